//! Rollouts → padded training tensors. A rollout's sampled-token mask drives every loss mask:
//! the prompt, environment replies, forced suffixes, an MRT prefix and padding are never trained.

use burn::prelude::*;

use super::rollout::Rollout;

/// Training tensors of a set of rollouts, aligned with the targets (`[N, T − 1]`).
pub struct RolloutBatch<B: Backend> {
    /// `[N, T]`
    pub tokens: Tensor<B, 2, Int>,
    /// 1 on trained target tokens.
    pub mask: Tensor<B, 2>,
    /// Per-target advantage.
    pub advantages: Tensor<B, 2>,
    /// Trained tokens in the batch.
    pub trained_tokens: usize,
}

/// `token_advantages[i][t]` is the advantage of token t of rollout i (indexed like its tokens);
/// `keep[i]` false drops rollout i from the loss entirely.
pub fn rollout_batch<B: Backend>(
    rollouts: &[&Rollout],
    token_advantages: &[Vec<f32>],
    keep: &[bool],
    pad: u32,
    device: &B::Device,
) -> RolloutBatch<B> {
    let n = rollouts.len();
    let t = rollouts.iter().map(|r| r.tokens.len()).max().unwrap_or(2).max(2);
    let mut ids = Vec::with_capacity(n * t);
    let mut mask = Vec::with_capacity(n * (t - 1));
    let mut adv = Vec::with_capacity(n * (t - 1));
    let mut trained = 0;
    for ((r, a), &k) in rollouts.iter().zip(token_advantages).zip(keep) {
        ids.extend(r.tokens.iter().map(|&i| i as i64));
        ids.extend(std::iter::repeat_n(pad as i64, t - r.tokens.len()));
        let trainable = r.trainable();
        for pos in 1..t {
            let m = k && trainable.get(pos).copied().unwrap_or(false);
            trained += m as usize;
            mask.push(m as u8 as f32);
            adv.push(if m { a[pos] } else { 0.0 });
        }
    }
    RolloutBatch {
        tokens: Tensor::from_data(TensorData::new(ids, [n, t]), device),
        mask: Tensor::from_data(TensorData::new(mask, [n, t - 1]), device),
        advantages: Tensor::from_data(TensorData::new(adv, [n, t - 1]), device),
        trained_tokens: trained,
    }
}
