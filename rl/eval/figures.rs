//! The comparison plots: every algorithm overlaid (mean over seeds with a ±1 standard-error
//! band), the warm start and, where computable, the Bayes-optimal policy beside them.

use std::path::Path;

use super::compare::{by_algo, RunEval};
use super::plots::{algo_color, line_chart, Series};
use super::report::EvalReport;
use crate::error::Result;

/// Mean and standard error of the mean (0 with one value).
fn mean_se(x: &[f64]) -> (f64, f64) {
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

/// Element-wise mean ± SE of curves (cut to the shortest).
fn curve_mean(curves: &[&[f64]]) -> (Vec<f64>, Vec<f64>) {
    let len = curves.iter().map(|c| c.len()).min().unwrap_or(0);
    (0..len)
        .map(|i| mean_se(&curves.iter().map(|c| c[i]).collect::<Vec<_>>()))
        .unzip()
}

/// Writes the comparison plots into `dir`; returns their file names.
pub fn plots(dir: &Path, runs: &[RunEval], title_suffix: &str) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir).map_err(|e| crate::error::Error::io(dir, e))?;
    let groups = by_algo(runs);
    let Some(first) = runs.first() else {
        return Ok(Vec::new());
    };
    let budget = first.fine_tuned.train_budget as f64;
    let mut files = Vec::new();
    let band_series = |label: &str, color, curves: Vec<&[f64]>, x: &dyn Fn(usize) -> f64| {
        let (m, se) = curve_mean(&curves);
        Series::new(label, color, m.iter().enumerate().map(|(i, &v)| (x(i), v)).collect()).with_band(se)
    };
    let base_label = "warm start";

    // 1. Anytime accuracy against episodes, past the training budget (budget forcing).
    let mut series = vec![band_series(
        base_label,
        algo_color(base_label),
        runs.iter().map(|r| r.base.extended_anytime.as_slice()).collect(),
        &|i| i as f64,
    )];
    for (algo, rs) in &groups {
        series.push(band_series(
            algo,
            algo_color(algo),
            rs.iter().map(|r| r.fine_tuned.extended_anytime.as_slice()).collect(),
            &|i| i as f64,
        ));
    }
    if let Some(opt) = &first.fine_tuned.extended_optimal {
        series.push(
            Series::new(
                "Bayes-optimal",
                algo_color("optimal"),
                opt.iter().enumerate().map(|(i, &v)| (i as f64, v)).collect(),
            )
            .dashed(),
        );
    }
    series.push(
        Series::new(
            format!("training budget ({budget} episodes)"),
            algo_color("other"),
            vec![(budget, 0.0), (budget, 1.0)],
        )
        .dashed(),
    );
    line_chart(
        &dir.join("anytime_episodes.svg"),
        &format!("Anytime accuracy vs episodes{title_suffix}"),
        "episodes before the forced answer",
        "P(forced answer correct)",
        &series,
        Some((0.0, 1.02)),
    )?;
    files.push("anytime_episodes.svg".to_string());

    // 1b. The same under budget forcing.
    let mut series = vec![band_series(
        base_label,
        algo_color(base_label),
        runs.iter().map(|r| r.base.forced_anytime.as_slice()).collect(),
        &|i| i as f64,
    )];
    for (algo, rs) in &groups {
        series.push(band_series(
            algo,
            algo_color(algo),
            rs.iter().map(|r| r.fine_tuned.forced_anytime.as_slice()).collect(),
            &|i| i as f64,
        ));
    }
    series.push(
        Series::new(
            format!("training budget ({budget} episodes)"),
            algo_color("other"),
            vec![(budget, 0.0), (budget, 1.0)],
        )
        .dashed(),
    );
    line_chart(
        &dir.join("anytime_forced.svg"),
        &format!("Anytime accuracy under budget forcing{title_suffix}"),
        "episodes before the forced answer (</think> suppressed)",
        "P(forced answer correct)",
        &series,
        Some((0.0, 1.02)),
    )?;
    files.push("anytime_forced.svg".to_string());

    // 2. Anytime accuracy against tokens.
    let mut series = vec![band_series(
        base_label,
        algo_color(base_label),
        runs.iter().map(|r| r.base.token_anytime.as_slice()).collect(),
        &|i| i as f64,
    )];
    for (algo, rs) in &groups {
        series.push(band_series(
            algo,
            algo_color(algo),
            rs.iter().map(|r| r.fine_tuned.token_anytime.as_slice()).collect(),
            &|i| i as f64,
        ));
    }
    line_chart(
        &dir.join("anytime_tokens.svg"),
        &format!("Anytime accuracy vs tokens{title_suffix}"),
        "policy tokens spent (tokens)",
        "P(forced answer correct)",
        &series,
        Some((0.0, 1.02)),
    )?;
    files.push("anytime_tokens.svg".to_string());

    // 3. Cumulative regret at every budget.
    let mut series = vec![band_series(
        base_label,
        algo_color(base_label),
        runs.iter().map(|r| r.base.extended_regret.as_slice()).collect(),
        &|i| (i + 1) as f64,
    )];
    for (algo, rs) in &groups {
        series.push(band_series(
            algo,
            algo_color(algo),
            rs.iter().map(|r| r.fine_tuned.extended_regret.as_slice()).collect(),
            &|i| (i + 1) as f64,
        ));
    }
    line_chart(
        &dir.join("regret.svg"),
        &format!("Normalised cumulative regret (J* = 1){title_suffix}"),
        "episode budget (episodes)",
        "regret per episode",
        &series,
        None,
    )?;
    files.push("regret.svg".to_string());

    // 4. maj@k against total tokens.
    let mut series = Vec::new();
    let base_maj: Vec<(f64, f64)> = first.base.maj.iter().map(|p| (p.tokens, p.accuracy)).collect();
    series.push(Series::new(base_label, algo_color(base_label), base_maj));
    for (algo, rs) in &groups {
        let k = rs.iter().map(|r| r.fine_tuned.maj.len()).min().unwrap_or(0);
        let mean = |f: &dyn Fn(&super::analysis::CostPoint) -> f64, i: usize| {
            mean_se(&rs.iter().map(|r| f(&r.fine_tuned.maj[i])).collect::<Vec<_>>()).0
        };
        series.push(Series::new(
            algo.clone(),
            algo_color(algo),
            (0..k)
                .map(|i| (mean(&|p| p.tokens, i), mean(&|p| p.accuracy, i)))
                .collect(),
        ));
    }
    line_chart(
        &dir.join("majk_tokens.svg"),
        &format!(
            "maj@k (k = 1…{}) vs total tokens{title_suffix}",
            first.fine_tuned.maj.len()
        ),
        "total policy tokens of the k samples (tokens)",
        "maj@k accuracy",
        &series,
        None,
    )?;
    files.push("majk_tokens.svg".to_string());

    // 5. Where episodes made no progress.
    let unproductive = |r: &EvalReport| -> Vec<f64> {
        r.progress_hist
            .iter()
            .map(|h| (h[0] + h[1]) as f64 / (h.iter().sum::<usize>().max(1)) as f64)
            .collect()
    };
    let base_curve = unproductive(&first.base);
    let mut series = vec![Series::new(
        base_label,
        algo_color(base_label),
        base_curve
            .iter()
            .enumerate()
            .map(|(i, &v)| ((i + 1) as f64, v))
            .collect(),
    )];
    for (algo, rs) in &groups {
        let curves: Vec<Vec<f64>> = rs.iter().map(|r| unproductive(&r.fine_tuned)).collect();
        series.push(band_series(
            algo,
            algo_color(algo),
            curves.iter().map(Vec::as_slice).collect(),
            &|i| (i + 1) as f64,
        ));
    }
    line_chart(
        &dir.join("unproductive_episodes.svg"),
        &format!("Episodes with zero or negative progress{title_suffix}"),
        "episode index",
        "fraction of episodes (|progress| < 0.01 or < 0)",
        &series,
        Some((0.0, 1.02)),
    )?;
    files.push("unproductive_episodes.svg".to_string());

    // 6. Held-out pass@1 during RL, against steps, sampled tokens and wall-clock: the
    // prover's extra cost shows as a curve shifted right.
    let axes: [(&str, &str, fn(&super::compare::TrainPoint) -> f64); 3] = [
        ("training_pass1.svg", "RL step", |p| p.step),
        ("training_pass1_tokens.svg", "tokens sampled in RL (tokens)", |p| {
            p.sampled_tokens
        }),
        ("training_pass1_seconds.svg", "wall-clock of RL steps (s)", |p| {
            p.seconds
        }),
    ];
    for (file, x_label, x_of) in axes {
        let mut series = Vec::new();
        for (algo, rs) in &groups {
            let len = rs.iter().map(|r| r.training.len()).min().unwrap_or(0);
            if len == 0 {
                continue;
            }
            let xs: Vec<f64> = (0..len)
                .map(|i| mean_se(&rs.iter().map(|r| x_of(&r.training[i])).collect::<Vec<_>>()).0)
                .collect();
            let (m, se) = curve_mean(
                &rs.iter()
                    .map(|r| r.training.iter().map(|p| p.pass1).collect::<Vec<_>>())
                    .collect::<Vec<_>>()
                    .iter()
                    .map(Vec::as_slice)
                    .collect::<Vec<_>>(),
            );
            series.push(Series::new(algo.clone(), algo_color(algo), xs.into_iter().zip(m).collect()).with_band(se));
        }
        if !series.is_empty() {
            line_chart(
                &dir.join(file),
                &format!("Held-out pass@1 during RL{title_suffix}"),
                x_label,
                "pass@1",
                &series,
                None,
            )?;
            files.push(file.to_string());
        }
    }
    Ok(files)
}
