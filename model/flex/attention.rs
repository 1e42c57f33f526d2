//! Masked attention for the CPU backend, parallel over (row, head).
//!
//! Burn-flex 0.21's attention walks the (row, head) pairs on one thread and issues two `gemm`
//! calls per pair; in decoding each call is a 1 × D by D × S product, so most of a `tiny`
//! decode step went to one core doing call overhead while the other waited. Here every pair
//! is one rayon task doing plain dot products and one weighted sum of values, and masked slots
//! (holes in ragged chunks, slots not yet written) are skipped instead of computed and then
//! discarded. Grouped-query heads read their shared key/value head directly, without the
//! expanded copy the portable path makes. Each pair is computed by one thread in a fixed
//! order, so results do not depend on scheduling.

use burn::prelude::*;
use burn::tensor::{DType, TensorPrimitive};
use burn_flex::FlexTensor;
use rayon::prelude::*;
use std::any::Any;

/// softmax(q·kᵀ / √D, masked) · v, or `None` when the tensors are not flex f32 (the caller
/// then takes the portable path).
///
/// # Shapes
/// - `q`: `[B, H, W, D]`; `k`, `v`: `[B, KVH, S, D]` with KVH dividing H (query head h reads
///   key/value head h / (H / KVH))
/// - `mask`: `[B, 1, W, S]` or `[B, H, W, S]`, true where query w must not attend slot s
/// - returns `[B, H, W, D]`; a query with no slot to attend gets zeros
pub(crate) fn masked_attention<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    mask: &Tensor<B, 4, Bool>,
) -> Option<Tensor<B, 4>> {
    let device = q.device();
    // `to_contiguous` copies only what is not laid out row-major already.
    let (q, k, v) = (
        flex_f32(q)?.to_contiguous(),
        flex_f32(k)?.to_contiguous(),
        flex_f32(v)?.to_contiguous(),
    );
    let mask_prim = mask.clone().into_primitive();
    let mask = (&mask_prim as &dyn Any).downcast_ref::<FlexTensor>()?.to_contiguous();
    let ([b, h, w, d], [kb, kvh, s, k_width], [mb, mask_heads, mw, ms]) = (dims(&q), dims(&k), dims(&mask));
    let shapes_fit = kb == b && k_width == d && dims(&v) == dims(&k) && kvh > 0 && h % kvh == 0;
    let mask_fits = mb == b && (mask_heads == 1 || mask_heads == h) && mw == w && ms == s;
    // Flex keeps booleans as one byte each; anything else is not what the kernel reads.
    let mask_bytes = matches!(mask.dtype(), DType::Bool(_)) && mask.bytes().len() == b * mask_heads * w * s;
    if !(shapes_fit && mask_fits && mask_bytes) {
        return None;
    }
    let (qd, kd, vd, md): (&[f32], &[f32], &[f32], &[u8]) = (q.storage(), k.storage(), v.storage(), mask.bytes());
    let (rep, scale) = (h / kvh, 1.0 / (d as f32).sqrt());
    let mut out = vec![0f32; b * h * w * d];
    let pair_job = |scores: &mut Vec<f32>, (pair, out): (usize, &mut [f32])| {
        let (row, head) = (pair / h, pair % h);
        let kv = (row * kvh + head / rep) * s * d;
        let (keys, values) = (&kd[kv..kv + s * d], &vd[kv..kv + s * d]);
        let masks = (row * mask_heads + if mask_heads == 1 { 0 } else { head }) * w * s;
        for i in 0..w {
            let query = &qd[(pair * w + i) * d..(pair * w + i + 1) * d];
            let masked = &md[masks + i * s..masks + (i + 1) * s];
            attend(query, keys, values, masked, scale, scores, &mut out[i * d..(i + 1) * d]);
        }
    };
    // Waking the thread pool costs more than small problems take on one core.
    if b * h * w * s * d < PARALLEL_WORK {
        let mut scores = vec![0f32; s];
        out.chunks_mut(w * d)
            .enumerate()
            .for_each(|job| pair_job(&mut scores, job));
    } else {
        out.par_chunks_mut(w * d)
            .enumerate()
            .for_each_init(|| vec![0f32; s], pair_job);
    }
    Some(Tensor::from_data(TensorData::new(out, [b, h, w, d]), &device))
}

/// Multiply-adds below which one thread does the whole call.
const PARALLEL_WORK: usize = 1 << 19;

wide_fn! {
    /// One query against S slots of width D.
    fn attend(
        query: &[f32],
        keys: &[f32],
        values: &[f32],
        masked: &[u8],
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32]
    ) {
        let d = query.len();
        let mut max = f32::NEG_INFINITY;
        for (slot, (score, &m)) in scores.iter_mut().zip(masked).enumerate() {
            if m == 0 {
                *score = dot(query, &keys[slot * d..(slot + 1) * d]) * scale;
                max = max.max(*score);
            }
        }
        out.fill(0.0);
        if max == f32::NEG_INFINITY {
            return;
        }
        let mut sum = 0.0;
        for (slot, (&score, &m)) in scores.iter().zip(masked).enumerate() {
            if m == 0 {
                let p = (score - max).exp();
                sum += p;
                for (o, &x) in out.iter_mut().zip(&values[slot * d..(slot + 1) * d]) {
                    *o += p * x;
                }
            }
        }
        let inv = 1.0 / sum;
        out.iter_mut().for_each(|o| *o *= inv);
    }
}

/// Dot product with eight independent accumulators, so the compiler can vectorise it.
#[inline(always)]
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8.remainder().iter().zip(b8.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The flex tensor behind a float tensor, when the backend is flex and the data is f32.
pub(super) fn flex_f32<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Option<FlexTensor> {
    let prim = t.clone().into_primitive();
    let TensorPrimitive::Float(prim) = prim else {
        return None;
    };
    let flex = (&prim as &dyn Any).downcast_ref::<FlexTensor>()?;
    (flex.dtype() == DType::F32).then(|| flex.clone())
}

pub(super) fn dims(t: &FlexTensor) -> [usize; 4] {
    let shape = t.layout().shape();
    [shape[0], shape[1], shape[2], shape[3]]
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::Distribution;

    /// The kernel against Burn's attention on the same inputs, with grouped-query heads and a
    /// ragged mask, on one thread (small) and on the pool (large).
    #[test]
    fn kernel_matches_burn_attention() {
        let dev = Default::default();
        <Flex as Backend>::seed(&dev, 11);
        for [b, h, kvh, w, s, d] in [[2, 4, 2, 3, 20, 16], [4, 8, 4, 2, 256, 36]] {
            let q = Tensor::<Flex, 4>::random([b, h, w, d], Distribution::Normal(0.0, 1.0), &dev);
            let k = Tensor::<Flex, 4>::random([b, kvh, s, d], Distribution::Normal(0.0, 1.0), &dev);
            let v = Tensor::<Flex, 4>::random([b, kvh, s, d], Distribution::Normal(0.0, 1.0), &dev);
            // Masked: slot s for query w when (s·7 + w·3 + row) % 5 < 2, never slot 0.
            let bits: Vec<bool> = (0..b * w * s)
                .map(|i| (i % s) != 0 && ((i % s) * 7 + (i / s % w) * 3 + i / (w * s)) % 5 < 2)
                .collect();
            let mask = Tensor::<Flex, 4, Bool>::from_data(TensorData::new(bits, [b, 1, w, s]), &dev);
            let ours = masked_attention(&q, &k, &v, &mask).expect("flex tensors");
            let rep = h / kvh;
            let expand = |t: Tensor<Flex, 4>| {
                t.unsqueeze_dim::<5>(2)
                    .expand([b, kvh, rep, s, d])
                    .reshape([b, h, s, d])
            };
            let options = AttentionModuleOptions {
                scale: None,
                softcap: None,
                is_causal: false,
            };
            let theirs = attention(q, expand(k), expand(v), Some(mask.expand([b, h, w, s])), None, options);
            let diff: f32 = (ours - theirs).abs().max().into_scalar();
            assert!(diff < 1e-5, "[{b}, {h}, {kvh}, {w}, {s}, {d}]: differs by {diff}");
        }
    }

    #[test]
    fn a_query_with_nothing_to_attend_gets_zeros() {
        let dev = Default::default();
        let t = Tensor::<Flex, 4>::ones([1, 1, 2, 8], &dev);
        let mask =
            Tensor::<Flex, 4, Bool>::from_data(TensorData::new(vec![true, true, false, true], [1, 1, 2, 2]), &dev);
        let y = masked_attention(&t, &t, &(t.clone() * 3.0), &mask).expect("flex tensors");
        let rows: Vec<f32> = y.into_data().to_vec().unwrap();
        assert_eq!(&rows[..8], &[0.0; 8]);
        assert_eq!(&rows[8..], &[3.0; 8]);
    }
}
