//! The α sweep (`experiment --sweep`): every algorithm with an α, at each α of the regime's
//! sweep, for the sweep's seeds from the regime's first warm start, evaluated on the
//! *validation* split (never held-out); GRPO beside them for reference. All regimes given share
//! one pool of workers: first their warm starts, then every (regime, setting, seed) run, the
//! costliest objectives first so that the last workers are not left with one long run.
//! Writes `sweep/REPORT.md` and `sweep/choice.json` per regime (α minimising mean validation
//! regret at the training budget, per algorithm).

use std::fmt::Write as _;
use std::path::PathBuf;

use burn::tensor::backend::AutodiffBackend;
use serde_json::Value;

use super::compare::RunEval;
use super::experiment::{ensure_run, evaluate_run, ExperimentOptions, EVAL_SEED};
use super::jobs::{cost_rank, run_all, Job};
use super::report::{EvalReport, ReportOptions};
use super::warm::warm_start;
use crate::data::Split;
use crate::error::{Error, Result};
use crate::fsutil::{read_json, write_atomic, write_json};
use crate::rl::config::merge_json;
use crate::rl::run::git_commit;

/// One sweep run: regime (index into the list), algorithm, α (none for GRPO), seed.
struct Setting {
    regime: usize,
    algo: String,
    alpha: Option<f64>,
    seed: u64,
}

fn report_options(opts: &ExperimentOptions) -> ReportOptions {
    let s = &opts.regime.sweep;
    ReportOptions {
        problems: s.problems,
        samples: s.samples,
        extended_samples: 1,
        seed: EVAL_SEED,
        samples_file: None,
        progress: false,
    }
}

/// Runs the sweep of every regime in `list` and returns the path of each regime's report.
pub fn run_sweeps<B: AutodiffBackend>(
    list: &[ExperimentOptions],
    workers: usize,
    device: &B::Device,
) -> Result<Vec<PathBuf>> {
    // 1. The first warm start of each regime, evaluated on validation.
    let mut jobs: Vec<Job<(PathBuf, EvalReport)>> = Vec::new();
    for opts in list {
        let out = opts.out.join("sweep");
        std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
        let w = opts.regime.warm_start_seeds[0];
        jobs.push(Box::new(move || {
            warm_start::<B>(opts, w, &report_options(opts), Split::Validation, device)
        }));
    }
    let bases = run_all(jobs, workers)?;

    // 2. Every setting and seed of every regime, in one pool.
    let mut settings = Vec::new();
    for (i, opts) in list.iter().enumerate() {
        let r = &opts.regime;
        for spec in &r.algos {
            let alphas: Vec<Option<f64>> = if spec.algo == "grpo" {
                vec![None]
            } else {
                r.sweep.alphas.iter().map(|&a| Some(a)).collect()
            };
            for alpha in alphas {
                for seed in 0..r.sweep.seeds as u64 {
                    settings.push(Setting {
                        regime: i,
                        algo: spec.algo.clone(),
                        alpha,
                        seed,
                    });
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..settings.len()).collect();
    order.sort_by_key(|&k| cost_rank(&settings[k].algo));
    let mut jobs: Vec<Job<RunEval>> = Vec::new();
    for &k in &order {
        let s = &settings[k];
        let opts = &list[s.regime];
        let (ckpt, base) = &bases[s.regime];
        jobs.push(Box::new(move || {
            let regime = &opts.regime;
            let mut spec = regime.algos.iter().find(|a| a.algo == s.algo).expect("listed").clone();
            if let Some(a) = s.alpha {
                if spec.config.is_null() {
                    spec.config = Value::Object(Default::default());
                }
                merge_json(&mut spec.config, serde_json::json!({"rl": {"alpha": a}}));
            }
            let mut config = regime.run_config(&spec, s.seed)?;
            config.eval.split = Split::Validation;
            let tag = s.alpha.map(|a| format!("-a{a}")).unwrap_or_default();
            let dir = opts.out.join("sweep").join(format!("{}{tag}-s{}", s.algo, s.seed));
            ensure_run::<B>(config, &dir, Some(ckpt.clone()), device)?;
            match read_json::<RunEval>(&dir.join("eval.json")) {
                Ok(e) => Ok(e),
                Err(_) => evaluate_run::<B>(
                    &dir,
                    &report_options(opts),
                    Some(base),
                    regime.warm_start_seeds[0],
                    device,
                ),
            }
        }));
    }
    let done = run_all(jobs, workers)?;
    let mut evals: Vec<Option<RunEval>> = (0..settings.len()).map(|_| None).collect();
    for (k, e) in order.into_iter().zip(done) {
        evals[k] = Some(e);
    }

    // 3. One report per regime.
    let mut paths = Vec::new();
    for (i, opts) in list.iter().enumerate() {
        let runs: Vec<(&Setting, RunEval)> = settings
            .iter()
            .zip(evals.iter_mut())
            .filter(|(s, _)| s.regime == i)
            .map(|(s, e)| (s, e.take().expect("every job ran")))
            .collect();
        paths.push(write_report(opts, &runs, &bases[i].1)?);
    }
    Ok(paths)
}

fn write_report(opts: &ExperimentOptions, runs: &[(&Setting, RunEval)], base: &EvalReport) -> Result<PathBuf> {
    let regime = &opts.regime;
    let out = opts.out.join("sweep");
    // (algorithm, α) → per-seed validation pass@1 and regret at the training budget.
    let mut rows: Vec<(String, Option<f64>, Vec<f64>, Vec<f64>)> = Vec::new();
    for (s, e) in runs {
        let row = match rows.iter_mut().position(|r| r.0 == s.algo && r.1 == s.alpha) {
            Some(k) => &mut rows[k],
            None => {
                rows.push((s.algo.clone(), s.alpha, Vec::new(), Vec::new()));
                rows.last_mut().expect("just pushed")
            }
        };
        row.2.push(e.fine_tuned.natural.pass1);
        row.3.push(e.fine_tuned.regret.last().copied().unwrap_or(f64::NAN));
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let mut choice = serde_json::Map::new();
    let mut s = String::new();
    let w = regime.warm_start_seeds[0];
    let _ = writeln!(
        s,
        "# α sweep — regime `{}` (validation split)\n\nProduced by `{}` on {} (git commit {}). \
        Validation problems only: {} × {} samples; {} seeds per setting from warm start {w}. The choice minimises \
            mean validation regret at the training \
                budget.\n",
        regime.name,
        opts.command,
        opts.device_label,
        git_commit(),
        regime.sweep.problems,
        regime.sweep.samples,
        regime.sweep.seeds
    );
    let _ = writeln!(
        s,
        "| algorithm | α | validation pass@1 (per seed) | mean | validation regret at B (per seed) \
        | mean |\n|---|---|---|---|---|---|"
    );
    for (algo, alpha, pass, regret) in &rows {
        let fmt = |v: &[f64]| v.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>().join(", ");
        let _ = writeln!(
            s,
            "| {algo} | {} | {} | {:.3} | {} | {:.3} |",
            alpha.map(|a| a.to_string()).unwrap_or_else(|| "—".into()),
            fmt(pass),
            mean(pass),
            fmt(regret),
            mean(regret)
        );
    }
    for spec in regime.algos.iter().filter(|a| a.algo != "grpo") {
        let best = rows
            .iter()
            .filter(|r| r.0 == spec.algo)
            .min_by(|a, b| mean(&a.3).total_cmp(&mean(&b.3)));
        if let Some((_, Some(alpha), _, regret)) = best {
            choice.insert(spec.algo.clone(), serde_json::json!(alpha));
            let _ = writeln!(
                s,
                "\nChosen for `{}`: α = {alpha} (mean validation regret {:.3}).",
                spec.algo,
                mean(regret)
            );
        }
    }
    let _ = writeln!(
        s,
        "\nWarm start on validation: pass@1 {:.3}, regret at B {:.3}.",
        base.natural.pass1,
        base.regret.last().copied().unwrap_or(f64::NAN)
    );
    write_json(&out.join("choice.json"), &Value::Object(choice))?;
    let path = out.join("REPORT.md");
    write_atomic(&path, s.as_bytes())?;
    Ok(path)
}
