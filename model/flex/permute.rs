//! Swapping a 4-D tensor's two middle dimensions into a fresh row-major buffer.
//!
//! Attention moves between token-major `[B, W, H, D]` (what the projections produce) and
//! head-major `[B, H, W, D]` (what the KV cache and attention read) twice per layer. Burn's
//! `swap_dims` only relabels strides; the first operation that needs contiguous memory then
//! copies, and burn-flex 0.21 copies this layout one element at a time through its generic
//! strided iterator (it merges only layouts that collapse to two dimensions). In chunked
//! passes — prefill, the exact prover's answer trees, evaluation — that iterator was ≈ 11 % of
//! a countdown `mrt-dense` run's profile. Each head's D values are contiguous on both sides,
//! so the swap is B·W·H copies of D floats. The values are moved, never computed, so results
//! are bit-identical to the portable path.

use burn::prelude::*;

use super::attention::{dims, flex_f32};

/// `t.swap_dims(1, 2)`, laid out row-major. Flex f32 tensors are copied in runs of the last
/// dimension; every other tensor (GPU backends, autodiff, other dtypes) takes `swap_dims`.
pub(crate) fn swap_middle<B: Backend>(t: Tensor<B, 4>) -> Tensor<B, 4> {
    let Some(flex) = flex_f32(&t) else {
        return t.swap_dims(1, 2);
    };
    let device = t.device();
    drop(t);
    // Free when already row-major (a projection's output reshaped), a copy otherwise.
    let src = flex.to_contiguous();
    let [b, a, c, d] = dims(&src);
    let from: &[f32] = src.storage();
    let mut out = vec![0f32; b * a * c * d];
    for bi in 0..b {
        for ci in 0..c {
            for ai in 0..a {
                let (to, at) = (((bi * c + ci) * a + ai) * d, ((bi * a + ai) * c + ci) * d);
                out[to..to + d].copy_from_slice(&from[at..at + d]);
            }
        }
    }
    Tensor::from_data(TensorData::new(out, [b, c, a, d]), &device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    /// Same elements in the same order as `swap_dims`, for a row-major input and for one that
    /// is itself a strided view (which must be read through its strides, not its buffer).
    #[test]
    fn swap_middle_is_swap_dims_made_contiguous() {
        let dev = Default::default();
        let values: Vec<f32> = (0..2 * 3 * 4 * 5).map(|i| i as f32).collect();
        let t = Tensor::<Flex, 4>::from_data(TensorData::new(values, [2, 3, 4, 5]), &dev);
        for input in [t.clone(), t.swap_dims(0, 3)] {
            let expected: Vec<f32> = input.clone().swap_dims(1, 2).into_data().to_vec().unwrap();
            let ours = swap_middle(input.clone());
            assert_eq!(ours.dims(), input.swap_dims(1, 2).dims());
            assert_eq!(ours.into_data().to_vec::<f32>().unwrap(), expected);
        }
    }
}
