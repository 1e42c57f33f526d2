//! Held-out evaluation: pass@1, anytime accuracy after each episode, cumulative regret, and the
//! token cost of solving.
//!
//! Anytime accuracy at budget b (MRT.md's J_r(μ(·|x, z_{0:b}))): for a rollout that finished
//! on its own within b episodes, its outcome; otherwise the meta-prover's J after b episodes.
//! Normalised regret over B episodes: `(1/B) Σ_{b=1..B} (J* − A_b)` with J* ≡ 1, and against
//! the Bayes-optimal curve where the task can compute it.

use std::collections::HashSet;

use burn::prelude::*;
use indicatif::ProgressBar;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::by_problem::mean_by_problem;
use crate::data::split::fnv1a;
use crate::data::{sample_problem, Problem, Split, Task};
use crate::error::Result;
use crate::model::{split_rngs, SamplerConfig, Transformer};
use crate::rl::config::EvalConfig;
use crate::rl::protocol::Protocol;
use crate::rl::rollout::{Engine, Finish, Rollout, RolloutConfig};

/// The fixed evaluation set of a task configuration on one split (`HeldOut` for reported
/// numbers, `Validation` for choosing hyper-parameters): up to `n` distinct problems drawn with
/// a seed derived from the task name and split only, so every run of a task sees the same set.
pub fn eval_problems(task: &dyn Task, n: usize, split: Split) -> Result<Vec<Problem>> {
    let stream = match split {
        Split::HeldOut => "eval",
        Split::Validation => "validation",
        Split::Train => "train-eval",
    };
    let mut rng = StdRng::seed_from_u64(fnv1a(format!("{stream}:{}", task.name()).as_bytes()));
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(n);
    let mut misses = 0;
    while out.len() < n && misses < 20 * n + 1000 {
        let p = sample_problem(task, split, &mut rng)?;
        if seen.insert(task.key(&p)) {
            out.push(p);
        } else {
            misses += 1;
        }
    }
    Ok(out)
}

/// Anytime accuracy of one rollout at a budget of `b` episodes: its outcome once it has ended
/// (on its own or forced) within b episodes, else the meta-prover's J after b episodes.
pub fn anytime(r: &Rollout, b: usize) -> f32 {
    if b >= r.episodes.len() || r.j.len() <= b {
        r.reward
    } else {
        r.j[b]
    }
}

/// Aggregates of one evaluation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalSummary {
    pub problems: usize,
    pub rollouts: usize,
    /// Mean outcome reward within the episode budget.
    #[serde(deserialize_with = "crate::fsutil::nan")]
    pub pass1: f64,
    /// Fraction of rollouts that answered on their own (not forced).
    #[serde(deserialize_with = "crate::fsutil::nan")]
    pub answered: f64,
    #[serde(deserialize_with = "crate::fsutil::nan")]
    pub mean_episodes: f64,
    /// Mean policy tokens per rollout.
    #[serde(deserialize_with = "crate::fsutil::nan")]
    pub mean_tokens: f64,
    /// Mean policy tokens of the solved rollouts.
    #[serde(deserialize_with = "crate::fsutil::nan")]
    pub tokens_to_solve: f64,
    /// Mean episodes of the solved rollouts.
    #[serde(deserialize_with = "crate::fsutil::nan")]
    pub episodes_to_solve: f64,
    /// Mean anytime accuracy after 0 … B episodes.
    #[serde(deserialize_with = "crate::fsutil::nan")]
    pub anytime: Vec<f64>,
    /// Bayes-optimal anytime accuracy on the same problems, when computable.
    #[serde(deserialize_with = "crate::fsutil::nan")]
    pub optimal: Option<Vec<f64>>,
    /// Normalised cumulative regret against J* = 1 over B episodes.
    #[serde(deserialize_with = "crate::fsutil::nan")]
    pub regret: f64,
    /// Normalised cumulative regret against the Bayes-optimal curve.
    pub regret_vs_optimal: Option<f64>,
    /// Mean well-formedness of forced answers over all episode boundaries.
    #[serde(deserialize_with = "crate::fsutil::nan")]
    pub forced_well_formed: f64,
    /// pass@1 of each problem (its samples' mean reward), in the problems' order: what an
    /// interval over the problems is drawn from.
    #[serde(default)]
    #[serde(deserialize_with = "crate::fsutil::nan")]
    pub pass1_by_problem: Vec<f64>,
}

fn mean(x: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = x.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        s / n as f64
    }
}

/// Summarises rollouts of `problems` at an episode budget `budget`.
pub fn summarize(task: &dyn Task, problems: &[Problem], rollouts: &[Rollout], budget: usize) -> EvalSummary {
    let solved: Vec<&Rollout> = rollouts.iter().filter(|r| r.reward > 0.0).collect();
    let anytime_curve: Vec<f64> = (0..=budget)
        .map(|b| mean(rollouts.iter().map(|r| anytime(r, b) as f64)))
        .collect();
    let optimal: Option<Vec<f64>> = problems
        .iter()
        .map(|p| task.optimal_curve(p, budget))
        .collect::<Option<Vec<_>>>()
        .map(|curves| (0..=budget).map(|b| mean(curves.iter().map(|c| c[b]))).collect());
    let regret = mean(anytime_curve[1..].iter().map(|a| 1.0 - a));
    let regret_vs_optimal = optimal
        .as_ref()
        .map(|o| mean(o[1..].iter().zip(&anytime_curve[1..]).map(|(o, a)| o - a)));
    EvalSummary {
        problems: problems.len(),
        rollouts: rollouts.len(),
        pass1: mean(rollouts.iter().map(|r| r.reward as f64)),
        answered: mean(rollouts.iter().map(|r| (r.finish == Finish::Answered) as u8 as f64)),
        mean_episodes: mean(rollouts.iter().map(|r| r.episodes.len() as f64)),
        mean_tokens: mean(rollouts.iter().map(|r| r.policy_tokens() as f64)),
        tokens_to_solve: mean(solved.iter().map(|r| r.policy_tokens() as f64)),
        episodes_to_solve: mean(solved.iter().map(|r| r.episodes.len() as f64)),
        anytime: anytime_curve,
        optimal,
        regret,
        regret_vs_optimal,
        forced_well_formed: mean(
            rollouts
                .iter()
                .flat_map(|r| r.j_well_formed.iter().map(|&w| w as f64))
                .filter(|w| !w.is_nan()),
        ),
        pass1_by_problem: mean_by_problem(problems.len(), rollouts, |r| r.reward as f64),
    }
}

/// KV-cache memory one evaluation batch may take: a pretrained model's rows are long and its
/// cache wide (SmolLM2-135M: ≈ 46 kB per token per row), so its problems go a few at a time;
/// the synthetic tasks' small models keep their batches of 32 problems (and their numbers).
const EVAL_CACHE_BYTES: usize = 2 << 30;
/// Rows' tokens beyond `max_tokens` that a batch's cache must hold: the prompt, the forced
/// suffix and answer (GSM8K's first question through SmolLM2's chat template is 96 tokens).
const EVAL_ROW_SLACK: usize = 512;

/// Problems per evaluation batch for `config` on `model`: at most 32, fewer when their
/// rows' KV cache would pass [`EVAL_CACHE_BYTES`].
pub fn eval_chunk<B: Backend>(model: &Transformer<B>, config: &EvalConfig) -> usize {
    let per_row = model.config.kv_bytes_per_token() * (config.max_tokens + EVAL_ROW_SLACK);
    (EVAL_CACHE_BYTES / per_row.max(1) / config.samples.max(1)).clamp(1, 32)
}

/// Samples `config.samples` rollouts per held-out problem with J estimates at every boundary.
pub fn evaluate<B: Backend>(
    model: &Transformer<B>,
    task: &dyn Task,
    protocol: &dyn Protocol,
    problems: &[Problem],
    config: &EvalConfig,
    budget_forcing: bool,
    seed: u64,
) -> Result<(EvalSummary, Vec<Rollout>)> {
    evaluate_shown(
        model,
        task,
        protocol,
        problems,
        config,
        budget_forcing,
        seed,
        &ProgressBar::hidden(),
    )
}

/// [`evaluate`], counting finished problems on `bar`.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_shown<B: Backend>(
    model: &Transformer<B>,
    task: &dyn Task,
    protocol: &dyn Protocol,
    problems: &[Problem],
    config: &EvalConfig,
    budget_forcing: bool,
    seed: u64,
    bar: &ProgressBar,
) -> Result<(EvalSummary, Vec<Rollout>)> {
    let share = 0..problems.len();
    let rollouts = eval_rollouts(model, protocol, problems, share, config, budget_forcing, seed, bar)?;
    Ok((summarize(task, problems, &rollouts, config.max_episodes), rollouts))
}

/// The rollouts [`evaluate`] samples for `problems[share]` (their `problem` indexes the whole
/// list): every problem has its own generator, split in order from `seed` over the whole
/// list, so its rollouts do not depend on the batch size nor, when data-parallel peers share
/// the problems out, on which peer samples them.
#[allow(clippy::too_many_arguments)]
pub fn eval_rollouts<B: Backend>(
    model: &Transformer<B>,
    protocol: &dyn Protocol,
    problems: &[Problem],
    share: std::ops::Range<usize>,
    config: &EvalConfig,
    budget_forcing: bool,
    seed: u64,
    bar: &ProgressBar,
) -> Result<Vec<Rollout>> {
    let rollout = RolloutConfig {
        max_episodes: config.max_episodes,
        max_tokens: config.max_tokens,
        max_answer_tokens: config.prover.max_answer_tokens,
        free_answer: config.free_answer,
        sampler: SamplerConfig {
            temperature: config.temperature,
            ..SamplerConfig::default()
        },
        budget_forcing,
    };
    let engine = Engine {
        model,
        protocol,
        config: &rollout,
        prover: Some(&config.prover),
    };
    let mut rngs = split_rngs(&mut StdRng::seed_from_u64(seed), problems.len());
    let mut rollouts = Vec::new();
    // Bounded batches keep the KV cache small on the CPU.
    let size = eval_chunk(model, config);
    let (mine, rngs) = (&problems[share.clone()], &mut rngs[share.clone()]);
    for (chunk, rngs) in mine.chunks(size).zip(rngs.chunks_mut(size)) {
        let offset = share.start + rollouts.len() / config.samples;
        let mut part = engine.rollouts_with(chunk, config.samples, rngs)?;
        for r in &mut part {
            r.problem += offset;
        }
        rollouts.extend(part);
        bar.inc(chunk.len() as u64);
    }
    Ok(rollouts)
}

/// pass@1 of a scripted strategy on `problems` (within the task's episode budget), verified
/// like the policy's answers: a reference point for what the warm-start data teaches.
pub fn scripted_pass1(task: &dyn Task, problems: &[Problem], strategy: &str, samples: usize, seed: u64) -> f64 {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut solved = 0usize;
    for p in problems {
        for _ in 0..samples {
            let trace = task.scripted_trace(p, strategy, None, &mut rng);
            solved += trace.answer().is_some_and(|a| task.verify(p, a)) as usize;
        }
    }
    solved as f64 / (problems.len() * samples).max(1) as f64
}
