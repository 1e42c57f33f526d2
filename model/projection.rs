//! A linear projection of a block (q, k, v, o, gate, up, down) with an optional LoRA adapter
//! (Hu et al. 2021): y = x W + b + (α / r) · (x A) B, with A `[in, r]`, B `[r, out]`.
//!
//! The parameters keep `Linear`'s names (`weight`, `bias`), so checkpoints written before
//! adapters existed read unchanged (their records simply have no `lora`). The adapter is
//! applied beside the frozen weight on every pass, training and decoding alike: nothing is
//! merged until export ([`Projection::merged`]).

use burn::module::Param;
use burn::nn::Linear;
use burn::prelude::*;

use super::precision::{linear, ACTIVATIONS};

/// A rank-r update `(α / r) · A B` of a `[in, out]` weight.
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    /// `[in, r]`
    pub a: Param<Tensor<B, 2>>,
    /// `[r, out]`; zero at initialisation, so the adapted model starts as its base.
    pub b: Param<Tensor<B, 2>>,
    /// The scaling numerator α (PEFT's `lora_alpha`); the update is scaled by α / r.
    pub alpha: f64,
}

impl<B: Backend> Lora<B> {
    pub fn rank(&self) -> usize {
        self.a.dims()[1]
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank() as f64
    }

    /// `[N, in]` → `[N, out]`. The scale multiplies the narrow `[N, r]` product.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        x.matmul(self.a.val()).mul_scalar(self.scale()).matmul(self.b.val())
    }

    /// The dense update `(α / r) · A B`, `[in, out]`.
    pub fn delta(&self) -> Tensor<B, 2> {
        self.a.val().mul_scalar(self.scale()).matmul(self.b.val())
    }
}

#[derive(Module, Debug)]
pub struct Projection<B: Backend> {
    /// `[in, out]` (Burn's layout; PyTorch stores `[out, in]`)
    pub weight: Param<Tensor<B, 2>>,
    /// `[out]`
    pub bias: Option<Param<Tensor<B, 1>>>,
    pub lora: Option<Lora<B>>,
}

impl<B: Backend> From<Linear<B>> for Projection<B> {
    fn from(l: Linear<B>) -> Self {
        Self {
            weight: l.weight,
            bias: l.bias,
            lora: None,
        }
    }
}

impl<B: Backend> Projection<B> {
    /// `[N, in]` → `[N, out]`. Without an adapter this is exactly `Linear::forward` (a weight
    /// in half precision multiplies in its own type: model/precision.rs); with one whose B is
    /// zero, the same values plus exact zeros.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let bias = self.bias.as_ref().map(|b| b.val());
        match &self.lora {
            None => linear(x, self.weight.val(), bias),
            Some(lora) => linear(x.clone(), self.weight.val(), bias) + lora.forward(x),
        }
    }

    /// Folds the adapter into the weight: `W + (α / r) A B` in f32 (a half-precision base is
    /// widened first), no adapter left.
    pub fn merge(&mut self) {
        if let Some(lora) = self.lora.take() {
            self.weight = Param::from_tensor(self.weight.val().cast(ACTIVATIONS) + lora.delta());
        }
    }

    /// `[in, out]`
    pub fn dims(&self) -> [usize; 2] {
        self.weight.dims()
    }
}
