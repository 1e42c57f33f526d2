//! Fast paths for the CPU backend (burn-flex) where Burn 0.21's generic operations leave most
//! of the time on the table in *decoding*: the KV-cache write copies the whole cache, and
//! attention runs on one core. Each function takes any backend's tensors, recognises flex
//! tensors at run time, and otherwise (GPU backends, autodiff, other dtypes or layouts) falls
//! back to the portable Burn operation, so callers stay generic over `B: Backend`.

mod attention;
mod write;

pub(crate) use attention::masked_attention;
pub(crate) use write::write_slots;

use std::any::Any;

use burn::prelude::*;
use burn::tensor::{DType, TensorPrimitive};
use burn_flex::FlexTensor;

/// The flex tensor behind a float tensor, when the backend is flex and the data is f32.
fn flex_f32<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Option<FlexTensor> {
    let prim = t.clone().into_primitive();
    let TensorPrimitive::Float(prim) = prim else {
        return None;
    };
    let flex = (&prim as &dyn Any).downcast_ref::<FlexTensor>()?;
    (flex.dtype() == DType::F32).then(|| flex.clone())
}

/// True when the tensor's elements are exactly its buffer, in row-major order.
fn whole(t: &FlexTensor) -> bool {
    t.is_contiguous() && t.layout().start_offset() == 0 && t.bytes().len() == t.layout().num_elements() * t.dtype().size()
}
