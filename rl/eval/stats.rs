//! Interval estimates over seeds, after rliable (Agarwal et al. 2021): with few runs, report a
//! statistic with a stratified bootstrap confidence interval, and compare algorithms through
//! *paired* differences (same warm start, same RL seed, so the same problems at every step).
//!
//! A unit is one RL seed; its stratum is its warm start. A resample draws, within each stratum,
//! as many units as the stratum has, with replacement; the interval is the 2.5 % and 97.5 %
//! percentiles of the statistic over the resamples (strata are pooled when one holds a single
//! unit). Everything is seeded: the same numbers give the same interval. With fewer than two
//! units there is no interval and no verdict.
//!
//! Runs are evaluated on one fixed held-out set, so an interval over seeds alone says how
//! another seed would do on *these* problems. [`bootstrap2`] also resamples the problems (the
//! same draw for every run of a resample, so differences stay paired by problem): its
//! intervals cover another seed on another draw of problems from the task.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Bootstrap resamples per interval.
pub const RESAMPLES: usize = 4000;

/// A point estimate with its 95 % interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub point: f64,
    pub lo: f64,
    pub hi: f64,
    /// Units (seeds) behind it.
    pub n: usize,
    /// Fraction of resamples where the statistic was undefined (dropped).
    pub undefined: f64,
}

impl Interval {
    /// The interval lies strictly above (`> 0`) or below (`< 0`) zero.
    pub fn excludes_zero(&self) -> bool {
        self.lo > 0.0 || self.hi < 0.0
    }

    /// `0.123 [0.100, 0.150]`.
    pub fn show(&self, digits: usize) -> String {
        format!("{:.d$} [{:.d$}, {:.d$}]", self.point, self.lo, self.hi, d = digits)
    }
}

/// Stratified percentile bootstrap of `stat`, a function of the indices of the units in a
/// (re)sample that returns `None` (or a non-finite value) where it is undefined. `strata[i]` is
/// unit i's stratum. `None` with fewer than two units or when the statistic is undefined on the
/// full sample.
pub fn bootstrap(strata: &[usize], stat: &dyn Fn(&[usize]) -> Option<f64>, seed: u64) -> Option<Interval> {
    bootstrap2(strata, 0, &|units, _| stat(units), seed)
}

/// Two-level bootstrap: each resample draws the units (RL seeds, stratified as in
/// [`bootstrap`]) and, independently, `problems` held-out problems with replacement; `stat`
/// gets both index lists. The problems drawn are the same for every unit of a resample, so a
/// difference between runs evaluated on the same problems stays paired by problem. With
/// `problems` ≤ 1 only the units are resampled (the second list is then `0..problems`).
pub fn bootstrap2(
    strata: &[usize],
    problems: usize,
    stat: &dyn Fn(&[usize], &[usize]) -> Option<f64>,
    seed: u64,
) -> Option<Interval> {
    bootstrap_curve(strata, problems, 1, &|units, probs| vec![stat(units, probs)], seed)
        .pop()
        .flatten()
}

/// [`bootstrap2`] of a statistic with `len` components (a curve, e.g. regret at every budget)
/// from one set of resamples: component j's interval is over the resamples where it is
/// defined.
pub fn bootstrap_curve(
    strata: &[usize],
    problems: usize,
    len: usize,
    stat: &dyn Fn(&[usize], &[usize]) -> Vec<Option<f64>>,
    seed: u64,
) -> Vec<Option<Interval>> {
    let n = strata.len();
    if n < 2 {
        return vec![None; len];
    }
    let all: Vec<usize> = (0..n).collect();
    let all_problems: Vec<usize> = (0..problems).collect();
    let point = stat(&all, &all_problems);
    assert_eq!(point.len(), len, "the statistic has {len} components");
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, &s) in strata.iter().enumerate() {
        if groups.len() <= s {
            groups.resize(s + 1, Vec::new());
        }
        groups[s].push(i);
    }
    groups.retain(|g| !g.is_empty());
    // A stratum of one unit would resample to itself and hide its variance: then the
    // strata are pooled.
    if groups.iter().any(|g| g.len() < 2) {
        groups = vec![all.clone()];
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut values = vec![Vec::with_capacity(RESAMPLES); len];
    let mut sample = Vec::with_capacity(n);
    let mut drawn = all_problems.clone();
    for _ in 0..RESAMPLES {
        sample.clear();
        for g in &groups {
            sample.extend((0..g.len()).map(|_| g[rng.random_range(0..g.len())]));
        }
        if problems > 1 {
            for p in drawn.iter_mut() {
                *p = rng.random_range(0..problems);
            }
        }
        for (j, v) in stat(&sample, &drawn).into_iter().enumerate() {
            if let Some(v) = v.filter(|v| v.is_finite()) {
                values[j].push(v);
            }
        }
    }
    point
        .into_iter()
        .zip(values)
        .map(|(point, mut values)| {
            let point = point.filter(|p| p.is_finite())?;
            if values.is_empty() {
                return None;
            }
            values.sort_by(f64::total_cmp);
            let q = |p: f64| values[((p * (values.len() - 1) as f64).round() as usize).min(values.len() - 1)];
            Some(Interval {
                point,
                lo: q(0.025),
                hi: q(0.975),
                n,
                undefined: 1.0 - values.len() as f64 / RESAMPLES as f64,
            })
        })
        .collect()
}

/// Mean of `x` over the units `idx`.
pub fn mean_of(x: &[f64], idx: &[usize]) -> f64 {
    idx.iter().map(|&i| x[i]).sum::<f64>() / idx.len().max(1) as f64
}

/// Mean with its stratified bootstrap interval.
pub fn mean_interval(x: &[f64], strata: &[usize], seed: u64) -> Option<Interval> {
    bootstrap(strata, &|idx| Some(mean_of(x, idx)), seed)
}

/// Mean of the paired differences `b − a` with its interval.
pub fn paired_difference(a: &[f64], b: &[f64], strata: &[usize], seed: u64) -> Option<Interval> {
    assert_eq!(a.len(), b.len(), "paired samples");
    let d: Vec<f64> = a.iter().zip(b).map(|(a, b)| b - a).collect();
    mean_interval(&d, strata, seed)
}

/// Fraction of paired units where `b` beats `a` (ties count half): rliable's probability of
/// improvement, for `higher_better` measures; flipped otherwise. Values within [`TIE`] of
/// each other (relative) are ties: measures summed in another order (regret over a curve, say)
/// differ in their last bits when the outcomes are the same, and that must not decide which
/// algorithm is better.
pub fn probability_of_improvement(a: &[f64], b: &[f64], higher_better: bool) -> f64 {
    let score: f64 = a
        .iter()
        .zip(b)
        .map(|(a, b)| {
            let (a, b) = if higher_better { (*a, *b) } else { (-*a, -*b) };
            if (b - a).abs() <= TIE * a.abs().max(b.abs()).max(1.0) {
                0.5
            } else if b > a {
                1.0
            } else {
                0.0
            }
        })
        .sum();
    score / a.len().max(1) as f64
}

/// Relative difference up to which two paired values are a tie.
pub const TIE: f64 = 1e-9;

/// Outcome of a verdict fixed before the experiment ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Verdict {
    Met,
    NotMet,
    /// Not decidable from the data (too few seeds, an undefined statistic); says why.
    NoVerdict(String),
}

impl Verdict {
    pub fn word(&self) -> String {
        match self {
            Verdict::Met => "**met**".into(),
            Verdict::NotMet => "not met".into(),
            Verdict::NoVerdict(why) => format!("no verdict ({why})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_cover_the_mean_and_shrink_with_agreement() {
        let strata = [0, 0, 0, 0, 1, 1, 1, 1];
        let noisy = [0.1, -0.2, 0.3, 0.0, 0.2, -0.1, 0.25, -0.05];
        let i = mean_interval(&noisy, &strata, 1).unwrap();
        assert!((i.point - 0.0625).abs() < 1e-12 && i.lo < i.point && i.point < i.hi);
        assert!(!i.excludes_zero(), "{i:?}");
        let clear = [0.30, 0.32, 0.28, 0.31, 0.29, 0.33, 0.30, 0.31];
        let j = mean_interval(&clear, &strata, 1).unwrap();
        assert!(j.excludes_zero() && j.lo > 0.27 && j.hi < 0.33, "{j:?}");
        // Resamples stay inside each stratum: a constant stratum shift does not widen it.
        let shifted: Vec<f64> = clear.iter().zip(strata).map(|(v, s)| v + s as f64).collect();
        let k = mean_interval(&shifted, &strata, 1).unwrap();
        assert!((k.hi - k.lo) - (j.hi - j.lo) < 0.02, "{k:?} vs {j:?}");
        // Same inputs, same interval.
        assert_eq!(mean_interval(&noisy, &strata, 1), Some(i));
    }

    #[test]
    fn two_level_intervals_cover_the_problems_and_stay_paired() {
        // 4 runs (2 warm starts) × 6 problems; every run has the same per-problem spread.
        let problem = [0.0, 1.0, 0.2, 0.9, 0.1, 0.8];
        let runs: Vec<Vec<f64>> = (0..4)
            .map(|r| problem.iter().map(|p| p + 0.01 * r as f64).collect())
            .collect();
        let strata = [0, 0, 1, 1];
        let mean = |units: &[usize], probs: &[usize]| {
            Some(units.iter().map(|&u| mean_of(&runs[u], probs)).sum::<f64>() / units.len() as f64)
        };
        let seeds_only = bootstrap2(&strata, 0, &|u, _| mean(u, &(0..6).collect::<Vec<_>>()), 9).unwrap();
        let both = bootstrap2(&strata, 6, &mean, 9).unwrap();
        assert!((both.point - seeds_only.point).abs() < 1e-12 && (both.point - 0.5150).abs() < 1e-12);
        // Seeds barely differ; problems do: only the two-level interval is wide.
        assert!(seeds_only.hi - seeds_only.lo < 0.03, "{seeds_only:?}");
        assert!(both.hi - both.lo > 0.3 && both.lo < 0.35 && both.hi > 0.65, "{both:?}");
        // A difference between two algorithms that is the same on every problem stays exact:
        // the problems are drawn once per resample for both, so the problem spread cancels.
        let shifted: Vec<Vec<f64>> = runs.iter().map(|r| r.iter().map(|v| v + 0.05).collect()).collect();
        let diff = bootstrap2(
            &strata,
            6,
            &|u, p| {
                let d = u.iter().map(|&i| mean_of(&shifted[i], p) - mean_of(&runs[i], p));
                Some(d.sum::<f64>() / u.len() as f64)
            },
            9,
        )
        .unwrap();
        assert!(
            (diff.lo - 0.05).abs() < 1e-12 && (diff.hi - 0.05).abs() < 1e-12,
            "{diff:?}"
        );
        // With problems ≤ 1 it is the one-level bootstrap, draw for draw.
        let x = [0.1, 0.3, 0.2, 0.6];
        assert_eq!(
            bootstrap2(&strata, 1, &|u, _| Some(mean_of(&x, u)), 4),
            mean_interval(&x, &strata, 4)
        );
    }

    #[test]
    fn curves_get_one_interval_per_component() {
        let x = [[0.1, 1.0], [0.2, 2.0], [0.3, 3.0], [0.4, f64::NAN]];
        let c = bootstrap_curve(
            &[0, 0, 0, 0],
            0,
            2,
            &|u, _| {
                (0..2)
                    .map(|j| Some(u.iter().map(|&i| x[i][j]).sum::<f64>() / u.len() as f64))
                    .collect()
            },
            5,
        );
        let a = c[0].unwrap();
        assert!((a.point - 0.25).abs() < 1e-12 && a.undefined == 0.0);
        // The second component is undefined on the full sample: no interval.
        assert_eq!(c[1], None);
        assert_eq!(
            bootstrap_curve(&[0], 3, 2, &|_, _| vec![Some(1.0); 2], 5),
            vec![None, None]
        );
    }

    #[test]
    fn one_unit_has_no_interval() {
        assert_eq!(mean_interval(&[0.5], &[0], 1), None);
        assert_eq!(paired_difference(&[0.976], &[0.974], &[0], 1), None);
    }

    #[test]
    fn paired_differences_and_probability_of_improvement() {
        let a = [0.5, 0.6, 0.7, 0.8];
        let b = [0.6, 0.7, 0.8, 0.8];
        let d = paired_difference(&a, &b, &[0, 0, 0, 0], 3).unwrap();
        assert!(
            (d.point - 0.075).abs() < 1e-12 && d.lo >= 0.0 && d.hi <= 0.1 + 1e-12,
            "{d:?}"
        );
        assert_eq!(probability_of_improvement(&a, &b, true), 0.875);
        assert_eq!(probability_of_improvement(&a, &b, false), 0.125);
        // Equal up to summation order: a tie, whichever way the rounding went.
        let (x, y) = ([0.1 + 0.2, 7.0], [0.3, 7.0 * (1.0 + 1e-12)]);
        assert_ne!(x[0], y[0]);
        assert_eq!(probability_of_improvement(&x, &y, true), 0.5);
        assert_eq!(probability_of_improvement(&x, &y, false), 0.5);
        assert_eq!(probability_of_improvement(&[0.3], &[0.3 + 1e-6], true), 1.0);
    }
}
