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
use super::math::MathProblem;
use super::math_task::{Math, MathConfig};
use super::search::{Search, SearchConfig, SearchProblem};
use super::split::{split_of_key, Split};
use super::trace::{Role, Trace};
use crate::error::{Error, Result};

/// One problem instance of any task family.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Problem {
    Search(SearchProblem),
    Countdown(CountdownProblem),
    /// A free-text problem read from a JSONL file (pretrained models).
    Math(MathProblem),
}

/// What every task family provides. Object safe, so a run picks its task at run time.
pub trait Task: Send + Sync {
    fn name(&self) -> &'static str;
    /// Task words, besides the special tokens (the tokenizer is built from them).
    fn words(&self) -> Vec<String>;
    /// Episode budget of a training rollout.
    fn max_episodes(&self) -> usize;
    /// Fraction of the problem space held out from training (for reported numbers).
    fn held_out_fraction(&self) -> f64;
    /// Fraction of the problem space kept apart for choosing hyper-parameters.
    fn validation_fraction(&self) -> f64;
    /// Canonical identity of a problem: equal keys are the same problem.
    fn key(&self, problem: &Problem) -> String;
    /// What decides a problem's split: everything the model is shown, so that no prompt of
    /// one split is ever seen in another. Problems whose prompts are equal share a split key.
    fn split_key(&self, problem: &Problem) -> String {
        self.key(problem)
    }
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
    /// Whether this episode is known to have solved the problem: the environment said so (an
    /// interactive task's `correct`), or the episode is itself a checkable attempt that
    /// verifies (countdown's line). Budget forcing never keeps such a row thinking: after a
    /// confirmed solution, more episodes can only push it off its training distribution.
    /// Tasks whose episodes cannot be checked confirm nothing, so the default is `false`.
    fn confirms_solution(&self, _problem: &Problem, _episode: &[String]) -> bool {
        false
    }
    /// Every answer that verifies, when the task can list them: the meta-prover then reads J
    /// exactly, as the total probability of these answers, instead of sampling.
    fn correct_answers(&self, problem: &Problem) -> Option<Vec<Vec<String>>>;
    /// Whether `correct_answers` is `Some` for every problem.
    fn enumerable_answers(&self) -> bool;
    /// Whether a well-formed answer can begin with this word.
    fn starts_answer(&self, word: &str) -> bool;
    /// Anytime accuracy of the Bayes-optimal policy on this problem (entry j: whether its
    /// forced answer after j episodes is correct), when it is computable.
    fn optimal_curve(&self, _problem: &Problem, _max_episodes: usize) -> Option<Vec<f64>> {
        None
    }
    /// Names of the scripted strategies, from good to wasteful.
    fn strategies(&self) -> &'static [&'static str];
    /// A scripted trace with `strategy`; with `cut_after = Some(j)` (j at most the strategy's
    /// natural episode count) it stops after j episodes, even when the j-th solved the problem,
    /// and ends with the forced suffix and the strategy's best guess so far.
    fn scripted_trace(&self, problem: &Problem, strategy: &str, cut_after: Option<usize>, rng: &mut StdRng) -> Trace;
}

/// The problem's side of the train / held-out split.
pub fn split_of(task: &dyn Task, problem: &Problem) -> Split {
    split_of_key(
        &task.split_key(problem),
        task.held_out_fraction(),
        task.validation_fraction(),
    )
}

/// Largest number of number tokens a task may put in the vocabulary (`search`'s n,
/// `countdown`'s max_value + 1): past it the embedding alone would not fit a small machine.
pub const MAX_NUMBER_TOKENS: usize = 10_000;

/// Draws a task generates before [`sample_problem`] gives up on a split.
const MAX_DRAWS: usize = 100_000;

/// A random problem from one split (rejection sampling). An error when the split is empty
/// (its fraction is 0, or too small for a small problem space).
pub fn sample_problem(task: &dyn Task, split: Split, rng: &mut StdRng) -> Result<Problem> {
    for _ in 0..MAX_DRAWS {
        let p = task.generate(rng);
        if split_of(task, &p) == split {
            return Ok(p);
        }
    }
    Err(Error::config(
        "task",
        task.name(),
        format!(
            "no problem of the {split:?} split in {MAX_DRAWS} draws: raise held_out_fraction / \
            validation_fraction or enlarge the task"
        ),
    ))
}

/// Checks the held-out and validation fractions of a task configuration.
pub fn validate_split_fractions(held_out: f64, validation: f64) -> Result<()> {
    if !(0.0..1.0).contains(&held_out) {
        return Err(Error::config("task.held_out_fraction", held_out, "must be in [0, 1)"));
    }
    if !(0.0..1.0).contains(&validation) || held_out + validation >= 1.0 {
        return Err(Error::config(
            "task.validation_fraction",
            validation,
            format!("must be ≥ 0 and leave training problems (held_out_fraction is {held_out})"),
        ));
    }
    Ok(())
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
    /// Fraction of traces cut at a random episode boundary (including the one after the last
    /// episode, even a solving one) and ended with the forced suffix and a best guess, so the
    /// meta-prover's forced answers mean something from the start at every boundary it scores.
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
            return Err(Error::config(
                "warm_start.weights",
                "{}",
                "need at least one positive weight",
            ));
        }
        if !(0.0..=1.0).contains(&self.cut_fraction) {
            return Err(Error::config(
                "warm_start.cut_fraction",
                self.cut_fraction,
                "must be in [0, 1]",
            ));
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
/// after a uniformly drawn number j ∈ {0 … e} of its e episodes. j = e cuts after the last
/// episode too, so `… correct <timeup> </think> <answer> x </answer>` is in the data: the
/// meta-prover scores that boundary (the solving episode's progress, `mrt`'s termination
/// baselines, token-level anytime accuracy) and must not be out of distribution there.
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
    let j = rng.random_range(0..=natural);
    task.scripted_trace(problem, &strategy, Some(j), &mut StdRng::seed_from_u64(child))
}

/// Configuration of a task family, tagged by `name` in JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case", deny_unknown_fields)]
pub enum TaskConfig {
    Search(SearchConfig),
    Countdown(CountdownConfig),
    /// Free-text problems from a JSONL file, for pretrained models.
    Math(MathConfig),
}

/// The synthetic task families (word vocabulary, scripted warm-start traces).
pub const TASKS: [&str; 2] = ["search", "countdown"];

/// Every name `--task` accepts: the synthetic tasks and `math` (free text, pretrained models).
pub const ALL_TASKS: [&str; 3] = ["search", "countdown", "math"];

impl TaskConfig {
    /// Default configuration of a task family by name.
    pub fn by_name(name: &str) -> Result<Self> {
        match name {
            "search" => Ok(Self::Search(SearchConfig::default())),
            "countdown" => Ok(Self::Countdown(CountdownConfig::default())),
            "math" => Ok(Self::Math(MathConfig::default())),
            other => Err(Error::Unknown {
                kind: "task",
                name: other.into(),
                expected: ALL_TASKS.join(", "),
            }),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Search(_) => "search",
            Self::Countdown(_) => "countdown",
            Self::Math(_) => "math",
        }
    }

    /// Builds the task, validating its configuration.
    pub fn build(&self) -> Result<Box<dyn Task>> {
        Ok(match self {
            Self::Search(c) => Box::new(Search::new(c.clone())?),
            Self::Countdown(c) => Box::new(Countdown::new(c.clone())?),
            Self::Math(c) => Box::new(Math::new(c.clone())?),
        })
    }

    /// The warm-start mixture configured for this task; `None` for free text (no scripted
    /// traces: the model is pretrained).
    pub fn warm_start(&self) -> Option<&WarmStartMix> {
        match self {
            Self::Search(c) => Some(&c.warm_start),
            Self::Countdown(c) => Some(&c.warm_start),
            Self::Math(_) => None,
        }
    }

    /// Whether the task's text comes from a pretrained model's tokenizer (the run starts from
    /// a Hugging Face model directory) rather than a word vocabulary built from the task.
    pub fn is_text(&self) -> bool {
        matches!(self, Self::Math(_))
    }
}
