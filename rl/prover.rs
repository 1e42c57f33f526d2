//! The meta-prover μ, value-free (MRT.md): the policy itself, forced to stop after episode j by
//! the suffix `<timeup> </think> <answer>`, answers now; J_j is the probability that this
//! forced answer is correct.
//!
//! - `Sample`: K forced answers are sampled and verified; J_j is the fraction correct (the
//!   paper's estimator, K = 8 in its analysis).
//! - `Exact`: when the task can list every answer that verifies (`search`: the hidden number;
//!   `countdown`: every line that reaches the target), J_j is their total probability,
//!   Σ_a p(a ++ `</answer>` | prefix, suffix), read from the softmax at the temperature the
//!   `Sample` mode would draw with: the limit of the `Sample` estimate as K → ∞, without its
//!   noise, for a forward pass over the correct answers instead of K decoded ones.
//!
//! Both run on a *fork* of the rollout's KV cache taken at the episode boundary, so the prefix
//! is never recomputed: only the 3 suffix tokens and the answer tokens are. `Exact` scores a
//! problem's answers as one token tree (answers that share their first tokens share those
//! nodes), all of a row's nodes in one pass over its cache, each seeing only the prefix and
//! its own ancestors; this gives the J of scoring every answer on its own copy of the cache,
//! to the last bit on the CPU (`tests/prover_countdown.rs`), without the copies.

use std::collections::HashMap;

use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use super::protocol::Protocol;
use crate::data::{Problem, Task};
use crate::error::{Error, Result};
use crate::model::cache::int_tensor;
use crate::model::{generate_rows, split_rngs, GenerateConfig, KvCache, SamplerConfig, Transformer};

/// How J is estimated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProverMode {
    /// Mean 0/1 reward of K sampled forced answers.
    Sample,
    /// Exact probability from the softmax (tasks that can list their correct answers).
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
        if self.mode == ProverMode::Exact && !task.enumerable_answers() {
            return Err(not_enumerable(task));
        }
        if self.mode == ProverMode::Sample && self.samples == 0 {
            return Err(Error::config("prover.samples", 0, "must be positive"));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(Error::config(
                "prover.temperature",
                self.temperature,
                "must be > 0 (J is a probability under the sampling distribution)",
            ));
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
    /// Fraction of well-formed answers (Sample), or the probability mass of first answer tokens
    /// that can begin one (Exact).
    pub well_formed: f32,
}

/// Estimates J for every row of `cache`, row r being a prefix of a rollout of `problems[r]`
/// that ends at an episode boundary. Consumes the cache (it is a fork).
pub fn estimate<B: Backend>(
    model: &Transformer<B>,
    cache: KvCache<B>,
    problems: &[&Problem],
    protocol: &dyn Protocol,
    config: &ProverConfig,
    rng: &mut StdRng,
) -> Result<Vec<Estimate>> {
    let rngs = split_rngs(rng, cache.rows());
    estimate_rows(model, cache, problems, protocol, config, rngs)
}

/// [`estimate`] with one generator per row (`rngs[r]` draws row r's K forced answers): a row's
/// J does not depend on which other forks are scored with it.
pub fn estimate_rows<B: Backend>(
    model: &Transformer<B>,
    cache: KvCache<B>,
    problems: &[&Problem],
    protocol: &dyn Protocol,
    config: &ProverConfig,
    mut rngs: Vec<StdRng>,
) -> Result<Vec<Estimate>> {
    let rows = cache.rows();
    assert_eq!(rows, problems.len(), "one problem per cache row");
    assert_eq!(rows, rngs.len(), "one generator per cache row");
    if rows == 0 {
        return Ok(Vec::new());
    }
    match config.mode {
        ProverMode::Exact => exact(model, cache, problems, protocol, config),
        ProverMode::Sample => {
            // K copies of each fork: a pretrained model's long rows go a few at a time.
            let per_row = config.samples
                * (cache.slots() + protocol.suffix().len() + config.max_answer_tokens)
                * model.config.kv_bytes_per_token();
            let chunk = (PROVER_BATCH_BYTES / per_row.max(1)).max(1);
            if chunk >= rows {
                return sampled(model, cache, problems, protocol, config, &mut rngs);
            }
            let mut out = Vec::with_capacity(rows);
            for start in (0..rows).step_by(chunk) {
                let end = (start + chunk).min(rows);
                let part = cache.select_rows(&(start..end).collect::<Vec<_>>());
                let rngs = &mut rngs[start..end];
                out.extend(sampled(model, part, &problems[start..end], protocol, config, rngs)?);
            }
            Ok(out)
        }
    }
}

/// KV-cache bytes of the K replicated forks one sampled batch of the prover may hold.
const PROVER_BATCH_BYTES: usize = 1 << 30;

/// Appends the suffix to every row and returns the logits of the first answer token, `[R, V]`.
fn force<B: Backend>(model: &Transformer<B>, cache: &mut KvCache<B>, protocol: &dyn Protocol) -> Result<Tensor<B, 2>> {
    let rows = cache.rows();
    let device = model.device();
    let n = protocol.suffix().len();
    let suffix: Vec<i64> = (0..rows)
        .flat_map(|_| protocol.suffix().iter().map(|&i| i as i64))
        .collect();
    cache.ensure_capacity(n);
    model.forward_cached_last(
        Tensor::from_data(TensorData::new(suffix, [rows, n]), &device),
        cache,
        None,
    )
}

fn not_enumerable(task: &dyn Task) -> Error {
    Error::config(
        "prover.mode",
        "exact",
        format!("task `{}` cannot list its correct answers; use \"sample\"", task.name()),
    )
}

fn not_listed() -> Error {
    Error::config(
        "prover.mode",
        "exact",
        "this task cannot list its correct answers; use \"sample\"",
    )
}

/// Tree tokens (rows × the widest tree among them) scored per forward pass in `exact`: bounds
/// the logits and masks alive at once.
const TREE_TOKENS: usize = 4096;

/// A problem's correct answers as a token tree: one node per distinct answer prefix (answers
/// of `countdown` share their first steps: ≈ 41 nodes for ≈ 56 answer tokens on average in a
/// simulation of its problems, not measured here), parents
/// before children.
struct AnswerTree {
    tokens: Vec<u32>,
    /// The token that closes every answer (`</answer>`).
    close: u32,
    parents: Vec<Option<usize>>,
    /// Per answer, in the listed order: the node that ends each of its prefixes (answer a's
    /// k-th token is `tokens[paths[a][k]]`).
    paths: Vec<Vec<usize>>,
}

impl AnswerTree {
    fn new(answers: &[Vec<u32>], close: u32) -> Self {
        let mut tree = Self {
            tokens: Vec::new(),
            close,
            parents: Vec::new(),
            paths: Vec::with_capacity(answers.len()),
        };
        let mut nodes: HashMap<(Option<usize>, u32), usize> = HashMap::new();
        for answer in answers {
            let mut parent = None;
            let path: Vec<usize> = answer
                .iter()
                .map(|&token| {
                    let node = *nodes.entry((parent, token)).or_insert_with(|| {
                        tree.tokens.push(token);
                        tree.parents.push(parent);
                        tree.tokens.len() - 1
                    });
                    parent = Some(node);
                    node
                })
                .collect();
            tree.paths.push(path);
        }
        tree
    }
}

/// Rows grouped for one forward pass each: widest trees first, a group closed when the next
/// tree is under 90 % of its widest or the group would exceed [`TREE_TOKENS`]. Every padded
/// token costs a full token's forward, and a pass more costs only a copy of its rows' caches:
/// on simulated `countdown` tree sizes (11 … ~200, 350 rows) this pads ≈ 2 % where closing at
/// half pads ≈ 25 % (a Python simulation of the task's generator, not a Rust measurement).
fn tree_groups(sizes: &[usize]) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by_key(|&r| std::cmp::Reverse(sizes[r]));
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for r in order {
        match groups.last_mut() {
            Some(g) if 10 * sizes[r] > 9 * sizes[g[0]] && (g.len() + 1) * sizes[g[0]] <= TREE_TOKENS => g.push(r),
            _ => groups.push(vec![r]),
        }
    }
    groups
}

fn exact<B: Backend>(
    model: &Transformer<B>,
    mut cache: KvCache<B>,
    problems: &[&Problem],
    protocol: &dyn Protocol,
    config: &ProverConfig,
) -> Result<Vec<Estimate>> {
    let rows = cache.rows();
    let device = model.device();
    let t = config.temperature;
    // Mass on first answer tokens that can begin a well-formed answer.
    let starts: Vec<f32> = protocol
        .answer_starts()
        .ok_or_else(not_listed)?
        .into_iter()
        .map(|s| s as u8 as f32)
        .collect();
    let v = starts.len();
    // Every correct answer of each row's problem as a token tree; built once per distinct
    // problem.
    let mut listed: HashMap<String, AnswerTree> = HashMap::new();
    let mut keys = Vec::with_capacity(rows);
    for p in problems {
        let key = format!("{p:?}");
        if !listed.contains_key(&key) {
            // Each listed answer ends with its closing token; the tree holds what comes before.
            let list = protocol.correct_answers(p).ok_or_else(not_listed)??;
            let close = list.first().and_then(|a| a.last().copied()).unwrap_or(protocol.pad());
            let mut ids: Vec<Vec<u32>> = list
                .into_iter()
                .map(|mut a| {
                    a.pop();
                    a
                })
                .filter(|a| !a.is_empty() && a.len() < config.max_answer_tokens)
                .collect();
            // An answer listed twice must not count twice.
            ids.sort_unstable();
            ids.dedup();
            listed.insert(key.clone(), AnswerTree::new(&ids, close));
        }
        keys.push(key);
    }
    let trees: &[&AnswerTree] = &keys.iter().map(|k| &listed[k]).collect::<Vec<_>>();
    let starts = Tensor::<B, 1>::from_data(TensorData::new(starts, [v]), &device);

    let first = log_softmax(force(model, &mut cache, protocol)? / t, 1); // [R, V]
    let mass: Vec<f32> = (first.clone().exp().narrow(1, 0, v) * starts.reshape([1, v]))
        .sum_dim(1)
        .into_data()
        .iter::<f32>()
        .collect();
    let mut j = vec![0.0f32; rows];
    let groups = tree_groups(&trees.iter().map(|t| t.tokens.len()).collect::<Vec<_>>());
    let whole = groups.len() == 1 && groups[0].iter().copied().eq(0..rows);
    let mut cache = Some(cache);
    for group in groups.iter().filter(|g| !trees[g[0]].tokens.is_empty()) {
        // log P(a ++ </answer>) for each (row, answer) pair: the first token from the suffix's
        // logits, the rest (and `</answer>`) from one pass over the row's answer tree.
        // One group of every row in order (all trees alike, as on `search`) uses the cache
        // itself; otherwise each group gets a copy of its rows, one per row, not per answer.
        let mut rows_cache = match &mut cache {
            Some(c) if !whole => c.select_rows(group),
            c => c.take().expect("taken by the only group"),
        };
        let g = group.len();
        let width = trees[group[0]].tokens.len();
        rows_cache.ensure_capacity(width);
        let pad = protocol.pad();
        let ids: Vec<i64> = group
            .iter()
            .flat_map(|&r| (0..width).map(move |k| *trees[r].tokens.get(k).unwrap_or(&pad) as i64))
            .collect();
        let parents: Vec<Vec<Option<usize>>> = group.iter().map(|&r| trees[r].parents.clone()).collect();
        let logits = model.forward_tree(
            Tensor::from_data(TensorData::new(ids, [g, width]), &device),
            &parents,
            &mut rows_cache,
        )?;
        let lp = log_softmax(logits / t, 2).reshape([g * width * v]);

        // Per pair, answer token k is followed by token k + 1 (by `</answer>` after the last):
        // read at flat index (node of a[..=k]) · V + next.
        // Not empty: every tree node comes from an answer, and the group's trees are not empty.
        let pairs: Vec<(usize, &AnswerTree, &Vec<usize>)> = group
            .iter()
            .enumerate()
            .flat_map(|(gi, &r)| trees[r].paths.iter().map(move |path| (gi, trees[r], path)))
            .collect();
        let e = pairs.len();
        let span = pairs.iter().map(|(_, _, path)| path.len()).max().unwrap_or(1);
        let (mut at, mut mask, mut heads, mut idx) = (
            Vec::with_capacity(e * span),
            Vec::with_capacity(e * span),
            Vec::with_capacity(e),
            Vec::with_capacity(e),
        );
        for &(gi, tree, path) in &pairs {
            for k in 0..span {
                let next = if k + 1 < path.len() {
                    tree.tokens[path[k + 1]]
                } else {
                    tree.close
                };
                at.push(if k < path.len() {
                    ((gi * width + path[k]) * v + next as usize) as i64
                } else {
                    0
                });
                mask.push((k < path.len()) as u8 as f32);
            }
            heads.push(tree.tokens[path[0]] as usize);
            idx.push(group[gi]);
        }
        let at = Tensor::<B, 1, Int>::from_data(TensorData::new(at, [e * span]), &device);
        let mask = Tensor::<B, 2>::from_data(TensorData::new(mask, [e, span]), &device);
        let tail = (lp.select(0, at).reshape([e, span]) * mask).sum_dim(1).reshape([e]);
        let head = first
            .clone()
            .select(0, int_tensor::<B>(&idx, &device))
            .gather(1, int_tensor::<B>(&heads, &device).reshape([e, 1]))
            .reshape([e]);
        for (r, lp) in idx.iter().zip((head + tail).into_data().iter::<f32>()) {
            j[*r] += lp.exp();
        }
    }
    Ok(j.into_iter()
        .zip(mass)
        .map(|(j, well_formed)| Estimate {
            j: j.min(1.0),
            well_formed,
        })
        .collect())
}

fn sampled<B: Backend>(
    model: &Transformer<B>,
    cache: KvCache<B>,
    problems: &[&Problem],
    protocol: &dyn Protocol,
    config: &ProverConfig,
    rngs: &mut [StdRng],
) -> Result<Vec<Estimate>> {
    let k = config.samples;
    // The K copies of row r follow it (`replicate`); each draws from its own generator, split
    // from the row's.
    let mut copies: Vec<StdRng> = rngs.iter_mut().flat_map(|rng| split_rngs(rng, k)).collect();
    let mut cache = cache.replicate(k);
    let logits = force(model, &mut cache, protocol)?;
    cache.ensure_capacity(config.max_answer_tokens);
    let gen = GenerateConfig {
        max_new_tokens: config.max_answer_tokens,
        sampler: SamplerConfig {
            temperature: config.temperature,
            ..SamplerConfig::default()
        },
        stop_tokens: protocol.answer_stops(),
        check_every: config.max_answer_tokens,
    };
    let outs = generate_rows(model, cache, logits, &gen, &mut copies)?;
    let mut estimates = Vec::with_capacity(problems.len());
    for (r, p) in problems.iter().enumerate() {
        let (mut correct, mut formed) = (0usize, 0usize);
        for out in &outs[r * k..(r + 1) * k] {
            // The answer ends where it first closes (free text: its brace, maybe before a stop).
            let mut closed = None;
            for n in 1..=out.len() {
                if protocol.answer_closed(&out[..n], true)? {
                    closed = Some(n);
                    break;
                }
            }
            if let Some(n) = closed {
                let verdict = protocol.judge(p, &out[..n], true)?;
                formed += verdict.well_formed as usize;
                correct += (verdict.reward > 0.0) as usize;
            }
        }
        estimates.push(Estimate {
            j: correct as f32 / k as f32,
            well_formed: formed as f32 / k as f32,
        });
    }
    Ok(estimates)
}
