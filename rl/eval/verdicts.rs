//! The verdicts fixed before any experiment ran, for each MRT variant against GRPO (pairs: same
//! warm start and RL seed), printed with the numbers behind them, met or not:
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

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::analysis::{matched_token_efficiency, tokens_to_reach};
use super::by_problem::ByProblem;
use super::compare::{
    by_algo, gain, interval, mean_maj, mean_over, pairs, problem_count, RunEval, BOOTSTRAP_SEED, MEASURES,
};
use super::stats::{bootstrap2, bootstrap_curve, probability_of_improvement, Interval, Verdict};

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
