//! Causal grouped-query attention blocked over query rows, with its own backward pass.
//!
//! Forward, per block of n query rows s..e (grouped so that the H / KVH query heads sharing a
//! key/value head form one `[rep·n, D]` matrix, with no expanded copy of K and V):
//! S = Q_b K_{0..e}ᵀ / √D, masked above the diagonal; m = rowmax S; P = exp(S − m);
//! O_b = P V / ΣP; lse_b = m + log ΣP. Saved: Q, K, V, O and lse (all linear in T).
//! Backward (FlashAttention's, with the same blocks): Δ = rowsum(dO ⊙ O);
//! P = exp(S − lse); dV += Pᵀ dO; dP = dO Vᵀ; dS = P ⊙ (dP − Δ); dQ_b = dS K / √D;
//! dK += dSᵀ Q_b / √D. Summing over the grouped rows adds the query heads' contributions to
//! their shared key/value head.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use std::sync::atomic::{AtomicBool, Ordering};

use burn::prelude::*;
use burn::tensor::ops::attention::attention_fallback;
use burn::tensor::ops::{AttentionModuleOptions, FloatTensor};

use super::{apply, primitive, tensor, CustomOp, Tracked, BLOCK_ELEMENTS};
use crate::model::flex;

/// Stands in for −∞ above the diagonal: exp(MASKED − m) is exactly 0 in f32 for any finite
/// row maximum m, and, unlike −∞, it cannot make a NaN in a fused kernel.
const MASKED: f32 = -1.0e30;

/// Whether a training pass over rows of `t` tokens (model width `c`, `h` query heads) on a
/// backend without a fused attention kernel ([`fused_kernel`]) is better served by Burn's
/// materialised attention: while a layer's `[B, H, T, T]` scores are at most 16·C floats per
/// token (H·T ≤ 16·C), less than what the block keeps of its other activations anyway
/// (6·C + 4·F ≥ 20·C per token for every model this project runs), so memory stays linear in
/// T with the same order of constant. On such short rows the materialised pass was faster than
/// the blocked one in Burn operations (`tiny` on the CPU, 256-token rows: 2,117–2,231 →
/// 2,681–2,855 training tok/s, BENCHMARKS.md); longer rows take [`causal_attention`].
/// [`set_blocked_always`] turns the shortcut off (tests, benchmarks).
pub fn materialise_short_rows(t: usize, h: usize, c: usize) -> bool {
    !BLOCKED_ALWAYS.load(Ordering::Relaxed) && h * t <= 16 * c
}

/// Whether [`causal_attention`] runs as a fused kernel on backend `B` (the CPU backend, flex,
/// with or without autodiff): then it is both the faster and the leaner choice at every length
/// (`tiny`, 256-token rows: 2,768–2,932 training tok/s materialised, 3,685–3,761 fused;
/// BENCHMARKS.md), and training passes take it whatever the rows' length.
pub fn fused_kernel<B: Backend>() -> bool {
    use burn::backend::{Autodiff, Flex};
    use std::any::TypeId;
    [TypeId::of::<Flex>(), TypeId::of::<Autodiff<Flex>>()].contains(&TypeId::of::<B>())
}

static BLOCKED_ALWAYS: AtomicBool = AtomicBool::new(false);

/// Every training pass takes the blocked attention, however short its rows (process-wide).
pub fn set_blocked_always(on: bool) {
    BLOCKED_ALWAYS.store(on, Ordering::Relaxed);
}

/// softmax(Q Kᵀ / √D, causal) V with the `[B, H, T, T]` scores materialised, as the same
/// sequence of tensor operations with and without autodiff (Burn's decomposed attention; the
/// CPU backend's own fused kernel sums in another order), so that a block recomputed in the
/// backward pass reproduces the forward pass bit for bit.
///
/// # Shapes
/// `q`: `[B, H, T, D]`, `k`, `v`: `[B, KVH, T, D]` → `[B, H, T, D]`
pub fn materialised_attention<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, h, t, d] = q.dims();
    let kvh = k.dims()[1];
    let expand = |x: Tensor<B, 4>| {
        if kvh == h {
            return x;
        }
        x.unsqueeze_dim::<5>(2)
            .expand([b, kvh, h / kvh, t, d])
            .reshape([b, h, t, d])
    };
    let options = AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal: true,
    };
    tensor(attention_fallback::<B>(
        primitive(q),
        primitive(expand(k)),
        primitive(expand(v)),
        None,
        None,
        options,
    ))
}

/// Query rows per block so that one block's scores `[B, H, n, T]` stay within
/// [`BLOCK_ELEMENTS`] (at least 16 rows, at most T: rows shorter than 16 tokens are one block).
pub fn attention_block_rows(batch: usize, heads: usize, t: usize) -> usize {
    (BLOCK_ELEMENTS / (batch * heads * t).max(1)).max(16).min(t.max(1))
}

/// softmax(Q Kᵀ / √D, causal) V in memory linear in T, forward and backward.
///
/// Rows are right-padded: under causal attention a real token never sees the padding after
/// it, so no mask is needed (padding rows' outputs are meaningless, as with any causal pass).
///
/// # Shapes
/// - `q`: `[B, H, T, D]`; `k`, `v`: `[B, KVH, T, D]`, KVH dividing H (query head h reads
///   key/value head h / (H / KVH))
/// - `block_rows`: query rows per block; `None` for the backend's choice: on the CPU backend
///   (f32) a fused kernel whose memory per thread does not grow with the batch (model/flex),
///   elsewhere [`attention_block_rows`]
/// - returns `[B, H, T, D]`
pub fn causal_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    block_rows: Option<usize>,
) -> Tensor<B, 4> {
    let h = q.dims()[1];
    let kvh = k.dims()[1];
    assert!(
        kvh > 0 && h.is_multiple_of(kvh),
        "{h} query heads for {kvh} key/value heads"
    );
    let rows = block_rows.map(|r| r.max(1));
    let out = apply::<B, 3, _>(CausalAttention { rows }, [primitive(q), primitive(k), primitive(v)]);
    tensor(out.into_iter().next().expect("one output"))
}

struct CausalAttention {
    rows: Option<usize>,
}

impl<B: Backend> CustomOp<B, 3> for CausalAttention {
    fn tracked<I: Backend>(self, [q, k, v]: [Tracked<I>; 3]) -> Vec<Tracked<I>> {
        let (out, lse) = forward::<I>(
            tensor(q.primitive.clone()),
            tensor(k.primitive.clone()),
            tensor(v.primitive.clone()),
            self.rows,
        );
        let out = primitive(out);
        let backward = AttentionBackward { rows: self.rows };
        let node = match backward
            .prepare::<NoCheckpointing>([q.node.clone(), k.node.clone(), v.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(
                (q.primitive, k.primitive, v.primitive, out.clone(), primitive(lse)),
                out,
            ),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        vec![node]
    }

    fn plain(self, [q, k, v]: [FloatTensor<B>; 3]) -> Vec<FloatTensor<B>> {
        vec![primitive(forward::<B>(tensor(q), tensor(k), tensor(v), self.rows).0)]
    }
}

#[derive(Debug)]
struct AttentionBackward {
    rows: Option<usize>,
}

impl<I: Backend> Backward<I, 3> for AttentionBackward {
    /// Q, K, V, the output and the per-row log-sum-exp `[B, H, T, 1]`.
    type State = (
        FloatTensor<I>,
        FloatTensor<I>,
        FloatTensor<I>,
        FloatTensor<I>,
        FloatTensor<I>,
    );

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (q, k, v, out, lse) = ops.state;
        let dout = grads.consume::<I>(&ops.node);
        let (dq, dk, dv) = backward::<I>(
            [tensor(q), tensor(k), tensor(v), tensor(out), tensor(dout)],
            tensor(lse),
            self.rows,
        );
        for (parent, grad) in ops.parents.into_iter().zip([dq, dk, dv]) {
            if let Some(node) = parent {
                grads.register::<I>(node.id, primitive(grad));
            }
        }
    }
}

/// The blocks' (first row, rows).
fn blocks(t: usize, rows: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t).step_by(rows).map(move |s| (s, rows.min(t - s)))
}

/// `[B, H, n, X]` → `[B, KVH, rep·n, X]`: the query heads of one key/value head stacked.
fn group<X: Backend>(t: Tensor<X, 4>, kvh: usize) -> Tensor<X, 4> {
    let [b, h, n, x] = t.dims();
    t.reshape([b, kvh, h / kvh * n, x])
}

/// The inverse of [`group`].
fn ungroup<X: Backend>(t: Tensor<X, 4>, h: usize) -> Tensor<X, 4> {
    let [b, kvh, rn, x] = t.dims();
    t.reshape([b, h, rn * kvh / h, x])
}

/// Scaled scores of grouped queries (block rows s..s+n) against keys 0..e, e = s + n, with
/// the keys after each row's position masked: `[B, KVH, rep·n, e]`.
fn masked_scores<X: Backend>(qg: Tensor<X, 4>, kb: Tensor<X, 4>, s: usize, n: usize, scale: f64) -> Tensor<X, 4> {
    let scores = qg.matmul(kb.transpose()) * scale;
    let [b, kvh, rn, e] = scores.dims();
    // Row i (position s + i) sees keys j ≤ s + i: mask j − i > s.
    let mask = Tensor::<X, 2, Bool>::tril_mask([n, e], s as i64, &scores.device())
        .reshape([1, 1, 1, n, e])
        .expand([b, kvh, rn / n, n, e]);
    scores
        .reshape([b, kvh, rn / n, n, e])
        .mask_fill(mask, MASKED)
        .reshape([b, kvh, rn, e])
}

/// The blocked forward: (output `[B, H, T, D]`, log-sum-exp `[B, H, T, 1]`), by the CPU
/// backend's fused kernel where it applies.
fn forward<X: Backend>(
    q: Tensor<X, 4>,
    k: Tensor<X, 4>,
    v: Tensor<X, 4>,
    rows: Option<usize>,
) -> (Tensor<X, 4>, Tensor<X, 4>) {
    if let Some(fused) = flex::causal_forward(&q, &k, &v, rows.unwrap_or(flex::FUSED_ROWS)) {
        return fused;
    }
    let [b, h, t, _] = q.dims();
    portable_forward(q, k, v, rows.unwrap_or_else(|| attention_block_rows(b, h, t)))
}

/// The blocked backward: (dQ, dK, dV) from [Q, K, V, O, dO] and the forward's log-sum-exp, by
/// the CPU backend's fused kernel where it applies.
fn backward<X: Backend>(
    [q, k, v, out, dout]: [Tensor<X, 4>; 5],
    lse: Tensor<X, 4>,
    rows: Option<usize>,
) -> (Tensor<X, 4>, Tensor<X, 4>, Tensor<X, 4>) {
    if let Some(fused) = flex::causal_backward([&q, &k, &v, &out, &dout], &lse, rows.unwrap_or(flex::FUSED_ROWS)) {
        return fused;
    }
    let [b, h, t, _] = q.dims();
    portable_backward(
        [q, k, v, out, dout],
        lse,
        rows.unwrap_or_else(|| attention_block_rows(b, h, t)),
    )
}

/// [`forward`] in Burn tensor operations, for every backend.
fn portable_forward<X: Backend>(
    q: Tensor<X, 4>,
    k: Tensor<X, 4>,
    v: Tensor<X, 4>,
    rows: usize,
) -> (Tensor<X, 4>, Tensor<X, 4>) {
    let [_, h, t, d] = q.dims();
    let kvh = k.dims()[1];
    let scale = 1.0 / (d as f64).sqrt();
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    for (s, n) in blocks(t, rows) {
        let qg = group(q.clone().narrow(2, s, n), kvh);
        let (kb, vb) = (k.clone().narrow(2, 0, s + n), v.clone().narrow(2, 0, s + n));
        let scores = masked_scores(qg, kb, s, n, scale);
        let m = scores.clone().max_dim(3);
        let p = (scores - m.clone()).exp();
        let l = p.clone().sum_dim(3);
        outs.push(ungroup(p.matmul(vb) / l.clone(), h));
        lses.push(ungroup(m + l.log(), h));
    }
    (Tensor::cat(outs, 2), Tensor::cat(lses, 2))
}

/// [`backward`] in Burn tensor operations, for every backend.
fn portable_backward<X: Backend>(
    [q, k, v, out, dout]: [Tensor<X, 4>; 5],
    lse: Tensor<X, 4>,
    rows: usize,
) -> (Tensor<X, 4>, Tensor<X, 4>, Tensor<X, 4>) {
    let [_, h, t, d] = q.dims();
    let kvh = k.dims()[1];
    let scale = 1.0 / (d as f64).sqrt();
    let delta = (dout.clone() * out).sum_dim(3);
    let (mut dk, mut dv) = (k.zeros_like(), v.zeros_like());
    let mut dqs = Vec::new();
    for (s, n) in blocks(t, rows) {
        let e = s + n;
        let rows_of = |x: &Tensor<X, 4>| group(x.clone().narrow(2, s, n), kvh);
        let (qg, dog) = (rows_of(&q), rows_of(&dout));
        let (kb, vb) = (k.clone().narrow(2, 0, e), v.clone().narrow(2, 0, e));
        let p = (masked_scores(qg.clone(), kb.clone(), s, n, scale) - rows_of(&lse)).exp();
        dv = add_prefix(dv, p.clone().transpose().matmul(dog.clone()));
        let ds = p * (dog.matmul(vb.transpose()) - rows_of(&delta));
        dqs.push(ungroup(ds.clone().matmul(kb) * scale, h));
        dk = add_prefix(dk, ds.transpose().matmul(qg) * scale);
    }
    (Tensor::cat(dqs, 2), dk, dv)
}

/// `acc` with `x` added to its first `x.dims()[2]` rows.
fn add_prefix<X: Backend>(acc: Tensor<X, 4>, x: Tensor<X, 4>) -> Tensor<X, 4> {
    let [b, kvh, e, d] = x.dims();
    if e == acc.dims()[2] {
        return acc + x;
    }
    let head = acc.clone().narrow(2, 0, e) + x;
    acc.slice_assign([0..b, 0..kvh, 0..e, 0..d], head)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn normal(dims: [usize; 4], rng: &mut StdRng) -> Tensor<Flex, 4> {
        let n = dims.iter().product();
        let values: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
        Tensor::from_data(TensorData::new(values, dims), &Default::default())
    }

    /// max |a − b| over max |b|.
    fn relative(a: Tensor<Flex, 4>, b: Tensor<Flex, 4>) -> f32 {
        let scale: f32 = b.clone().abs().max().into_scalar();
        let diff: f32 = (a - b).abs().max().into_scalar();
        diff / scale.max(f32::MIN_POSITIVE)
    }

    /// The CPU backend's fused kernel against the portable blocked version in Burn operations,
    /// forward and backward: grouped-query heads, odd lengths, blocks that do not divide T, a
    /// single token, and the kernel's own block size.
    #[test]
    fn fused_kernel_matches_the_portable_version() {
        let mut rng = StdRng::seed_from_u64(17);
        for [b, h, kvh, t, d, rows] in [
            [2, 4, 2, 37, 16, 5],
            [1, 6, 2, 70, 8, 64],
            [3, 2, 2, 1, 4, 16],
            [2, 4, 1, 130, 32, 0],
        ] {
            let (q, k, v) = (
                normal([b, h, t, d], &mut rng),
                normal([b, kvh, t, d], &mut rng),
                normal([b, kvh, t, d], &mut rng),
            );
            let dout = normal([b, h, t, d], &mut rng);
            let rows = (rows > 0).then_some(rows);
            let block = rows.unwrap_or(flex::FUSED_ROWS);
            let (out, lse) = flex::causal_forward(&q, &k, &v, block).expect("flex f32 tensors");
            let (out_ref, lse_ref) = portable_forward(q.clone(), k.clone(), v.clone(), block);
            let case = format!("[{b}, {h}, {kvh}, {t}, {d}] rows {block}");
            assert!(relative(out.clone(), out_ref.clone()) < 1e-5, "{case}: output");
            assert!(relative(lse.clone(), lse_ref.clone()) < 1e-5, "{case}: lse");
            let inputs = [q, k, v, out_ref, dout];
            let fused = flex::causal_backward(inputs.each_ref(), &lse_ref, block).expect("flex f32 tensors");
            let reference = portable_backward(inputs, lse_ref, block);
            for (name, a, b) in [
                ("dq", fused.0, reference.0),
                ("dk", fused.1, reference.1),
                ("dv", fused.2, reference.2),
            ] {
                let r = relative(a, b);
                assert!(r < 1e-5, "{case}: {name} differs by {r}");
            }
        }
    }

    #[test]
    fn short_rows_materialise_and_long_ones_block() {
        // tiny (C 256, 8 heads): up to 512 tokens; Qwen2.5-0.5B (896, 14): 1,024;
        // R1-Distill-Qwen-1.5B (1,536, 12): 2,048.
        for (c, h, last) in [(256, 8, 512), (896, 14, 1024), (1536, 12, 2048)] {
            assert!(materialise_short_rows(last, h, c));
            assert!(!materialise_short_rows(last + 1, h, c));
        }
    }
}
