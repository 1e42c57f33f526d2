//! Comparing runs: algorithms overlaid in the same plots (mean ± standard error over seeds),
//! a table of the paper's measures, and `REPORT.md`. Statements about MRT against GRPO are
//! computed from the numbers, so the report says so when MRT does not win.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::analysis::{token_efficiency, CostPoint};
use super::plots::{algo_color, line_chart, Series};
use super::report::EvalReport;
use crate::error::Result;

/// The evaluation of one run: its warm start (base) and its fine-tuned checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunEval {
    pub run: String,
    pub algo: String,
    pub seed: u64,
    pub base: EvalReport,
    pub fine_tuned: EvalReport,
    /// (RL step, held-out pass@1) from the run's periodic evaluations.
    #[serde(default)]
    pub training_reward: Vec<(f64, f64)>,
}

/// Mean and standard error of the mean.
pub fn mean_se(x: &[f64]) -> (f64, f64) {
    let v: Vec<f64> = x.iter().copied().filter(|v| v.is_finite()).collect();
    let n = v.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let m = v.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (m, 0.0);
    }
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1) as f64;
    (m, (var / n as f64).sqrt())
}

/// Element-wise mean ± SE of equally long vectors.
fn curve_mean(curves: &[&[f64]]) -> (Vec<f64>, Vec<f64>) {
    let len = curves.iter().map(|c| c.len()).min().unwrap_or(0);
    (0..len).map(|i| mean_se(&curves.iter().map(|c| c[i]).collect::<Vec<_>>())).unzip()
}

/// Runs grouped by algorithm (in a stable order).
pub fn by_algo(runs: &[RunEval]) -> BTreeMap<String, Vec<&RunEval>> {
    let mut m: BTreeMap<String, Vec<&RunEval>> = BTreeMap::new();
    for r in runs {
        m.entry(r.algo.clone()).or_default().push(r);
    }
    m
}

/// The mean maj@k curve of a group.
fn mean_maj(runs: &[&RunEval]) -> Vec<CostPoint> {
    let k = runs.iter().map(|r| r.fine_tuned.maj.len()).min().unwrap_or(0);
    (0..k)
        .map(|i| CostPoint {
            tokens: mean_se(&runs.iter().map(|r| r.fine_tuned.maj[i].tokens).collect::<Vec<_>>()).0,
            accuracy: mean_se(&runs.iter().map(|r| r.fine_tuned.maj[i].accuracy).collect::<Vec<_>>()).0,
        })
        .collect()
}

fn pm(x: (f64, f64)) -> String {
    if x.0.is_nan() {
        "n/a".into()
    } else {
        format!("{:.3} ± {:.3}", x.0, x.1)
    }
}

/// The comparison table (markdown) and the computed verdicts of MRT against GRPO.
pub fn table(runs: &[RunEval]) -> String {
    let groups = by_algo(runs);
    let mut s = String::new();
    let _ = writeln!(s, "| algorithm | seeds | pass@1 warm start | pass@1 fine-tuned | gain | regret (J*=1) | regret vs optimal | regret at 2× budget | regret, budget forcing | tokens to solve | token regret | maj@k best |");
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    let stat = |rs: &[&RunEval], f: &dyn Fn(&RunEval) -> f64| mean_se(&rs.iter().map(|r| f(r)).collect::<Vec<_>>());
    for (algo, rs) in &groups {
        let _ = writeln!(
            s,
            "| {algo} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            rs.len(),
            pm(stat(rs, &|r| r.base.natural.pass1)),
            pm(stat(rs, &|r| r.fine_tuned.natural.pass1)),
            pm(stat(rs, &|r| r.fine_tuned.natural.pass1 - r.base.natural.pass1)),
            pm(stat(rs, &|r| r.fine_tuned.regret.last().copied().unwrap_or(f64::NAN))),
            pm(stat(rs, &|r| r.fine_tuned.regret_vs_optimal.as_ref().and_then(|v| v.last().copied()).unwrap_or(f64::NAN))),
            pm(stat(rs, &|r| r.fine_tuned.extended_regret.last().copied().unwrap_or(f64::NAN))),
            pm(stat(rs, &|r| r.fine_tuned.forced_regret.last().copied().unwrap_or(f64::NAN))),
            pm(stat(rs, &|r| r.fine_tuned.natural.tokens_to_solve)),
            pm(stat(rs, &|r| r.fine_tuned.token_regret)),
            pm(stat(rs, &|r| r.fine_tuned.maj.iter().map(|p| p.accuracy).fold(f64::NAN, f64::max))),
        );
    }
    if let Some(grpo) = groups.get("grpo") {
        for variant in ["mrt-dense", "mrt"] {
            if let Some(mrt) = groups.get(variant) {
                let _ = writeln!(s, "\n`{variant}` against `grpo`:\n");
                s.push_str(&verdicts(grpo, mrt, variant));
            }
        }
    }
    s
}

/// An MRT variant against GRPO in words: the paper's two headline ratios and per-measure
/// verdicts.
fn verdicts(grpo: &[&RunEval], mrt: &[&RunEval], name: &str) -> String {
    let mut s = String::new();
    let gain = |rs: &[&RunEval]| mean_se(&rs.iter().map(|r| r.fine_tuned.natural.pass1 - r.base.natural.pass1).collect::<Vec<_>>());
    let (g_grpo, g_mrt) = (gain(grpo), gain(mrt));
    let rel = g_mrt.0 / g_grpo.0;
    let _ = writeln!(
        s,
        "- Relative gain over GRPO (pass@1 gain over the warm start, {name} / GRPO): {} ({:+.3} vs {:+.3}; the paper reports 2–3×).",
        if g_grpo.0.abs() < 1e-9 { "undefined (GRPO gained nothing)".into() } else { format!("{rel:.2}×") },
        g_mrt.0,
        g_grpo.0
    );
    let (mg, mm) = (mean_maj(grpo), mean_maj(mrt));
    let target = mg.iter().map(|p| p.accuracy).fold(f64::NAN, f64::max);
    match token_efficiency(&mg, &mm, target) {
        Some(e) => {
            let _ = writeln!(s, "- Token efficiency (tokens GRPO needs / tokens {name} needs for GRPO's best maj@k accuracy, {target:.3}): {e:.2}× (the paper reports ≈1.5×).");
        }
        None => {
            let _ = writeln!(s, "- Token efficiency: {name}'s maj@k never reaches GRPO's best accuracy ({target:.3}) within the sampled k, so it is *not* more token-efficient by that measure.");
            // Where both curves saturate near 1, GRPO's best is a fragile target: also compare
            // at the highest accuracy both reach.
            let shared = target.min(mm.iter().map(|p| p.accuracy).fold(f64::NAN, f64::max));
            if let Some(e) = token_efficiency(&mg, &mm, shared) {
                let _ = writeln!(s, "- At the highest maj@k accuracy both reach ({shared:.3}), GRPO needs {e:.2}× the tokens {name} needs.");
            }
        }
    }
    let measures: [(&str, bool, &dyn Fn(&RunEval) -> f64); 6] = [
        ("pass@1", true, &|r| r.fine_tuned.natural.pass1),
        ("regret at the training budget", false, &|r| r.fine_tuned.regret.last().copied().unwrap_or(f64::NAN)),
        ("regret at 2× the budget", false, &|r| r.fine_tuned.extended_regret.last().copied().unwrap_or(f64::NAN)),
        ("regret at 2× the budget under budget forcing", false, &|r| r.fine_tuned.forced_regret.last().copied().unwrap_or(f64::NAN)),
        ("tokens to solve", false, &|r| r.fine_tuned.natural.tokens_to_solve),
        ("token regret", false, &|r| r.fine_tuned.token_regret),
    ];
    for (measure, higher_better, f) in measures {
        let a = mean_se(&grpo.iter().map(|r| f(r)).collect::<Vec<_>>());
        let b = mean_se(&mrt.iter().map(|r| f(r)).collect::<Vec<_>>());
        let better = if higher_better { b.0 > a.0 } else { b.0 < a.0 };
        let clear = (b.0 - a.0).abs() > 2.0 * (a.1.powi(2) + b.1.powi(2)).sqrt();
        let verdict = match (better, clear) {
            (true, true) => "better",
            (true, false) => "better, but within 2 standard errors",
            (false, true) => "worse",
            (false, false) => "not better (within 2 standard errors)",
        };
        let _ = writeln!(s, "- {measure}: {name} {} vs GRPO {} — {verdict}.", pm(b), pm(a));
    }
    s
}

/// Writes the comparison plots into `dir`; returns their file names.
pub fn plots(dir: &Path, runs: &[RunEval], title_suffix: &str) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir).map_err(|e| crate::error::Error::io(dir, e))?;
    let groups = by_algo(runs);
    let Some(first) = runs.first() else { return Ok(Vec::new()) };
    let budget = first.fine_tuned.train_budget as f64;
    let mut files = Vec::new();
    let band_series = |label: &str, color, curves: Vec<&[f64]>, x: &dyn Fn(usize) -> f64| {
        let (m, se) = curve_mean(&curves);
        Series::new(label, color, m.iter().enumerate().map(|(i, &v)| (x(i), v)).collect()).with_band(se)
    };
    let base_label = "warm start";

    // 1. Anytime accuracy against episodes, past the training budget (budget forcing).
    let mut series = vec![band_series(base_label, algo_color(base_label), runs.iter().map(|r| r.base.extended_anytime.as_slice()).collect(), &|i| i as f64)];
    for (algo, rs) in &groups {
        series.push(band_series(algo, algo_color(algo), rs.iter().map(|r| r.fine_tuned.extended_anytime.as_slice()).collect(), &|i| i as f64));
    }
    if let Some(opt) = &first.fine_tuned.extended_optimal {
        series.push(Series::new("Bayes-optimal", algo_color("optimal"), opt.iter().enumerate().map(|(i, &v)| (i as f64, v)).collect()).dashed());
    }
    series.push(Series::new(format!("training budget ({budget} episodes)"), algo_color("other"), vec![(budget, 0.0), (budget, 1.0)]).dashed());
    line_chart(&dir.join("anytime_episodes.svg"), &format!("Anytime accuracy vs episodes{title_suffix}"), "episodes before the forced answer", "P(forced answer correct)", &series, Some((0.0, 1.02)))?;
    files.push("anytime_episodes.svg".to_string());

    // 1b. The same under budget forcing.
    let mut series = vec![band_series(base_label, algo_color(base_label), runs.iter().map(|r| r.base.forced_anytime.as_slice()).collect(), &|i| i as f64)];
    for (algo, rs) in &groups {
        series.push(band_series(algo, algo_color(algo), rs.iter().map(|r| r.fine_tuned.forced_anytime.as_slice()).collect(), &|i| i as f64));
    }
    series.push(Series::new(format!("training budget ({budget} episodes)"), algo_color("other"), vec![(budget, 0.0), (budget, 1.0)]).dashed());
    line_chart(&dir.join("anytime_forced.svg"), &format!("Anytime accuracy under budget forcing{title_suffix}"), "episodes before the forced answer (</think> suppressed)", "P(forced answer correct)", &series, Some((0.0, 1.02)))?;
    files.push("anytime_forced.svg".to_string());

    // 2. Anytime accuracy against tokens.
    let mut series = vec![band_series(base_label, algo_color(base_label), runs.iter().map(|r| r.base.token_anytime.as_slice()).collect(), &|i| i as f64)];
    for (algo, rs) in &groups {
        series.push(band_series(algo, algo_color(algo), rs.iter().map(|r| r.fine_tuned.token_anytime.as_slice()).collect(), &|i| i as f64));
    }
    line_chart(&dir.join("anytime_tokens.svg"), &format!("Anytime accuracy vs tokens{title_suffix}"), "policy tokens spent (tokens)", "P(forced answer correct)", &series, Some((0.0, 1.02)))?;
    files.push("anytime_tokens.svg".to_string());

    // 3. Cumulative regret at every budget.
    let mut series = vec![band_series(base_label, algo_color(base_label), runs.iter().map(|r| r.base.extended_regret.as_slice()).collect(), &|i| (i + 1) as f64)];
    for (algo, rs) in &groups {
        series.push(band_series(algo, algo_color(algo), rs.iter().map(|r| r.fine_tuned.extended_regret.as_slice()).collect(), &|i| (i + 1) as f64));
    }
    line_chart(&dir.join("regret.svg"), &format!("Normalised cumulative regret (J* = 1){title_suffix}"), "episode budget (episodes)", "regret per episode", &series, None)?;
    files.push("regret.svg".to_string());

    // 4. maj@k against total tokens.
    let mut series = Vec::new();
    let base_maj: Vec<(f64, f64)> = first.base.maj.iter().map(|p| (p.tokens, p.accuracy)).collect();
    series.push(Series::new(base_label, algo_color(base_label), base_maj));
    for (algo, rs) in &groups {
        series.push(Series::new(algo.clone(), algo_color(algo), mean_maj(rs).iter().map(|p| (p.tokens, p.accuracy)).collect()));
    }
    line_chart(&dir.join("majk_tokens.svg"), &format!("maj@k (k = 1…{}) vs total tokens{title_suffix}", first.fine_tuned.maj.len()), "total policy tokens of the k samples (tokens)", "maj@k accuracy", &series, None)?;
    files.push("majk_tokens.svg".to_string());

    // 5. Where episodes made no progress.
    let unproductive = |r: &EvalReport| -> Vec<f64> { r.progress_hist.iter().map(|h| (h[0] + h[1]) as f64 / (h.iter().sum::<usize>().max(1)) as f64).collect() };
    let base_curve = unproductive(&first.base);
    let mut series = vec![Series::new(base_label, algo_color(base_label), base_curve.iter().enumerate().map(|(i, &v)| ((i + 1) as f64, v)).collect())];
    for (algo, rs) in &groups {
        let curves: Vec<Vec<f64>> = rs.iter().map(|r| unproductive(&r.fine_tuned)).collect();
        series.push(band_series(algo, algo_color(algo), curves.iter().map(Vec::as_slice).collect(), &|i| (i + 1) as f64));
    }
    line_chart(&dir.join("unproductive_episodes.svg"), &format!("Episodes with zero or negative progress{title_suffix}"), "episode index", "fraction of episodes (|progress| < 0.01 or < 0)", &series, Some((0.0, 1.02)))?;
    files.push("unproductive_episodes.svg".to_string());

    // 6. Held-out pass@1 during RL.
    let mut series = Vec::new();
    for (algo, rs) in &groups {
        let curves: Vec<Vec<f64>> = rs.iter().map(|r| r.training_reward.iter().map(|p| p.1).collect()).collect();
        if curves.iter().all(|c| !c.is_empty()) {
            let steps: Vec<f64> = rs[0].training_reward.iter().map(|p| p.0).collect();
            series.push(band_series(algo, algo_color(algo), curves.iter().map(Vec::as_slice).collect(), &|i| steps.get(i).copied().unwrap_or(i as f64)));
        }
    }
    if !series.is_empty() {
        line_chart(&dir.join("training_pass1.svg"), &format!("Held-out pass@1 during RL{title_suffix}"), "RL step", "pass@1", &series, None)?;
        files.push("training_pass1.svg".to_string());
    }
    Ok(files)
}
