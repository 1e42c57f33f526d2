//! The decoder: embedding → blocks → RMSNorm → output head (optionally tied to the embedding).
//! Two forward paths share every layer: [`Transformer::forward`] over whole (padded) sequences
//! for training and log-probs, and [`Transformer::forward_cached`] that appends a chunk to a
//! [`KvCache`] for decoding.

use burn::nn::{Embedding, Linear, RmsNorm, RmsNormConfig};
use burn::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::block::Block;
use super::cache::KvCache;
use super::config::TransformerConfig;
use super::flex::{packing, packing_allowed, PACK_FROM_BYTES};
use super::generate::last_logits;
use super::init::HostInit;
use super::lora::BaseRef;
use super::precision::matmul;
use super::rope::Rope;
use crate::error::{Error, Result};

/// Standard deviation of the initial weights (GPT-2).
const INIT_STD: f64 = 0.02;

#[derive(Module, Debug)]
pub struct Transformer<B: Backend> {
    /// `[V, C]`
    pub embed: Embedding<B>,
    pub blocks: Vec<Block<B>>,
    pub norm: RmsNorm<B>,
    /// `[C, V]`; `None` when tied to `embed`.
    pub head: Option<Linear<B>>,
    #[module(skip)]
    pub config: TransformerConfig,
    /// Where the frozen base of this model's LoRA adapters comes from (model/lora.rs): a
    /// checkpoint then stores the adapters and names the base instead of copying it.
    #[module(skip)]
    pub lora_base: Option<BaseRef>,
}

impl<B: Backend> Transformer<B> {
    /// A freshly initialised model; the weights depend only on `(config, seed)`.
    pub fn new(config: &TransformerConfig, seed: u64, device: &B::Device) -> Result<Self> {
        config.validate()?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut init = HostInit::<B> {
            rng: &mut rng,
            device,
            std: INIT_STD,
        };
        let embed = init.embedding(config.vocab_size, config.d_model);
        let blocks = (0..config.n_layers).map(|_| Block::init(config, &mut init)).collect();
        let head = (!config.tie_embeddings).then(|| init.linear(config.d_model, config.vocab_size, INIT_STD));
        Ok(Self {
            embed,
            blocks,
            norm: RmsNormConfig::new(config.d_model)
                .with_epsilon(config.norm_eps)
                .init(device),
            head,
            config: config.clone(),
            lora_base: None,
        })
    }

    /// Full-sequence forward.
    ///
    /// Rows of different lengths are right-padded: a row's real tokens come first, at positions
    /// 0, 1, …, and under causal attention no real token attends to the padding after it, so
    /// the logits at real positions do not depend on the padding.
    ///
    /// # Shapes
    /// - `tokens`: `[B, T]`
    /// - returns logits `[B, T, V]`
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let h = self.forward_hidden(tokens);
        self.logits(h)
    }

    /// Full-sequence forward up to the final norm (before the output head).
    ///
    /// # Shapes
    /// `tokens`: `[B, T]` → `[B, T, C]`
    pub fn forward_hidden(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [b, t] = tokens.dims();
        let rope = self.sequence_rope(b, t);
        let mut x = self.embed_tokens(tokens);
        for block in &self.blocks {
            x = block.forward(x, &rope, b, None, true, None);
        }
        self.norm.forward(x).reshape([b, t, self.config.d_model])
    }

    /// Rotary tables for `batch` rows at positions 0..t (the full-sequence pass).
    pub(crate) fn sequence_rope(&self, batch: usize, t: usize) -> Rope<B> {
        let positions = Tensor::<B, 1, Int>::arange(0..t as i64, &self.device()).reshape([1, t]);
        self.rope(positions, batch)
    }

    fn rope(&self, positions: Tensor<B, 2, Int>, batch: usize) -> Rope<B> {
        let c = &self.config;
        Rope::new(positions, batch, c.head_dim(), c.n_heads, c.n_kv_heads, c.rope_theta)
    }

    /// Appends a chunk of tokens to `cache` and returns their logits.
    ///
    /// # Shapes
    /// - `tokens`: `[B, W]`; row b's real tokens are its first `counts[b]` (all W when `counts`
    ///   is `None`); the rest are holes whose logits are meaningless.
    /// - returns logits `[B, W, V]`
    pub fn forward_cached(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
        counts: Option<&[usize]>,
    ) -> Result<Tensor<B, 3>> {
        let chunk = self.reserve(&tokens, cache, counts)?;
        Ok(self.forward_chunk(tokens, cache, chunk, None))
    }

    /// [`Self::forward_cached`] that returns only the logits decoding samples from next: those
    /// of each row's last real token (position `counts[b] - 1`, or W − 1 without `counts`; a
    /// row that fed nothing gets position 0's, meaningless). The output head then multiplies
    /// B rows instead of B·W: on a prompt's prefill it is the largest product of the pass
    /// (SmolLM2: [C, 49,152], a fifth of the FLOPs of every position) and the largest tensor.
    ///
    /// # Shapes
    /// - `tokens`: `[B, W]` as in [`Self::forward_cached`]
    /// - returns logits `[B, V]`
    pub fn forward_cached_last(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
        counts: Option<&[usize]>,
    ) -> Result<Tensor<B, 2>> {
        let [b, w] = tokens.dims();
        let last: Vec<usize> = match counts {
            Some(counts) => counts.iter().map(|&c| c.max(1)).collect(),
            None => vec![w; b],
        };
        let chunk = self.reserve(&tokens, cache, counts)?;
        Ok(self
            .forward_chunk(tokens, cache, chunk, Some(&last))
            .reshape([b, self.config.vocab_size]))
    }

    /// Reserves the slots of a `[B, W]` chunk in `cache` (its rows must be the cache's).
    fn reserve(
        &self,
        tokens: &Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
        counts: Option<&[usize]>,
    ) -> Result<(usize, Tensor<B, 2, Int>, Tensor<B, 4, Bool>)> {
        let [b, w] = tokens.dims();
        if b != cache.rows() {
            return Err(Error::Budget(format!(
                "{b} token rows for a cache of {} rows",
                cache.rows()
            )));
        }
        cache.advance(w, counts)
    }

    /// Appends a *tree* of tokens per row to `cache` and returns their logits: row b's token i
    /// continues `parents[b][i]` (an earlier token of the row, or the cached prefix when `None`)
    /// and sees only the prefix and its own ancestors (see [`KvCache::advance_tree`]). Token i's
    /// logits are those a plain [`Self::forward_cached`] of its path would give. The cache is
    /// spent afterwards: it holds the tree, not a sequence to decode on from.
    ///
    /// # Shapes
    /// - `tokens`: `[B, W]`, W the size of the largest tree; row b's first `parents[b].len()`
    ///   tokens are real, the rest holes
    /// - returns logits `[B, W, V]`
    pub fn forward_tree(
        &self,
        tokens: Tensor<B, 2, Int>,
        parents: &[Vec<Option<usize>>],
        cache: &mut KvCache<B>,
    ) -> Result<Tensor<B, 3>> {
        let [b, w] = tokens.dims();
        if b != cache.rows() || parents.iter().map(Vec::len).max().unwrap_or(0) != w {
            return Err(Error::Budget(format!(
                "{b} token rows of width {w} for trees of {:?} tokens in a cache of {} rows",
                parents.iter().map(Vec::len).collect::<Vec<_>>(),
                cache.rows()
            )));
        }
        let chunk = cache.advance_tree(parents)?;
        Ok(self.forward_chunk(tokens, cache, chunk, None))
    }

    /// The layers over a chunk that `cache` has reserved: (first slot, positions `[B, W]`,
    /// mask `[B, 1, W, S]`). Returns the logits `[B, W, V]` of every position, or `[B, 1, V]`
    /// of position `last[b] - 1` of each row when `last` is given.
    fn forward_chunk(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
        (slot, positions, mask): (usize, Tensor<B, 2, Int>, Tensor<B, 4, Bool>),
        last: Option<&[usize]>,
    ) -> Tensor<B, 3> {
        let [b, w] = tokens.dims();
        let rope = self.rope(positions, b);
        packing(self.decodes_packed(), || {
            let mut x = self.embed_tokens(tokens);
            for (block, kv) in self.blocks.iter().zip(cache.layers.iter_mut()) {
                x = block.forward(x, &rope, b, Some(mask.clone()), false, Some((kv, slot)));
            }
            let h = self.norm.forward(x).reshape([b, w, self.config.d_model]);
            match last {
                Some(last) if w > 1 => self.logits(last_logits(h, last).reshape([b, 1, self.config.d_model])),
                _ => self.logits(h),
            }
        })
    }

    /// Whether cached forwards multiply by weights packed once (model/flex/packed.rs): for
    /// models whose matrices do not fit a CPU's caches, where decoding streams them, unless
    /// `MRT_PACKED_DECODING=0`.
    pub(crate) fn decodes_packed(&self) -> bool {
        self.config.num_params() * 4 >= PACK_FROM_BYTES && packing_allowed()
    }

    /// Output head on normalised hidden states.
    ///
    /// # Shapes
    /// `[B, T, C]` → `[B, T, V]`
    pub fn logits(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, c] = h.dims();
        matmul(h.reshape([b * t, c]), self.head_weight()).reshape([b, t, self.config.vocab_size])
    }

    /// The output head's weight `[C, V]` (the embedding's, transposed, when tied); the head
    /// has no bias (HF import refuses one).
    pub fn head_weight(&self) -> Tensor<B, 2> {
        match &self.head {
            Some(head) => {
                debug_assert!(head.bias.is_none(), "the output head has no bias");
                head.weight.val()
            }
            None => self.embed.weight.val().transpose(),
        }
    }

    /// An empty KV cache sized for this model.
    pub fn new_cache(&self, rows: usize, capacity: usize) -> KvCache<B> {
        KvCache::new(&self.config, rows, capacity, &self.embed.weight.device())
    }

    pub fn device(&self) -> B::Device {
        self.embed.weight.device()
    }
}
