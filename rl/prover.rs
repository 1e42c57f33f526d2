//! The meta-prover μ, value-free (MRT.md): the policy itself, forced to stop after episode j by
//! the suffix `<timeup> </think> <answer>`, answers now; J_j is the probability that this
//! forced answer is correct.
//!
//! - `Sample`: K forced answers are sampled and verified; J_j is the fraction correct (the
//!   paper's estimator, K = 8 in its analysis).
//! - `Exact`: when the answer is one token from a known set (`search`), J_j is read from the
//!   softmax: p(x | prefix, suffix) · p(`</answer>` | prefix, suffix, x), at the same
//!   temperature the `Sample` mode would draw the answers with.
//!
//! Both run on a *fork* of the rollout's KV cache taken at the episode boundary, so the prefix
//! is never recomputed: only the 3 suffix tokens and the answer tokens are.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use crate::data::{Problem, Task, Vocab};
use crate::error::{Error, Result};
use crate::model::cache::int_tensor;
use crate::model::{generate, last_logits, GenerateConfig, KvCache, SamplerConfig, Transformer};

/// How J is estimated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProverMode {
    /// Mean 0/1 reward of K sampled forced answers.
    Sample,
    /// Exact probability from the softmax (single-token answers only).
    Exact,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProverConfig {
    pub mode: ProverMode,
    /// K: forced answers sampled per boundary in `Sample` mode.
    pub samples: usize,
    /// Temperature of the forced answers (sampled, or the softmax J is read from).
    pub temperature: f64,
    /// Longest forced answer, in tokens, before it counts as malformed.
    pub max_answer_tokens: usize,
}

impl Default for ProverConfig {
    fn default() -> Self {
        Self {
            mode: ProverMode::Exact,
            samples: 8,
            temperature: 1.0,
            max_answer_tokens: 4,
        }
    }
}

impl ProverConfig {
    pub fn validate(&self, task: &dyn Task) -> Result<()> {
        if self.mode == ProverMode::Exact && !task.single_token_answer() {
            return Err(Error::config(
                "prover.mode",
                "exact",
                format!("task `{}` has no single-token answer; use \"sample\"", task.name()),
            ));
        }
        if self.mode == ProverMode::Sample && self.samples == 0 {
            return Err(Error::config("prover.samples", 0, "must be positive"));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(Error::config("prover.temperature", self.temperature, "must be > 0 (J is a probability under the sampling distribution)"));
        }
        if self.max_answer_tokens == 0 {
            return Err(Error::config("prover.max_answer_tokens", 0, "must be positive"));
        }
        Ok(())
    }
}

/// One J estimate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// Probability that the forced answer is correct.
    pub j: f32,
    /// Fraction (Sample) or probability mass (Exact, first answer token) of well-formed answers.
    pub well_formed: f32,
}

/// The forced termination suffix as ids.
pub fn suffix_ids(vocab: &Vocab) -> [u32; 3] {
    let s = vocab.specials;
    [s.time_up, s.end_think, s.answer]
}

/// Estimates J for every row of `cache`, row r being a prefix of a rollout of `problems[r]`
/// that ends at an episode boundary. Consumes the cache (it is a fork).
pub fn estimate<B: Backend>(
    model: &Transformer<B>,
    cache: KvCache<B>,
    problems: &[&Problem],
    task: &dyn Task,
    vocab: &Vocab,
    config: &ProverConfig,
    rng: &mut StdRng,
) -> Result<Vec<Estimate>> {
    let rows = cache.rows();
    assert_eq!(rows, problems.len(), "one problem per cache row");
    if rows == 0 {
        return Ok(Vec::new());
    }
    match config.mode {
        ProverMode::Exact => exact(model, cache, problems, task, vocab, config.temperature),
        ProverMode::Sample => sampled(model, cache, problems, task, vocab, config, rng),
    }
}

/// Appends the suffix to every row and returns the logits of the first answer token, `[R, V]`.
fn force<B: Backend>(model: &Transformer<B>, cache: &mut KvCache<B>, vocab: &Vocab) -> Result<Tensor<B, 2>> {
    let rows = cache.rows();
    let device = model.device();
    let suffix: Vec<i64> = (0..rows).flat_map(|_| suffix_ids(vocab).map(|i| i as i64)).collect();
    cache.ensure_capacity(3);
    let logits = model.forward_cached(Tensor::from_data(TensorData::new(suffix, [rows, 3]), &device), cache, None)?;
    Ok(last_logits(logits, &vec![3; rows]))
}

fn exact<B: Backend>(model: &Transformer<B>, mut cache: KvCache<B>, problems: &[&Problem], task: &dyn Task, vocab: &Vocab, temperature: f64) -> Result<Vec<Estimate>> {
    let rows = cache.rows();
    let device = model.device();
    let answers: Vec<usize> = problems
        .iter()
        .map(|p| {
            let word = task.exact_answer(p).ok_or_else(|| Error::config("prover.mode", "exact", "task has no exact answer"))?;
            vocab.id(&word).map(|i| i as usize).ok_or_else(|| Error::Tokenizer(format!("answer `{word}` not in vocabulary")))
        })
        .collect::<Result<_>>()?;
    // Mass on answer tokens that are well-formed answers by themselves.
    let formed: Vec<f32> = (0..vocab.size() as u32).map(|i| task.well_formed(&[vocab.word(i).to_string()]) as u8 as f32).collect();
    let formed = Tensor::<B, 1>::from_data(TensorData::new(formed, [vocab.size()]), &device);

    let first = log_softmax(force(model, &mut cache, vocab)? / temperature, 1); // [R, V]
    let ids = int_tensor::<B>(&answers, &device).reshape([rows, 1]);
    let lp_answer = first.clone().gather(1, ids.clone()).reshape([rows]);
    let mass = (first.exp().narrow(1, 0, vocab.size()) * formed.reshape([1, vocab.size()])).sum_dim(1).reshape([rows]);
    cache.ensure_capacity(1);
    let second = model.forward_cached(ids, &mut cache, None)?.reshape([rows, model.config.vocab_size]);
    let end = int_tensor::<B>(&vec![vocab.specials.end_answer as usize; rows], &device).reshape([rows, 1]);
    let lp_end = log_softmax(second / temperature, 1).gather(1, end).reshape([rows]);
    let j: Vec<f32> = (lp_answer + lp_end).exp().into_data().iter::<f32>().collect();
    let m: Vec<f32> = mass.into_data().iter::<f32>().collect();
    Ok(j.into_iter().zip(m).map(|(j, well_formed)| Estimate { j, well_formed }).collect())
}

fn sampled<B: Backend>(
    model: &Transformer<B>,
    cache: KvCache<B>,
    problems: &[&Problem],
    task: &dyn Task,
    vocab: &Vocab,
    config: &ProverConfig,
    rng: &mut StdRng,
) -> Result<Vec<Estimate>> {
    let k = config.samples;
    let mut cache = cache.replicate(k);
    let logits = force(model, &mut cache, vocab)?;
    cache.ensure_capacity(config.max_answer_tokens);
    let gen = GenerateConfig {
        max_new_tokens: config.max_answer_tokens,
        sampler: SamplerConfig {
            temperature: config.temperature,
            ..SamplerConfig::default()
        },
        stop_tokens: vec![vocab.specials.end_answer],
        check_every: config.max_answer_tokens,
    };
    let outs = generate(model, cache, logits, &gen, rng)?;
    Ok(problems
        .iter()
        .enumerate()
        .map(|(r, p)| {
            let (mut correct, mut formed) = (0usize, 0usize);
            for out in &outs[r * k..(r + 1) * k] {
                if out.last() == Some(&vocab.specials.end_answer) {
                    let words = vocab.decode(&out[..out.len() - 1]);
                    formed += task.well_formed(&words) as usize;
                    correct += task.verify(p, &words) as usize;
                }
            }
            Estimate {
                j: correct as f32 / k as f32,
                well_formed: formed as f32 / k as f32,
            }
        })
        .collect())
}

/// Boundary snapshots waiting for the prover, flushed in one batch.
pub struct ProverQueue<B: Backend> {
    caches: Vec<KvCache<B>>,
    /// (rollout row, episode index j, problem index) per queued cache row.
    pub tags: Vec<(usize, usize, usize)>,
}

impl<B: Backend> Default for ProverQueue<B> {
    fn default() -> Self {
        Self {
            caches: Vec::new(),
            tags: Vec::new(),
        }
    }
}

impl<B: Backend> ProverQueue<B> {
    /// Queues a fork of `rows` of `cache` (each at an episode boundary).
    pub fn push(&mut self, cache: &KvCache<B>, rows: &[usize], tags: impl IntoIterator<Item = (usize, usize, usize)>) {
        if rows.is_empty() {
            return;
        }
        self.caches.push(cache.select_rows(rows));
        self.tags.extend(tags);
    }

    pub fn len(&self) -> usize {
        self.tags.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tags.is_empty()
    }

    /// Runs the prover on everything queued; returns `(tag, estimate)` pairs.
    pub fn flush(
        &mut self,
        model: &Transformer<B>,
        problems: &[Problem],
        task: &dyn Task,
        vocab: &Vocab,
        config: &ProverConfig,
        rng: &mut StdRng,
    ) -> Result<Vec<((usize, usize, usize), Estimate)>> {
        if self.tags.is_empty() {
            return Ok(Vec::new());
        }
        let cache = KvCache::cat(std::mem::take(&mut self.caches));
        let tags = std::mem::take(&mut self.tags);
        let probs: Vec<&Problem> = tags.iter().map(|t| &problems[t.2]).collect();
        let est = estimate(model, cache, &probs, task, vocab, config, rng)?;
        Ok(tags.into_iter().zip(est).collect())
    }
}
