//! Causal self-attention with grouped-query heads (KVH ≤ H key/value heads shared by H / KVH
//! query heads each) and an optional KV cache.

use burn::prelude::*;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

use super::cache::LayerKv;
use super::flex::{masked_attention, swap_middle};
use super::init::HostInit;
use super::lowmem::{causal_attention, fused_kernel, materialise_short_rows, materialised_attention};
use super::projection::Projection;
use super::rope::Rope;

/// Shapes: B batch, W new tokens, Tk keys attended (cache slots + W), H query heads,
/// KVH key/value heads, D head width, C = H·D model width.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// `[C, H·D]`
    pub q: Projection<B>,
    /// `[C, KVH·D]`
    pub k: Projection<B>,
    /// `[C, KVH·D]`
    pub v: Projection<B>,
    /// `[H·D, C]`
    pub o: Projection<B>,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl<B: Backend> Attention<B> {
    /// Fresh weights; with `qkv_bias` the query, key and value projections get zero biases.
    pub fn init(
        d_model: usize,
        n_heads: usize,
        n_kv_heads: usize,
        qkv_bias: bool,
        out_std: f64,
        init: &mut HostInit<'_, B>,
    ) -> Self {
        let head_dim = d_model / n_heads;
        let mut proj = |width: usize| {
            let layer = init.linear(d_model, width, init.std);
            if qkv_bias {
                init.with_bias(layer).into()
            } else {
                layer.into()
            }
        };
        Self {
            q: proj(n_heads * head_dim),
            k: proj(n_kv_heads * head_dim),
            v: proj(n_kv_heads * head_dim),
            o: init.linear(n_heads * head_dim, d_model, out_std).into(),
            n_heads,
            n_kv_heads,
            head_dim,
        }
    }

    /// # Shapes
    /// - `x`: `[B·W, C]` (flattened so every projection is one matrix product)
    /// - `mask`: `[B, 1, W, Tk]`, true where query w must not attend key t; `None` with `causal`
    ///   for a plain causal pass (right padding needs no mask: a real token never sees the
    ///   padding after it). With `causal`, keys after the query are masked (aligned
    ///   bottom-right: query w sees keys ≤ Tk − W + w).
    /// - `cache`: when given, the W new keys/values are written at `slot..slot + W` and the
    ///   queries attend to all S cache slots (Tk = S); the mask then carries causality.
    /// - returns `[B·W, C]`
    pub fn forward(
        &self,
        x: Tensor<B, 2>,
        rope: &Rope<B>,
        batch: usize,
        mask: Option<Tensor<B, 4, Bool>>,
        causal: bool,
        cache: Option<(&mut LayerKv<B>, usize)>,
    ) -> Tensor<B, 2> {
        let (b, w) = (batch, x.dims()[0] / batch);
        let (h, kvh, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let q = split_heads(rope.apply_q(self.q.forward(x.clone())), b, h);
        let k = split_heads(rope.apply_k(self.k.forward(x.clone())), b, kvh);
        let v = split_heads(self.v.forward(x), b, kvh);
        let (k, v) = match cache {
            Some((kv, slot)) => kv.write(slot, k, v),
            None => (k, v),
        };
        // The full-sequence (training) pass: blocked, in memory linear in T (model/lowmem),
        // unless the backend has no fused kernel for it and the rows are short enough for the
        // materialised scores to cost no more.
        if causal && mask.is_none() && k.dims()[2] == w {
            let y = if !fused_kernel::<B>() && materialise_short_rows(w, h, h * d) {
                materialised_attention(q, k, v)
            } else {
                causal_attention(q, k, v, None)
            };
            return self.output(y, b, w);
        }
        if let Some(y) = mask
            .as_ref()
            .filter(|_| !causal)
            .and_then(|m| masked_attention(&q, &k, &v, m))
        {
            return self.output(y, b, w);
        }
        let tk = k.dims()[2];
        let (k, v) = if kvh == h {
            (k, v)
        } else {
            let rep = h / kvh;
            let expand = |t: Tensor<B, 4>| {
                t.unsqueeze_dim::<5>(2)
                    .expand([b, kvh, rep, tk, d])
                    .reshape([b, h, tk, d])
            };
            (expand(k), expand(v))
        };
        let mask = mask.map(|m| m.expand([b, h, w, tk]));
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: causal,
        };
        self.output(attention(q, k, v, mask, None, options), b, w)
    }

    /// Heads `[B, H, W, D]` → output projection `[B·W, C]`.
    fn output(&self, y: Tensor<B, 4>, b: usize, w: usize) -> Tensor<B, 2> {
        let hd = self.n_heads * self.head_dim;
        let y = if w == 1 {
            y.reshape([b, hd])
        } else {
            swap_middle(y).reshape([b * w, hd])
        };
        self.o.forward(y)
    }
}

/// `[B·W, N·D]` → `[B, N, W, D]`. With one token per row (decoding) this is a plain reshape:
/// the memory order is already right, and a `swap_dims` would leave a layout that the CPU
/// backend does not recognise as contiguous and copies element by element in every op after.
/// With several tokens the heads are moved once, in runs of D (`swap_middle`).
fn split_heads<B: Backend>(t: Tensor<B, 2>, b: usize, n: usize) -> Tensor<B, 4> {
    let [rows, width] = t.dims();
    let (w, d) = (rows / b, width / n);
    if w == 1 {
        t.reshape([b, n, 1, d])
    } else {
        swap_middle(t.reshape([b, w, n, d]))
    }
}
