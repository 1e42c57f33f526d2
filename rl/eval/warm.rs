//! The warm starts of an experiment: each regime's shared warm-start runs (used by the headline
//! runs and the α sweep), their cached evaluations, and the order they are started in.

use std::path::{Path, PathBuf};

use burn::tensor::backend::AutodiffBackend;

use super::experiment::{ensure_run, report_options, ExperimentOptions};
use super::jobs::{run_costliest_first, Job};
use super::report::{evaluate_report, EvalReport, ReportOptions};
use crate::data::Split;
use crate::error::{Error, Result};
use crate::fsutil::{read_json, write_json};
use crate::model::checkpoint;
use crate::rl::config::RunConfig;
use crate::rl::run::RunDir;

/// The shared warm start of seed `w` (in the regime's directory, shared by the headline runs
/// and the sweep) and its evaluation on `split` (both cached there).
pub(super) fn warm_start<B: AutodiffBackend>(
    opts: &ExperimentOptions,
    w: u64,
    report: &ReportOptions,
    split: Split,
    device: &B::Device,
) -> Result<(PathBuf, EvalReport)> {
    let dir = opts.out.join(format!("warm-start-{w}"));
    let mut cfg = opts.regime.run_config(&opts.regime.algos[0], w)?;
    cfg.rl.steps = 0;
    ensure_run::<B>(cfg, &dir, None, device)?;
    let run = RunDir::new(&dir);
    let ckpt = run.checkpoint("warm_start");
    let cached = dir.join(format!(
        "eval_base_{}_{}x{}.json",
        if split == Split::HeldOut {
            "held_out"
        } else {
            "validation"
        },
        report.problems,
        report.samples
    ));
    let base = match read_json::<EvalReport>(&cached) {
        Ok(b) => b,
        Err(_) => {
            let b = evaluate_report_on::<B>(&run, &ckpt, report, split, device)?;
            write_json(&cached, &b)?;
            b
        }
    };
    Ok((ckpt, base))
}

/// Evaluates a checkpoint of a run on `split` whatever split its config names.
fn evaluate_report_on<B: AutodiffBackend>(
    run: &RunDir,
    ckpt: &Path,
    opts: &ReportOptions,
    split: Split,
    device: &B::Device,
) -> Result<EvalReport> {
    let (mut config, tokens) = run.open()?;
    config.eval.split = split;
    let task = config.task.build()?;
    let protocol = tokens.protocol(task.as_ref(), &config.task)?;
    let model = checkpoint::load(ckpt, Some(&config.model))?.model::<B::InnerBackend>(device)?;
    evaluate_report(&model, task.as_ref(), protocol.as_ref(), &config, opts)
}

/// Every warm start of every regime given, with its held-out evaluation (both cached in the
/// regime's directory), side by side: per regime, (warm-start seed, checkpoint, evaluation).
pub fn warm_starts<B: AutodiffBackend>(
    list: &[ExperimentOptions],
    workers: usize,
    device: &B::Device,
) -> Result<Vec<Vec<(u64, PathBuf, EvalReport)>>> {
    let jobs: Vec<(u64, Job<(PathBuf, EvalReport)>)> = warm_start_list(list)?
        .into_iter()
        .map(|(cost, r, _, w)| {
            let opts = &list[r];
            let job: Job<(PathBuf, EvalReport)> =
                Box::new(move || warm_start::<B>(opts, w, &report_options(&opts.regime), Split::HeldOut, device));
            (cost, job)
        })
        .collect();
    let mut done = run_costliest_first(jobs, workers)?.into_iter();
    Ok(list
        .iter()
        .map(|o| {
            o.regime
                .warm_start_seeds
                .iter()
                .map(|&w| {
                    let (c, e) = done.next().expect("one per warm start");
                    (w, c, e)
                })
                .collect()
        })
        .collect())
}

/// Every warm start of the regimes given, in regime order, as (cost, regime index, index in
/// the regime's `warm_start_seeds`, seed); creates the regimes' directories.
pub(super) fn warm_start_list(list: &[ExperimentOptions]) -> Result<Vec<(u64, usize, usize, u64)>> {
    let mut out = Vec::new();
    for (r, opts) in list.iter().enumerate() {
        std::fs::create_dir_all(&opts.out).map_err(|e| Error::io(&opts.out, e))?;
        for (i, &w) in opts.regime.warm_start_seeds.iter().enumerate() {
            out.push((
                warm_start_cost(&opts.regime.run_config(&opts.regime.algos[0], w)?),
                r,
                i,
                w,
            ));
        }
    }
    Ok(out)
}

/// A warm start's cost in token slots: steps × batch × the longest trace. On the 2-core CPU
/// this orders the committed regimes as their times do (countdown 3000 · 32 · 120 at ≈ 0.3 s
/// a step; search and search-tight ≈ 3000 · 32 · 48 and · 40 at ≈ 0.1 s).
fn warm_start_cost(config: &RunConfig) -> u64 {
    (config.warm_start.steps * config.warm_start.batch_size * config.rl.rollout.max_tokens) as u64
}
