//! `search`: find a hidden integer x in [0, n) from a noisy hint. Each episode is one guess;
//! the environment answers `higher`, `lower` or `correct`. The answer is one number token.
//!
//! The hint is a window: h is drawn uniformly from [x − w, x + w] (w = `hint_noise`) and the
//! prompt shows `[max(0, h − w), min(n − 1, h + w)]`. Given the window, x is uniform on it, and
//! after any history of feedback x is uniform on the *consistent interval*: so bisection of the
//! consistent interval is Bayes-optimal, and its anytime accuracy is computable exactly.
//!
//! Prompt: `<bos> search lo hi <think>`; episode: `g <ep>` then the reply;
//! end: `</think> <answer> g </answer>`.

use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::task::{push_forced_suffix, validate_split_fractions, Problem, Task, WarmStartMix, MAX_NUMBER_TOKENS};
use super::trace::{Role, Trace};
use crate::error::{Error, Result};

/// Configuration of the `search` task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SearchConfig {
    /// Hidden numbers are drawn uniformly from [0, n).
    pub n: usize,
    /// Half-width w of the hint window (the hint's noise).
    pub hint_noise: usize,
    /// Episode (guess) budget of a training rollout. The default, 10, is generous (bisection
    /// needs at most 5 on a 17-wide window): as in the paper's long-budget regime, outcome
    /// reward then no longer says how fast a stream gets there.
    pub max_episodes: usize,
    /// Fraction of hint windows (prompts) held out from training, for reported numbers.
    pub held_out_fraction: f64,
    /// Fraction of hint windows kept apart for choosing hyper-parameters. The default n = 32
    /// has only 48 distinct windows, hence 0.2 (5 of them; 10 % would leave 2).
    pub validation_fraction: f64,
    /// Scripted strategies of the warm-start data.
    pub warm_start: WarmStartMix,
}

impl Default for SearchConfig {
    fn default() -> Self {
        Self {
            n: 32,
            hint_noise: 8,
            max_episodes: 10,
            held_out_fraction: 0.2,
            validation_fraction: 0.2,
            warm_start: WarmStartMix {
                weights: [("bisect", 0.2), ("random", 0.3), ("scan", 0.3), ("blind", 0.2)]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
                cut_fraction: 0.35,
            },
        }
    }
}

/// A hidden number and the hint window shown in the prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SearchProblem {
    pub hidden: u32,
    pub lo: u32,
    pub hi: u32,
}

/// The environment's answer to a guess.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feedback {
    Higher,
    Lower,
    Correct,
}

impl Feedback {
    pub fn of(guess: u32, hidden: u32) -> Self {
        match guess.cmp(&hidden) {
            std::cmp::Ordering::Less => Feedback::Higher,
            std::cmp::Ordering::Greater => Feedback::Lower,
            std::cmp::Ordering::Equal => Feedback::Correct,
        }
    }

    pub fn word(self) -> &'static str {
        match self {
            Feedback::Higher => "higher",
            Feedback::Lower => "lower",
            Feedback::Correct => "correct",
        }
    }
}

/// The interval of values consistent with the window and the feedback so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval {
    pub lo: u32,
    pub hi: u32,
}

impl Interval {
    pub fn size(&self) -> u32 {
        self.hi - self.lo + 1
    }

    /// The Bayes-optimal guess (and forced answer): the midpoint.
    pub fn midpoint(&self) -> u32 {
        (self.lo + self.hi) / 2
    }

    /// Narrows the interval after `guess` got `feedback` (guesses outside it change nothing).
    pub fn update(&mut self, guess: u32, feedback: Feedback) {
        match feedback {
            Feedback::Higher if guess >= self.lo => self.lo = (guess + 1).min(self.hi),
            Feedback::Lower if guess <= self.hi => self.hi = guess.saturating_sub(1).max(self.lo),
            Feedback::Correct => {
                self.lo = guess;
                self.hi = guess;
            }
            _ => {}
        }
    }
}

/// Anytime accuracy of the Bayes-optimal policy (bisection, forced answer = midpoint) on a
/// window: entry j is the probability that the forced answer after j guesses is correct, for x
/// uniform on the window, computed by enumerating x. Entries 0..=max_episodes.
pub fn bayes_optimal_curve(window: Interval, max_episodes: usize) -> Vec<f64> {
    let size = window.size() as f64;
    let mut curve = vec![0.0; max_episodes + 1];
    for x in window.lo..=window.hi {
        for (c, o) in curve.iter_mut().zip(bisection_outcomes(window, x, max_episodes)) {
            *c += o / size;
        }
    }
    curve
}

/// What the Bayes-optimal policy achieves on one concrete problem: entry j is 1 when its
/// forced answer after j guesses is the hidden number (it found it, or the midpoint of the
/// remaining interval is it), else 0. Averaged over x uniform on the window this is
/// [`bayes_optimal_curve`]; on a fixed evaluation set it is the like-for-like comparator.
pub fn bisection_outcomes(window: Interval, hidden: u32, max_episodes: usize) -> Vec<f64> {
    let mut interval = window;
    let mut found = false;
    (0..=max_episodes)
        .map(|j| {
            let right = found || interval.midpoint() == hidden;
            if j < max_episodes && !found {
                let g = interval.midpoint();
                let fb = Feedback::of(g, hidden);
                found = fb == Feedback::Correct;
                interval.update(g, fb);
            }
            right as u8 as f64
        })
        .collect()
}

/// The task.
pub struct Search {
    config: SearchConfig,
}

impl Search {
    pub fn new(config: SearchConfig) -> Result<Self> {
        if !(2..=MAX_NUMBER_TOKENS).contains(&config.n) {
            return Err(Error::config(
                "task.n",
                config.n,
                format!("must be in 2..={MAX_NUMBER_TOKENS}: every number in [0, n) is a token of the vocabulary"),
            ));
        }
        if config.n < 2 * config.hint_noise + 1 {
            return Err(Error::config(
                "task.hint_noise",
                config.hint_noise,
                format!("window 2·w + 1 must not exceed n = {}", config.n),
            ));
        }
        if config.max_episodes == 0 {
            return Err(Error::config("task.max_episodes", 0, "must be positive"));
        }
        validate_split_fractions(config.held_out_fraction, config.validation_fraction)?;
        let task = Self { config };
        task.config.warm_start.validate(&task)?;
        Ok(task)
    }

    pub fn config(&self) -> &SearchConfig {
        &self.config
    }

    fn problem<'a>(&self, p: &'a Problem) -> &'a SearchProblem {
        match p {
            Problem::Search(s) => s,
            other => panic!("search task given a foreign problem: {other:?}"),
        }
    }

    /// The problem with hidden number `hidden` and hint centre `h` (which may lie outside [0, n)).
    pub fn make(&self, hidden: u32, h: i64) -> SearchProblem {
        let (w, n) = (self.config.hint_noise as i64, self.config.n as i64);
        SearchProblem {
            hidden,
            lo: (h - w).max(0) as u32,
            hi: (h + w).min(n - 1) as u32,
        }
    }

    /// Parses a number word inside [0, n).
    fn number(&self, word: &str) -> Option<u32> {
        let v: u32 = word.parse().ok()?;
        (v < self.config.n as u32 && v.to_string() == word).then_some(v)
    }

    fn guess(&self, strategy: &str, window: Interval, interval: Interval, rng: &mut StdRng) -> u32 {
        match strategy {
            "bisect" => interval.midpoint(),
            "random" => rng.random_range(interval.lo..=interval.hi),
            "scan" => interval.lo,
            "blind" => rng.random_range(window.lo..=window.hi),
            other => panic!("unknown search strategy {other}"),
        }
    }
}

impl Task for Search {
    fn name(&self) -> &'static str {
        "search"
    }

    fn words(&self) -> Vec<String> {
        let mut w: Vec<String> = ["search", "higher", "lower", "correct", "invalid"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        w.extend((0..self.config.n).map(|i| i.to_string()));
        w
    }

    fn max_episodes(&self) -> usize {
        self.config.max_episodes
    }

    fn held_out_fraction(&self) -> f64 {
        self.config.held_out_fraction
    }

    fn validation_fraction(&self) -> f64 {
        self.config.validation_fraction
    }

    fn key(&self, p: &Problem) -> String {
        let p = self.problem(p);
        format!("search:{}:{}:{}", p.hidden, p.lo, p.hi)
    }

    /// The prompt is the hint window only: problems that share a window share a split.
    fn split_key(&self, p: &Problem) -> String {
        let p = self.problem(p);
        format!("search:{}:{}", p.lo, p.hi)
    }

    fn generate(&self, rng: &mut StdRng) -> Problem {
        let x = rng.random_range(0..self.config.n as u32);
        let w = self.config.hint_noise as i64;
        let h = x as i64 + rng.random_range(-w..=w);
        Problem::Search(self.make(x, h))
    }

    fn prompt(&self, p: &Problem) -> Vec<String> {
        let p = self.problem(p);
        [
            "<bos>".to_string(),
            "search".into(),
            p.lo.to_string(),
            p.hi.to_string(),
            "<think>".into(),
        ]
        .to_vec()
    }

    fn verify(&self, p: &Problem, answer: &[String]) -> bool {
        let p = self.problem(p);
        matches!(answer, [a] if self.number(a) == Some(p.hidden))
    }

    fn well_formed(&self, answer: &[String]) -> bool {
        matches!(answer, [a] if self.number(a).is_some())
    }

    fn reply(&self, p: &Problem, episode: &[String]) -> Option<Vec<String>> {
        let p = self.problem(p);
        let word = match episode {
            [g] => self
                .number(g)
                .map(|g| Feedback::of(g, p.hidden).word())
                .unwrap_or("invalid"),
            _ => "invalid",
        };
        Some(vec![word.to_string()])
    }

    fn confirms_solution(&self, p: &Problem, episode: &[String]) -> bool {
        let p = self.problem(p);
        matches!(episode, [g] if self.number(g) == Some(p.hidden))
    }

    fn correct_answers(&self, p: &Problem) -> Option<Vec<Vec<String>>> {
        Some(vec![vec![self.problem(p).hidden.to_string()]])
    }

    fn starts_answer(&self, word: &str) -> bool {
        self.number(word).is_some()
    }

    fn optimal_curve(&self, p: &Problem, max_episodes: usize) -> Option<Vec<f64>> {
        let p = self.problem(p);
        Some(bisection_outcomes(
            Interval { lo: p.lo, hi: p.hi },
            p.hidden,
            max_episodes,
        ))
    }

    fn enumerable_answers(&self) -> bool {
        true
    }

    fn strategies(&self) -> &'static [&'static str] {
        &["bisect", "random", "scan", "blind"]
    }

    fn scripted_trace(&self, p: &Problem, strategy: &str, cut_after: Option<usize>, rng: &mut StdRng) -> Trace {
        let sp = self.problem(p);
        let window = Interval { lo: sp.lo, hi: sp.hi };
        let mut interval = window;
        let mut trace = Trace::default();
        trace.push(Role::Prompt, self.prompt(p));
        let budget = cut_after
            .unwrap_or(self.config.max_episodes)
            .min(self.config.max_episodes);
        for done in 1..=budget {
            let g = self.guess(strategy, window, interval, rng);
            let fb = Feedback::of(g, sp.hidden);
            trace.push(Role::Policy, [g.to_string(), "<ep>".into()]);
            trace.push(Role::Env, [fb.word()]);
            interval.update(g, fb);
            if cut_after == Some(done) {
                break;
            }
            if fb == Feedback::Correct {
                trace.push(
                    Role::Policy,
                    [
                        "</think>".to_string(),
                        "<answer>".into(),
                        g.to_string(),
                        "</answer>".into(),
                    ],
                );
                return trace;
            }
        }
        // Out of episodes (or cut): time is up, answer the Bayes-optimal best guess.
        push_forced_suffix(&mut trace);
        trace.push(Role::Policy, [interval.midpoint().to_string(), "</answer>".into()]);
        trace
    }
}
