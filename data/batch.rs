//! Batching: right-padded token tensors with the per-target loss mask.

use burn::prelude::*;

use super::trace::Tokenized;

/// A padded batch of sequences.
#[derive(Debug, Clone)]
pub struct SeqBatch<B: Backend> {
    /// `[B, T]` token ids, right-padded with `pad`.
    pub tokens: Tensor<B, 2, Int>,
    /// `[B, T − 1]`: 1 where target `tokens[b, t + 1]` is a trainable (policy) token.
    pub mask: Tensor<B, 2>,
    /// Real length of each row.
    pub lengths: Vec<usize>,
    /// Number of trainable targets in the batch.
    pub targets: usize,
}

/// Pads `seqs` (each at least 2 tokens) to the longest one.
pub fn collate<B: Backend>(seqs: &[&Tokenized], pad: u32, device: &B::Device) -> SeqBatch<B> {
    let t = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(2).max(2);
    let b = seqs.len();
    let mut ids = Vec::with_capacity(b * t);
    let mut mask = Vec::with_capacity(b * (t - 1));
    for s in seqs {
        ids.extend(s.ids.iter().map(|&i| i as i64));
        ids.extend(std::iter::repeat_n(pad as i64, t - s.ids.len()));
        for k in 1..t {
            let m = s.trainable.get(k).copied().unwrap_or(false);
            mask.push(if m { 1.0f32 } else { 0.0 });
        }
    }
    SeqBatch {
        tokens: Tensor::from_data(TensorData::new(ids, [b, t]), device),
        mask: Tensor::from_data(TensorData::new(mask, [b, t - 1]), device),
        lengths: seqs.iter().map(|s| s.ids.len()).collect(),
        targets: seqs.iter().map(|s| s.targets()).sum(),
    }
}
