//! The measures of one evaluation broken down by held-out problem, so that an interval can
//! resample the problems as well as the seeds (`stats::bootstrap2`).
//!
//! Every measure the comparison reports is a mean over problems of a per-problem quantity
//! (pass@1, anytime accuracy, token regret, maj@k accuracy and tokens) or a ratio of two such
//! sums (tokens to solve), or a fixed function of such means (regret curves, best maj@k). So
//! a resample of problems, given as a list of indices with repeats, gives each measure by the
//! same arithmetic, and the full list `0..n` gives exactly the aggregate of the evaluation.

use serde::{Deserialize, Serialize};

use super::analysis::{maj_at_k, regret_curve, token_anytime, CostPoint, Vote};
use super::stats::mean_of;
use crate::rl::rollout::Rollout;

/// Per-problem values of one checkpoint's evaluation, in the held-out problems' order (pass@1
/// per problem is the natural summary's `pass1_by_problem`). Curves are stored
/// `[point][problem]`, so a point's resampled mean reads one row.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ByProblem {
    /// Anytime accuracy after b = 0 … B episodes (the natural evaluation).
    #[serde(deserialize_with = "crate::fsutil::nan")]
    pub anytime: Vec<Vec<f64>>,
    /// The same after b = 0 … 2B, free to stop and under budget forcing (empty when the
    /// evaluation stopped at the budget).
    #[serde(deserialize_with = "crate::fsutil::nan")]
    pub extended_anytime: Vec<Vec<f64>>,
    #[serde(deserialize_with = "crate::fsutil::nan")]
    pub forced_anytime: Vec<Vec<f64>>,
    /// Normalised token regret of each problem's samples.
    #[serde(deserialize_with = "crate::fsutil::nan")]
    pub token_regret: Vec<f64>,
    /// Policy tokens summed over each problem's solved samples, and how many were solved.
    #[serde(deserialize_with = "crate::fsutil::nan")]
    pub solved_tokens: Vec<f64>,
    #[serde(deserialize_with = "crate::fsutil::nan")]
    pub solved: Vec<f64>,
    /// maj@k accuracy and mean total tokens for k = 1 … samples.
    #[serde(deserialize_with = "crate::fsutil::nan")]
    pub maj_accuracy: Vec<Vec<f64>>,
    #[serde(deserialize_with = "crate::fsutil::nan")]
    pub maj_tokens: Vec<Vec<f64>>,
}

/// Mean of `f` over each problem's rollouts (NaN for a problem without any), in one pass.
pub fn mean_by_problem(problems: usize, rollouts: &[Rollout], f: impl Fn(&Rollout) -> f64) -> Vec<f64> {
    let mut sum = vec![(0.0f64, 0usize); problems];
    for r in rollouts {
        let s = &mut sum[r.problem];
        *s = (s.0 + f(r), s.1 + 1);
    }
    sum.into_iter()
        .map(|(s, n)| if n == 0 { f64::NAN } else { s / n as f64 })
        .collect()
}

/// Anytime accuracy of each problem after b = 0 … `budget` episodes, `[b][problem]`.
fn anytime_rows(problems: usize, rollouts: &[Rollout], budget: usize) -> Vec<Vec<f64>> {
    (0..=budget)
        .map(|b| mean_by_problem(problems, rollouts, |r| super::anytime(r, b) as f64))
        .collect()
}

/// Rollouts of each problem, in order.
fn grouped(problems: usize, rollouts: &[Rollout]) -> Vec<Vec<&Rollout>> {
    let mut g = vec![Vec::new(); problems];
    for r in rollouts {
        g[r.problem].push(r);
    }
    g
}

impl ByProblem {
    /// From the natural evaluation's rollouts (`votes[p]`: problem p's samples for maj@k) and,
    /// when run, the two evaluations past the budget.
    pub fn new(
        problems: usize,
        natural: &[Rollout],
        votes: &[Vec<Vote>],
        budget: usize,
        token_budget: usize,
        past: Option<(&[Rollout], &[Rollout])>,
    ) -> ByProblem {
        let groups = grouped(problems, natural);
        let token_regret = groups
            .iter()
            .map(|g| {
                regret_curve(&token_anytime(g.iter().copied(), token_budget), None)
                    .last()
                    .copied()
                    .unwrap_or(f64::NAN)
            })
            .collect();
        let (solved_tokens, solved) = groups
            .iter()
            .map(|g| {
                let solved = g.iter().filter(|r| r.reward > 0.0);
                solved.fold((0.0, 0.0), |(t, n), r| (t + r.policy_tokens() as f64, n + 1.0))
            })
            .unzip();
        let samples = votes.iter().map(Vec::len).min().unwrap_or(0).min(16);
        let (mut maj_accuracy, mut maj_tokens) = (Vec::new(), Vec::new());
        for k in 1..=samples {
            let (acc, tok): (Vec<f64>, Vec<f64>) = votes.iter().map(|v| maj_at_k(std::slice::from_ref(v), k)).unzip();
            maj_accuracy.push(acc);
            maj_tokens.push(tok);
        }
        let (extended_anytime, forced_anytime) = match past {
            Some((free, forced)) => (
                anytime_rows(problems, free, 2 * budget),
                anytime_rows(problems, forced, 2 * budget),
            ),
            None => (Vec::new(), Vec::new()),
        };
        ByProblem {
            anytime: anytime_rows(problems, natural, budget),
            extended_anytime,
            forced_anytime,
            token_regret,
            solved_tokens,
            solved,
            maj_accuracy,
            maj_tokens,
        }
    }

    /// Number of problems (the anytime curve's row before any episode has one per problem).
    pub fn problems(&self) -> usize {
        self.anytime.first().map_or(0, Vec::len)
    }

    /// Regret R(b) for b = 1 … of a stored anytime curve, on the problems `p`.
    pub fn regret(curve: &[Vec<f64>], p: &[usize]) -> Vec<f64> {
        let acc: Vec<f64> = curve.iter().map(|row| mean_of(row, p)).collect();
        regret_curve(&acc, None)
    }

    pub fn token_regret(&self, p: &[usize]) -> f64 {
        mean_of(&self.token_regret, p)
    }

    /// Mean policy tokens of the solved samples of the problems `p` (NaN when none is solved).
    pub fn tokens_to_solve(&self, p: &[usize]) -> f64 {
        let n: f64 = p.iter().map(|&i| self.solved[i]).sum();
        if n == 0.0 {
            return f64::NAN;
        }
        p.iter().map(|&i| self.solved_tokens[i]).sum::<f64>() / n
    }

    /// The maj@k curve (accuracy against mean total tokens) on the problems `p`.
    pub fn maj(&self, p: &[usize]) -> Vec<CostPoint> {
        self.maj_accuracy
            .iter()
            .zip(&self.maj_tokens)
            .map(|(acc, tok)| CostPoint {
                tokens: mean_of(tok, p),
                accuracy: mean_of(acc, p),
            })
            .collect()
    }
}
