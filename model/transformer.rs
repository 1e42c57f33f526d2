//! The decoder: embedding → blocks → RMSNorm → output head (optionally tied to the embedding).
//! Two forward paths share every layer: [`Transformer::forward`] over whole (padded) sequences
//! for training and log-probs, and [`Transformer::forward_cached`] that appends a chunk to a
//! [`KvCache`] for decoding.

use burn::nn::{Embedding, Linear, RmsNorm, RmsNormConfig};
use burn::prelude::*;
use burn::tensor::module::linear;
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::block::Block;
use super::cache::KvCache;
use super::config::TransformerConfig;
use super::init::HostInit;
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
            norm: RmsNormConfig::new(config.d_model).with_epsilon(config.norm_eps).init(device),
            head,
            config: config.clone(),
        })
    }

    /// Full-sequence forward.
    ///
    /// # Shapes
    /// - `tokens`: `[B, T]`
    /// - `valid`: `[B, T]`, true for real tokens; `None` = no padding. Rows are right-padded:
    ///   a row's real tokens come first, at positions 0, 1, …
    /// - returns logits `[B, T, V]`
    pub fn forward(&self, tokens: Tensor<B, 2, Int>, valid: Option<Tensor<B, 2, Bool>>) -> Tensor<B, 3> {
        let h = self.forward_hidden(tokens, valid);
        self.logits(h)
    }

    /// Full-sequence forward up to the final norm (before the output head).
    ///
    /// # Shapes
    /// `tokens`, `valid`: `[B, T]` → `[B, T, C]`
    pub fn forward_hidden(&self, tokens: Tensor<B, 2, Int>, valid: Option<Tensor<B, 2, Bool>>) -> Tensor<B, 3> {
        let [b, t] = tokens.dims();
        let device = tokens.device();
        let positions = Tensor::<B, 1, Int>::arange(0..t as i64, &device).reshape([1, t]);
        let rope = Rope::new(positions, self.config.head_dim(), self.config.rope_theta);
        let key_masked = match valid {
            Some(valid) => valid.bool_not(),
            None => Tensor::<B, 2, Int>::zeros([b, t], &device).bool(),
        };
        let mut x = self.embed.forward(tokens);
        for block in &self.blocks {
            x = block.forward(x, &rope, key_masked.clone(), None);
        }
        self.norm.forward(x)
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
        let [b, w] = tokens.dims();
        if b != cache.rows() {
            return Err(Error::Budget(format!("{b} token rows for a cache of {} rows", cache.rows())));
        }
        let (slot, positions, key_masked) = cache.advance(w, counts)?;
        let rope = Rope::new(positions, self.config.head_dim(), self.config.rope_theta);
        let mut x = self.embed.forward(tokens);
        for (block, kv) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            x = block.forward(x, &rope, key_masked.clone(), Some((kv, slot)));
        }
        Ok(self.logits(self.norm.forward(x)))
    }

    /// Output head on normalised hidden states.
    ///
    /// # Shapes
    /// `[B, T, C]` → `[B, T, V]`
    pub fn logits(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.head {
            Some(head) => head.forward(h),
            None => linear(h, self.embed.weight.val().transpose(), None),
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
