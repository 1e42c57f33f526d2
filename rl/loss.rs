//! Losses on per-token log-probs, token-mean aggregated (every trained token weighs the same,
//! whichever rollout it is in).
//!
//! Policy gradient (PPO-clip form): with ρ_t = π(y_t)/π_old(y_t),
//! `ℓ_t = −min(ρ_t A_t, clip(ρ_t, 1 − ε, 1 + ε) A_t) + β · KL_t`, where KL_t is the k3
//! estimator `e^{q−p} − (q − p) − 1` of KL(π ‖ π_ref) (q = log π_ref, p = log π). With one
//! optimizer pass per batch ρ = 1 and this is the plain policy gradient −A ∇log π.

use burn::prelude::*;

/// Inputs, all `[N, T − 1]` aligned with the targets.
pub struct PgBatch<B: Backend> {
    /// Current policy log-probs (with gradient).
    pub logp: Tensor<B, 2>,
    /// Behaviour log-probs (π_old), detached.
    pub old_logp: Tensor<B, 2>,
    /// Reference log-probs for the KL penalty, detached.
    pub ref_logp: Option<Tensor<B, 2>>,
    pub advantages: Tensor<B, 2>,
    /// 1 on trained tokens.
    pub mask: Tensor<B, 2>,
}

/// The loss and its diagnostics (diagnostics are detached scalars).
pub struct PgOutput<B: Backend> {
    pub loss: Tensor<B, 1>,
    /// Mean of `old_logp − logp` over trained tokens (≈ KL(π_old ‖ π)).
    pub approx_kl: Tensor<B, 1>,
    /// Fraction of trained tokens whose ratio was clipped.
    pub clip_fraction: Tensor<B, 1>,
    /// Mean k3 KL to the reference (0 without one).
    pub ref_kl: Tensor<B, 1>,
}

fn token_mean<B: Backend>(x: Tensor<B, 2>, mask: &Tensor<B, 2>) -> Tensor<B, 1> {
    (x * mask.clone()).sum() / mask.clone().sum().clamp_min(1.0)
}

pub fn policy_loss<B: Backend>(batch: PgBatch<B>, clip_eps: f64, kl_beta: f64) -> PgOutput<B> {
    let PgBatch { logp, old_logp, ref_logp, advantages, mask } = batch;
    let delta = logp.clone() - old_logp.clone();
    let ratio = delta.clone().exp();
    let unclipped = ratio.clone() * advantages.clone();
    let clipped = ratio.clone().clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages;
    // −min(a, b) = max(−a, −b)
    let pg = (-unclipped.clone()).max_pair(-clipped.clone());
    let was_clipped = unclipped.not_equal(clipped).float();
    let (kl_term, ref_kl) = match ref_logp {
        Some(q) => {
            let d = q - logp.clone();
            let k3 = d.clone().exp() - d - 1.0;
            (Some(k3.clone()), token_mean(k3.detach(), &mask))
        }
        None => (None, Tensor::zeros([1], &mask.device())),
    };
    let per_token = match kl_term {
        Some(k3) if kl_beta > 0.0 => pg + k3 * kl_beta,
        _ => pg,
    };
    PgOutput {
        loss: token_mean(per_token, &mask),
        approx_kl: token_mean((-delta).detach(), &mask),
        clip_fraction: token_mean(was_clipped.detach(), &mask),
        ref_kl,
    }
}

/// Supervised loss: mean negative log-likelihood of the masked tokens.
pub fn sft_loss<B: Backend>(logp: Tensor<B, 2>, mask: &Tensor<B, 2>) -> Tensor<B, 1> {
    -token_mean(logp, mask)
}
