//! Episode-structured batched rollouts.
//!
//! All rows decode in lockstep on one KV cache. Each step samples one token per row on the
//! device, reads the batch of tokens back (stop conditions and environment replies need them:
//! one host read per step for the whole batch), and appends to each row its *chunk*: the
//! sampled token, plus the environment's reply when the token closed an episode, or the forced
//! suffix when the row ran out of episodes or tokens. Chunks are ragged; the cache's holes
//! absorb the difference (see `model::cache`).
//!
//! What the tokens mean is the task's [`Protocol`]: where an episode ends, what the environment
//! replies, when an answer is complete and whether it is right. A row ends when its answer
//! closes; at the episode cap or the token budget it is forced to answer through the
//! meta-prover's suffix, so every rollout has an outcome. With `budget_forcing` the row is kept
//! thinking until the episode budget is spent (evaluation past the training budget), except in
//! rows whose environment has confirmed a solution. At every episode boundary the row's cache
//! is forked into the prover queue, so J_j is estimated from the cached prefix; a free-text
//! episode ends before the marker that opens the next one, so its fork is rewound to there.
//!
//! Rollouts start from *seeds*: partial rollouts that end at an episode boundary (a prompt, or
//! an MRT prefix cut from an earlier stream). Each seed is prefilled once and its cache
//! replicated into the rows that continue it, so every row's first token is sampled from the
//! full-forward logits at the end of its seed.

use burn::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::protocol::{Forcing, Protocol};
use super::prover::ProverConfig;
use crate::data::{Problem, Role};
use crate::error::{Error, Result};
use crate::model::sampling::open_uniform;
use crate::model::{read_ids, sample, split_rngs, KvCache, Transformer};

mod advance;
mod queue;
mod record;
mod rngs;
use queue::ProverQueue;
pub use record::{AnswerLimit, Finish, Rollout, RolloutConfig};
use rngs::RowRngs;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Thinking,
    Answering {
        forced: bool,
        start: usize,
    },
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
    /// Tokens budget forcing fed in place of a stop ("Wait"): they count against
    /// `max_tokens` like the policy's own, or a row that keeps stopping would never end.
    forced: usize,
    /// The row's own generators, of its tokens and of its prover forks' forced answers: what
    /// a row samples does not depend on the other rows of its batch.
    rngs: RowRngs,
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
    pub protocol: &'a dyn Protocol,
    pub config: &'a RolloutConfig,
    pub prover: Option<&'a ProverConfig>,
}

/// KV-cache bytes the prover queue's forks may hold before they are scored mid-rollout. The
/// synthetic tasks never come near it (≈ 40 000 slots of ≈ 1 kB at most), so their J are
/// scored once, after decoding, as before; a pretrained model's long streams are scored in
/// several batches (SmolLM2-135M: 46 kB per slot, so ≈ 5 forks of 1 000 tokens).
const PROVER_QUEUE_BYTES: usize = 256 << 20;

impl<'a, B: Backend> Engine<'a, B> {
    /// Prefills each problem's prompt once and replicates it into `group` rows; with a prover,
    /// J_0 is estimated once per problem. `rngs[i]` is problem i's generator: its rows draw
    /// from generators split from it, so its rollouts are the same whatever else is batched.
    pub fn start(&self, problems: &[Problem], group: usize, rngs: &mut [StdRng]) -> Result<Batch<B>> {
        let seeds: Vec<Rollout> = problems
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let prompt = self.protocol.prompt(p)?;
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
        self.start_from(&seeds, problems, group, rngs)
    }

    /// Prefills each seed (a partial rollout of `problems[seed.problem]` ending at an episode
    /// boundary) once and replicates it into `group` rows, which continue it; everything in the
    /// seed becomes their context (never trained). With a prover, J at the end of a seed that
    /// does not carry it yet is estimated once per seed. `rngs[s]` is seed s's generator.
    pub fn start_from(
        &self,
        seeds: &[Rollout],
        problems: &[Problem],
        group: usize,
        rngs: &mut [StdRng],
    ) -> Result<Batch<B>> {
        assert_eq!(seeds.len(), rngs.len(), "one generator per seed");
        let given = seeds
            .iter()
            .map(|s| s.tokens.len() - s.policy_tokens())
            .max()
            .unwrap_or(1);
        if given + self.config.max_tokens + 8 > self.model.config.max_seq_len {
            return Err(Error::Budget(format!(
                "prompt and replies ({given} tokens) + max_tokens ({}) exceed the model's max_seq_len {}",
                self.config.max_tokens, self.model.config.max_seq_len
            )));
        }
        let device = self.model.device();
        let width = seeds.iter().map(|s| s.tokens.len()).max().unwrap_or(1);
        let pad = self.protocol.pad();
        let ids: Vec<i64> = seeds
            .iter()
            .flat_map(|s| (0..width).map(|i| *s.tokens.get(i).unwrap_or(&pad) as i64))
            .collect();
        let counts: Vec<usize> = seeds.iter().map(|s| s.tokens.len()).collect();
        let mut cache = self
            .model
            .new_cache(seeds.len(), width + 2 * self.config.max_tokens + 16);
        let logits = self.model.forward_cached_last(
            Tensor::from_data(TensorData::new(ids, [seeds.len(), width]), &device),
            &mut cache,
            Some(&counts),
        )?;

        let mut seeds = seeds.to_vec();
        // Drawn with or without a prover, so that the rows' generators (split next) and thus
        // their samples are the same for every objective of a seed.
        let mut j0_rngs: Vec<StdRng> = rngs.iter_mut().map(|r| StdRng::seed_from_u64(r.random())).collect();
        if let Some(cfg) = self.prover {
            let missing: Vec<usize> = (0..seeds.len())
                .filter(|&i| seeds[i].j.len() < seeds[i].boundaries.len())
                .collect();
            let mut queue = ProverQueue::default();
            let queued: Vec<_> = missing
                .iter()
                .map(|&i| {
                    let rng = std::mem::replace(&mut j0_rngs[i], StdRng::seed_from_u64(0));
                    ((i, seeds[i].episodes.len(), seeds[i].problem), rng)
                })
                .collect();
            queue.push(&cache, &missing, queued);
            for ((i, _, _), est) in queue.flush(self.model, problems, self.protocol, cfg)? {
                let s = &mut seeds[i];
                let last = s.boundaries.len() - 1;
                s.j.resize(last, f32::NAN);
                s.j_well_formed.resize(last, f32::NAN);
                s.j.push(est.j);
                s.j_well_formed.push(est.well_formed);
            }
        }
        // A seed that already spent its episodes or tokens goes straight to its forced answer.
        let mut starts: Vec<(Phase, bool)> = Vec::with_capacity(seeds.len());
        for seed in &seeds {
            let problem = &problems[seed.problem];
            let mut solved = false;
            for span in &seed.episodes {
                solved |= self.protocol.confirms(problem, &seed.tokens[span.clone()])?;
            }
            let spent =
                seed.episodes.len() >= self.config.max_episodes || seed.policy_tokens() >= self.config.max_tokens;
            starts.push((if spent { Phase::NeedsSuffix } else { Phase::Thinking }, solved));
        }
        let order: Vec<usize> = (0..seeds.len()).flat_map(|s| std::iter::repeat_n(s, group)).collect();
        let mut row_rngs = rngs.iter_mut().flat_map(|rng| RowRngs::split(rng, group));
        let rows = order
            .iter()
            .map(|&s| {
                let mut r = seeds[s].clone();
                r.context_len = r.tokens.len();
                let (phase, solved) = starts[s];
                Row {
                    episode_start: r.tokens.len(),
                    r,
                    phase,
                    solved,
                    forced: 0,
                    rngs: row_rngs.next().expect("group generators per seed"),
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

    /// The rollouts of a batch so far.
    pub fn rollouts_of(batch: &Batch<B>) -> impl Iterator<Item = &Rollout> {
        batch.rows.iter().map(|r| &r.r)
    }

    /// Decodes until every row has answered, then scores the outcomes.
    pub fn run(&self, batch: &mut Batch<B>, problems: &[Problem]) -> Result<()> {
        let device = self.model.device();
        let pad = self.protocol.pad();
        let rows = batch.rows.len();
        let mut queue = ProverQueue::<B>::default();
        let vocab_size = self.model.config.vocab_size;
        let forcing = self.config.budget_forcing.then(|| self.protocol.forcing());
        let suppress = match &forcing {
            Some(Forcing::Suppress(token)) => {
                let mut b = vec![0.0f32; vocab_size];
                b[*token as usize] = -1e9;
                Some(Tensor::<B, 1>::from_data(TensorData::new(b, [vocab_size]), &device).reshape([1, vocab_size]))
            }
            _ => None,
        };
        let replace = match &forcing {
            Some(Forcing::Replace { stops, instead }) => Some((stops.as_slice(), instead.as_slice())),
            _ => None,
        };
        loop {
            if batch.rows.iter().all(|r| r.phase == Phase::Done) {
                break;
            }
            let logits = match &suppress {
                // Only rows still thinking without a confirmed solution are kept thinking.
                Some(bias) => {
                    let forced: Vec<f32> = batch
                        .rows
                        .iter()
                        .map(|r| (r.phase == Phase::Thinking && !r.solved) as u8 as f32)
                        .collect();
                    let forced = Tensor::<B, 1>::from_data(TensorData::new(forced, [rows]), &device).reshape([rows, 1]);
                    batch.logits.clone() + forced * bias.clone()
                }
                None => batch.logits.clone(),
            };
            let u: Vec<f32> = batch
                .rows
                .iter_mut()
                .map(|r| open_uniform(&mut r.rngs.decode))
                .collect();
            let u = Tensor::<B, 1>::from_data(TensorData::new(u, [rows]), &device);
            let next = read_ids(sample(logits, u, &self.config.sampler));
            let mut chunks: Vec<Vec<u32>> = vec![Vec::new(); rows];
            let mut boundary: Vec<(usize, usize)> = Vec::new();
            let mut rewind: Vec<(usize, usize)> = Vec::new();
            for (i, row) in batch.rows.iter_mut().enumerate() {
                let step = self.advance_row(row, next[i], &problems[row.r.problem], replace)?;
                chunks[i] = step.chunk;
                boundary.extend(step.boundary.map(|b| (i, b)));
                rewind.extend(step.rewind.map(|b| (i, b)));
            }
            batch.cache.rewind(&rewind)?;
            let counts: Vec<usize> = chunks.iter().map(Vec::len).collect();
            let width = counts.iter().copied().max().unwrap_or(0);
            if width > 0 {
                let ids: Vec<i64> = chunks
                    .iter()
                    .flat_map(|c| (0..width).map(|k| *c.get(k).unwrap_or(&pad) as i64))
                    .collect();
                batch.cache.ensure_capacity(width);
                // Rows that fed nothing are done or about to feed their forced suffix: their
                // (meaningless) logits are never sampled from.
                batch.logits = self.model.forward_cached_last(
                    Tensor::from_data(TensorData::new(ids, [rows, width]), &device),
                    &mut batch.cache,
                    Some(&counts),
                )?;
            }
            if self.prover.is_some() {
                // A boundary behind the row's last cached token (free text: before the marker
                // that opened the next episode) is forked and rewound to there.
                let lengths = batch.cache.lengths().to_vec();
                let (at_end, behind): (Vec<(usize, usize)>, Vec<(usize, usize)>) =
                    boundary.into_iter().partition(|&(i, b)| lengths[i] == b);
                let mut queued = |i: usize| {
                    let row = &mut batch.rows[i];
                    ((i, row.r.episodes.len(), row.r.problem), row.rngs.fork())
                };
                let rows_at_end: Vec<usize> = at_end.iter().map(|&(i, _)| i).collect();
                let at_end: Vec<_> = rows_at_end.iter().map(|&i| queued(i)).collect();
                let behind: Vec<_> = behind.into_iter().map(|(i, b)| (i, b, queued(i))).collect();
                queue.push(&batch.cache, &rows_at_end, at_end);
                for (i, b, q) in behind {
                    let mut fork = batch.cache.select_rows(&[i]);
                    fork.rewind(&[(0, b)])?;
                    queue.push_owned(fork, [q]);
                }
                // Long free-text streams: score what is queued before the forks outgrow memory.
                if queue.held_slots() * self.model.config.kv_bytes_per_token() > PROVER_QUEUE_BYTES {
                    self.score_queue(&mut queue, batch, problems)?;
                }
            }
        }
        self.score_queue(&mut queue, batch, problems)
    }

    /// Runs the prover on the queued boundary snapshots and stores their J in the rows.
    fn score_queue(&self, queue: &mut ProverQueue<B>, batch: &mut Batch<B>, problems: &[Problem]) -> Result<()> {
        let Some(cfg) = self.prover else {
            return Ok(());
        };
        for ((row, j, _), est) in queue.flush(self.model, problems, self.protocol, cfg)? {
            let r = &mut batch.rows[row].r;
            if r.j.len() <= j {
                r.j.resize(j + 1, f32::NAN);
                r.j_well_formed.resize(j + 1, f32::NAN);
            }
            r.j[j] = est.j;
            r.j_well_formed[j] = est.well_formed;
        }
        Ok(())
    }

    /// The finished rollouts of a batch.
    pub fn finish(batch: Batch<B>) -> Vec<Rollout> {
        batch.rows.into_iter().map(|r| r.r).collect()
    }

    /// `group` rollouts per problem, run to completion; `rngs[i]` is problem i's generator.
    pub fn rollouts_with(&self, problems: &[Problem], group: usize, rngs: &mut [StdRng]) -> Result<Vec<Rollout>> {
        let mut batch = self.start(problems, group, rngs)?;
        self.run(&mut batch, problems)?;
        Ok(Self::finish(batch))
    }

    /// [`Self::rollouts_with`] with the problems' generators split from `rng` in order.
    pub fn rollouts(&self, problems: &[Problem], group: usize, rng: &mut StdRng) -> Result<Vec<Rollout>> {
        self.rollouts_with(problems, group, &mut split_rngs(rng, problems.len()))
    }
}
