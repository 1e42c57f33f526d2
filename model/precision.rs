//! Half-precision frozen weights under LoRA: the base's matrices (every projection's weight,
//! the embedding table and the output head) stored in bf16 or f16, everything else in f32.
//!
//! A frozen base needs no f32 master copy: nothing updates it. Halving its matrices halves
//! the largest part of a LoRA run's memory (a 1.5 B model: 6.6 → 3.3 GiB). The adapters,
//! their gradients and AdamW's moments, the norms' weights, the biases, the activations, the
//! KV cache and every softmax stay f32. A product with a half weight casts its f32 input to
//! the weight's type, multiplies there (the GPU backends' matrix kernels accumulate in f32)
//! and casts the result back, so the activations between operations are f32 and the
//! gradients that reach the adapters are f32; the casts are differentiable.
//!
//! On the CPU backend the default stays f32: flex multiplies bf16 by converting both operands
//! to f32 per product, which costs time, not memory (BENCHMARKS.md).

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::module::linear as plain_linear;
use burn::tensor::{DType, FloatDType};
use serde::{Deserialize, Serialize};

use super::flex::packed_matmul;
use super::lora::Target;
use super::transformer::Transformer;
use crate::error::{Error, Result};

/// The type of the activations, and of every weight that is trained.
pub const ACTIVATIONS: FloatDType = FloatDType::F32;

/// What a LoRA run stores its frozen base's matrices in (`rl.lora.base_precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BasePrecision {
    /// bf16 on GPU backends (f16 where the device lacks bf16; f32 where it lacks both), f32
    /// on the CPU.
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
}

impl BasePrecision {
    /// The type to store the base in on `device` of backend `B`; `cpu` says whether `B` is a
    /// CPU backend (which `Auto` leaves at f32). An explicit half type the device cannot
    /// compute in is an error naming it.
    pub fn resolve<B: Backend>(self, device: &B::Device, cpu: bool) -> Result<FloatDType> {
        let supports = |t: FloatDType| B::supports_dtype(device, DType::from(t));
        let wanted = match self {
            Self::Auto if cpu => return Ok(FloatDType::F32),
            Self::Auto => {
                return Ok([FloatDType::BF16, FloatDType::F16]
                    .into_iter()
                    .find(|&t| supports(t))
                    .unwrap_or(FloatDType::F32))
            }
            Self::F32 => return Ok(FloatDType::F32),
            Self::Bf16 => FloatDType::BF16,
            Self::F16 => FloatDType::F16,
        };
        if supports(wanted) {
            Ok(wanted)
        } else {
            Err(Error::config(
                "rl.lora.base_precision",
                format!("{self:?}").to_lowercase(),
                "is not supported by this device (try auto or f32)",
            ))
        }
    }
}

/// `x w` with `x` in the activations' type and `w` in any float type: computed in `w`'s type
/// (so a half weight is never widened in memory) and returned in `x`'s.
///
/// # Shapes
/// `x`: `[N, K]`, `w`: `[K, M]` → `[N, M]`
pub fn matmul<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
    // A large model decoding on the CPU: the weight packed once (model/flex/packed.rs).
    if let Some(y) = packed_matmul(&x, &w) {
        return y;
    }
    let (xt, wt) = (x.dtype(), w.dtype());
    if xt == wt {
        return x.matmul(w);
    }
    x.cast(FloatDType::from(wt)).matmul(w).cast(FloatDType::from(xt))
}

/// `x w + b` (Burn's `linear`) through [`matmul`]; the bias stays f32.
pub fn linear<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>, b: Option<Tensor<B, 1>>) -> Tensor<B, 2> {
    let y = match packed_matmul(&x, &w) {
        Some(y) => y,
        None if x.dtype() == w.dtype() => return plain_linear(x, w, b),
        None => matmul(x, w),
    };
    match b {
        Some(b) => y + b.unsqueeze(),
        None => y,
    }
}

fn cast<B: Backend, const D: usize>(p: &mut Param<Tensor<B, D>>, dtype: FloatDType) {
    if p.val().dtype() != DType::from(dtype) {
        // Same id; detached, so a frozen weight stays off the autodiff graph.
        *p = p.clone().map(|t| t.detach().cast(dtype));
    }
}

impl<B: Backend> Transformer<B> {
    /// This model with its base's matrices (projection weights, embedding, head) in `dtype`;
    /// adapters, norms and biases are left as they are. For a frozen base only: a weight
    /// stored in half precision cannot be trained (`f32` puts a model back).
    pub fn with_base_dtype(mut self, dtype: FloatDType) -> Self {
        for block in &mut self.blocks {
            for t in Target::ALL {
                cast(&mut t.of_mut(block).weight, dtype);
            }
        }
        cast(&mut self.embed.weight, dtype);
        if let Some(head) = &mut self.head {
            cast(&mut head.weight, dtype);
        }
        self
    }

    /// The type the base's matrices are stored in (the embedding's).
    pub fn base_dtype(&self) -> FloatDType {
        self.embed.weight.val().dtype().into()
    }

    /// Token embeddings in the activations' type: `[B, T]` → `[B·T, C]`.
    pub fn embed_tokens(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        let [b, t] = tokens.dims();
        let x = self.embed.forward(tokens).reshape([b * t, self.config.d_model]);
        if x.dtype() == DType::from(ACTIVATIONS) {
            x
        } else {
            x.cast(ACTIVATIONS)
        }
    }
}
