//! Episode-structured batched rollouts.
//!
//! All rows decode in lockstep on one KV cache. Each step samples one token per row on the
//! device, reads the batch of tokens back (stop conditions and environment replies need them),
//! and appends to each row its *chunk*: the sampled token, plus the environment's reply when the
//! token closed an episode, or the forced suffix when the row ran out of episodes or tokens.
//! Chunks are ragged; the cache's holes absorb the difference (see `model::cache`).
//!
//! A row ends at `</answer>`; at the episode cap or the token budget it is forced to answer
//! through the meta-prover's suffix (`<timeup> </think> <answer>`), so every rollout has an
//! outcome. With `budget_forcing`, `</think>` is suppressed until the episode budget is spent
//! (evaluation past the training budget). At every episode boundary the row's cache is forked
//! into the prover queue, so J_j is estimated from the cached prefix.

use std::ops::Range;

use burn::prelude::*;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use super::prover::{suffix_ids, ProverConfig, ProverQueue};
use crate::data::{Problem, Role, Task, Vocab};
use crate::error::{Error, Result};
use crate::model::sampling::uniforms;
use crate::model::{last_logits, read_ids, sample, KvCache, SamplerConfig, Transformer};

/// Limits and sampling of a rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutConfig {
    /// Episodes before the row is forced to answer.
    pub max_episodes: usize,
    /// Policy tokens (episodes and answer) before the row is forced to answer.
    pub max_tokens: usize,
    /// Tokens after `<answer>` before the answer counts as unfinished.
    pub max_answer_tokens: usize,
    pub sampler: SamplerConfig,
    /// Suppress `</think>` until `max_episodes` episodes are done.
    #[serde(default)]
    pub budget_forcing: bool,
}

/// How a rollout ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Finish {
    /// The policy answered on its own.
    Answered,
    /// The policy was forced to answer (episode cap or token budget).
    Forced,
    /// The answer never closed within `max_answer_tokens`.
    Unfinished,
    /// Stopped at a requested episode count (an MRT prefix), to be continued.
    Paused,
}

/// One sampled output stream.
#[derive(Debug, Clone)]
pub struct Rollout {
    /// Index of the problem in the slice the rollouts were made from.
    pub problem: usize,
    pub tokens: Vec<u32>,
    pub roles: Vec<Role>,
    /// Tokens that were given, not generated here: the prompt, plus the prefix for MRT
    /// continuations. Only policy tokens at or after this index are trained.
    pub context_len: usize,
    /// Token ranges of the policy's completed episodes (delimiter included).
    pub episodes: Vec<Range<usize>>,
    /// Token counts at the meta-prover's evaluation points: `boundaries[0]` is the start,
    /// `boundaries[j]` is after episode j and its environment reply.
    pub boundaries: Vec<usize>,
    /// Words between `<answer>` and `</answer>`, when the answer closed.
    pub answer: Option<Vec<String>>,
    /// Outcome reward: 1 if the answer verifies, else 0.
    pub reward: f32,
    pub finish: Finish,
    /// J estimates at `boundaries` (empty without a prover).
    pub j: Vec<f32>,
    /// Well-formedness of the forced answers at `boundaries` (empty without a prover).
    pub j_well_formed: Vec<f32>,
}

impl Rollout {
    /// Policy tokens in the whole rollout (an MRT continuation counts its prefix's too).
    pub fn policy_tokens(&self) -> usize {
        self.roles.iter().filter(|&&r| r == Role::Policy).count()
    }

    /// Trainable flags: policy tokens after the context.
    pub fn trainable(&self) -> Vec<bool> {
        self.roles.iter().enumerate().map(|(i, &r)| r == Role::Policy && i >= self.context_len).collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Thinking,
    Answering { forced: bool, start: usize },
    /// Feed the forced suffix at the next step instead of the sampled token.
    NeedsSuffix,
    Done,
    Paused,
}

#[derive(Debug, Clone)]
struct Row {
    r: Rollout,
    phase: Phase,
    episode_start: usize,
    /// Pause after this many episodes (MRT prefixes).
    pause_at: Option<usize>,
}

/// Rows decoding together on one cache. `logits` are those of each row's next token.
pub struct Batch<B: Backend> {
    cache: KvCache<B>,
    logits: Tensor<B, 2>,
    rows: Vec<Row>,
}

/// Runs rollouts of one policy on one task.
pub struct Engine<'a, B: Backend> {
    pub model: &'a Transformer<B>,
    pub task: &'a dyn Task,
    pub vocab: &'a Vocab,
    pub config: &'a RolloutConfig,
    pub prover: Option<&'a ProverConfig>,
}

impl<'a, B: Backend> Engine<'a, B> {
    /// Prefills each problem's prompt once and replicates it into `group` rows; with a prover,
    /// J_0 is estimated once per problem.
    pub fn start(&self, problems: &[Problem], group: usize, rng: &mut StdRng) -> Result<Batch<B>> {
        let prompts: Vec<Vec<u32>> = problems.iter().map(|p| self.vocab.encode_words(&self.task.prompt(p))).collect::<Result<_>>()?;
        let width = prompts.iter().map(Vec::len).max().unwrap_or(1);
        if width + self.config.max_tokens + 8 > self.model.config.max_seq_len {
            return Err(Error::Budget(format!(
                "prompt ({width} tokens) + max_tokens ({}) exceeds the model's max_seq_len {}",
                self.config.max_tokens, self.model.config.max_seq_len
            )));
        }
        let device = self.model.device();
        let ids: Vec<i64> = prompts.iter().flat_map(|p| (0..width).map(|i| *p.get(i).unwrap_or(&self.vocab.specials.pad) as i64)).collect();
        let counts: Vec<usize> = prompts.iter().map(Vec::len).collect();
        let capacity = width + 2 * self.config.max_tokens + 16;
        let mut cache = self.model.new_cache(problems.len(), capacity);
        let logits = self.model.forward_cached(Tensor::from_data(TensorData::new(ids, [problems.len(), width]), &device), &mut cache, Some(&counts))?;
        let logits = last_logits(logits, &counts);

        let j0 = match self.prover {
            Some(cfg) => {
                let mut queue = ProverQueue::default();
                let all: Vec<usize> = (0..problems.len()).collect();
                queue.push(&cache, &all, all.iter().map(|&p| (p, 0, p)));
                Some(queue.flush(self.model, problems, self.task, self.vocab, cfg, rng)?)
            }
            None => None,
        };
        let order: Vec<usize> = (0..problems.len()).flat_map(|p| std::iter::repeat_n(p, group)).collect();
        let rows = order
            .iter()
            .map(|&p| {
                let n = prompts[p].len();
                let mut r = Rollout {
                    problem: p,
                    tokens: prompts[p].clone(),
                    roles: vec![Role::Prompt; n],
                    context_len: n,
                    episodes: Vec::new(),
                    boundaries: vec![n],
                    answer: None,
                    reward: 0.0,
                    finish: Finish::Unfinished,
                    j: Vec::new(),
                    j_well_formed: Vec::new(),
                };
                if let Some(est) = &j0 {
                    r.j.push(est[p].1.j);
                    r.j_well_formed.push(est[p].1.well_formed);
                }
                Row {
                    r,
                    phase: Phase::Thinking,
                    episode_start: n,
                    pause_at: None,
                }
            })
            .collect();
        let idx = crate::model::cache::int_tensor::<B>(&order, &device);
        Ok(Batch {
            cache: cache.replicate(group),
            logits: logits.select(0, idx),
            rows,
        })
    }

    /// Pauses every row after `episodes[r]` episodes (an MRT prefix of that length; 0 pauses
    /// it right after the prompt).
    pub fn pause_at(batch: &mut Batch<B>, episodes: &[usize]) {
        for (row, &e) in batch.rows.iter_mut().zip(episodes) {
            row.pause_at = Some(e);
            if e <= row.r.episodes.len() && row.phase == Phase::Thinking {
                row.phase = Phase::Paused;
                row.r.finish = Finish::Paused;
            }
        }
    }

    /// Which rows are paused (as opposed to finished).
    pub fn paused(batch: &Batch<B>) -> Vec<bool> {
        batch.rows.iter().map(|r| r.phase == Phase::Paused).collect()
    }

    /// The rollouts of a batch so far.
    pub fn rollouts_of(batch: &Batch<B>) -> impl Iterator<Item = &Rollout> {
        batch.rows.iter().map(|r| &r.r)
    }

    /// A new batch of copies of the given rows (paused prefixes), continuing from their cache.
    /// Rows listed in `terminate` are forced to answer at once; the others think on. The
    /// copies' context is everything generated so far.
    pub fn fork(batch: &Batch<B>, rows: &[usize], terminate: &[bool]) -> Batch<B> {
        let device = batch.logits.device();
        let idx = crate::model::cache::int_tensor::<B>(rows, &device);
        Batch {
            cache: batch.cache.select_rows(rows),
            logits: batch.logits.clone().select(0, idx),
            rows: rows
                .iter()
                .zip(terminate)
                .map(|(&i, &term)| {
                    let mut row = batch.rows[i].clone();
                    row.r.context_len = row.r.tokens.len();
                    row.pause_at = None;
                    row.phase = if term { Phase::NeedsSuffix } else { Phase::Thinking };
                    row
                })
                .collect(),
        }
    }

    /// Decodes until every row has answered or paused, then scores the outcomes.
    pub fn run(&self, batch: &mut Batch<B>, problems: &[Problem], rng: &mut StdRng) -> Result<()> {
        let device = self.model.device();
        let sp = self.vocab.specials;
        let suffix = suffix_ids(self.vocab);
        let rows = batch.rows.len();
        let mut queue = ProverQueue::<B>::default();
        let end_think_bias = self.config.budget_forcing.then(|| {
            let mut b = vec![0.0f32; self.model.config.vocab_size];
            b[sp.end_think as usize] = -1e9;
            Tensor::<B, 1>::from_data(TensorData::new(b, [self.model.config.vocab_size]), &device).reshape([1, self.model.config.vocab_size])
        });
        loop {
            if batch.rows.iter().all(|r| matches!(r.phase, Phase::Done | Phase::Paused)) {
                break;
            }
            let logits = match &end_think_bias {
                Some(bias) => batch.logits.clone() + bias.clone(),
                None => batch.logits.clone(),
            };
            let u = uniforms::<B>(1, rows, rng, &device).reshape([rows]);
            let next = read_ids(sample(logits, u, &self.config.sampler));
            let mut chunks: Vec<Vec<u32>> = vec![Vec::new(); rows];
            let mut boundary: Vec<usize> = Vec::new();
            for (i, row) in batch.rows.iter_mut().enumerate() {
                let (chunk, at_boundary) = self.advance_row(row, next[i], &problems[row.r.problem], &suffix)?;
                chunks[i] = chunk;
                if at_boundary {
                    boundary.push(i);
                }
            }
            let counts: Vec<usize> = chunks.iter().map(Vec::len).collect();
            let width = counts.iter().copied().max().unwrap_or(0);
            if width == 0 {
                continue;
            }
            let ids: Vec<i64> = chunks.iter().flat_map(|c| (0..width).map(|k| *c.get(k).unwrap_or(&sp.pad) as i64)).collect();
            batch.cache.ensure_capacity(width);
            let logits = self.model.forward_cached(Tensor::from_data(TensorData::new(ids, [rows, width]), &device), &mut batch.cache, Some(&counts))?;
            let pick: Vec<usize> = counts.iter().map(|&c| c.max(1)).collect();
            batch.logits = last_logits(logits, &pick);
            if self.prover.is_some() {
                let tags: Vec<(usize, usize, usize)> = boundary.iter().map(|&i| (i, batch.rows[i].r.episodes.len(), batch.rows[i].r.problem)).collect();
                queue.push(&batch.cache, &boundary, tags);
            }
        }
        if let Some(cfg) = self.prover {
            for ((row, j, _), est) in queue.flush(self.model, problems, self.task, self.vocab, cfg, rng)? {
                let r = &mut batch.rows[row].r;
                if r.j.len() <= j {
                    r.j.resize(j + 1, f32::NAN);
                    r.j_well_formed.resize(j + 1, f32::NAN);
                }
                r.j[j] = est.j;
                r.j_well_formed[j] = est.well_formed;
            }
        }
        Ok(())
    }

    /// Applies one sampled token to a row. Returns the tokens to feed and whether the row now
    /// sits at an episode boundary.
    fn advance_row(&self, row: &mut Row, token: u32, problem: &Problem, suffix: &[u32; 3]) -> Result<(Vec<u32>, bool)> {
        let sp = self.vocab.specials;
        let r = &mut row.r;
        match row.phase {
            Phase::Done | Phase::Paused => Ok((Vec::new(), false)),
            Phase::NeedsSuffix => {
                r.tokens.extend_from_slice(suffix);
                r.roles.extend([Role::Forced; 3]);
                row.phase = Phase::Answering { forced: true, start: r.tokens.len() };
                Ok((suffix.to_vec(), false))
            }
            Phase::Answering { forced, start } => {
                r.tokens.push(token);
                r.roles.push(Role::Policy);
                if token == sp.end_answer {
                    let words = self.vocab.decode(&r.tokens[start..r.tokens.len() - 1]);
                    r.reward = self.task.verify(problem, &words) as u8 as f32;
                    r.answer = Some(words);
                    r.finish = if forced { Finish::Forced } else { Finish::Answered };
                    row.phase = Phase::Done;
                    return Ok((Vec::new(), false));
                }
                if r.tokens.len() - start >= self.config.max_answer_tokens {
                    r.finish = Finish::Unfinished;
                    row.phase = Phase::Done;
                    return Ok((Vec::new(), false));
                }
                Ok((vec![token], false))
            }
            Phase::Thinking => {
                r.tokens.push(token);
                r.roles.push(Role::Policy);
                let mut chunk = vec![token];
                let mut at_boundary = false;
                if token == sp.ep {
                    r.episodes.push(row.episode_start..r.tokens.len());
                    let words = self.vocab.decode(&r.tokens[row.episode_start..r.tokens.len() - 1]);
                    if let Some(reply) = self.task.reply(problem, &words) {
                        let ids = self.vocab.encode_words(&reply)?;
                        r.tokens.extend_from_slice(&ids);
                        r.roles.extend(std::iter::repeat_n(Role::Env, ids.len()));
                        chunk.extend(ids);
                    }
                    row.episode_start = r.tokens.len();
                    r.boundaries.push(r.tokens.len());
                    at_boundary = true;
                    let done = r.episodes.len();
                    if row.pause_at == Some(done) {
                        r.finish = Finish::Paused;
                        row.phase = Phase::Paused;
                        return Ok((chunk, true));
                    }
                    if done >= self.config.max_episodes {
                        row.phase = Phase::NeedsSuffix;
                    }
                } else if token == sp.answer {
                    row.phase = Phase::Answering { forced: false, start: r.tokens.len() };
                }
                if row.phase == Phase::Thinking && r.policy_tokens() >= self.config.max_tokens {
                    row.phase = Phase::NeedsSuffix;
                }
                Ok((chunk, at_boundary))
            }
        }
    }

    /// The finished rollouts of a batch.
    pub fn finish(batch: Batch<B>) -> Vec<Rollout> {
        batch.rows.into_iter().map(|r| r.r).collect()
    }

    /// Convenience: `group` rollouts per problem, run to completion.
    pub fn rollouts(&self, problems: &[Problem], group: usize, rng: &mut StdRng) -> Result<Vec<Rollout>> {
        let mut batch = self.start(problems, group, rng)?;
        self.run(&mut batch, problems, rng)?;
        Ok(Self::finish(batch))
    }
}
