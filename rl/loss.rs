//! Losses on per-token log-probs.
//!
//! Policy gradient (PPO-clip form): with ρ_t = π(y_t)/π_old(y_t) and the per-token coefficient
//! c_t of `rl/batch.rs` (advantage with its term's normalisation),
//! `ℓ = Σ_t −min(ρ_t c_t, clip(ρ_t, 1 − ε, 1 + ε) c_t) + β · mean_t KL_t`, where KL_t is the k3
//! estimator `e^{q−p} − (q − p) − 1` of KL(π ‖ π_ref) (q = log π_ref, p = log π). With one
//! optimizer pass per batch ρ = 1 and this is the plain policy gradient −Σ c_t ∇log π.

use burn::prelude::*;

/// Inputs, all `[N, T − 1]` aligned with the targets.
pub struct PgBatch<B: Backend> {
    /// Current policy log-probs (with gradient).
    pub logp: Tensor<B, 2>,
    /// Behaviour log-probs (π_old), detached.
    pub old_logp: Tensor<B, 2>,
    /// Reference log-probs for the KL penalty, detached.
    pub ref_logp: Option<Tensor<B, 2>>,
    /// Per-token coefficient c_t (advantage / its term's token count).
    pub coef: Tensor<B, 2>,
    /// 1 on trained tokens.
    pub mask: Tensor<B, 2>,
}

/// The loss and its diagnostics (diagnostics are detached scalars).
pub struct PgOutput<B: Backend> {
    pub loss: Tensor<B, 1>,
    /// Mean of `old_logp − logp` over trained tokens (≈ KL(π_old ‖ π)).
    pub approx_kl: Tensor<B, 1>,
    /// Fraction of trained tokens where the clipped branch of the min is the one taken (the
    /// token's gradient is cut off).
    pub clip_fraction: Tensor<B, 1>,
    /// Mean k3 KL to the reference (0 without one).
    pub ref_kl: Tensor<B, 1>,
}

fn token_mean<B: Backend>(x: Tensor<B, 2>, mask: &Tensor<B, 2>) -> Tensor<B, 1> {
    (x * mask.clone()).sum() / mask.clone().sum().clamp_min(1.0)
}

pub fn policy_loss<B: Backend>(batch: PgBatch<B>, clip_eps: f64, kl_beta: f64) -> PgOutput<B> {
    let PgBatch {
        logp,
        old_logp,
        ref_logp,
        coef,
        mask,
    } = batch;
    let delta = logp.clone() - old_logp.clone();
    let ratio = delta.clone().exp();
    let unclipped = -(ratio.clone() * coef.clone());
    let clipped = -(ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * coef);
    // −min(a, b) = max(−a, −b): the clipped branch is taken where its loss is strictly larger.
    let took_clipped = clipped.clone().greater(unclipped.clone()).float();
    let pg = unclipped.max_pair(clipped);
    let (kl_term, ref_kl) = match ref_logp {
        Some(q) => {
            let d = q - logp.clone();
            let k3 = d.clone().exp() - d - 1.0;
            (Some(k3.clone()), token_mean(k3.detach(), &mask))
        }
        None => (None, Tensor::zeros([1], &mask.device())),
    };
    let mut loss = (pg * mask.clone()).sum();
    if let (Some(k3), true) = (kl_term, kl_beta > 0.0) {
        loss = loss + token_mean(k3, &mask) * kl_beta;
    }
    PgOutput {
        loss,
        approx_kl: token_mean((-delta).detach(), &mask),
        clip_fraction: token_mean(took_clipped.detach(), &mask),
        ref_kl,
    }
}

/// Supervised loss: mean negative log-likelihood of the masked tokens.
pub fn sft_loss<B: Backend>(logp: Tensor<B, 2>, mask: &Tensor<B, 2>) -> Tensor<B, 1> {
    -token_mean(logp, mask)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    fn one(x: f32) -> Tensor<Flex, 2> {
        Tensor::from_data([[x]], &Default::default())
    }

    #[test]
    fn clip_fraction_counts_only_where_the_clipped_branch_is_taken() {
        let frac = |logp: f32, old: f32, c: f32| -> f32 {
            let out = policy_loss(
                PgBatch {
                    logp: one(logp),
                    old_logp: one(old),
                    ref_logp: None,
                    coef: one(c),
                    mask: one(1.0),
                },
                0.2,
                0.0,
            );
            out.clip_fraction.into_scalar()
        };
        // ρ = e^{−1} < 1 − ε: with c > 0 the min takes the unclipped ρc (gradient flows) …
        assert_eq!(frac(-2.0, -1.0, 1.0), 0.0);
        // … with c < 0 the clipped (1 − ε)c (no gradient).
        assert_eq!(frac(-2.0, -1.0, -1.0), 1.0);
        // ρ = e > 1 + ε: clipped for c > 0, not for c < 0.
        assert_eq!(frac(0.0, -1.0, 1.0), 1.0);
        assert_eq!(frac(0.0, -1.0, -1.0), 0.0);
        // Inside the band nothing is clipped.
        assert_eq!(frac(-1.0, -1.05, 1.0), 0.0);
    }
}
