//! Comparing runs: a table of the paper's measures per algorithm with 95 % intervals over seeds,
//! the MRT variants against GRPO through paired differences, and the verdicts fixed before any
//! experiment ran (printed with the numbers behind them, met or not). Plots are in `figures.rs`.
//!
//! Verdicts, for each MRT variant against GRPO (pairs: same warm start and RL seed):
//! 1. *learns*: the gain in held-out pass@1 over the warm start has an interval above 0 (asked
//!    of every algorithm, GRPO included);
//! 2. *regret*: at every episode budget b = 1 … 2B the paired difference of normalised regret
//!    (MRT − GRPO) has an interval below 0; once letting the policy stop when it wants and once
//!    under budget forcing;
//! 3. *relative gain ≥ 2×* (the paper's Table 1): mean gain of MRT / mean gain of GRPO ≥ 2 and
//!    the paired difference of gains has an interval above 0;
//! 4. *token efficiency ≥ 1.5×*: tokens GRPO needs / tokens MRT needs to reach the same maj@k
//!    accuracy, the lower of the two mean curves' peaks (so both reach it), ≥ 1.5 with the
//!    interval's lower end above 1. Whether MRT reaches GRPO's own peak is reported beside it.
//!    With fewer than two paired seeds nothing has an interval and no verdict is given.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::analysis::{matched_token_efficiency, tokens_to_reach, CostPoint};
use super::by_problem::ByProblem;
use super::report::EvalReport;
use super::stats::{bootstrap2, bootstrap_curve, mean_of, probability_of_improvement, Interval, Verdict};

/// Seed of every bootstrap in a comparison (fixed, so a report is reproducible).
const BOOTSTRAP_SEED: u64 = 0x5eed;

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
fn mean_over(runs: &[&RunEval], f: &dyn Fn(&RunEval, &[usize]) -> f64, u: &[usize], p: &[usize]) -> f64 {
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
fn mean_maj(runs: &[&RunEval], u: &[usize], p: &[usize]) -> Vec<CostPoint> {
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

/// Everything computed for one MRT variant against GRPO.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Versus {
    pub variant: String,
    /// Paired seeds.
    pub n: usize,
    /// Per measure: (name, paired difference variant − GRPO, probability of improvement).
    pub differences: Vec<(String, Option<Interval>, f64)>,
    /// Paired regret differences at every budget b = 1 … 2B: free to stop, and forced.
    pub regret_by_budget: Vec<Option<Interval>>,
    pub forced_regret_by_budget: Vec<Option<Interval>>,
    pub relative_gain: Option<Interval>,
    pub token_efficiency: Option<Interval>,
    /// The accuracy the token-efficiency ratio is measured at: the lower of the two mean maj@k
    /// curves' peaks (both reach it).
    pub efficiency_target: f64,
    /// GRPO's best mean maj@k accuracy, and whether the variant's mean curve reaches it.
    pub grpo_peak: f64,
    pub reaches_grpo_peak: bool,
    pub verdict_regret: Verdict,
    pub verdict_forced_regret: Verdict,
    pub verdict_relative_gain: Verdict,
    pub verdict_token_efficiency: Verdict,
}

/// Verdict 1 for one algorithm: its gain over the warm start, with interval.
pub fn learns(runs: &[&RunEval]) -> (Option<Interval>, Verdict) {
    match interval(runs, &gain) {
        Some(i) => {
            let v = if i.lo > 0.0 { Verdict::Met } else { Verdict::NotMet };
            (Some(i), v)
        }
        None => (None, Verdict::NoVerdict("fewer than 2 seeds".into())),
    }
}

/// Below zero at every budget; no verdict where any budget has no interval.
fn below_everywhere(intervals: &[Option<Interval>]) -> Verdict {
    if intervals.is_empty() || intervals.iter().any(Option::is_none) {
        return Verdict::NoVerdict("fewer than 2 paired seeds".into());
    }
    if intervals.iter().flatten().all(|i| i.hi < 0.0) {
        Verdict::Met
    } else {
        Verdict::NotMet
    }
}

/// An MRT variant's runs against GRPO's. Every interval is two-level: paired seeds (the same
/// warm start and RL seed) and the held-out problems, drawn once per resample for both.
pub fn versus(grpo: &[&RunEval], variant: &[&RunEval], name: &str) -> Versus {
    let (a, b, st) = pairs(grpo, variant);
    let n = a.len();
    let problems = problem_count(&a.iter().chain(&b).copied().collect::<Vec<_>>());
    let all: Vec<usize> = (0..problems).collect();
    // Paired difference variant − GRPO of `f`, over the pairs `u` and problems `p`.
    let diff = |f: &dyn Fn(&RunEval, &[usize]) -> f64, u: &[usize], p: &[usize]| {
        mean_over(&b, f, u, p) - mean_over(&a, f, u, p)
    };
    let paired =
        |f: &dyn Fn(&RunEval, &[usize]) -> f64| bootstrap2(&st, problems, &|u, p| Some(diff(f, u, p)), BOOTSTRAP_SEED);
    let differences = MEASURES
        .iter()
        .map(|(m, higher, f)| {
            let (x, y): (Vec<f64>, Vec<f64>) = a.iter().zip(&b).map(|(ra, rb)| (f(ra, &all), f(rb, &all))).unzip();
            (m.to_string(), paired(f), probability_of_improvement(&x, &y, *higher))
        })
        .collect();
    let budgets = a
        .iter()
        .chain(&b)
        .map(|r| r.fine_tuned.extended_regret.len().min(r.fine_tuned.forced_regret.len()))
        .min()
        .unwrap_or(0);
    // Regret differences at every budget from one set of resamples.
    let by_budget = |curve: fn(&ByProblem) -> &Vec<Vec<f64>>| -> Vec<Option<Interval>> {
        let regrets = |rs: &[&RunEval], u: &[usize], p: &[usize]| -> Vec<f64> {
            let mut sum = vec![0.0; budgets];
            for &i in u {
                for (s, r) in sum
                    .iter_mut()
                    .zip(ByProblem::regret(curve(&rs[i].fine_tuned.by_problem), p))
                {
                    *s += r;
                }
            }
            sum.into_iter().map(|s| s / u.len().max(1) as f64).collect()
        };
        bootstrap_curve(
            &st,
            problems,
            budgets,
            &|u, p| {
                regrets(&b, u, p)
                    .iter()
                    .zip(regrets(&a, u, p))
                    .map(|(y, x)| Some(y - x))
                    .collect()
            },
            BOOTSTRAP_SEED,
        )
    };
    let regret_by_budget = by_budget(|r| &r.extended_anytime);
    let forced_regret_by_budget = by_budget(|r| &r.forced_anytime);

    let relative_gain = bootstrap2(
        &st,
        problems,
        &|u, p| {
            let (ga, gb) = (mean_over(&a, &gain, u, p), mean_over(&b, &gain, u, p));
            Some(gb / ga).filter(|_| ga > 0.0)
        },
        BOOTSTRAP_SEED,
    );
    let gain_diff = paired(&gain);
    let verdict_relative_gain = match (&relative_gain, &gain_diff) {
        (Some(r), Some(d)) => {
            if r.point >= 2.0 && d.lo > 0.0 {
                Verdict::Met
            } else {
                Verdict::NotMet
            }
        }
        _ if n < 2 => Verdict::NoVerdict("fewer than 2 paired seeds".into()),
        _ => Verdict::NoVerdict("GRPO's mean gain is not positive, so the ratio is undefined".into()),
    };
    // Tokens to reach the same accuracy: the lower of the two mean curves' peaks, which both
    // reach (a target only one curve reaches would make the ratio undefined, and writing 0
    // for it turned a peak difference within noise into a verdict).
    let pairs_all: Vec<usize> = (0..n).collect();
    let (ma, mb) = (mean_maj(&a, &pairs_all, &all), mean_maj(&b, &pairs_all, &all));
    let efficiency_target = matched_token_efficiency(&ma, &mb).map(|(t, _)| t).unwrap_or(f64::NAN);
    let grpo_peak = ma.iter().map(|p| p.accuracy).fold(f64::NAN, f64::max);
    let reaches_grpo_peak = tokens_to_reach(&mb, grpo_peak).is_some();
    let token_efficiency = bootstrap2(
        &st,
        problems,
        &|u, p| matched_token_efficiency(&mean_maj(&a, u, p), &mean_maj(&b, u, p)).map(|(_, r)| r),
        BOOTSTRAP_SEED,
    );
    let verdict_token_efficiency = match &token_efficiency {
        Some(e) if e.point >= 1.5 && e.lo > 1.0 => Verdict::Met,
        Some(_) => Verdict::NotMet,
        None => Verdict::NoVerdict("fewer than 2 paired seeds".into()),
    };
    Versus {
        variant: name.to_string(),
        n,
        differences,
        verdict_regret: below_everywhere(&regret_by_budget),
        verdict_forced_regret: below_everywhere(&forced_regret_by_budget),
        regret_by_budget,
        forced_regret_by_budget,
        relative_gain,
        token_efficiency,
        efficiency_target,
        grpo_peak,
        reaches_grpo_peak,
        verdict_relative_gain,
        verdict_token_efficiency,
    }
}

/// The verdicts and paired differences of every MRT variant present against GRPO, in words.
pub fn verdicts(runs: &[RunEval]) -> String {
    let groups = by_algo(runs);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Verdict 1, each algorithm learns (gain in held-out pass@1 over the warm start, interval above 0):\n"
    );
    for (algo, rs) in &groups {
        let (i, v) = learns(rs);
        let _ = writeln!(
            s,
            "- `{algo}`: gain {} — {}.",
            i.map(|i| i.show(3)).unwrap_or_else(|| "n/a".into()),
            v.word()
        );
    }
    let Some(grpo) = groups.get("grpo") else {
        return s;
    };
    for (name, rs) in groups.iter().filter(|(n, _)| n.as_str() != "grpo") {
        let v = versus(grpo, rs, name);
        s.push_str(&render_versus(&v));
    }
    s
}

fn show(i: &Option<Interval>, digits: usize) -> String {
    i.map(|i| i.show(digits)).unwrap_or_else(|| "n/a".into())
}

/// One variant against GRPO: verdicts 2–4 with their numbers, then every paired difference.
pub fn render_versus(v: &Versus) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n`{}` against `grpo` ({} paired seeds; differences are {} − grpo, 95 % intervals):\n",
        v.variant, v.n, v.variant
    );
    let worst = |xs: &[Option<Interval>]| xs.iter().flatten().map(|i| i.hi).fold(f64::NEG_INFINITY, f64::max);
    let _ = writeln!(
        s,
        "- Verdict 2, lower regret at every budget 1…{} (free to stop): {} (largest upper end of the intervals \
            {:+.3}).",
        v.regret_by_budget.len(),
        v.verdict_regret.word(),
        worst(&v.regret_by_budget)
    );
    let _ = writeln!(
        s,
        "- Verdict 2, the same under budget forcing: {} (largest upper end {:+.3}).",
        v.verdict_forced_regret.word(),
        worst(&v.forced_regret_by_budget)
    );
    let _ = writeln!(
        s,
        "- Verdict 3, relative gain ≥ 2× (the paper: 2–3×): {} — {}.",
        show(&v.relative_gain, 2),
        v.verdict_relative_gain.word()
    );
    let _ = writeln!(
        s,
        "- Verdict 4, token efficiency ≥ 1.5× (GRPO's tokens / {}'s to reach maj@k accuracy {:.3}, the lower of the \
            two \
         peaks; the paper: ≈1.5×): {} — {}.",
        v.variant,
        v.efficiency_target,
        show(&v.token_efficiency, 2),
        v.verdict_token_efficiency.word()
    );
    let _ = writeln!(
        s,
        "- {} GRPO's best maj@k accuracy {:.3} (mean curves).",
        if v.reaches_grpo_peak {
            format!("`{}` reaches", v.variant)
        } else {
            format!("`{}` never reaches", v.variant)
        },
        v.grpo_peak
    );
    let _ = writeln!(s, "\n| measure | difference | P({} better) |\n|---|---|---|", v.variant);
    for (m, d, p) in &v.differences {
        let p = if d.is_some() { format!("{p:.2}") } else { "n/a".into() };
        let _ = writeln!(s, "| {m} | {} | {p} |", show(d, 3));
    }
    let _ = writeln!(
        s,
        "\nRegret difference by episode budget (free to stop / budget forcing):\n"
    );
    let _ = writeln!(s, "| budget | free to stop | budget forcing |\n|---|---|---|");
    for (b, (f, g)) in v.regret_by_budget.iter().zip(&v.forced_regret_by_budget).enumerate() {
        let _ = writeln!(s, "| {} | {} | {} |", b + 1, show(f, 3), show(g, 3));
    }
    s
}
