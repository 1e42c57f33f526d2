//! One pre-norm transformer block: x + Attn(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)).

use burn::nn::{RmsNorm, RmsNormConfig};
use burn::prelude::*;

use super::attention::Attention;
use super::cache::LayerKv;
use super::config::TransformerConfig;
use super::flex::swiglu;
use super::init::HostInit;
use super::projection::Projection;
use super::rope::Rope;

/// SwiGLU MLP: down(silu(gate(x)) ⊙ up(x)).
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// `[C, F]`
    pub gate: Projection<B>,
    /// `[C, F]`
    pub up: Projection<B>,
    /// `[F, C]`
    pub down: Projection<B>,
}

impl<B: Backend> Mlp<B> {
    /// # Shapes
    /// `[N, C]` → `[N, C]`
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        // silu(gate) ⊙ up, fused on the CPU backend (model/flex/swiglu.rs).
        let hidden = swiglu(self.gate.forward(x.clone()), self.up.forward(x));
        self.down.forward(hidden)
    }
}

#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub attn_norm: RmsNorm<B>,
    pub attn: Attention<B>,
    pub mlp_norm: RmsNorm<B>,
    pub mlp: Mlp<B>,
}

impl<B: Backend> Block<B> {
    pub fn init(config: &TransformerConfig, init: &mut HostInit<'_, B>) -> Self {
        let (d, device) = (config.d_model, init.device);
        // GPT-2's scaling of the projections that write into the residual stream keeps its
        // variance independent of depth.
        let out_std = init.std / (2.0 * config.n_layers as f64).sqrt();
        let norm = || RmsNormConfig::new(d).with_epsilon(config.norm_eps).init(device);
        Self {
            attn_norm: norm(),
            attn: Attention::init(d, config.n_heads, config.n_kv_heads, config.qkv_bias, out_std, init),
            mlp_norm: norm(),
            mlp: Mlp {
                gate: init.linear(d, config.d_ff, init.std).into(),
                up: init.linear(d, config.d_ff, init.std).into(),
                down: init.linear(config.d_ff, d, out_std).into(),
            },
        }
    }

    /// # Shapes
    /// `x`: `[B·W, C]`, `mask`: `[B, 1, W, Tk]` → `[B·W, C]` (see [`Attention::forward`])
    pub fn forward(
        &self,
        x: Tensor<B, 2>,
        rope: &Rope<B>,
        batch: usize,
        mask: Option<Tensor<B, 4, Bool>>,
        causal: bool,
        cache: Option<(&mut LayerKv<B>, usize)>,
    ) -> Tensor<B, 2> {
        let x = x.clone()
            + self
                .attn
                .forward(self.attn_norm.forward(x), rope, batch, mask, causal, cache);
        x.clone() + self.mlp.forward(self.mlp_norm.forward(x))
    }
}
