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
use super::report::EvalReport;
use super::stats::{bootstrap, mean_interval, mean_of, paired_difference, probability_of_improvement, Interval, Verdict};

/// Seed of every bootstrap in a comparison (fixed, so a report is reproducible).
const BOOTSTRAP_SEED: u64 = 0x5eed;

/// A point of a run's held-out pass@1 curve during RL, with the cost spent so far.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrainPoint {
    pub step: f64,
    pub pass1: f64,
    /// Tokens the policy sampled in RL steps up to here.
    pub sampled_tokens: f64,
    /// Seconds of RL steps up to here (evaluations excluded).
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

/// A measure of a run.
pub type Measure = fn(&RunEval) -> f64;

fn last(v: &[f64]) -> f64 {
    v.last().copied().unwrap_or(f64::NAN)
}

pub fn pass1(r: &RunEval) -> f64 {
    r.fine_tuned.natural.pass1
}
pub fn gain(r: &RunEval) -> f64 {
    r.fine_tuned.natural.pass1 - r.base.natural.pass1
}
pub fn regret_at_budget(r: &RunEval) -> f64 {
    last(&r.fine_tuned.regret)
}
pub fn regret_extended(r: &RunEval) -> f64 {
    last(&r.fine_tuned.extended_regret)
}
pub fn regret_forced(r: &RunEval) -> f64 {
    last(&r.fine_tuned.forced_regret)
}
pub fn tokens_to_solve(r: &RunEval) -> f64 {
    r.fine_tuned.natural.tokens_to_solve
}
pub fn token_regret(r: &RunEval) -> f64 {
    r.fine_tuned.token_regret
}
pub fn best_maj(r: &RunEval) -> f64 {
    r.fine_tuned.maj.iter().map(|p| p.accuracy).fold(f64::NAN, f64::max)
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

fn cell(values: &[f64], strata: &[usize], digits: usize) -> String {
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if finite.len() != values.len() || values.is_empty() {
        return "n/a".into();
    }
    match mean_interval(values, strata, BOOTSTRAP_SEED) {
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
        let st = strata(&rs);
        let base: Vec<f64> = rs.iter().map(|r| r.base.natural.pass1).collect();
        let cells: Vec<String> = MEASURES.iter().map(|(_, _, f)| cell(&rs.iter().map(|r| f(r)).collect::<Vec<_>>(), &st, 3)).collect();
        let _ = writeln!(s, "| {algo} | {} | {:.3} | {} |", rs.len(), mean_of(&base, &(0..base.len()).collect::<Vec<_>>()), cells.join(" | "));
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

/// The mean maj@k curve (accuracy against total tokens) of the runs `idx`.
fn mean_maj(runs: &[&RunEval], idx: &[usize]) -> Vec<CostPoint> {
    let k = idx.iter().map(|&i| runs[i].fine_tuned.maj.len()).min().unwrap_or(0);
    (0..k)
        .map(|j| CostPoint {
            tokens: idx.iter().map(|&i| runs[i].fine_tuned.maj[j].tokens).sum::<f64>() / idx.len() as f64,
            accuracy: idx.iter().map(|&i| runs[i].fine_tuned.maj[j].accuracy).sum::<f64>() / idx.len() as f64,
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
    let g: Vec<f64> = runs.iter().map(|r| gain(r)).collect();
    match mean_interval(&g, &strata(runs), BOOTSTRAP_SEED) {
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

/// An MRT variant's runs against GRPO's.
pub fn versus(grpo: &[&RunEval], variant: &[&RunEval], name: &str) -> Versus {
    let (a, b, st) = pairs(grpo, variant);
    let n = a.len();
    let col = |rs: &[&RunEval], f: &dyn Fn(&RunEval) -> f64| rs.iter().map(|r| f(r)).collect::<Vec<f64>>();
    let differences = MEASURES
        .iter()
        .map(|(m, higher, f)| {
            let (x, y) = (col(&a, &|r| f(r)), col(&b, &|r| f(r)));
            (m.to_string(), paired_difference(&x, &y, &st, BOOTSTRAP_SEED), probability_of_improvement(&x, &y, *higher))
        })
        .collect();
    let budgets = a.iter().chain(&b).map(|r| r.fine_tuned.extended_regret.len().min(r.fine_tuned.forced_regret.len())).min().unwrap_or(0);
    let by_budget = |curve: fn(&RunEval) -> &Vec<f64>| -> Vec<Option<Interval>> {
        (0..budgets).map(|i| paired_difference(&col(&a, &|r| curve(r)[i]), &col(&b, &|r| curve(r)[i]), &st, BOOTSTRAP_SEED)).collect()
    };
    let regret_by_budget = by_budget(|r| &r.fine_tuned.extended_regret);
    let forced_regret_by_budget = by_budget(|r| &r.fine_tuned.forced_regret);

    let (ga, gb) = (col(&a, &|r| gain(r)), col(&b, &|r| gain(r)));
    let relative_gain = bootstrap(&st, &|idx| Some(mean_of(&gb, idx) / mean_of(&ga, idx)).filter(|_| mean_of(&ga, idx) > 0.0), BOOTSTRAP_SEED);
    let gain_diff = paired_difference(&ga, &gb, &st, BOOTSTRAP_SEED);
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
    let all: Vec<usize> = (0..n).collect();
    let (ma, mb) = (mean_maj(&a, &all), mean_maj(&b, &all));
    let efficiency_target = matched_token_efficiency(&ma, &mb).map(|(t, _)| t).unwrap_or(f64::NAN);
    let grpo_peak = ma.iter().map(|p| p.accuracy).fold(f64::NAN, f64::max);
    let reaches_grpo_peak = tokens_to_reach(&mb, grpo_peak).is_some();
    let token_efficiency = bootstrap(&st, &|idx| matched_token_efficiency(&mean_maj(&a, idx), &mean_maj(&b, idx)).map(|(_, r)| r), BOOTSTRAP_SEED);
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
    let _ = writeln!(s, "Verdict 1, each algorithm learns (gain in held-out pass@1 over the warm start, interval above 0):\n");
    for (algo, rs) in &groups {
        let (i, v) = learns(rs);
        let _ = writeln!(s, "- `{algo}`: gain {} — {}.", i.map(|i| i.show(3)).unwrap_or_else(|| "n/a".into()), v.word());
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
    let _ = writeln!(s, "\n`{}` against `grpo` ({} paired seeds; differences are {} − grpo, 95 % intervals):\n", v.variant, v.n, v.variant);
    let worst = |xs: &[Option<Interval>]| xs.iter().flatten().map(|i| i.hi).fold(f64::NEG_INFINITY, f64::max);
    let _ = writeln!(
        s,
        "- Verdict 2, lower regret at every budget 1…{} (free to stop): {} (largest upper end of the intervals {:+.3}).",
        v.regret_by_budget.len(),
        v.verdict_regret.word(),
        worst(&v.regret_by_budget)
    );
    let _ = writeln!(s, "- Verdict 2, the same under budget forcing: {} (largest upper end {:+.3}).", v.verdict_forced_regret.word(), worst(&v.forced_regret_by_budget));
    let _ = writeln!(s, "- Verdict 3, relative gain ≥ 2× (the paper: 2–3×): {} — {}.", show(&v.relative_gain, 2), v.verdict_relative_gain.word());
    let _ = writeln!(
        s,
        "- Verdict 4, token efficiency ≥ 1.5× (GRPO's tokens / {}'s to reach maj@k accuracy {:.3}, the lower of the two \
         peaks; the paper: ≈1.5×): {} — {}.",
        v.variant,
        v.efficiency_target,
        show(&v.token_efficiency, 2),
        v.verdict_token_efficiency.word()
    );
    let _ = writeln!(
        s,
        "- {} GRPO's best maj@k accuracy {:.3} (mean curves).",
        if v.reaches_grpo_peak { format!("`{}` reaches", v.variant) } else { format!("`{}` never reaches", v.variant) },
        v.grpo_peak
    );
    let _ = writeln!(s, "\n| measure | difference | P({} better) |\n|---|---|---|", v.variant);
    for (m, d, p) in &v.differences {
        let p = if d.is_some() { format!("{p:.2}") } else { "n/a".into() };
        let _ = writeln!(s, "| {m} | {} | {p} |", show(d, 3));
    }
    let _ = writeln!(s, "\nRegret difference by episode budget (free to stop / budget forcing):\n");
    let _ = writeln!(s, "| budget | free to stop | budget forcing |\n|---|---|---|");
    for (b, (f, g)) in v.regret_by_budget.iter().zip(&v.forced_regret_by_budget).enumerate() {
        let _ = writeln!(s, "| {} | {} | {} |", b + 1, show(f, 3), show(g, 3));
    }
    s
}
