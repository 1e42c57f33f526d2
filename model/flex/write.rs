//! Writing new keys/values into a KV cache buffer without copying the buffer.
//!
//! `slice_assign` is the portable way to write a chunk into the cache, and on the GPU backends
//! it runs in place. Burn-flex 0.21 always copies the whole destination instead: its
//! `slice_assign` makes a contiguous handle with `to_contiguous(&self)`, which clones the
//! buffer's `Arc`, so the copy-on-write check that follows never sees a unique buffer. During
//! decoding that rewrote every layer's whole cache for every token: 30 % of the `tiny` decode
//! profile was `memmove`.
//!
//! So for flex we write the chunk ourselves when the buffer is provably ours alone (`Arc`
//! count 1, contiguous, f32); in every other case (another backend, a buffer shared with a
//! `Clone` of the cache, an unusual layout) we fall back to `slice_assign`, which is correct
//! under sharing. Both paths give bit-identical results (tested in `tests/model_forward.rs`).

use std::any::Any;

use burn::prelude::*;
use burn::tensor::{DType, TensorPrimitive};
use burn_flex::FlexTensor;

/// Writes `value` (`[B, H, W, D]`) into `dst` (`[B, H, S, D]`) at `slot..slot + W` along
/// dimension 2 and returns the updated tensor.
pub(crate) fn write_slots<B: Backend>(dst: Tensor<B, 4>, slot: usize, value: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, h, w, d] = value.dims();
    let s = dst.dims()[2];
    let mut dst_prim = dst.into_primitive().tensor();
    let value_prim = value.into_primitive().tensor();
    let done = match (
        (&mut dst_prim as &mut dyn Any).downcast_mut::<FlexTensor>(),
        (&value_prim as &dyn Any).downcast_ref::<FlexTensor>(),
    ) {
        (Some(dst), Some(value)) => write(dst, value, slot, [b, h, w, d], s),
        _ => false,
    };
    let dst = Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(dst_prim));
    if done {
        return dst;
    }
    let value = Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(value_prim));
    dst.slice_assign([0..b, 0..h, slot..slot + w, 0..d], value)
}

/// The in-place write; false (nothing written) when it does not apply.
fn write(dst: &mut FlexTensor, value: &FlexTensor, slot: usize, [b, h, w, d]: [usize; 4], s: usize) -> bool {
    let shape = dst.layout().shape();
    let fits = shape.num_dims() == 4 && [shape[0], shape[1], shape[2], shape[3]] == [b, h, s, d] && slot + w <= s;
    if dst.dtype() != DType::F32 || value.dtype() != DType::F32 || !whole(dst) || !fits {
        return false;
    }
    let value = value.to_contiguous();
    let src: &[f32] = value.storage();
    let Some(out) = dst.try_storage_mut::<f32>() else {
        return false; // shared: let slice_assign copy it
    };
    let run = w * d;
    for bh in 0..b * h {
        let at = (bh * s + slot) * d;
        out[at..at + run].copy_from_slice(&src[bh * run..(bh + 1) * run]);
    }
    true
}

/// True when the tensor's elements are exactly its buffer, in row-major order.
fn whole(t: &FlexTensor) -> bool {
    t.is_contiguous()
        && t.layout().start_offset() == 0
        && t.bytes().len() == t.layout().num_elements() * t.dtype().size()
}
