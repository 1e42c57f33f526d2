//! Causal grouped-query attention for training on the CPU backend: FlashAttention's forward
//! and backward passes as fused kernels over blocks of query rows.
//!
//! The portable version (model/lowmem/attention.rs) composes each block from Burn tensor
//! operations: a score matrix, a mask filled above the diagonal, a max, an exponential, a sum
//! and a division, each a pass over memory and a fresh buffer, with Burn's `exp` a scalar libm
//! call per element. Here one rayon task per (row, head) in the forward pass and per (row,
//! key/value head) in the backward pass runs `gemm` on a block's scores in a scratch buffer
//! of its own and does the softmax and its gradient in place, in loops that vectorise (the
//! exponential of `swiglu`), over the causal prefix only.
//!
//! Per block of n query rows s..e of one head (e = s + n), with scale c = 1/√D:
//! - forward: S = c·Q Kᵀ over keys 0..e; m = rowmax S on each row's prefix; P = exp(S − m),
//!   0 past the prefix; O = (P V) / ΣP; lse = m + ln ΣP.
//! - backward: P = exp(c·Q Kᵀ − lse) on the prefix; dV += Pᵀ dO; dP = dO Vᵀ;
//!   dS = P ⊙ (dP − Δ) with Δ = rowsum(dO ⊙ O); dQ = c·dS K; dK += c·dSᵀ Q.
//!
//! Every task computes its outputs alone in a fixed order (gemm on one thread), so results do
//! not depend on scheduling or thread count, and a block recomputed by activation checkpointing
//! reproduces the forward pass bit for bit. The backward task owns one key/value head's dK and
//! dV and the dQ of its query heads, so nothing is reduced across threads; that gives B·KVH
//! tasks, enough for the few cores of a CPU.

use burn::prelude::*;
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use super::attention::{dims, dot, flex_f32};
use super::swiglu::exp;

/// Query rows per block when the caller does not choose: a block's scores are 64 × T floats
/// per task (2 MiB at 8 k tokens), and 64 rows keep gemm's products efficient.
pub(crate) const FUSED_ROWS: usize = 64;

/// The forward pass: (output `[B, H, T, D]`, log-sum-exp `[B, H, T, 1]`), or `None` when
/// the tensors are not flex f32 (the caller then takes the portable path).
///
/// `q`: `[B, H, T, D]`; `k`, `v`: `[B, KVH, T, D]`, KVH dividing H; `rows`: query rows per
/// block. Rows are right-padded, as for the portable version.
pub(crate) fn causal_forward<X: Backend>(
    q: &Tensor<X, 4>,
    k: &Tensor<X, 4>,
    v: &Tensor<X, 4>,
    rows: usize,
) -> Option<(Tensor<X, 4>, Tensor<X, 4>)> {
    let device = q.device();
    let (q, k, v) = (
        flex_f32(q)?.to_contiguous(),
        flex_f32(k)?.to_contiguous(),
        flex_f32(v)?.to_contiguous(),
    );
    let ([b, h, t, d], [_, kvh, _, _]) = (dims(&q), dims(&k));
    let (qd, kd, vd) = (q.storage::<f32>(), k.storage::<f32>(), v.storage::<f32>());
    let (rep, rows) = (h / kvh, rows.max(1));
    let mut out = vec![0f32; b * h * t * d];
    let mut lse = vec![0f32; b * h * t];
    out.par_chunks_mut(t * d)
        .zip(lse.par_chunks_mut(t))
        .enumerate()
        .for_each_init(Scratch::default, |scratch, (pair, (out, lse))| {
            let kv = (pair / h * kvh + pair % h / rep) * t * d;
            let head = Head {
                q: &qd[pair * t * d..(pair + 1) * t * d],
                k: &kd[kv..kv + t * d],
                v: &vd[kv..kv + t * d],
                d,
            };
            head.forward(rows, scratch, out, lse);
        });
    Some((
        Tensor::from_data(TensorData::new(out, [b, h, t, d]), &device),
        Tensor::from_data(TensorData::new(lse, [b, h, t, 1]), &device),
    ))
}

/// The backward pass: (dQ, dK, dV) from Q, K, V, the output O, its gradient dO and the
/// forward's log-sum-exp, or `None` when the tensors are not flex f32.
pub(crate) fn causal_backward<X: Backend>(
    [q, k, v, out, dout]: [&Tensor<X, 4>; 5],
    lse: &Tensor<X, 4>,
    rows: usize,
) -> Option<(Tensor<X, 4>, Tensor<X, 4>, Tensor<X, 4>)> {
    let device = q.device();
    let [q, k, v, out, dout, lse] = [q, k, v, out, dout, lse].map(flex_f32);
    let (q, k, v, out, dout, lse) = (
        q?.to_contiguous(),
        k?.to_contiguous(),
        v?.to_contiguous(),
        out?.to_contiguous(),
        dout?.to_contiguous(),
        lse?.to_contiguous(),
    );
    let ([b, h, t, d], [_, kvh, _, _]) = (dims(&q), dims(&k));
    let (qd, kd, vd) = (q.storage::<f32>(), k.storage::<f32>(), v.storage::<f32>());
    let (od, dod, ld) = (out.storage::<f32>(), dout.storage::<f32>(), lse.storage::<f32>());
    let (rep, rows) = (h / kvh, rows.max(1));
    let (mut dq, mut dk, mut dv) = (
        vec![0f32; b * h * t * d],
        vec![0f32; b * kvh * t * d],
        vec![0f32; b * kvh * t * d],
    );
    let group = rep * t * d;
    dq.par_chunks_mut(group)
        .zip(dk.par_chunks_mut(t * d).zip(dv.par_chunks_mut(t * d)))
        .enumerate()
        .for_each_init(Scratch::default, |scratch, (kv, (dq, (dk, dv)))| {
            let (k, v) = (&kd[kv * t * d..(kv + 1) * t * d], &vd[kv * t * d..(kv + 1) * t * d]);
            // The group's query heads are adjacent in `[B, H, T, D]`: kv·rep.. (kv+1)·rep.
            for (r, dq) in dq.chunks_mut(t * d).enumerate() {
                let (at, head) = (kv * group + r * t * d, kv * rep + r);
                let grads = Grads {
                    out: &od[at..at + t * d],
                    dout: &dod[at..at + t * d],
                    lse: &ld[head * t..(head + 1) * t],
                };
                let head = Head {
                    q: &qd[at..at + t * d],
                    k,
                    v,
                    d,
                };
                head.backward(&grads, rows, scratch, dq, dk, dv);
            }
        });
    Some((
        Tensor::from_data(TensorData::new(dq, [b, h, t, d]), &device),
        Tensor::from_data(TensorData::new(dk, [b, kvh, t, d]), &device),
        Tensor::from_data(TensorData::new(dv, [b, kvh, t, d]), &device),
    ))
}

/// One query head's rows `[T, D]` and the key/value head it reads.
struct Head<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    d: usize,
}

/// What the backward pass reads of one query head besides its inputs: O, dO `[T, D]` and
/// the log-sum-exp `[T]`.
struct Grads<'a> {
    out: &'a [f32],
    dout: &'a [f32],
    lse: &'a [f32],
}

/// A task's buffers, reused across its blocks: scores (then probabilities) and their gradient.
#[derive(Default)]
struct Scratch {
    p: Vec<f32>,
    dp: Vec<f32>,
}

impl Head<'_> {
    fn tokens(&self) -> usize {
        self.q.len() / self.d
    }

    fn scale(&self) -> f32 {
        1.0 / (self.d as f32).sqrt()
    }

    /// S = c·Q[s..e] K[0..e]ᵀ into `p` (`[n, e]`, row-major).
    fn scores(&self, s: usize, e: usize, p: &mut Vec<f32>) {
        let (n, d) = (e - s, self.d);
        p.clear();
        p.resize(n * e, 0.0);
        let q = Mat::rows(&self.q[s * d..e * d], d);
        product(n, e, d, p, false, q, Mat::cols(self.k, d), self.scale());
    }

    fn forward(&self, rows: usize, scratch: &mut Scratch, out: &mut [f32], lse: &mut [f32]) {
        let d = self.d;
        for (s, e) in blocks(self.tokens(), rows) {
            self.scores(s, e, &mut scratch.p);
            // The rows' 1/ΣP: the product runs on the unnormalised exponentials.
            scratch.dp.clear();
            for (i, row) in scratch.p.chunks_mut(e).enumerate() {
                let (max, sum) = softmax_prefix(row, s + i + 1);
                lse[s + i] = max + sum.ln();
                scratch.dp.push(1.0 / sum);
            }
            let o = &mut out[s * d..e * d];
            product(
                e - s,
                d,
                e,
                o,
                false,
                Mat::rows(&scratch.p, e),
                Mat::rows(self.v, d),
                1.0,
            );
            for (row, &inv) in o.chunks_mut(d).zip(&scratch.dp) {
                row.iter_mut().for_each(|x| *x *= inv);
            }
        }
    }

    fn backward(&self, g: &Grads, rows: usize, scratch: &mut Scratch, dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) {
        let (d, c) = (self.d, self.scale());
        for (s, e) in blocks(self.tokens(), rows) {
            let n = e - s;
            let dout = Mat::rows(&g.dout[s * d..e * d], d);
            self.scores(s, e, &mut scratch.p);
            for (i, row) in scratch.p.chunks_mut(e).enumerate() {
                exp_prefix(row, s + i + 1, g.lse[s + i]);
            }
            // dV[0..e] += Pᵀ dO
            product(e, d, n, &mut dv[..e * d], true, Mat::rows(&scratch.p, e).t(), dout, 1.0);
            // dP = dO V[0..e]ᵀ, then dS = P ⊙ (dP − Δ) in its place.
            scratch.dp.clear();
            scratch.dp.resize(n * e, 0.0);
            product(n, e, d, &mut scratch.dp, false, dout, Mat::cols(self.v, d), 1.0);
            for (i, (ds, p)) in scratch.dp.chunks_mut(e).zip(scratch.p.chunks(e)).enumerate() {
                let at = (s + i) * d..(s + i + 1) * d;
                let delta = wide_dot(&g.dout[at.clone()], &g.out[at]);
                softmax_grad_prefix(ds, p, s + i + 1, delta);
            }
            let ds = Mat::rows(&scratch.dp, e);
            // dQ[s..e] = c·dS K[0..e]; dK[0..e] += c·dSᵀ Q[s..e]
            product(n, d, e, &mut dq[s * d..e * d], false, ds, Mat::rows(self.k, d), c);
            let q = Mat::rows(&self.q[s * d..e * d], d);
            product(e, d, n, &mut dk[..e * d], true, ds.t(), q, c);
        }
    }
}

/// The blocks' (first row, row after the last).
fn blocks(t: usize, rows: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t).step_by(rows).map(move |s| (s, (s + rows).min(t)))
}

/// A matrix operand in a slice: element (i, j) at `i·rs + j·cs`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rs: isize,
    cs: isize,
}

impl<'a> Mat<'a> {
    /// Row-major with `width` columns.
    fn rows(data: &'a [f32], width: usize) -> Self {
        Mat {
            data,
            rs: width as isize,
            cs: 1,
        }
    }

    /// The transpose of a row-major matrix with `width` columns.
    fn cols(data: &'a [f32], width: usize) -> Self {
        Mat::rows(data, width).t()
    }

    fn t(self) -> Self {
        Mat {
            data: self.data,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// Whether an `m × n` matrix lies inside the slice.
    fn holds(&self, m: usize, n: usize) -> bool {
        let last = (m as isize - 1) * self.rs + (n as isize - 1) * self.cs;
        m > 0 && n > 0 && last >= 0 && (last as usize) < self.data.len()
    }
}

/// dst `[m, n]` (row-major) = (dst if `accumulate`) + alpha · A `[m, k]` · B `[k, n]`, on the
/// calling thread.
#[allow(clippy::too_many_arguments)]
fn product(m: usize, n: usize, k: usize, dst: &mut [f32], accumulate: bool, a: Mat, b: Mat, alpha: f32) {
    assert!(
        dst.len() >= m * n && a.holds(m, k) && b.holds(k, n),
        "operands out of bounds"
    );
    // SAFETY: the three operands lie inside their slices (checked above), `dst` is borrowed
    // mutably and the inputs shared, so they do not overlap.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs,
            a.rs,
            b.data.as_ptr(),
            b.cs,
            b.rs,
            1.0,
            alpha,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

wide_fn! {
    /// A row of scores becomes exp(S − max) on its first `len` entries and 0 after; returns
    /// (max, sum of the exponentials).
    fn softmax_prefix(row: &mut [f32], len: usize) -> (f32, f32) {
        let (live, dead) = row.split_at_mut(len);
        let max = lanes(live, f32::NEG_INFINITY, f32::max);
        live.iter_mut().for_each(|x| *x = exp(*x - max));
        dead.fill(0.0);
        (max, lanes(live, 0.0, |a, b| a + b))
    }
}

wide_fn! {
    /// A row of scores becomes exp(S − lse) on its first `len` entries and 0 after.
    fn exp_prefix(row: &mut [f32], len: usize, lse: f32) {
        let (live, dead) = row.split_at_mut(len);
        live.iter_mut().for_each(|x| *x = exp(*x - lse));
        dead.fill(0.0);
    }
}

wide_fn! {
    /// dP becomes dS = P ⊙ (dP − Δ) on its first `len` entries and 0 after.
    fn softmax_grad_prefix(dp: &mut [f32], p: &[f32], len: usize, delta: f32) {
        let (live, dead) = dp.split_at_mut(len);
        live.iter_mut().zip(p).for_each(|(x, &p)| *x = p * (*x - delta));
        dead.fill(0.0);
    }
}

wide_fn! {
    /// The dot product of model/flex/attention.rs, compiled for AVX2 where the CPU has it.
    fn wide_dot(a: &[f32], b: &[f32]) -> f32 {
        dot(a, b)
    }
}

/// `xs` folded by `f` in eight interleaved lanes (a reduction the compiler vectorises, where a
/// single running value would be a chain of dependent scalar operations).
#[inline(always)]
fn lanes(xs: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(init, |a, &x| f(a, x));
    for c in chunks {
        for i in 0..8 {
            acc[i] = f(acc[i], c[i]);
        }
    }
    acc.into_iter().fold(tail, f)
}
