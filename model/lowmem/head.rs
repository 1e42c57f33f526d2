//! Token log-probs through the output head in chunks of rows, with their own backward pass:
//! training never holds the `[N, V]` logits (Liger-Kernel's fused linear cross-entropy, as
//! Burn tensor operations).
//!
//! With z = h W / τ for one chunk of rows: lse = log Σ_v exp z_v; log π(y) = z_y − lse;
//! entropy = lse − Σ_v softmax(z)_v z_v. With g the incoming gradient of log π(y), the
//! backward pass needs dz = g (onehot(y) − softmax(z)) / τ, then dh = dz Wᵀ and, when W is
//! trained, dW = hᵀ dz. What the forward pass saves for it (see [`Saved`]):
//! - a frozen head (as under LoRA): dh is g times a = (onehot(y) − softmax(z)) Wᵀ / τ, a row
//!   vector per token that does not depend on g, so the forward pass computes a while it has
//!   the chunk's softmax and saves only `[N, C]`: no product is left for the backward pass;
//! - a trained head whose softmax over all N rows fits [`KEEP_ELEMENTS`]: each chunk's
//!   softmax, so the backward pass has two products to do instead of three;
//! - a trained head beyond that: h, W and lse; the backward pass recomputes each chunk's
//!   logits, and the memory is independent of T.
//!
//! The kept softmax is the one place here where memory grows with N, up to a constant
//! (1 GiB): at Qwen2's vocabulary, rows of up to 1.7 k tokens. There the recomputed product
//! had made a 1,024-token step of Qwen2.5-0.5B's shapes (2 layers) 14 % slower than the code
//! before model/lowmem; keeping the softmax makes it 7 % faster (BENCHMARKS.md).
//!
//! A head stored in half precision multiplies in its own type (model/precision.rs); the
//! softmax is f32.

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

/// The fewest rows per chunk of the head. Each chunk's products pack the whole `[C, V]` weight
/// for gemm, and each adds one pass over the `[C, V]` weight gradient; that fixed cost per
/// chunk is a share ∝ 1/rows of the chunk's arithmetic. At a real vocabulary the block budget
/// alone gives few rows (27 at Qwen2's 151,936) and that cost dominated: a 1,024-token step of
/// Qwen2.5-0.5B's shapes (2 layers) took 19 s against 8.6 s before model/lowmem, 19 % of it
/// in gemm's packing (BENCHMARKS.md). 256 rows hold a chunk's logits to 156 MB at that
/// vocabulary (a backward pass keeps a few such tensors at once), still independent of T.
pub const HEAD_MIN_ROWS: usize = 256;

/// The most softmax entries (N × V) a trained head keeps for its backward pass instead of
/// recomputing the logits there: 2²⁸, 1 GiB in f32.
pub const KEEP_ELEMENTS: usize = 1 << 28;

/// How [`head_logprobs`] walks and what it keeps.
#[derive(Debug, Clone, Copy)]
pub struct HeadOptions {
    /// Rows per chunk; `None` for [`head_block_rows`].
    pub block_rows: Option<usize>,
    /// A trained head keeps its softmax for the backward pass when it has at most this many
    /// entries (N × V); [`KEEP_ELEMENTS`] by default.
    pub keep_elements: usize,
}

impl Default for HeadOptions {
    fn default() -> Self {
        Self {
            block_rows: None,
            keep_elements: KEEP_ELEMENTS,
        }
    }
}

/// log softmax(h W / τ)[y] per row, and the entropy of softmax(h W / τ) when asked for
/// (detached: a metric). Gradients flow into `hidden` and `weight` on autodiff backends.
///
/// # Shapes
/// - `hidden`: `[N, C]`; `weight`: `[C, V]`; `targets`: `[N]`
/// - returns (`[N]`, `[N]`)
pub fn head_logprobs<B: Backend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    temperature: f64,
    with_entropy: bool,
    options: HeadOptions,
) -> (Tensor<B, 1>, Option<Tensor<B, 1>>) {
    assert!(
        temperature > 0.0,
        "log-probs need a positive temperature, got {temperature}"
    );
    let rows = options
        .block_rows
        .unwrap_or_else(|| head_block_rows(weight.dims()[1]))
        .max(1);
    let [n, v] = [hidden.dims()[0], weight.dims()[1]];
    let op = HeadLogprobs::<B> {
        targets: targets.into_primitive(),
        chunks: Chunks { temperature, rows },
        with_entropy,
        keep_probabilities: n.saturating_mul(v) <= options.keep_elements,
    };
    let mut out = apply::<B, 2, _>(op, [primitive(hidden), primitive(weight)]).into_iter();
    let logprobs = tensor(out.next().expect("log-probs"));
    (logprobs, out.next().map(tensor))
}

struct HeadLogprobs<B: Backend> {
    targets: IntTensor<B>,
    chunks: Chunks,
    with_entropy: bool,
    keep_probabilities: bool,
}

impl<B: Backend> CustomOp<B, 2> for HeadLogprobs<B> {
    fn tracked<I: Backend>(self, [h, w]: [Tracked<I>; 2]) -> Vec<Tracked<I>> {
        // `B` is `Autodiff<I>`, whose integer tensors are `I`'s.
        let targets: IntTensor<I> = cast(self.targets).unwrap_or_else(|_| unreachable!("B is Autodiff<I>"));
        let frozen = w.node.requirement.is_none();
        let prep = HeadBackward(self.chunks)
            .prepare::<NoCheckpointing>([h.node.clone(), w.node.clone()])
            .compute_bound()
            .stateful();
        let keep = match &prep {
            OpsKind::UnTracked(_) => Keep::Nothing,
            OpsKind::Tracked(_) if frozen => Keep::InputGradient,
            OpsKind::Tracked(_) if self.keep_probabilities => Keep::Probabilities,
            OpsKind::Tracked(_) => Keep::Lse,
        };
        let out = self.chunks.forward::<I>(
            tensor(h.primitive),
            tensor(w.primitive),
            Tensor::from_primitive(targets),
            self.with_entropy,
            keep,
        );
        let lp = primitive(out.logprobs);
        let node = match (prep, out.saved) {
            (OpsKind::Tracked(prep), Some(state)) => prep.finish(state, lp),
            (OpsKind::Tracked(_), None) => unreachable!("a tracked head keeps what its backward pass needs"),
            (OpsKind::UnTracked(prep), _) => prep.finish(lp),
        };
        let mut out_nodes = vec![node];
        out_nodes.extend(out.entropy.map(|e| Tracked::<I>::new(primitive(e))));
        out_nodes
    }

    fn plain(self, [h, w]: [FloatTensor<B>; 2]) -> Vec<FloatTensor<B>> {
        let targets = Tensor::from_primitive(self.targets);
        let out = self
            .chunks
            .forward::<B>(tensor(h), tensor(w), targets, self.with_entropy, Keep::Nothing);
        let mut prims = vec![primitive(out.logprobs)];
        prims.extend(out.entropy.map(primitive));
        prims
    }
}

#[derive(Debug, Clone, Copy)]
struct Chunks {
    temperature: f64,
    rows: usize,
}

/// What the forward pass keeps for the backward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keep {
    /// No backward pass follows.
    Nothing,
    /// The per-row log-sum-exp: the backward pass recomputes the logits.
    Lse,
    /// Each chunk's softmax.
    Probabilities,
    /// ∂ log π(y) / ∂h per row (a frozen head).
    InputGradient,
}

/// The forward pass's results.
struct Forward<X: Backend> {
    /// `[N]`
    logprobs: Tensor<X, 1>,
    /// `[N]`, when asked for
    entropy: Option<Tensor<X, 1>>,
    /// The backward pass's state, unless [`Keep::Nothing`].
    saved: Option<Saved<X>>,
}

/// The state of the backward pass.
#[derive(Debug, Clone)]
enum Saved<I: Backend> {
    /// h, W, the targets and the per-row log-sum-exp `[N, 1]`.
    Logits(FloatTensor<I>, FloatTensor<I>, IntTensor<I>, FloatTensor<I>),
    /// h, W, the targets and each chunk's softmax.
    Probabilities(FloatTensor<I>, FloatTensor<I>, IntTensor<I>, Vec<FloatTensor<I>>),
    /// ∂ log π(y) / ∂h per row, `[N, C]`: a frozen head's.
    InputGradient(FloatTensor<I>),
}

#[derive(Debug)]
struct HeadBackward(Chunks);

impl<I: Backend> Backward<I, 2> for HeadBackward {
    type State = Saved<I>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = tensor::<I, 1>(grads.consume::<I>(&ops.node));
        let [h_node, w_node] = ops.parents;
        let (dh, dw) = match ops.state {
            Saved::InputGradient(a) => {
                let n = g.dims()[0];
                (tensor::<I, 2>(a) * g.reshape([n, 1]), None)
            }
            Saved::Logits(h, w, targets, lse) => {
                let lse = tensor::<I, 2>(lse);
                let probabilities = |h: &Tensor<I, 2>, w: &Tensor<I, 2>, s, m| {
                    (self.0.logits(h, w, s, m) - lse.clone().narrow(0, s, m)).exp()
                };
                let (h, w) = (tensor(h), tensor(w));
                self.0.backward(
                    h,
                    w,
                    Tensor::from_primitive(targets),
                    g,
                    w_node.is_some(),
                    probabilities,
                )
            }
            Saved::Probabilities(h, w, targets, p) => {
                let mut p = p.into_iter();
                let probabilities = |_: &Tensor<I, 2>, _: &Tensor<I, 2>, _, _| tensor(p.next().expect("one per chunk"));
                let (h, w) = (tensor(h), tensor(w));
                self.0.backward(
                    h,
                    w,
                    Tensor::from_primitive(targets),
                    g,
                    w_node.is_some(),
                    probabilities,
                )
            }
        };
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

    /// dz = g (onehot(y) − p) / τ for one chunk: `[m, V]`.
    fn logit_gradient<X: Backend>(self, p: Tensor<X, 2>, g: Tensor<X, 2>, target: Tensor<X, 2, Int>) -> Tensor<X, 2> {
        let dz = (p * g.clone().neg()).scatter(1, target, g, IndexingUpdateOp::Add);
        if self.temperature == 1.0 {
            dz
        } else {
            dz / self.temperature
        }
    }

    fn forward<X: Backend>(
        self,
        h: Tensor<X, 2>,
        w: Tensor<X, 2>,
        targets: Tensor<X, 1, Int>,
        with_entropy: bool,
        keep: Keep,
    ) -> Forward<X> {
        let n = h.dims()[0];
        let (mut lps, mut lses, mut entropies, mut kept) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (s, m) in self.ranges(n) {
            let z = self.logits(&h, &w, s, m);
            let max = z.clone().max_dim(1);
            let e = (z.clone() - max.clone()).exp();
            let sum = e.clone().sum_dim(1);
            let lse = max + sum.clone().log();
            let target = targets.clone().narrow(0, s, m).reshape([m, 1]);
            lps.push(z.clone().gather(1, target.clone()) - lse.clone());
            // The softmax, once, when the entropy or the kept state needs it.
            let needs_p = with_entropy || matches!(keep, Keep::Probabilities | Keep::InputGradient);
            let p = needs_p.then(|| e / sum);
            if with_entropy {
                let p = p.clone().expect("computed for the entropy");
                entropies.push(lse.clone() - (p * z).sum_dim(1));
            }
            match (keep, p) {
                (Keep::Lse, _) => lses.push(lse),
                (Keep::Probabilities, Some(p)) => kept.push(p),
                (Keep::InputGradient, Some(p)) => {
                    let dz = self.logit_gradient(p, Tensor::ones([m, 1], &h.device()), target);
                    kept.push(matmul(dz, w.clone().transpose()));
                }
                _ => {}
            }
        }
        let entropy = with_entropy.then(|| Tensor::cat(entropies, 0).reshape([n]));
        let inputs = || {
            (
                primitive(h.clone()),
                primitive(w.clone()),
                targets.clone().into_primitive(),
            )
        };
        let saved = match keep {
            Keep::Nothing => None,
            Keep::Lse => {
                let (h, w, y) = inputs();
                Some(Saved::Logits(h, w, y, primitive(Tensor::cat(lses, 0))))
            }
            Keep::Probabilities => {
                let (h, w, y) = inputs();
                Some(Saved::Probabilities(h, w, y, kept.into_iter().map(primitive).collect()))
            }
            Keep::InputGradient => Some(Saved::InputGradient(primitive(Tensor::cat(kept, 0)))),
        };
        Forward {
            logprobs: Tensor::cat(lps, 0).reshape([n]),
            entropy,
            saved,
        }
    }

    /// (dh `[N, C]`, dW `[C, V]` when `weight_grad`) for incoming log-prob gradients `g` `[N]`,
    /// with `probabilities(h, w, s, m)` giving the softmax of rows s..s+m, chunk by chunk.
    fn backward<X: Backend>(
        self,
        h: Tensor<X, 2>,
        w: Tensor<X, 2>,
        targets: Tensor<X, 1, Int>,
        g: Tensor<X, 1>,
        weight_grad: bool,
        mut probabilities: impl FnMut(&Tensor<X, 2>, &Tensor<X, 2>, usize, usize) -> Tensor<X, 2>,
    ) -> (Tensor<X, 2>, Option<Tensor<X, 2>>) {
        let n = h.dims()[0];
        let mut dw = weight_grad.then(|| w.zeros_like());
        let mut dhs = Vec::new();
        for (s, m) in self.ranges(n) {
            let p = probabilities(&h, &w, s, m);
            let gc = g.clone().narrow(0, s, m).reshape([m, 1]);
            let target = targets.clone().narrow(0, s, m).reshape([m, 1]);
            let dz = self.logit_gradient(p, gc, target);
            dhs.push(matmul(dz.clone(), w.clone().transpose()));
            dw = dw.map(|dw| dw + h.clone().narrow(0, s, m).transpose().matmul(dz));
        }
        (Tensor::cat(dhs, 0), dw)
    }
}
