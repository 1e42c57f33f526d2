//! Token log-probs through the output head in chunks of rows, with their own backward pass:
//! training never holds the `[N, V]` logits (Liger-Kernel's fused linear cross-entropy, as
//! Burn tensor operations).
//!
//! With z = h W / τ for one chunk of rows: lse = log Σ_v exp z_v; log π(y) = z_y − lse;
//! entropy = lse − Σ_v softmax(z)_v z_v. Saved: h, W, the targets and lse. Backward, with g the
//! incoming gradient of log π(y): dz = g (onehot(y) − softmax(z)) / τ recomputed per chunk;
//! dh = dz Wᵀ; dW += hᵀ dz, only when W is trained (a frozen head, as under LoRA, skips a
//! third of the backward's products and the `[C, V]` accumulator). A head stored in half
//! precision multiplies in its own type (model/precision.rs); the softmax is f32.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::prelude::*;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::IndexingUpdateOp;

use super::{apply, cast, primitive, tensor, CustomOp, Tracked, BLOCK_ELEMENTS};
use crate::model::precision::matmul;

/// Rows per chunk: as many as keep one chunk's logits `[n, V]` within [`BLOCK_ELEMENTS`], and
/// at least [`HEAD_MIN_ROWS`].
pub fn head_block_rows(vocab: usize) -> usize {
    (BLOCK_ELEMENTS / vocab.max(1)).max(HEAD_MIN_ROWS)
}

/// The fewest rows per chunk of the head. Each chunk's three products (logits, their
/// recomputation, dh) pack the whole `[C, V]` weight for gemm, and each adds one pass over the
/// `[C, V]` weight gradient; that fixed cost per chunk is a share ∝ 1/rows of the chunk's
/// arithmetic. At a real vocabulary the block budget alone gives few rows (27 at Qwen2's
/// 151,936) and that cost dominated: a 1,024-token step of Qwen2.5-0.5B's shapes (2 layers)
/// took 19 s against 8.6 s before model/lowmem, 19 % of it in gemm's packing (BENCHMARKS.md).
/// 256 rows hold a chunk's logits to 156 MB at that vocabulary (a backward pass keeps a few
/// such tensors at once), still independent of T.
pub const HEAD_MIN_ROWS: usize = 256;

/// log softmax(h W / τ)[y] per row, and the entropy of softmax(h W / τ) when asked for
/// (detached: a metric). Gradients flow into `hidden` and `weight` on autodiff backends.
///
/// # Shapes
/// - `hidden`: `[N, C]`; `weight`: `[C, V]`; `targets`: `[N]`
/// - `block_rows`: rows per chunk; `None` for [`head_block_rows`]
/// - returns (`[N]`, `[N]`)
pub fn head_logprobs<B: Backend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    temperature: f64,
    with_entropy: bool,
    block_rows: Option<usize>,
) -> (Tensor<B, 1>, Option<Tensor<B, 1>>) {
    assert!(
        temperature > 0.0,
        "log-probs need a positive temperature, got {temperature}"
    );
    let rows = block_rows.unwrap_or_else(|| head_block_rows(weight.dims()[1])).max(1);
    let op = HeadLogprobs::<B> {
        targets: targets.into_primitive(),
        temperature,
        with_entropy,
        rows,
    };
    let mut out = apply::<B, 2, _>(op, [primitive(hidden), primitive(weight)]).into_iter();
    let logprobs = tensor(out.next().expect("log-probs"));
    (logprobs, out.next().map(tensor))
}

struct HeadLogprobs<B: Backend> {
    targets: IntTensor<B>,
    temperature: f64,
    with_entropy: bool,
    rows: usize,
}

impl<B: Backend> CustomOp<B, 2> for HeadLogprobs<B> {
    fn tracked<I: Backend>(self, [h, w]: [Tracked<I>; 2]) -> Vec<Tracked<I>> {
        // `B` is `Autodiff<I>`, whose integer tensors are `I`'s.
        let targets: IntTensor<I> = cast(self.targets).unwrap_or_else(|_| unreachable!("B is Autodiff<I>"));
        let chunks = Chunks {
            temperature: self.temperature,
            rows: self.rows,
        };
        let (lp, lse, entropy) = chunks.forward::<I>(
            tensor(h.primitive.clone()),
            tensor(w.primitive.clone()),
            Tensor::from_primitive(targets.clone()),
            self.with_entropy,
        );
        let lp = primitive(lp);
        let node = match HeadBackward(chunks)
            .prepare::<NoCheckpointing>([h.node.clone(), w.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((h.primitive, w.primitive, targets, primitive(lse)), lp),
            OpsKind::UnTracked(prep) => prep.finish(lp),
        };
        let mut out = vec![node];
        out.extend(entropy.map(|e| Tracked::<I>::new(primitive(e))));
        out
    }

    fn plain(self, [h, w]: [FloatTensor<B>; 2]) -> Vec<FloatTensor<B>> {
        let chunks = Chunks {
            temperature: self.temperature,
            rows: self.rows,
        };
        let targets = Tensor::from_primitive(self.targets);
        let (lp, _, entropy) = chunks.forward::<B>(tensor(h), tensor(w), targets, self.with_entropy);
        let mut out = vec![primitive(lp)];
        out.extend(entropy.map(primitive));
        out
    }
}

#[derive(Debug, Clone, Copy)]
struct Chunks {
    temperature: f64,
    rows: usize,
}

#[derive(Debug)]
struct HeadBackward(Chunks);

impl<I: Backend> Backward<I, 2> for HeadBackward {
    /// h, W, the targets and the per-row log-sum-exp `[N, 1]`.
    type State = (FloatTensor<I>, FloatTensor<I>, IntTensor<I>, FloatTensor<I>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (h, w, targets, lse) = ops.state;
        let g = grads.consume::<I>(&ops.node);
        let [h_node, w_node] = ops.parents;
        let (dh, dw) = self.0.backward::<I>(
            tensor(h),
            tensor(w),
            Tensor::from_primitive(targets),
            tensor(lse),
            tensor(g),
            w_node.is_some(),
        );
        if let Some(node) = h_node {
            grads.register::<I>(node.id, primitive(dh));
        }
        if let (Some(node), Some(dw)) = (w_node, dw) {
            grads.register::<I>(node.id, primitive(dw));
        }
    }
}

impl Chunks {
    /// The chunks' (first row, rows) over N rows.
    fn ranges(self, n: usize) -> impl Iterator<Item = (usize, usize)> {
        (0..n).step_by(self.rows).map(move |s| (s, self.rows.min(n - s)))
    }

    /// z = h W / τ for rows s..s+m: `[m, V]`.
    fn logits<X: Backend>(self, h: &Tensor<X, 2>, w: &Tensor<X, 2>, s: usize, m: usize) -> Tensor<X, 2> {
        let z = matmul(h.clone().narrow(0, s, m), w.clone());
        if self.temperature == 1.0 {
            z
        } else {
            z / self.temperature
        }
    }

    /// (log-probs `[N]`, log-sum-exp `[N, 1]`, entropies `[N]` when asked for).
    fn forward<X: Backend>(
        self,
        h: Tensor<X, 2>,
        w: Tensor<X, 2>,
        targets: Tensor<X, 1, Int>,
        with_entropy: bool,
    ) -> (Tensor<X, 1>, Tensor<X, 2>, Option<Tensor<X, 1>>) {
        let n = h.dims()[0];
        let (mut lps, mut lses, mut entropies) = (Vec::new(), Vec::new(), Vec::new());
        for (s, m) in self.ranges(n) {
            let z = self.logits(&h, &w, s, m);
            let max = z.clone().max_dim(1);
            let e = (z.clone() - max.clone()).exp();
            let sum = e.clone().sum_dim(1);
            let lse = max + sum.clone().log();
            let target = targets.clone().narrow(0, s, m).reshape([m, 1]);
            lps.push(z.clone().gather(1, target) - lse.clone());
            if with_entropy {
                entropies.push(lse.clone() - (e / sum * z).sum_dim(1));
            }
            lses.push(lse);
        }
        let entropy = with_entropy.then(|| Tensor::cat(entropies, 0).reshape([n]));
        (Tensor::cat(lps, 0).reshape([n]), Tensor::cat(lses, 0), entropy)
    }

    /// (dh `[N, C]`, dW `[C, V]` when `weight_grad`) for incoming log-prob gradients `g` `[N]`.
    fn backward<X: Backend>(
        self,
        h: Tensor<X, 2>,
        w: Tensor<X, 2>,
        targets: Tensor<X, 1, Int>,
        lse: Tensor<X, 2>,
        g: Tensor<X, 1>,
        weight_grad: bool,
    ) -> (Tensor<X, 2>, Option<Tensor<X, 2>>) {
        let n = h.dims()[0];
        let mut dw = weight_grad.then(|| w.zeros_like());
        let mut dhs = Vec::new();
        for (s, m) in self.ranges(n) {
            let p = (self.logits(&h, &w, s, m) - lse.clone().narrow(0, s, m)).exp();
            let gc = g.clone().narrow(0, s, m).reshape([m, 1]);
            let target = targets.clone().narrow(0, s, m).reshape([m, 1]);
            let mut dz = (p * gc.clone().neg()).scatter(1, target, gc, IndexingUpdateOp::Add);
            if self.temperature != 1.0 {
                dz = dz / self.temperature;
            }
            dhs.push(matmul(dz.clone(), w.clone().transpose()));
            dw = dw.map(|dw| dw + h.clone().narrow(0, s, m).transpose().matmul(dz));
        }
        (Tensor::cat(dhs, 0), dw)
    }
}
