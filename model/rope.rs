//! Rotary position embedding, "rotate-half" convention (HF Llama/Qwen2 and `torch_ref.py`), so
//! pretrained checkpoints load without permuting q/k weights. Burn's own `RotaryEncoding` rotates
//! interleaved pairs instead, which is why this is written here.
//!
//! The angles are computed from explicit per-row positions rather than a fixed table slice: in a
//! ragged batch every row sits at its own position, and a cache slot is not a position.

use burn::prelude::*;

/// cos / sin of the rotation angles for a set of positions.
#[derive(Debug, Clone)]
pub struct Rope<B: Backend> {
    /// `[B', 1, W, D/2]` (B' is 1 when all rows share positions).
    cos: Tensor<B, 4>,
    /// `[B', 1, W, D/2]`
    sin: Tensor<B, 4>,
}

impl<B: Backend> Rope<B> {
    /// # Shapes
    /// - `positions`: `[B', W]` absolute token positions.
    pub fn new(positions: Tensor<B, 2, Int>, head_dim: usize, theta: f64) -> Self {
        let [rows, width] = positions.dims();
        let half = head_dim / 2;
        let device = positions.device();
        // inv_freq[i] = θ^(-2i/D), computed in f64 then rounded once to f32.
        let inv: Vec<f32> = (0..half)
            .map(|i| (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32)
            .collect();
        let inv = Tensor::<B, 1>::from_data(TensorData::new(inv, [half]), &device).reshape([1, 1, half]);
        let angles = positions.float().reshape([rows, width, 1]).mul(inv);
        let angles = angles.unsqueeze_dim::<4>(1);
        Self {
            cos: angles.clone().cos(),
            sin: angles.sin(),
        }
    }

    /// Rotates `x` by the stored angles.
    ///
    /// # Shapes
    /// - `x`: `[B, H, W, D]` → `[B, H, W, D]`
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [_, _, _, d] = x.dims();
        let half = d / 2;
        let x1 = x.clone().narrow(3, 0, half);
        let x2 = x.narrow(3, half, half);
        let first = x1.clone() * self.cos.clone() - x2.clone() * self.sin.clone();
        let second = x2 * self.cos.clone() + x1 * self.sin.clone();
        Tensor::cat(vec![first, second], 3)
    }
}
