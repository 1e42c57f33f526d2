//! Activation checkpointing per transformer block, as a backward pass in segments.
//!
//! Without it, autodiff keeps every block's activations (the normalised inputs, q/k/v, the
//! attention output, the MLP's gate, up and gated products: ≈ (6 C + 4 F) floats per token and
//! layer, 2.4 MB per token for Qwen2.5-0.5B) until the backward pass. Here the forward pass
//! runs the blocks without a graph and keeps only each block's input (C floats per token and
//! layer); the backward pass then walks the segments from the top: the loss on the final
//! hidden state, then each block recomputed from its saved input under autodiff and
//! differentiated against the gradient of its output, then the embedding. One block's
//! activations are alive at a time, for about one more forward pass of compute.
//!
//! Burn 0.21's own checkpointing (`Autodiff<B, BalancedCheckpointing>`) does something else:
//! it recomputes *memory-bound* operations (element-wise ones) from the kept outputs of
//! *compute-bound* ones (matrix products), so the projections' outputs, most of a block's
//! activations, are still kept; it also changes the backend type that every binary names. A
//! recomputation nested inside a backward step is not possible either: burn-autodiff holds the
//! graph's lock while it runs the steps and a nested `backward` waits on it. Separate backward
//! passes, one per segment, are what is left, and they need nothing from Burn's internals.

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use crate::model::Transformer;

/// Whether a training pass recomputes each block in the backward pass instead of keeping its
/// activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Checkpointing {
    /// On for rows of at least [`Checkpointing::AUTO_FROM`] tokens, where activations dominate.
    #[default]
    Auto,
    On,
    Off,
}

impl Checkpointing {
    /// Row length from which `Auto` checkpoints.
    pub const AUTO_FROM: usize = 1024;

    /// Whether a pass over rows of `t` tokens checkpoints.
    pub fn applies(self, t: usize) -> bool {
        match self {
            Self::Auto => t >= Self::AUTO_FROM,
            Self::On => true,
            Self::Off => false,
        }
    }
}

/// Gradients of `loss(hidden)` for every parameter of `model`, with hidden =
/// `model.forward_hidden(tokens)`; block by block with `checkpoint` (same values up to float
/// summation order), in one backward pass otherwise.
///
/// # Shapes
/// - `tokens`: `[B, T]`; `loss` gets the final hidden states `[B, T, C]` and returns `[1]`
pub fn hidden_gradients<B: AutodiffBackend>(
    model: &Transformer<B>,
    tokens: Tensor<B, 2, Int>,
    checkpoint: bool,
    loss: impl FnOnce(Tensor<B, 3>) -> Tensor<B, 1>,
) -> GradientsParams {
    if !checkpoint {
        return GradientsParams::from_grads(loss(model.forward_hidden(tokens)).backward(), model);
    }
    let [b, t] = tokens.dims();
    let c = model.config.d_model;
    // Forward without a graph, keeping each block's input.
    let inner = model.valid();
    let rope = inner.sequence_rope(b, t);
    let mut x = inner.embed_tokens(tokens.clone().inner());
    let mut inputs = Vec::with_capacity(inner.blocks.len());
    for block in &inner.blocks {
        inputs.push(x.clone());
        x = block.forward(x, &rope, b, None, true, None);
    }
    drop(inner);
    let mut acc = GradientsAccumulator::<Transformer<B>>::new();
    // The head's segment: final norm, output head and the loss.
    let top = Tensor::<B, 2>::from_inner(x).require_grad();
    let mut grads = loss(model.norm.forward(top.clone()).reshape([b, t, c])).backward();
    let mut dx = top.grad(&grads).expect("the loss depends on the hidden states");
    acc.accumulate(model, GradientsParams::from_module(&mut grads, model));
    // Each block from the top, recomputed from its input.
    let rope = model.sequence_rope(b, t);
    for (block, input) in model.blocks.iter().zip(inputs).rev() {
        let x = Tensor::<B, 2>::from_inner(input).require_grad();
        let y = block.forward(x.clone(), &rope, b, None, true, None);
        let mut grads = (y * Tensor::from_inner(dx)).sum().backward();
        dx = x.grad(&grads).expect("a block's output depends on its input");
        acc.accumulate(model, GradientsParams::from_module(&mut grads, block));
    }
    // The embedding (tied heads add to the gradient the head's segment gave it); frozen
    // under LoRA, when there is nothing to differentiate.
    if !model.embed.weight.val().is_require_grad() {
        return acc.grads();
    }
    let e = model.embed_tokens(tokens);
    let mut grads = (e * Tensor::from_inner(dx)).sum().backward();
    acc.accumulate(model, GradientsParams::from_module(&mut grads, &model.embed));
    acc.grads()
}
