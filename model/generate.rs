//! The decoding loop: sample → feed back → repeat, with the sampled tokens kept on the device
//! and read back only every `check_every` steps (or never, without stop tokens). On a GPU one
//! read-back per token costs more than a small model's whole decode step, so stop conditions
//! are checked in batches; rows that stopped keep generating until the next check, and their
//! extra tokens are cut off on the host.

use burn::prelude::*;
use rand::rngs::StdRng;

use super::cache::KvCache;
use super::sampling::{row_uniforms, sample, uniforms, SamplerConfig};
use super::transformer::Transformer;
use crate::error::Result;

/// What to generate and when to stop.
#[derive(Debug, Clone)]
pub struct GenerateConfig {
    /// Tokens to sample per row at most.
    pub max_new_tokens: usize,
    pub sampler: SamplerConfig,
    /// A row stops after emitting any of these (the stop token is kept in its output).
    pub stop_tokens: Vec<u32>,
    /// Read sampled tokens back to check for stops every this many steps (≥ 1).
    pub check_every: usize,
}

/// Samples up to `max_new_tokens` per row, starting from `logits` (the logits of each row's
/// last cached token). The cache is consumed: after the call it holds tokens past some rows'
/// stops, so it must not be extended further.
///
/// # Shapes
/// - `logits`: `[B, V]`
/// - returns B token lists, each cut after its first stop token
pub fn generate<B: Backend>(
    model: &Transformer<B>,
    cache: KvCache<B>,
    logits: Tensor<B, 2>,
    config: &GenerateConfig,
    rng: &mut StdRng,
) -> Result<Vec<Vec<u32>>> {
    let [b, _] = logits.dims();
    let u = uniforms::<B>(config.max_new_tokens, b, rng, &logits.device());
    decode(model, cache, logits, config, u)
}

/// [`generate`] with row r's draws from `rngs[r]` alone (one generator per row): a row's
/// tokens do not depend on the other rows of its batch.
pub fn generate_rows<B: Backend>(
    model: &Transformer<B>,
    cache: KvCache<B>,
    logits: Tensor<B, 2>,
    config: &GenerateConfig,
    rngs: &mut [StdRng],
) -> Result<Vec<Vec<u32>>> {
    assert_eq!(rngs.len(), logits.dims()[0], "one generator per row");
    let u = row_uniforms::<B>(config.max_new_tokens, rngs, &logits.device());
    decode(model, cache, logits, config, u)
}

/// The loop of [`generate`], with the uniforms `u` (`[max_new_tokens, B]`) drawn.
fn decode<B: Backend>(
    model: &Transformer<B>,
    mut cache: KvCache<B>,
    mut logits: Tensor<B, 2>,
    config: &GenerateConfig,
    u: Tensor<B, 2>,
) -> Result<Vec<Vec<u32>>> {
    let [b, _] = logits.dims();
    let steps = config.max_new_tokens;
    let mut out: Vec<Vec<u32>> = vec![Vec::with_capacity(steps); b];
    let mut stopped = vec![false; b];
    if steps == 0 || b == 0 {
        return Ok(out);
    }
    let check_every = config.check_every.max(1);
    let mut pending: Vec<Tensor<B, 1, Int>> = Vec::with_capacity(check_every);
    for step in 0..steps {
        let next = sample(logits, u.clone().narrow(0, step, 1).reshape([b]), &config.sampler);
        pending.push(next.clone());
        let last = step + 1 == steps;
        let check = !config.stop_tokens.is_empty() && (step + 1) % check_every == 0;
        if check || last {
            drain(&mut pending, &mut out, &mut stopped, &config.stop_tokens);
            if stopped.iter().all(|&s| s) {
                break;
            }
        }
        if last {
            break;
        }
        logits = model
            .forward_cached(next.reshape([b, 1]), &mut cache, None)?
            .reshape([b, model.config.vocab_size]);
    }
    Ok(out)
}

/// Reads the pending `[B]` token tensors back and appends them to the rows that have not
/// stopped yet.
fn drain<B: Backend>(pending: &mut Vec<Tensor<B, 1, Int>>, out: &mut [Vec<u32>], stopped: &mut [bool], stop: &[u32]) {
    if pending.is_empty() {
        return;
    }
    let n = pending.len();
    let block = Tensor::stack::<2>(std::mem::take(pending), 1); // [B, n]
    let ids = read_ids(block);
    for (r, row) in out.iter_mut().enumerate() {
        for &t in &ids[r * n..(r + 1) * n] {
            if stopped[r] {
                break;
            }
            row.push(t);
            stopped[r] = stop.contains(&t);
        }
    }
}

thread_local! {
    static TOKEN_READS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How many times this thread has read sampled tokens back from the device (every
/// [`read_ids`] call). On a GPU each read is a synchronisation that costs more than a small
/// model's decoding step, so the decoders keep it to one per step for the whole batch:
/// [`generate`] reads once every `check_every` steps (never more than once per step), and the
/// rollout engine once per decoding step (it must see each token to feed environment replies
/// and forced suffixes). Per thread, so that tests running side by side count only their own.
pub fn token_reads() -> u64 {
    TOKEN_READS.with(|c| c.get())
}

/// Host copy of an int tensor, whatever the backend's int width (counted by [`token_reads`]).
pub fn read_ids<B: Backend, const D: usize>(t: Tensor<B, D, Int>) -> Vec<u32> {
    TOKEN_READS.with(|c| c.set(c.get() + 1));
    t.into_data().iter::<i64>().map(|v| v as u32).collect()
}

/// Logits of each row's last real token in a chunk (or any other `[B, W, X]` tensor's rows at
/// those positions: the cached forward picks hidden states with it before the output head).
///
/// # Shapes
/// `logits`: `[B, W, V]`, `counts[b] ≥ 1` → `[B, V]`
pub fn last_logits<B: Backend>(logits: Tensor<B, 3>, counts: &[usize]) -> Tensor<B, 2> {
    let [b, _, v] = logits.dims();
    let device = logits.device();
    let idx: Vec<i64> = counts.iter().map(|&c| c.saturating_sub(1) as i64).collect();
    let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [b]), &device)
        .reshape([b, 1, 1])
        .expand([b, 1, v]);
    logits.gather(1, idx).reshape([b, v])
}
