//! `countdown`: reach a target from a few numbers with + − × ÷, each number used exactly once,
//! every intermediate a natural number no larger than `max_value`, division exact. Not
//! interactive: each episode is one attempted *line* that the model writes itself, e.g.
//! `3 + 5 = 8 , 8 * 4 = 32 <ep>`. The answer is a line; the verifier replays it.
//!
//! Prompt: `<bos> countdown a b c target t <think>`; end: `</think> <answer> line </answer>`.

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::task::{push_forced_suffix, validate_split_fractions, Problem, Task, WarmStartMix, MAX_NUMBER_TOKENS};
use super::trace::{Role, Trace};
use crate::error::{Error, Result};

/// Configuration (difficulty) of the `countdown` task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CountdownConfig {
    /// How many numbers a problem gives (3 or 4).
    pub count: usize,
    /// Numbers are drawn from 1..=max_number.
    pub max_number: u32,
    /// Largest allowed intermediate value and target (also the largest number token).
    pub max_value: u32,
    /// Smallest target.
    pub min_target: u32,
    /// Episode (attempt) budget of a training rollout.
    pub max_episodes: usize,
    /// Fraction of problems (number sets and targets) held out from training.
    pub held_out_fraction: f64,
    /// Fraction of problems kept apart for choosing hyper-parameters.
    pub validation_fraction: f64,
    pub warm_start: WarmStartMix,
}

impl Default for CountdownConfig {
    fn default() -> Self {
        Self {
            count: 3,
            max_number: 9,
            max_value: 60,
            min_target: 5,
            max_episodes: 6,
            held_out_fraction: 0.2,
            validation_fraction: 0.1,
            warm_start: WarmStartMix {
                weights: [("pruned", 0.4), ("random", 0.6)]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
                cut_fraction: 0.3,
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountdownProblem {
    pub numbers: Vec<u32>,
    pub target: u32,
}

/// One arithmetic step `a op b = c`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub a: u32,
    pub op: char,
    pub b: u32,
    pub c: u32,
}

/// The result of `a op b` if it is a natural number within `max`.
pub fn apply(a: u32, op: char, b: u32, max: u32) -> Option<u32> {
    let c = match op {
        '+' => a.checked_add(b)?,
        '-' => a.checked_sub(b)?,
        '*' => a.checked_mul(b)?,
        '/' => (b != 0 && a.is_multiple_of(b)).then(|| a / b)?,
        _ => return None,
    };
    (c <= max).then_some(c)
}

const OPS: [char; 4] = ['+', '-', '*', '/'];

/// Every complete line (combining all numbers into one) reachable from `numbers`.
pub fn all_lines(numbers: &[u32], max: u32) -> Vec<Vec<Step>> {
    let mut out = Vec::new();
    let mut path = Vec::new();
    extend_lines(numbers.to_vec(), max, &mut path, &mut out);
    out
}

fn extend_lines(pool: Vec<u32>, max: u32, path: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    if pool.len() == 1 {
        out.push(path.clone());
        return;
    }
    for i in 0..pool.len() {
        for j in 0..pool.len() {
            if i == j {
                continue;
            }
            for op in OPS {
                if let Some(c) = apply(pool[i], op, pool[j], max) {
                    let mut next: Vec<u32> = pool
                        .iter()
                        .enumerate()
                        .filter(|&(k, _)| k != i && k != j)
                        .map(|(_, &v)| v)
                        .collect();
                    next.push(c);
                    path.push(Step {
                        a: pool[i],
                        op,
                        b: pool[j],
                        c,
                    });
                    extend_lines(next, max, path, out);
                    path.pop();
                }
            }
        }
    }
}

/// A line as words: `a op b = c , …`.
pub fn line_words(line: &[Step]) -> Vec<String> {
    let mut w = Vec::new();
    for (k, s) in line.iter().enumerate() {
        if k > 0 {
            w.push(",".to_string());
        }
        w.extend([
            s.a.to_string(),
            s.op.to_string(),
            s.b.to_string(),
            "=".into(),
            s.c.to_string(),
        ]);
    }
    w
}

/// Replays a line of words over `numbers`: every operand must be available (each given number
/// used once, each result once), every result correct. Returns the final value when the line
/// consumes all numbers, `None` for anything malformed.
pub fn replay(numbers: &[u32], words: &[String], max: u32) -> Option<u32> {
    let mut pool = numbers.to_vec();
    let mut last = None;
    for step in words.split(|w| w == ",") {
        let [a, op, b, eq, c] = step else { return None };
        let num = |s: &String| s.parse::<u32>().ok().filter(|v| v.to_string() == *s);
        let (a, b, c) = (num(a)?, num(b)?, num(c)?);
        let mut ops = op.chars();
        let (Some(op), None) = (ops.next(), ops.next()) else {
            return None;
        };
        if eq != "=" || apply(a, op, b, max) != Some(c) {
            return None;
        }
        let take = |pool: &mut Vec<u32>, v: u32| pool.iter().position(|&x| x == v).map(|i| pool.swap_remove(i));
        take(&mut pool, a)?;
        take(&mut pool, b)?;
        pool.push(c);
        last = Some(c);
    }
    (pool.len() == 1).then_some(last?)
}

pub struct Countdown {
    config: CountdownConfig,
}

impl Countdown {
    pub fn new(config: CountdownConfig) -> Result<Self> {
        if !(2..=4).contains(&config.count) {
            return Err(Error::config("task.count", config.count, "must be 2, 3 or 4"));
        }
        if config.max_value as usize >= MAX_NUMBER_TOKENS {
            return Err(Error::config(
                "task.max_value",
                config.max_value,
                format!(
                    "must be below {MAX_NUMBER_TOKENS}: every number in 0..=max_value is a token of the vocabulary"
                ),
            ));
        }
        if config.max_number < 1 || config.max_number > config.max_value {
            return Err(Error::config(
                "task.max_number",
                config.max_number,
                "must be in 1..=max_value",
            ));
        }
        if config.min_target > config.max_value {
            return Err(Error::config(
                "task.min_target",
                config.min_target,
                "must not exceed max_value",
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

    fn problem<'a>(&self, p: &'a Problem) -> &'a CountdownProblem {
        match p {
            Problem::Countdown(c) => c,
            other => panic!("countdown task given a foreign problem: {other:?}"),
        }
    }

    /// The lines a strategy attempts, in order (at most the budget).
    fn attempts(&self, p: &CountdownProblem, strategy: &str, rng: &mut StdRng) -> Vec<Vec<Step>> {
        let max = self.config.max_value;
        let lines = all_lines(&p.numbers, max);
        let budget = self.config.max_episodes;
        match strategy {
            // Pruned depth-first search: skip lines with a no-op step (x·1, x/1, x+0, x−0) or
            // a commuted duplicate (a+b, a·b with a < b); order the rest greedily, step by step,
            // by how close each intermediate lands to the target (random tie-breaking). The
            // order never looks at a line's final value, so this is a search, not an oracle.
            "pruned" => {
                let mut keep: Vec<(Vec<u32>, u64, Vec<Step>)> = lines
                    .into_iter()
                    .filter(|l| {
                        l.iter()
                            .all(|s| !matches!((s.op, s.b), ('*', 1) | ('/', 1) | ('+', 0) | ('-', 0)))
                    })
                    .filter(|l| l.iter().all(|s| !(matches!(s.op, '+' | '*') && s.a < s.b)))
                    .map(|l| {
                        let key = l[..l.len() - 1].iter().map(|s| s.c.abs_diff(p.target)).collect();
                        (key, rng.random(), l)
                    })
                    .collect();
                keep.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
                keep.into_iter().take(budget).map(|(_, _, l)| l).collect()
            }
            // Random attempts, repeats allowed.
            "random" => (0..budget)
                .map(|_| lines[rng.random_range(0..lines.len())].clone())
                .collect(),
            other => panic!("unknown countdown strategy {other}"),
        }
    }
}

impl Task for Countdown {
    fn name(&self) -> &'static str {
        "countdown"
    }

    fn words(&self) -> Vec<String> {
        let mut w: Vec<String> = ["countdown", "target", "+", "-", "*", "/", "=", ","]
            .iter()
            .map(|s| s.to_string())
            .collect();
        w.extend((0..=self.config.max_value).map(|i| i.to_string()));
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
        let mut n = p.numbers.clone();
        n.sort_unstable();
        format!("countdown:{n:?}:{}", p.target)
    }

    fn generate(&self, rng: &mut StdRng) -> Problem {
        let c = &self.config;
        loop {
            let numbers: Vec<u32> = (0..c.count).map(|_| rng.random_range(1..=c.max_number)).collect();
            let mut targets: Vec<u32> = all_lines(&numbers, c.max_value)
                .iter()
                .filter_map(|l| l.last().map(|s| s.c))
                .filter(|&t| t >= c.min_target && !numbers.contains(&t))
                .collect();
            targets.sort_unstable();
            targets.dedup();
            if let Some(&target) = targets.choose(rng) {
                return Problem::Countdown(CountdownProblem { numbers, target });
            }
        }
    }

    fn prompt(&self, p: &Problem) -> Vec<String> {
        let p = self.problem(p);
        let mut w = vec!["<bos>".to_string(), "countdown".into()];
        w.extend(p.numbers.iter().map(|n| n.to_string()));
        w.extend(["target".to_string(), p.target.to_string(), "<think>".into()]);
        w
    }

    fn verify(&self, p: &Problem, answer: &[String]) -> bool {
        let p = self.problem(p);
        replay(&p.numbers, answer, self.config.max_value) == Some(p.target)
    }

    fn well_formed(&self, answer: &[String]) -> bool {
        // A well-formed answer is a sequence of `a op b = c` steps with known operators.
        !answer.is_empty()
            && answer.split(|w| w == ",").all(|s| {
                matches!(s, [a, op, b, eq, c] if [a, b, c].iter().all(|v| v.parse::<u32>().is_ok())
                    && ["+", "-", "*", "/"].contains(&op.as_str()) && eq == "=")
            })
    }

    fn reply(&self, _p: &Problem, _episode: &[String]) -> Option<Vec<String>> {
        None
    }

    /// An episode is a line, checkable like an answer: one that reaches the target has solved
    /// the problem, so budget forcing lets the row end (more attempts after a solution would
    /// only work against the policy that solved early).
    fn confirms_solution(&self, p: &Problem, episode: &[String]) -> bool {
        self.verify(p, episode)
    }

    /// Every line over the numbers that reaches the target (the verifier accepts exactly these),
    /// each once: with a repeated number, two orders of the pool write the same line, and
    /// listing it twice would count its probability twice in the exact meta-prover.
    fn correct_answers(&self, p: &Problem) -> Option<Vec<Vec<String>>> {
        let cp = self.problem(p);
        let mut lines: Vec<Vec<String>> = all_lines(&cp.numbers, self.config.max_value)
            .into_iter()
            .filter(|l| l.last().map(|s| s.c) == Some(cp.target))
            .map(|l| line_words(&l))
            .collect();
        lines.sort();
        lines.dedup();
        Some(lines)
    }

    fn enumerable_answers(&self) -> bool {
        true
    }

    fn starts_answer(&self, word: &str) -> bool {
        word.parse::<u32>()
            .is_ok_and(|v| v <= self.config.max_value && v.to_string() == word)
    }

    fn strategies(&self) -> &'static [&'static str] {
        &["pruned", "random"]
    }

    fn scripted_trace(&self, p: &Problem, strategy: &str, cut_after: Option<usize>, rng: &mut StdRng) -> Trace {
        let cp = self.problem(p);
        let mut trace = Trace::default();
        trace.push(Role::Prompt, self.prompt(p));
        let attempts = self.attempts(cp, strategy, rng);
        let budget = cut_after.unwrap_or(attempts.len()).min(attempts.len());
        let mut best: Option<&Vec<Step>> = None;
        for (done, line) in attempts[..budget].iter().enumerate() {
            trace.push(Role::Policy, line_words(line));
            trace.push(Role::Policy, ["<ep>"]);
            let value = line.last().map(|s| s.c).unwrap_or(0);
            let cut = cut_after == Some(done + 1);
            if value == cp.target && !cut {
                trace.push(Role::Policy, ["</think>", "<answer>"]);
                trace.push(Role::Policy, line_words(line));
                trace.push(Role::Policy, ["</answer>"]);
                return trace;
            }
            let dist = |l: &Vec<Step>| l.last().map(|s| s.c.abs_diff(cp.target)).unwrap_or(u32::MAX);
            if best.is_none_or(|b| dist(line) < dist(b)) {
                best = Some(line);
            }
        }
        // Out of attempts (or cut): time is up, answer the closest line so far (or the first
        // line there is, when cut before any attempt).
        push_forced_suffix(&mut trace);
        let fallback = all_lines(&cp.numbers, self.config.max_value);
        let line = best.or_else(|| fallback.first()).cloned().unwrap_or_default();
        trace.push(Role::Policy, line_words(&line));
        trace.push(Role::Policy, ["</answer>"]);
        trace
    }
}
