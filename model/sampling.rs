//! Batched sampling on the device: greedy, temperature, top-k, top-p.
//!
//! Randomness comes from host-drawn uniforms (one per row per step, uploaded once per
//! generation) and inverse-CDF sampling, not from the backend's RNG: Burn's RNG is global per
//! backend, so parallel work would perturb it, and it differs between backends. With host
//! uniforms a seed fixes the samples on every backend up to float rounding.

use burn::prelude::*;
use burn::tensor::activation::softmax;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::flex;
use crate::error::{Error, Result};

/// How the next token is drawn from the logits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplerConfig {
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f64,
    /// Keep only the k most likely tokens; 0 disables.
    #[serde(default)]
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose mass reaches p; 1 disables.
    #[serde(default = "one")]
    pub top_p: f64,
}

fn one() -> f64 {
    1.0
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        }
    }
}

impl SamplerConfig {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::config("temperature", self.temperature, "must be finite and ≥ 0"));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::config("top_p", self.top_p, "must be in (0, 1]"));
        }
        Ok(())
    }
}

/// A uniform draw in the open interval (0, 1) with 24 bits of resolution, so that `u · total`
/// is strictly inside the CDF's range and a zero-probability token can never be chosen.
pub fn open_uniform(rng: &mut StdRng) -> f32 {
    ((rng.random::<u32>() >> 8) as f32 + 0.5) / (1u32 << 24) as f32
}

/// `[steps, rows]` uniforms for a whole generation, uploaded at once.
pub fn uniforms<B: Backend>(steps: usize, rows: usize, rng: &mut StdRng, device: &B::Device) -> Tensor<B, 2> {
    let values: Vec<f32> = (0..steps * rows).map(|_| open_uniform(rng)).collect();
    Tensor::from_data(TensorData::new(values, [steps, rows]), device)
}

/// `[steps, rows]` uniforms with column r drawn from `rngs[r]` alone: what a row samples does
/// not depend on which other rows share its batch (data-parallel peers batch different rows).
pub fn row_uniforms<B: Backend>(steps: usize, rngs: &mut [StdRng], device: &B::Device) -> Tensor<B, 2> {
    let rows = rngs.len();
    let mut values = vec![0.0f32; steps * rows];
    for (r, rng) in rngs.iter_mut().enumerate() {
        for t in 0..steps {
            values[t * rows + r] = open_uniform(rng);
        }
    }
    Tensor::from_data(TensorData::new(values, [steps, rows]), device)
}

/// `n` independent generators seeded from `rng`, in order: one per problem (or row), so that
/// a problem's samples are the same whichever subset of problems is drawn together.
pub fn split_rngs(rng: &mut StdRng, n: usize) -> Vec<StdRng> {
    (0..n).map(|_| StdRng::seed_from_u64(rng.random())).collect()
}

/// Draws one token per row.
///
/// # Shapes
/// - `logits`: `[B, V]`
/// - `uniform`: `[B]`, values in (0, 1)
/// - returns `[B]` token ids
pub fn sample<B: Backend>(logits: Tensor<B, 2>, uniform: Tensor<B, 1>, config: &SamplerConfig) -> Tensor<B, 1, Int> {
    let [b, v] = logits.dims();
    if config.temperature <= 0.0 {
        return logits.argmax(1).reshape([b]);
    }
    let top_k = if config.top_k > 0 && config.top_k < v {
        config.top_k
    } else {
        v
    };
    if top_k == v && config.top_p >= 1.0 {
        // The CPU backend, large vocabularies: softmax and CDF in one (model/flex/softmax_cdf.rs).
        if let Some(index) = flex::sample_softmax(&logits, &uniform, config.temperature as f32) {
            return index.reshape([b]);
        }
        let probs = softmax(logits / config.temperature, 1);
        return inverse_cdf(probs, uniform).clamp(0, v as i32 - 1).reshape([b]);
    }
    let scaled = logits / config.temperature;
    // Work in sorted order: the first k columns are the top-k, and top-p is a prefix of them.
    let (sorted, order) = if top_k < v {
        scaled.topk_with_indices(top_k, 1)
    } else {
        scaled.sort_descending_with_indices(1)
    };
    let mut probs = softmax(sorted, 1);
    if config.top_p < 1.0 {
        // Keep token i while the mass strictly before it is below p (the first is always kept).
        let before = probs.clone().cumsum(1) - probs.clone();
        probs = probs.clone() * before.lower_elem(config.top_p).float();
    }
    let rank = inverse_cdf(probs, uniform).clamp(0, top_k as i32 - 1);
    order.gather(1, rank).reshape([b])
}

/// Index of the first column whose cumulative mass reaches `u · total`, per row.
///
/// # Shapes
/// `probs`: `[B, N]` (unnormalised is fine), `uniform`: `[B]` → `[B, 1]`
fn inverse_cdf<B: Backend>(probs: Tensor<B, 2>, uniform: Tensor<B, 1>) -> Tensor<B, 2, Int> {
    // The CPU backend: one pass per row, the same indices (model/flex/cdf.rs).
    if let Some(index) = flex::inverse_cdf(&probs, &uniform) {
        return index;
    }
    let [b, n] = probs.dims();
    let cdf = probs.cumsum(1);
    let total = cdf.clone().narrow(1, n - 1, 1);
    let threshold = uniform.reshape([b, 1]) * total;
    cdf.lower(threshold.expand([b, n])).int().sum_dim(1)
}
