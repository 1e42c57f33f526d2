//! Episode-structured batched rollouts.
//!
//! All rows decode in lockstep on one KV cache. Each step samples one token per row on the
//! device, reads the batch of tokens back (stop conditions and environment replies need them:
//! one host read per step for the whole batch), and appends to each row its *chunk*: the
//! sampled token, plus the environment's reply when the token closed an episode, or the forced
//! suffix when the row ran out of episodes or tokens. Chunks are ragged; the cache's holes
//! absorb the difference (see `model::cache`).
//!
//! A row ends at `</answer>`; at the episode cap or the token budget it is forced to answer
//! through the meta-prover's suffix (`<timeup> </think> <answer>`), so every rollout has an
//! outcome. With `budget_forcing`, `</think>` is suppressed until the episode budget is spent
//! (evaluation past the training budget), except in rows whose environment has confirmed a
//! solution. At every episode boundary the row's cache is forked into the prover queue, so J_j
//! is estimated from the cached prefix.
//!
//! Rollouts start from *seeds*: partial rollouts that end at an episode boundary (a prompt, or
//! an MRT prefix cut from an earlier stream). Each seed is prefilled once and its cache
//! replicated into the rows that continue it, so every row's first token is sampled from the
//! full-forward logits at the end of its seed.

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
}

/// One sampled output stream.
#[derive(Debug, Clone)]
pub struct Rollout {
    /// Index of the problem in the slice the rollouts were made from.
    pub problem: usize,
    pub tokens: Vec<u32>,
    pub roles: Vec<Role>,
    /// Tokens that were given, not generated here: the prompt, plus the seed prefix of an MRT
    /// continuation. Only policy tokens at or after this index are trained.
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

    /// Policy tokens sampled here, after the context.
    pub fn policy_tokens_after_context(&self) -> usize {
        self.roles[self.context_len..].iter().filter(|&&r| r == Role::Policy).count()
    }

    /// Trainable flags: policy tokens after the context.
    pub fn trainable(&self) -> Vec<bool> {
        self.roles.iter().enumerate().map(|(i, &r)| r == Role::Policy && i >= self.context_len).collect()
    }

    /// The rollout cut at boundary `k` (after its first k episodes and their replies): a seed
    /// for continuations, with the J estimates it had up to there. Outcome fields are reset.
    pub fn prefix(&self, k: usize) -> Rollout {
        let end = self.boundaries[k];
        Rollout {
            problem: self.problem,
            tokens: self.tokens[..end].to_vec(),
            roles: self.roles[..end].to_vec(),
            context_len: self.context_len.min(end),
            episodes: self.episodes[..k].to_vec(),
            boundaries: self.boundaries[..=k].to_vec(),
            answer: None,
            reward: 0.0,
            finish: Finish::Unfinished,
            j: self.j.iter().copied().take(k + 1).collect(),
            j_well_formed: self.j_well_formed.iter().copied().take(k + 1).collect(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Thinking,
    Answering { forced: bool, start: usize },
    /// Feed the forced suffix at the next step instead of the sampled token.
    NeedsSuffix,
    Done,
}

#[derive(Debug, Clone)]
struct Row {
    r: Rollout,
    phase: Phase,
    episode_start: usize,
    /// The environment confirmed a solution (budget forcing leaves the row free to stop).
    solved: bool,
}

/// Rows decoding together on one cache.
pub struct Batch<B: Backend> {
    cache: KvCache<B>,
    /// `[rows, V]`: the logits of each unfinished row's next token.
    logits: Tensor<B, 2>,
    rows: Vec<Row>,
}

impl<B: Backend> Batch<B> {
    /// `[rows, V]`: the logits each unfinished row samples its next token from.
    pub fn next_logits(&self) -> &Tensor<B, 2> {
        &self.logits
    }
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
        let seeds: Vec<Rollout> = problems
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let prompt = self.vocab.encode_words(&self.task.prompt(p))?;
                let n = prompt.len();
                Ok(Rollout {
                    problem: i,
                    tokens: prompt,
                    roles: vec![Role::Prompt; n],
                    context_len: n,
                    episodes: Vec::new(),
                    boundaries: vec![n],
                    answer: None,
                    reward: 0.0,
                    finish: Finish::Unfinished,
                    j: Vec::new(),
                    j_well_formed: Vec::new(),
                })
            })
            .collect::<Result<_>>()?;
        self.start_from(&seeds, problems, group, rng)
    }

    /// Prefills each seed (a partial rollout of `problems[seed.problem]` ending at an episode
    /// boundary) once and replicates it into `group` rows, which continue it; everything in the
    /// seed becomes their context (never trained). With a prover, J at the end of a seed that
    /// does not carry it yet is estimated once per seed.
    pub fn start_from(&self, seeds: &[Rollout], problems: &[Problem], group: usize, rng: &mut StdRng) -> Result<Batch<B>> {
        let given = seeds.iter().map(|s| s.tokens.len() - s.policy_tokens()).max().unwrap_or(1);
        if given + self.config.max_tokens + 8 > self.model.config.max_seq_len {
            return Err(Error::Budget(format!(
                "prompt and replies ({given} tokens) + max_tokens ({}) exceed the model's max_seq_len {}",
                self.config.max_tokens, self.model.config.max_seq_len
            )));
        }
        let device = self.model.device();
        let width = seeds.iter().map(|s| s.tokens.len()).max().unwrap_or(1);
        let ids: Vec<i64> = seeds.iter().flat_map(|s| (0..width).map(|i| *s.tokens.get(i).unwrap_or(&self.vocab.specials.pad) as i64)).collect();
        let counts: Vec<usize> = seeds.iter().map(|s| s.tokens.len()).collect();
        let mut cache = self.model.new_cache(seeds.len(), width + 2 * self.config.max_tokens + 16);
        let logits = self.model.forward_cached(Tensor::from_data(TensorData::new(ids, [seeds.len(), width]), &device), &mut cache, Some(&counts))?;
        let logits = last_logits(logits, &counts);

        let mut seeds = seeds.to_vec();
        if let Some(cfg) = self.prover {
            let missing: Vec<usize> = (0..seeds.len()).filter(|&i| seeds[i].j.len() < seeds[i].boundaries.len()).collect();
            let mut queue = ProverQueue::default();
            queue.push(&cache, &missing, missing.iter().map(|&i| (i, seeds[i].episodes.len(), seeds[i].problem)));
            for ((i, _, _), est) in queue.flush(self.model, problems, self.task, self.vocab, cfg, rng)? {
                let s = &mut seeds[i];
                let last = s.boundaries.len() - 1;
                s.j.resize(last, f32::NAN);
                s.j_well_formed.resize(last, f32::NAN);
                s.j.push(est.j);
                s.j_well_formed.push(est.well_formed);
            }
        }
        // A seed that already spent its episodes or tokens goes straight to its forced answer.
        let starts: Vec<(Phase, bool)> = seeds
            .iter()
            .map(|seed| {
                let problem = &problems[seed.problem];
                let solved = seed.episodes.iter().any(|span| self.task.confirms_solution(problem, &self.vocab.decode(&seed.tokens[span.start..span.end - 1])));
                let spent = seed.episodes.len() >= self.config.max_episodes || seed.policy_tokens() >= self.config.max_tokens;
                (if spent { Phase::NeedsSuffix } else { Phase::Thinking }, solved)
            })
            .collect();
        let order: Vec<usize> = (0..seeds.len()).flat_map(|s| std::iter::repeat_n(s, group)).collect();
        let rows = order
            .iter()
            .map(|&s| {
                let mut r = seeds[s].clone();
                r.context_len = r.tokens.len();
                let (phase, solved) = starts[s];
                Row { episode_start: r.tokens.len(), r, phase, solved }
            })
            .collect();
        let idx = crate::model::cache::int_tensor::<B>(&order, &device);
        Ok(Batch {
            cache: cache.replicate(group),
            logits: logits.select(0, idx),
            rows,
        })
    }

    /// The rollouts of a batch so far.
    pub fn rollouts_of(batch: &Batch<B>) -> impl Iterator<Item = &Rollout> {
        batch.rows.iter().map(|r| &r.r)
    }

    /// Decodes until every row has answered, then scores the outcomes.
    pub fn run(&self, batch: &mut Batch<B>, problems: &[Problem], rng: &mut StdRng) -> Result<()> {
        let device = self.model.device();
        let sp = self.vocab.specials;
        let suffix = suffix_ids(self.vocab);
        let rows = batch.rows.len();
        let mut queue = ProverQueue::<B>::default();
        let vocab_size = self.model.config.vocab_size;
        let end_think_bias = self.config.budget_forcing.then(|| {
            let mut b = vec![0.0f32; vocab_size];
            b[sp.end_think as usize] = -1e9;
            Tensor::<B, 1>::from_data(TensorData::new(b, [vocab_size]), &device).reshape([1, vocab_size])
        });
        loop {
            if batch.rows.iter().all(|r| r.phase == Phase::Done) {
                break;
            }
            let logits = match &end_think_bias {
                // Only rows still thinking without a confirmed solution are kept thinking.
                Some(bias) => {
                    let forced: Vec<f32> = batch.rows.iter().map(|r| (r.phase == Phase::Thinking && !r.solved) as u8 as f32).collect();
                    let forced = Tensor::<B, 1>::from_data(TensorData::new(forced, [rows]), &device).reshape([rows, 1]);
                    batch.logits.clone() + forced * bias.clone()
                }
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
            // Rows that fed nothing are done: their (meaningless) logits are never sampled from.
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
            Phase::Done => Ok((Vec::new(), false)),
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
                    row.solved |= self.task.confirms_solution(problem, &words);
                    if let Some(reply) = self.task.reply(problem, &words) {
                        let ids = self.vocab.encode_words(&reply)?;
                        r.tokens.extend_from_slice(&ids);
                        r.roles.extend(std::iter::repeat_n(Role::Env, ids.len()));
                        chunk.extend(ids);
                    }
                    row.episode_start = r.tokens.len();
                    r.boundaries.push(r.tokens.len());
                    at_boundary = true;
                    if r.episodes.len() >= self.config.max_episodes {
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
