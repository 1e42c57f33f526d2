//! One step's samples and their training signal: the only place where GRPO and the MRT
//! variants differ (MRT.md, "Instantiations"; the formulas are in `advantage.rs`).
//!
//! - `grpo`, `mrt-dense`, `star`, `mrt-star`: G full streams per problem from its prompt;
//!   `mrt-dense` and `mrt-star` score every episode boundary with the meta-prover.
//! - `mrt`: one full stream per problem with J at every boundary; it is cut at a boundary
//!   k ~ U{0 … e − 1} (e its episodes; k = 0 when it has none), and m = G continuations are
//!   sampled from the cut. The prover's J at the cut is the termination baseline: the success
//!   probability of stopping there, estimated as the paper's terminated continuations would
//!   (exactly from the softmax where the answer is one token, else from K forced answers), so
//!   all m continuations are trained, the same number of trained samples per problem as GRPO.

use burn::prelude::*;
use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::advantage::{grpo, mrt, progress, progress_bonus, progress_per_episode};
use super::batch::Signal;
use super::config::{Algo, RlConfig};
use super::rollout::{Engine, Rollout};
use crate::data::Problem;
use crate::error::Result;

/// Samples of one step with their training signal.
pub struct Scored {
    /// The trained samples.
    pub rollouts: Vec<Rollout>,
    /// One per rollout.
    pub signals: Vec<Signal>,
    /// `mrt`: the full streams the prefixes were cut from (empty otherwise).
    pub prefix_streams: Vec<Rollout>,
    /// `mrt`: the termination baseline b of each prefix (empty otherwise).
    pub baselines: Vec<f32>,
    /// Groups (of samples from one context) and those whose outcomes were all equal.
    pub groups: usize,
    pub degenerate_groups: usize,
    /// Mean magnitude of each advantage term over the trained samples (outcome) and over
    /// their tokens (`mrt-dense`'s bonus) or samples (`mrt`'s α(r̄ − b)); 0 where a term is
    /// absent. Shows which term drives the update.
    pub outcome_abs: f64,
    pub progress_abs: f64,
}

impl Scored {
    /// Full streams sampled from the prompts: what the step's `rollout/…` and `prover/…`
    /// metrics describe, so that they compare across algorithms.
    pub fn streams(&self) -> &[Rollout] {
        if self.prefix_streams.is_empty() {
            &self.rollouts
        } else {
            &self.prefix_streams
        }
    }
}

fn mean_abs(x: impl Iterator<Item = f32>) -> f64 {
    let (s, n) = x.fold((0.0f64, 0usize), |(s, n), v| (s + v.abs() as f64, n + 1));
    if n == 0 {
        0.0
    } else {
        s / n as f64
    }
}

/// A step's samples before their training signal: what a data-parallel peer samples for its
/// share of the problems, and what the peers exchange.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Sampled {
    /// The samples to train on, in groups of `group_size` per problem.
    pub rollouts: Vec<Rollout>,
    /// `mrt`: the full stream of each problem that the prefix was cut from, and J at the cut
    /// (the termination baseline); empty otherwise.
    pub prefix_streams: Vec<Rollout>,
    pub baselines: Vec<f32>,
    /// How many problems.
    pub problems: usize,
}

impl Sampled {
    /// The samples of consecutive shares of a step's problems, in order, as one device would
    /// have sampled them all (`Rollout::problem` indexes the whole step's problems).
    pub fn merge(parts: Vec<Sampled>) -> Sampled {
        let mut all = Sampled::default();
        for part in parts {
            let offset = all.problems;
            let shifted = |mut r: Rollout| {
                r.problem += offset;
                r
            };
            all.rollouts.extend(part.rollouts.into_iter().map(shifted));
            all.prefix_streams.extend(part.prefix_streams.into_iter().map(shifted));
            all.baselines.extend(part.baselines);
            all.problems += part.problems;
        }
        all
    }
}

/// Rollouts and their training signal for one step of `cfg.algo` on `problems`, `rngs[i]`
/// problem i's generator.
pub fn score<B: Backend>(
    engine: &Engine<B>,
    problems: &[Problem],
    cfg: &RlConfig,
    rngs: &mut [StdRng],
) -> Result<Scored> {
    Ok(signal(sample(engine, problems, cfg, rngs)?, cfg))
}

/// The samples of one step of `cfg.algo` on `problems`, `rngs[i]` problem i's generator: a
/// problem's samples do not depend on the other problems sampled with it, so peers that each
/// sample a share of a step's problems have, together, the one-device samples.
pub fn sample<B: Backend>(
    engine: &Engine<B>,
    problems: &[Problem],
    cfg: &RlConfig,
    rngs: &mut [StdRng],
) -> Result<Sampled> {
    if cfg.algo != Algo::Mrt {
        return Ok(Sampled {
            rollouts: engine.rollouts_with(problems, cfg.group_size, rngs)?,
            problems: problems.len(),
            ..Sampled::default()
        });
    }
    // The paper's recipe (see the module header).
    let streams = engine.rollouts_with(problems, 1, rngs)?;
    let mut seeds = Vec::with_capacity(streams.len());
    let mut baselines = Vec::with_capacity(streams.len());
    for (s, rng) in streams.iter().zip(rngs.iter_mut()) {
        let e = s.episodes.len();
        let k = if e == 0 { 0 } else { rng.random_range(0..e) };
        // J is there at every boundary (the engine has a prover); a NaN one poisons the loss,
        // which the loop reports as divergence.
        let b = s.j.get(k).copied().unwrap_or(f32::NAN);
        seeds.push(s.prefix(k));
        baselines.push(b);
    }
    let continuation = Engine {
        model: engine.model,
        protocol: engine.protocol,
        config: engine.config,
        prover: None,
    };
    let mut batch = continuation.start_from(&seeds, problems, cfg.group_size, rngs)?;
    continuation.run(&mut batch, problems)?;
    Ok(Sampled {
        rollouts: Engine::finish(batch),
        prefix_streams: streams,
        baselines,
        problems: problems.len(),
    })
}

/// The training signal of a step's samples. It needs the whole step (the `mrt` recipe scales
/// its advantages by their standard deviation over the batch), so data-parallel peers compute
/// it from everyone's samples.
pub fn signal(sampled: Sampled, cfg: &RlConfig) -> Scored {
    let Sampled {
        rollouts,
        prefix_streams,
        baselines,
        problems,
    } = sampled;
    if cfg.algo == Algo::Mrt {
        let rewards: Vec<f32> = rollouts.iter().map(|r| r.reward).collect();
        let lens: Vec<usize> = rollouts.iter().map(|r| r.tokens.len()).collect();
        let MrtSignals {
            signals,
            degenerate,
            outcome_abs,
            progress_abs,
        } = mrt_signals(
            &rewards,
            &baselines,
            &lens,
            cfg.group_size,
            cfg.alpha as f32,
            cfg.scale_by_std,
        );
        return Scored {
            groups: prefix_streams.len(),
            rollouts,
            signals,
            prefix_streams,
            baselines,
            degenerate_groups: degenerate,
            outcome_abs,
            progress_abs,
        };
    }
    let g = cfg.group_size;
    let rewards: Vec<f32> = rollouts.iter().map(|r| r.reward).collect();
    let (adv, keep, degenerate) = grpo(&rewards, g, cfg.scale_by_std);
    let mut signals: Vec<Signal> = adv.iter().zip(&keep).map(|(&a, &k)| Signal::outcome(a, k)).collect();
    let alpha = cfg.alpha as f32;
    match cfg.algo {
        // Every rollout is in the progress term, including those of all-equal groups: that is
        // where outcome RL goes blind once a problem is always (or never) solved, and where
        // the bonus should act. With α = 0 there is no progress term: GRPO exactly.
        Algo::MrtDense if alpha > 0.0 => {
            for (s, r) in signals.iter_mut().zip(&rollouts) {
                s.bonus = Some(progress_bonus(r.tokens.len(), &r.episodes, &progress(&r.j), alpha));
            }
        }
        // Supervised on selected correct streams, weight 1 on their tokens.
        Algo::Star | Algo::MrtStar => {
            for (group, chunk) in rollouts.chunks(g).enumerate() {
                let mut correct: Vec<usize> = (0..g)
                    .filter(|&i| chunk[i].reward > 0.0)
                    .map(|i| group * g + i)
                    .collect();
                if cfg.algo == Algo::MrtStar {
                    correct.sort_by(|&a, &b| {
                        progress_per_episode(&rollouts[b].j).total_cmp(&progress_per_episode(&rollouts[a].j))
                    });
                    let n = ((correct.len() as f64 * cfg.star_keep).ceil() as usize)
                        .max(1)
                        .min(correct.len());
                    correct.truncate(n);
                }
                for (i, s) in signals.iter_mut().enumerate().skip(group * g).take(g) {
                    *s = Signal::outcome(1.0, correct.contains(&i));
                }
            }
        }
        _ => {}
    }
    let outcome_abs = mean_abs(signals.iter().filter(|s| s.in_outcome).map(|s| s.outcome));
    let mut bonuses = Vec::new();
    for (s, r) in signals.iter().zip(&rollouts) {
        if let Some(b) = &s.bonus {
            bonuses.extend(b.iter().zip(r.trainable()).filter(|(_, t)| *t).map(|(v, _)| *v));
        }
    }
    let progress_abs = mean_abs(bonuses.into_iter());
    Scored {
        rollouts,
        signals,
        prefix_streams,
        baselines,
        groups: problems,
        degenerate_groups: degenerate,
        outcome_abs,
        progress_abs,
    }
}

/// The `mrt` recipe's training signal for continuations in groups of `m` (`lens[i]` the
/// length of continuation i's token sequence).
pub struct MrtSignals {
    pub signals: Vec<Signal>,
    /// Groups whose m rewards were all equal.
    pub degenerate: usize,
    /// Mean |outcome advantage| over the outcome term's samples, mean |α(r̄ − b)| over the
    /// progress term's.
    pub outcome_abs: f64,
    pub progress_abs: f64,
}

/// Splits the recipe's advantage `(r_i − r̄) + α(r̄ − b)` into its two terms, each normalised
/// over its own tokens as `mrt-dense`'s are (`batch.rs`): the outcome term is GRPO's, trained on
/// the groups with mixed outcomes only, and the termination term α(r̄ − b) is a per-token bonus
/// on every continuation of a group where it is non-zero, all-equal groups included. So an
/// all-equal group never joins the outcome term's token mean (which would scale the mixed
/// groups' signal down by their share of the tokens), and α → 0 is GRPO's centring,
/// continuously.
pub fn mrt_signals(
    rewards: &[f32],
    baselines: &[f32],
    lens: &[usize],
    m: usize,
    alpha: f32,
    scale_by_std: bool,
) -> MrtSignals {
    assert_eq!(rewards.len(), lens.len(), "one length per continuation");
    let adv = mrt(rewards, baselines, m, alpha, scale_by_std);
    let mut signals = Vec::with_capacity(rewards.len());
    let mut degenerate = 0;
    for (g, group) in rewards.chunks(m).enumerate() {
        let mixed = group.iter().any(|&r| r != group[0]);
        degenerate += !mixed as usize;
        let span = g * m..(g + 1) * m;
        let terms = adv.outcome[span.clone()].iter().zip(&adv.progress[span.clone()]);
        for ((&outcome, &p), &len) in terms.zip(&lens[span]) {
            let mut s = Signal::outcome(outcome, mixed);
            // A NaN baseline (no J at the cut; NaN ≠ 0) poisons the loss on purpose: the loop
            // reports it as divergence rather than training on a made-up baseline.
            if p != 0.0 {
                s.bonus = Some(vec![p; len]);
            }
            signals.push(s);
        }
    }
    let outcome_abs = mean_abs(
        signals
            .iter()
            .zip(&adv.outcome)
            .filter(|(s, _)| s.in_outcome)
            .map(|(_, a)| *a),
    );
    let progress_abs = mean_abs(
        signals
            .iter()
            .zip(&adv.progress)
            .filter(|(s, _)| s.bonus.is_some())
            .map(|(_, p)| *p),
    );
    MrtSignals {
        signals,
        degenerate,
        outcome_abs,
        progress_abs,
    }
}
