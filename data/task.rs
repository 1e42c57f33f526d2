//! The `Task` trait every task family implements, the problem type, and task configuration.
//!
//! A task generates problems from a seeded RNG, renders prompts, verifies answers (a pure 0/1
//! function), replies to episodes when it is interactive, and writes warm-start traces with
//! scripted strategies of varying quality.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::countdown::{Countdown, CountdownConfig, CountdownProblem};
use super::search::{Search, SearchConfig, SearchProblem};
use super::split::{split_of_key, Split};
use super::trace::{Role, Trace};
use crate::error::{Error, Result};

/// One problem instance of any task family.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Problem {
    Search(SearchProblem),
    Countdown(CountdownProblem),
}

/// What every task family provides. Object safe, so a run picks its task at run time.
pub trait Task: Send + Sync {
    fn name(&self) -> &'static str;
    /// Task words, besides the special tokens (the tokenizer is built from them).
    fn words(&self) -> Vec<String>;
    /// Episode budget of a training rollout.
    fn max_episodes(&self) -> usize;
    /// Fraction of the problem space held out from training.
    fn held_out_fraction(&self) -> f64;
    /// Canonical identity of a problem: equal keys are the same problem.
    fn key(&self, problem: &Problem) -> String;
    /// A random problem, from either split.
    fn generate(&self, rng: &mut StdRng) -> Problem;
    /// Prompt words, from `<bos>` to `<think>` inclusive.
    fn prompt(&self, problem: &Problem) -> Vec<String>;
    /// 0/1 outcome: the words between `<answer>` and `</answer>` solve the problem.
    fn verify(&self, problem: &Problem, answer: &[String]) -> bool;
    /// The answer has the task's answer format (whether right or wrong).
    fn well_formed(&self, answer: &[String]) -> bool;
    /// Environment reply after an episode (its words without the delimiter); `None` for tasks
    /// that are not interactive.
    fn reply(&self, problem: &Problem, episode: &[String]) -> Option<Vec<String>>;
    /// The single-token answer when the answer is one token from a known set, which lets the
    /// meta-prover read J exactly from the softmax.
    fn exact_answer(&self, problem: &Problem) -> Option<String>;
    /// Whether every problem's answer is a single token (so `exact_answer` is always `Some`).
    fn single_token_answer(&self) -> bool;
    /// Anytime accuracy of the Bayes-optimal policy on this problem (entry j: whether its
    /// forced answer after j episodes is correct), when it is computable.
    fn optimal_curve(&self, _problem: &Problem, _max_episodes: usize) -> Option<Vec<f64>> {
        None
    }
    /// Names of the scripted strategies, from good to wasteful.
    fn strategies(&self) -> &'static [&'static str];
    /// A scripted trace with `strategy`; with `cut_after = Some(j)` (j below the strategy's
    /// natural episode count) it stops after j episodes and ends with the forced suffix and the
    /// strategy's best guess so far.
    fn scripted_trace(&self, problem: &Problem, strategy: &str, cut_after: Option<usize>, rng: &mut StdRng) -> Trace;
}

/// The problem's side of the train / held-out split.
pub fn split_of(task: &dyn Task, problem: &Problem) -> Split {
    split_of_key(&task.key(problem), task.held_out_fraction())
}

/// A random problem from one side of the split (rejection sampling).
pub fn sample_problem(task: &dyn Task, split: Split, rng: &mut StdRng) -> Problem {
    loop {
        let p = task.generate(rng);
        if split_of(task, &p) == split {
            return p;
        }
    }
}

/// Appends the forced termination suffix `<timeup> </think> <answer>`.
pub fn push_forced_suffix(trace: &mut Trace) {
    trace.push(Role::Forced, ["<timeup>", "</think>", "<answer>"]);
}

/// Which scripted strategies the warm-start data mixes, and how often traces are cut.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmStartMix {
    /// Strategy name → relative weight.
    pub weights: BTreeMap<String, f64>,
    /// Fraction of traces cut after a random episode and ended with the forced suffix and a
    /// best guess, so the meta-prover's forced answers mean something from the start.
    pub cut_fraction: f64,
}

impl WarmStartMix {
    pub fn validate(&self, task: &dyn Task) -> Result<()> {
        for (name, &w) in &self.weights {
            if !task.strategies().contains(&name.as_str()) {
                return Err(Error::Unknown {
                    kind: "strategy",
                    name: name.clone(),
                    expected: task.strategies().join(", "),
                });
            }
            if !(w.is_finite() && w >= 0.0) {
                return Err(Error::config(format!("warm_start.weights.{name}"), w, "must be ≥ 0"));
            }
        }
        if self.weights.values().sum::<f64>() <= 0.0 {
            return Err(Error::config("warm_start.weights", "{}", "need at least one positive weight"));
        }
        if !(0.0..=1.0).contains(&self.cut_fraction) {
            return Err(Error::config("warm_start.cut_fraction", self.cut_fraction, "must be in [0, 1]"));
        }
        Ok(())
    }

    /// Draws a strategy by weight.
    pub fn pick(&self, rng: &mut StdRng) -> &str {
        let total: f64 = self.weights.values().sum();
        let mut u = rng.random::<f64>() * total;
        for (name, &w) in &self.weights {
            if u < w {
                return name;
            }
            u -= w;
        }
        self.weights.keys().next_back().expect("validated non-empty")
    }
}

/// One warm-start trace: a strategy drawn from the mix, cut with probability `cut_fraction`
/// after a uniformly drawn number of its episodes.
pub fn warm_start_trace(task: &dyn Task, problem: &Problem, mix: &WarmStartMix, rng: &mut StdRng) -> Trace {
    let strategy = mix.pick(rng).to_string();
    let cut = rng.random::<f64>() < mix.cut_fraction;
    // The trace draws from its own child RNG, so a cut trace replays the same guesses as the
    // full trace it is cut from.
    let child: u64 = rng.random();
    let full = task.scripted_trace(problem, &strategy, None, &mut StdRng::seed_from_u64(child));
    if !cut {
        return full;
    }
    let natural = full.words.iter().filter(|w| *w == "<ep>").count();
    let j = rng.random_range(0..natural.max(1));
    task.scripted_trace(problem, &strategy, Some(j), &mut StdRng::seed_from_u64(child))
}

/// Configuration of a task family, tagged by `name` in JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case", deny_unknown_fields)]
pub enum TaskConfig {
    Search(SearchConfig),
    Countdown(CountdownConfig),
}

/// Names accepted by `--task`.
pub const TASKS: [&str; 2] = ["search", "countdown"];

impl TaskConfig {
    /// Default configuration of a task family by name.
    pub fn by_name(name: &str) -> Result<Self> {
        match name {
            "search" => Ok(Self::Search(SearchConfig::default())),
            "countdown" => Ok(Self::Countdown(CountdownConfig::default())),
            other => Err(Error::Unknown {
                kind: "task",
                name: other.into(),
                expected: TASKS.join(", "),
            }),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Search(_) => "search",
            Self::Countdown(_) => "countdown",
        }
    }

    /// Builds the task, validating its configuration.
    pub fn build(&self) -> Result<Box<dyn Task>> {
        Ok(match self {
            Self::Search(c) => Box::new(Search::new(c.clone())?),
            Self::Countdown(c) => Box::new(Countdown::new(c.clone())?),
        })
    }

    /// The warm-start mixture configured for this task.
    pub fn warm_start(&self) -> &WarmStartMix {
        match self {
            Self::Search(c) => &c.warm_start,
            Self::Countdown(c) => &c.warm_start,
        }
    }
}
