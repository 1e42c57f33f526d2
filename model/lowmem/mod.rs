//! Training memory linear in the sequence length: causal attention and the output head's
//! log-probs computed block by block, each with a backward pass of its own that recomputes
//! what it needs instead of keeping it.
//!
//! Burn 0.21's autodiff composes attention from `matmul`, `softmax` and `matmul`, and keeps
//! every layer's `[B, H, T, T]` scores and probabilities for the backward pass; log-probs
//! through the output head keep the `[B·T, V]` logits and their log-softmax. At a real model's
//! vocabulary (49 k–152 k) and reasoning-length rows (thousands of tokens) those two dominate a
//! training step's memory. Here each is one autodiff node that saves only its inputs and a
//! per-row log-sum-exp, and walks the rows in blocks whose size is bounded in bytes, so the
//! memory they add grows linearly with T:
//! - [`causal_attention`]: FlashAttention's algorithm (Dao et al. 2022; Rabe & Staats 2021 for
//!   the memory argument), blocked over query rows only. A block of n query rows sees keys
//!   0..e with e its last row + 1, so its scores are `[n, e]`: bounded by the block budget, and
//!   an exact softmax per block needs no online rescaling across key blocks. On the CPU
//!   backend it is a fused kernel (model/flex/flash.rs), taken at every length. Elsewhere rows
//!   short enough that a layer's scores cost less than its other activations take
//!   [`materialised_attention`] instead, which on the CPU was faster than the blocks in Burn
//!   operations (not measured on GPUs; [`materialise_short_rows`]).
//! - [`head_logprobs`]: token log-probs (and entropies) through the output head in chunks of
//!   rows, as Liger-Kernel's fused linear cross-entropy does, holding `[N, V]` only while it
//!   fits 1 GiB ([`KEEP_ELEMENTS`]).
//!
//! Both are written once in Burn tensor operations, so every backend runs them (the attention
//! with a fused CPU kernel beside). Autodiff
//! backends are recognised at run time (`Autodiff<I>` for the inner backends this crate
//! builds: flex, and wgpu, cuda or ndarray when their features are on), where the operation
//! registers its own node; any other backend gets the blocked forward composed of ordinary
//! (differentiable) operations: the same values, without the memory bound under autodiff.

mod attention;
mod head;
mod segments;

use std::any::Any;
use std::cell::Cell;

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::ops::FloatTensor;
use burn::tensor::TensorPrimitive;

pub use attention::{
    attention_block_rows, causal_attention, fused_kernel, materialise_short_rows, materialised_attention,
    set_blocked_always,
};
pub use head::{head_block_rows, head_logprobs, HeadOptions, KEEP_ELEMENTS};
pub use segments::{hidden_gradients, Checkpointing};

/// An `Autodiff<I>` float tensor (burn-autodiff keeps its type's name private).
pub(crate) type Tracked<I> = FloatTensor<Autodiff<I>>;

/// Elements in one block's largest intermediate (scores or logits): 4 Mi, 16 MiB in f32. A
/// backward pass holds about four such tensors at a time.
pub const BLOCK_ELEMENTS: usize = 1 << 22;

/// An operation with a backward pass of its own, written once for any inner backend `I`:
/// [`CustomOp::tracked`] gets the inputs as `Autodiff<I>` tensors and registers its node;
/// [`CustomOp::plain`] computes the same values with `B`'s own operations.
pub(crate) trait CustomOp<B: Backend, const N: usize>: Sized {
    fn tracked<I: Backend>(self, inputs: [Tracked<I>; N]) -> Vec<Tracked<I>>;
    fn plain(self, inputs: [FloatTensor<B>; N]) -> Vec<FloatTensor<B>>;
}

/// Runs `op` on `inputs` as a tracked node when `B` is `Autodiff<I>` for an inner backend built here, else plainly.
pub(crate) fn apply<B: Backend, const N: usize, Op: CustomOp<B, N>>(
    op: Op,
    inputs: [FloatTensor<B>; N],
) -> Vec<FloatTensor<B>> {
    let (op, inputs) = match on::<B, burn::backend::Flex, N, Op>(op, inputs) {
        Ok(out) => return out,
        Err(back) => back,
    };
    #[cfg(feature = "wgpu")]
    let (op, inputs) = match on::<B, burn::backend::Wgpu, N, Op>(op, inputs) {
        Ok(out) => return out,
        Err(back) => back,
    };
    #[cfg(feature = "cuda")]
    let (op, inputs) = match on::<B, burn::backend::Cuda, N, Op>(op, inputs) {
        Ok(out) => return out,
        Err(back) => back,
    };
    #[cfg(feature = "ndarray")]
    let (op, inputs) = match on::<B, burn::backend::NdArray, N, Op>(op, inputs) {
        Ok(out) => return out,
        Err(back) => back,
    };
    op.plain(inputs)
}

thread_local! {
    static TRACKED: Cell<usize> = const { Cell::new(0) };
}

/// How many operations of this module ran as their own autodiff node on this thread so far
/// (tests check that the memory-bounded path is the one taken).
pub fn tracked_ops() -> usize {
    TRACKED.with(Cell::get)
}

/// `op` as a tracked node of `Autodiff<I>` when that is what `B` is; else `op` and the inputs back.
// The `Err` side is the caller's own input handed back by value, not an error to propagate.
#[allow(clippy::result_large_err)]
fn on<B: Backend, I: Backend, const N: usize, Op: CustomOp<B, N>>(
    op: Op,
    inputs: [FloatTensor<B>; N],
) -> Result<Vec<FloatTensor<B>>, (Op, [FloatTensor<B>; N])> {
    if (&inputs[0] as &dyn Any)
        .downcast_ref::<FloatTensor<Autodiff<I>>>()
        .is_none()
    {
        return Err((op, inputs));
    }
    let inputs = inputs.map(|t| cast::<_, Tracked<I>>(t).expect("all inputs share a backend"));
    TRACKED.with(|n| n.set(n.get() + 1));
    Ok(op
        .tracked(inputs)
        .into_iter()
        .map(|t| cast(t).expect("outputs have the inputs' backend"))
        .collect())
}

/// `t` as a `U` when `T` is `U`, else `t` back.
pub(crate) fn cast<T: 'static, U: 'static>(t: T) -> Result<U, T> {
    let mut slot = Some(t);
    match (&mut slot as &mut dyn Any).downcast_mut::<Option<U>>() {
        Some(u) => Ok(u.take().expect("just filled")),
        None => Err(slot.expect("not taken")),
    }
}

/// A primitive as a tensor of rank `D`.
fn tensor<X: Backend, const D: usize>(p: FloatTensor<X>) -> Tensor<X, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// A tensor's float primitive.
fn primitive<X: Backend, const D: usize>(t: Tensor<X, D>) -> FloatTensor<X> {
    t.into_primitive().tensor()
}
