//! Comparing runs: a table of the paper's measures per algorithm with 95 % intervals over seeds,
//! and the measures, pairing and intervals the MRT-against-GRPO verdicts (`verdicts.rs`,
//! re-exported here) are computed from. Plots are in `figures.rs`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::analysis::CostPoint;
use super::by_problem::ByProblem;
use super::report::EvalReport;
use super::stats::{bootstrap2, mean_of, Interval};
pub use super::verdicts::{learns, render_versus, verdicts, versus, Versus};

/// Seed of every bootstrap in a comparison (fixed, so a report is reproducible).
pub(super) const BOOTSTRAP_SEED: u64 = 0x5eed;

/// A point of a run's held-out pass@1 curve during RL, with the cost spent so far.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrainPoint {
    #[serde(deserialize_with = "crate::fsutil::nan")]
    pub step: f64,
    #[serde(deserialize_with = "crate::fsutil::nan")]
    pub pass1: f64,
    /// Tokens the policy sampled in RL steps up to here.
    #[serde(deserialize_with = "crate::fsutil::nan")]
    pub sampled_tokens: f64,
    /// Seconds of RL steps up to here (evaluations excluded).
    #[serde(deserialize_with = "crate::fsutil::nan")]
    pub seconds: f64,
}

/// The evaluation of one run: its warm start (base) and its fine-tuned checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunEval {
    pub run: String,
    pub algo: String,
    pub seed: u64,
    /// Which warm start the run started from (its seed): the bootstrap's stratum.
    pub warm_start: u64,
    pub base: EvalReport,
    pub fine_tuned: EvalReport,
    /// Held-out pass@1 during RL, from the run's periodic evaluations.
    pub training: Vec<TrainPoint>,
}

/// Runs grouped by algorithm (in a stable order).
pub fn by_algo(runs: &[RunEval]) -> BTreeMap<String, Vec<&RunEval>> {
    let mut m: BTreeMap<String, Vec<&RunEval>> = BTreeMap::new();
    for r in runs {
        m.entry(r.algo.clone()).or_default().push(r);
    }
    m
}

/// Stratum index of each run (its warm start, numbered in order of appearance).
fn strata(runs: &[&RunEval]) -> Vec<usize> {
    let mut seen: Vec<u64> = Vec::new();
    runs.iter()
        .map(|r| match seen.iter().position(|&w| w == r.warm_start) {
            Some(i) => i,
            None => {
                seen.push(r.warm_start);
                seen.len() - 1
            }
        })
        .collect()
}

/// A measure of a run on a (re)sample of its held-out problems (indices, with repeats):
/// on `0..n` it is the evaluation's aggregate.
pub type Measure = fn(&RunEval, &[usize]) -> f64;

fn last(v: &[f64]) -> f64 {
    v.last().copied().unwrap_or(f64::NAN)
}

pub fn pass1(r: &RunEval, p: &[usize]) -> f64 {
    mean_of(&r.fine_tuned.natural.pass1_by_problem, p)
}
pub fn gain(r: &RunEval, p: &[usize]) -> f64 {
    pass1(r, p) - mean_of(&r.base.natural.pass1_by_problem, p)
}
pub fn regret_at_budget(r: &RunEval, p: &[usize]) -> f64 {
    last(&ByProblem::regret(&r.fine_tuned.by_problem.anytime, p))
}
pub fn regret_extended(r: &RunEval, p: &[usize]) -> f64 {
    last(&ByProblem::regret(&r.fine_tuned.by_problem.extended_anytime, p))
}
pub fn regret_forced(r: &RunEval, p: &[usize]) -> f64 {
    last(&ByProblem::regret(&r.fine_tuned.by_problem.forced_anytime, p))
}
pub fn tokens_to_solve(r: &RunEval, p: &[usize]) -> f64 {
    r.fine_tuned.by_problem.tokens_to_solve(p)
}
pub fn token_regret(r: &RunEval, p: &[usize]) -> f64 {
    r.fine_tuned.by_problem.token_regret(p)
}
pub fn best_maj(r: &RunEval, p: &[usize]) -> f64 {
    r.fine_tuned
        .by_problem
        .maj(p)
        .iter()
        .map(|q| q.accuracy)
        .fold(f64::NAN, f64::max)
}

/// The measures of the tables: name, higher is better, the measure.
pub const MEASURES: [(&str, bool, Measure); 8] = [
    ("pass@1", true, pass1),
    ("gain over warm start", true, gain),
    ("regret at B", false, regret_at_budget),
    ("regret at 2B", false, regret_extended),
    ("regret at 2B, budget forcing", false, regret_forced),
    ("tokens to solve", false, tokens_to_solve),
    ("token regret", false, token_regret),
    ("best maj@k", true, best_maj),
];

/// The held-out problems every run (warm start and fine-tuned) was evaluated on. Runs of one
/// comparison share one held-out set; a mismatch is a bug in whoever put them together.
pub fn problem_count(runs: &[&RunEval]) -> usize {
    let n = runs.first().map_or(0, |r| r.fine_tuned.by_problem.problems());
    for r in runs {
        let sizes = [
            r.base.by_problem.problems(),
            r.base.natural.pass1_by_problem.len(),
            r.fine_tuned.natural.pass1_by_problem.len(),
        ];
        assert!(
            r.fine_tuned.by_problem.problems() == n && sizes.iter().all(|&s| s == n),
            "run {} was evaluated on another held-out set ({} / {} problems, not {n})",
            r.run,
            r.base.by_problem.problems(),
            r.fine_tuned.by_problem.problems()
        );
    }
    n
}

/// Mean over the runs `u` of `f` on the problems `p`.
pub(super) fn mean_over(runs: &[&RunEval], f: &dyn Fn(&RunEval, &[usize]) -> f64, u: &[usize], p: &[usize]) -> f64 {
    u.iter().map(|&i| f(runs[i], p)).sum::<f64>() / u.len().max(1) as f64
}

/// Mean of `f` over runs and problems with its two-level interval (seeds stratified by warm
/// start, and held-out problems).
pub fn interval(runs: &[&RunEval], f: &dyn Fn(&RunEval, &[usize]) -> f64) -> Option<Interval> {
    bootstrap2(
        &strata(runs),
        problem_count(runs),
        &|u, p| Some(mean_over(runs, f, u, p)),
        BOOTSTRAP_SEED,
    )
}

fn cell(runs: &[&RunEval], f: Measure, digits: usize) -> String {
    let all: Vec<usize> = (0..problem_count(runs)).collect();
    let values: Vec<f64> = runs.iter().map(|r| f(r, &all)).collect();
    if values.is_empty() || values.iter().any(|v| !v.is_finite()) {
        return "n/a".into();
    }
    match interval(runs, &f) {
        Some(i) => i.show(digits),
        None => format!("{:.d$} (n = 1, no interval)", values[0], d = digits),
    }
}

/// Per algorithm: every measure's mean over seeds with its 95 % interval.
pub fn table(runs: &[RunEval]) -> String {
    let mut s = String::new();
    let header: Vec<&str> = MEASURES.iter().map(|m| m.0).collect();
    let _ = writeln!(s, "| algorithm | seeds | warm-start pass@1 | {} |", header.join(" | "));
    let _ = writeln!(s, "|---|---|---|{}", "---|".repeat(MEASURES.len()));
    for (algo, rs) in by_algo(runs) {
        let base: Vec<f64> = rs.iter().map(|r| r.base.natural.pass1).collect();
        let cells: Vec<String> = MEASURES.iter().map(|(_, _, f)| cell(&rs, *f, 3)).collect();
        let _ = writeln!(
            s,
            "| {algo} | {} | {:.3} | {} |",
            rs.len(),
            mean_of(&base, &(0..base.len()).collect::<Vec<_>>()),
            cells.join(" | ")
        );
    }
    s
}

/// Runs of two algorithms paired by (warm start, seed), with their strata.
pub fn pairs<'a>(a: &[&'a RunEval], b: &[&'a RunEval]) -> (Vec<&'a RunEval>, Vec<&'a RunEval>, Vec<usize>) {
    let (mut pa, mut pb) = (Vec::new(), Vec::new());
    for x in a {
        if let Some(y) = b.iter().find(|y| y.seed == x.seed && y.warm_start == x.warm_start) {
            pa.push(*x);
            pb.push(*y);
        }
    }
    let st = strata(&pa);
    (pa, pb, st)
}

/// The mean maj@k curve (accuracy against total tokens) of the runs `u` on the problems `p`.
pub(super) fn mean_maj(runs: &[&RunEval], u: &[usize], p: &[usize]) -> Vec<CostPoint> {
    let curves: Vec<Vec<CostPoint>> = u.iter().map(|&i| runs[i].fine_tuned.by_problem.maj(p)).collect();
    let k = curves.iter().map(Vec::len).min().unwrap_or(0);
    let n = curves.len().max(1) as f64;
    (0..k)
        .map(|j| CostPoint {
            tokens: curves.iter().map(|c| c[j].tokens).sum::<f64>() / n,
            accuracy: curves.iter().map(|c| c[j].accuracy).sum::<f64>() / n,
        })
        .collect()
}
