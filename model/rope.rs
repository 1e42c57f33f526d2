//! Rotary position embedding, "rotate-half" convention (HF Llama/Qwen2 and `torch_ref.py`), so
//! pretrained checkpoints load without permuting q/k weights. Burn's own `RotaryEncoding` rotates
//! interleaved pairs instead, which is why this is written here.
//!
//! `rope(x) = x ⊙ cos + rotate_half(x) ⊙ sin`, with `rotate_half(x) = [−x₂, x₁]` computed as a
//! product with a fixed ±1 permutation matrix and the cos/sin tables laid out exactly like the
//! projections' output. Every operation is then a dense, same-shape one: on CPU backends a
//! broadcast or a half-width slice runs a strided slow path that cost more than the matmul.
//!
//! The angles come from explicit per-row positions: in a ragged batch every row sits at its own
//! position, and a cache slot is not a position.
//!
//! On Burn's fused GPU backends (`fusion<cubecl<…>>`: wgpu and CUDA) the permutation product is
//! replaced by a flip of the two halves and a sign: with fusion and autotuning at their default
//! settings, Burn 0.21 computes a wrong backward pass for the model when the rotation is a matmul
//! (query or key projection gradients off by ~50 % of their scale, found by `tests/wgpu.rs`; the
//! logits are right, and `CUBECL_AUTOTUNE_LEVEL=minimal` or an unfused backend hide it). The
//! flip is elementwise work that fuses cleanly. Reproduction and write-up for Burn:
//! `docs/burn-fusion-rope-gradient.md`.

use burn::prelude::*;

/// cos / sin tables for one forward call, shaped like the query and key projections.
#[derive(Debug, Clone)]
pub struct Rope<B: Backend> {
    /// `[B·W·H, D]`
    cos_q: Tensor<B, 2>,
    sin_q: Tensor<B, 2>,
    /// `[B·W·KVH, D]` (the query tables when KVH = H)
    cos_k: Tensor<B, 2>,
    sin_k: Tensor<B, 2>,
    rotation: Rotation<B>,
}

/// How `rotate_half` is computed, chosen once per forward call with the tensors it needs already on
/// the device, so `apply` (two calls per layer) uploads nothing.
#[derive(Debug, Clone)]
enum Rotation<B: Backend> {
    /// `x @ rot = rotate_half(x)`, `rot` a `[D, D]` ±1 permutation: unfused backends.
    Matmul(Tensor<B, 2>),
    /// `[x₁, x₂] → [x₂, x₁] ⊙ sign`, `sign = [−1, 1]` shaped `[1, 2, 1]`: fused backends.
    Flip(Tensor<B, 3>),
}

impl<B: Backend> Rope<B> {
    /// # Shapes
    /// - `positions`: `[B', W]` absolute positions; B' is 1 (shared by all `batch` rows) or `batch`.
    pub fn new(
        positions: Tensor<B, 2, Int>,
        batch: usize,
        head_dim: usize,
        heads: usize,
        kv_heads: usize,
        theta: f64,
    ) -> Self {
        let [rows, width] = positions.dims();
        let (d, half) = (head_dim, head_dim / 2);
        let device = positions.device();
        // inv_freq[i] = θ^(-2i/D), computed in f64 then rounded once to f32.
        let inv: Vec<f32> = (0..half)
            .map(|i| (1.0 / theta.powf(2.0 * i as f64 / d as f64)) as f32)
            .collect();
        let inv = Tensor::<B, 1>::from_data(TensorData::new(inv, [half]), &device).reshape([1, half]);
        let angles = positions.float().reshape([rows * width, 1]).mul(inv); // [B'·W, D/2]
        let angles = Tensor::cat(vec![angles.clone(), angles], 1).reshape([rows, width, 1, d]);
        let table = |t: Tensor<B, 4>, h: usize| t.repeat(&[batch / rows, 1, h, 1]).reshape([batch * width * h, d]);
        let (cos, sin) = (angles.clone().cos(), angles.sin());
        let (cos_q, sin_q) = (table(cos.clone(), heads), table(sin.clone(), heads));
        let (cos_k, sin_k) = if kv_heads == heads {
            (cos_q.clone(), sin_q.clone())
        } else {
            (table(cos, kv_heads), table(sin, kv_heads))
        };
        let rotation = if B::name(&device).contains("fusion<") {
            Rotation::Flip(Tensor::<B, 1>::from_floats([-1.0, 1.0], &device).reshape([1, 2, 1]))
        } else {
            let mut rot = vec![0.0f32; d * d];
            for i in 0..half {
                rot[(i + half) * d + i] = -1.0; // out[i] = −x[i + D/2]
                rot[i * d + i + half] = 1.0; // out[i + D/2] = x[i]
            }
            Rotation::Matmul(Tensor::from_data(TensorData::new(rot, [d, d]), &device))
        };
        Self {
            cos_q,
            sin_q,
            cos_k,
            sin_k,
            rotation,
        }
    }

    /// # Shapes
    /// `[B·W, H·D]` → `[B·W, H·D]`
    pub fn apply_q(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.apply(x, &self.cos_q, &self.sin_q)
    }

    /// # Shapes
    /// `[B·W, KVH·D]` → `[B·W, KVH·D]`
    pub fn apply_k(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.apply(x, &self.cos_k, &self.sin_k)
    }

    fn apply(&self, x: Tensor<B, 2>, cos: &Tensor<B, 2>, sin: &Tensor<B, 2>) -> Tensor<B, 2> {
        let [n, width] = x.dims();
        let [rows, d] = cos.dims();
        let x = x.reshape([rows, d]);
        let rotated = match &self.rotation {
            Rotation::Matmul(rot) => x.clone().matmul(rot.clone()),
            // [x₁, x₂] → [x₂, x₁] → [−x₂, x₁]
            Rotation::Flip(sign) => (x.clone().reshape([rows, 2, d / 2]).flip([1]) * sign.clone()).reshape([rows, d]),
        };
        (x * cos.clone() + rotated * sin.clone()).reshape([n, width])
    }
}
