//! Rollouts and their training signal → padded training tensors. A rollout's sampled-token mask
//! drives every loss mask: the prompt, environment replies, forced suffixes, an MRT prefix and
//! padding are never trained.
//!
//! The loss is `Σ_t c_t · ℓ_t` with a per-token coefficient c_t that carries each term's own
//! normalisation: `c_t = [outcome] A_i / N_outcome + [progress] bonus_t / N_progress`, where
//! N_outcome counts the trained tokens of the rollouts in the outcome term and N_progress those
//! of the rollouts in the progress term. So the outcome term is token-mean aggregated over
//! exactly the tokens GRPO would train, however many all-equal groups the progress term adds
//! to the batch, and α = 0 reproduces GRPO bit for bit.

use std::ops::Range;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::rollout::Rollout;

/// What one rollout contributes to the loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signal {
    /// Advantage of the outcome term on every trained token (GRPO, MRT), or the weight of a
    /// supervised sample (STaR: 1).
    pub outcome: f32,
    /// Whether the rollout is in the outcome term (GRPO drops all-equal groups, STaR keeps
    /// only the selected streams).
    pub in_outcome: bool,
    /// MRT dense: the per-token progress bonus (indexed like the rollout's tokens); the
    /// rollout is then in the progress term.
    pub bonus: Option<Vec<f32>>,
}

impl Signal {
    /// A rollout in the outcome term only.
    pub fn outcome(advantage: f32, kept: bool) -> Self {
        Self {
            outcome: advantage,
            in_outcome: kept,
            bonus: None,
        }
    }
}

/// Training tensors of a set of rollouts, aligned with the targets (`[N, T − 1]`).
pub struct RolloutBatch<B: Backend> {
    /// `[N, T]`
    pub tokens: Tensor<B, 2, Int>,
    /// 1 on trained target tokens (in either term).
    pub mask: Tensor<B, 2>,
    /// Per-target coefficient c_t, normalisation included (0 off the mask).
    pub coef: Tensor<B, 2>,
    /// Trained tokens in the batch, and in each term.
    pub trained_tokens: usize,
    pub outcome_tokens: usize,
    pub progress_tokens: usize,
    /// Σ |c_t| of each term over the trained tokens: the term's share of the update is its mass
    /// over both (the gradient is Σ c_t ∇log π, so a term with 6 % of the mass moves the policy
    /// about 6 % as much as one with all of it).
    pub outcome_mass: f64,
    pub progress_mass: f64,
    /// The tensors hold a share of the step's rows (a data-parallel peer's) while the token
    /// counts, the coefficients' normalisation and the masses are the whole step's.
    pub sharded: bool,
}

impl<B: Backend> RolloutBatch<B> {
    /// The outcome term's share of Σ |c_t| (NaN when nothing is trained).
    pub fn outcome_share(&self) -> f64 {
        self.outcome_mass / (self.outcome_mass + self.progress_mass)
    }
}

/// Builds the batch; `signals[i]` is rollout i's training signal.
pub fn rollout_batch<B: Backend>(
    rollouts: &[&Rollout],
    signals: &[Signal],
    pad: u32,
    device: &B::Device,
) -> RolloutBatch<B> {
    shard_batch(rollouts, signals, 0..rollouts.len(), pad, device)
}

/// The batch of `rows` of a step's rollouts, normalised over all of them: a data-parallel
/// peer's share, whose losses add up over the peers to the one-device loss.
pub fn shard_batch<B: Backend>(
    rollouts: &[&Rollout],
    signals: &[Signal],
    rows: Range<usize>,
    pad: u32,
    device: &B::Device,
) -> RolloutBatch<B> {
    assert_eq!(rollouts.len(), signals.len(), "one signal per rollout");
    let all = rollouts.len();
    let trainable: Vec<Vec<bool>> = rollouts.iter().map(|r| r.trainable()).collect();
    let count = |r: usize| trainable[r].iter().skip(1).filter(|&&x| x).count();
    let in_loss = |i: usize| signals[i].in_outcome || signals[i].bonus.is_some();
    let outcome_tokens: usize = (0..all).filter(|&i| signals[i].in_outcome).map(count).sum();
    let progress_tokens: usize = (0..all).filter(|&i| signals[i].bonus.is_some()).map(count).sum();
    let trained: usize = (0..all).filter(|&i| in_loss(i)).map(count).sum();
    let per_outcome = 1.0 / outcome_tokens.max(1) as f32;
    let per_progress = 1.0 / progress_tokens.max(1) as f32;

    let sharded = rows != (0..all);
    let n = rows.len();
    let t = rows.clone().map(|i| rollouts[i].tokens.len()).max().unwrap_or(2).max(2);
    let mut ids = Vec::with_capacity(n * t);
    let mut mask = Vec::with_capacity(n * (t - 1));
    let mut coef = Vec::with_capacity(n * (t - 1));
    // The update's composition over the whole step (every peer holds every rollout's signal).
    let (mut outcome_mass, mut progress_mass) = (0.0f64, 0.0f64);
    for (i, s) in signals.iter().enumerate().filter(|&(i, _)| in_loss(i)) {
        for pos in (1..rollouts[i].tokens.len()).filter(|&pos| trainable[i].get(pos).copied().unwrap_or(false)) {
            if s.in_outcome {
                outcome_mass += (s.outcome * per_outcome).abs() as f64;
            }
            if let Some(bonus) = &s.bonus {
                progress_mass += (bonus[pos] * per_progress).abs() as f64;
            }
        }
    }
    for i in rows {
        let (r, s) = (rollouts[i], &signals[i]);
        ids.extend(r.tokens.iter().map(|&x| x as i64));
        ids.extend(std::iter::repeat_n(pad as i64, t - r.tokens.len()));
        for pos in 1..t {
            let m = in_loss(i) && trainable[i].get(pos).copied().unwrap_or(false);
            mask.push(m as u8 as f32);
            let mut c = 0.0;
            if m && s.in_outcome {
                c += s.outcome * per_outcome;
            }
            if let (true, Some(bonus)) = (m, &s.bonus) {
                c += bonus[pos] * per_progress;
            }
            coef.push(c);
        }
    }
    RolloutBatch {
        tokens: Tensor::from_data(TensorData::new(ids, [n, t]), device),
        mask: Tensor::from_data(TensorData::new(mask, [n, t - 1]), device),
        coef: Tensor::from_data(TensorData::new(coef, [n, t - 1]), device),
        trained_tokens: trained,
        outcome_tokens,
        progress_tokens,
        outcome_mass,
        progress_mass,
        sharded,
    }
}
