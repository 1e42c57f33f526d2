//! The MRT-vs-GRPO experiment over a regime (`regime.rs`): warm starts, every algorithm × RL
//! seed from them (paired: same warm start and seed, hence the same problems at every step),
//! every checkpoint evaluated on the same held-out problems at 1× and 2× the training budget,
//! and `REPORT.md` with intervals, verdicts fixed in advance (`compare.rs`), diagnostics, costs
//! and plots. `--sweep` (`sweep.rs`) instead chooses α on the validation split. Re-running continues where
//! an interrupted experiment stopped: finished runs and evaluations are reused.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::compare::{by_algo, interval, learns, versus, RunEval, TrainPoint, Versus};
use super::figures::plots;
use super::jobs::{cost_rank, run_when_ready, Job};
use super::regime::Regime;
pub use super::render::render_overview;
use super::render::render_report;
use super::report::{evaluate_report, EvalReport, ReportOptions};
use super::stats::{Interval, Verdict};
pub use super::warm::warm_starts;
use super::warm::{warm_start, warm_start_list};
use crate::data::Split;
use crate::error::{Error, Result};
use crate::fsutil::{read_json, write_atomic, write_json};
use crate::model::checkpoint;
use crate::rl::config::RunConfig;
use crate::rl::metrics::read_metrics;
use crate::rl::pipeline::{run_pipeline, PipelineOptions};
use crate::rl::run::{RunDir, SavedConfig};

/// Seed of every evaluation's sampling: the same for every checkpoint, so evaluations pair.
pub(super) const EVAL_SEED: u64 = 1234;

/// What to run.
#[derive(Debug, Clone)]
pub struct ExperimentOptions {
    pub regime: Regime,
    /// The regime's directory (runs, evaluations, `REPORT.md`).
    pub out: PathBuf,
    pub quiet: bool,
    /// Words describing the device, for the report.
    pub device_label: String,
    /// The command line, for the report.
    pub command: String,
}

/// What a regime's experiment concluded (`summary.json`; `--regime all` tabulates these).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegimeSummary {
    pub regime: String,
    pub about: String,
    /// Per algorithm: seeds, mean held-out pass@1 of the warm starts, fine-tuned pass@1 and
    /// gain with intervals, verdict 1.
    pub algos: Vec<AlgoSummary>,
    pub versus: Vec<Versus>,
    pub minutes: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AlgoSummary {
    pub algo: String,
    pub seeds: usize,
    pub base_pass1: f64,
    pub pass1: Option<Interval>,
    pub gain: Option<Interval>,
    pub regret: Option<Interval>,
    pub learns: Verdict,
}

fn say(opts: &ExperimentOptions, msg: String) {
    if !opts.quiet {
        eprintln!("{msg}");
    }
}

/// Evaluates one checkpoint of a run directory on its config's evaluation split.
pub fn evaluate_checkpoint<B: AutodiffBackend>(
    run: &RunDir,
    path: &Path,
    opts: &ReportOptions,
    device: &B::Device,
) -> Result<EvalReport> {
    let (config, tokens) = run.open()?;
    let task = config.task.build()?;
    let protocol = tokens.protocol(task.as_ref(), &config.task)?;
    let model = checkpoint::load(path, Some(&config.model))?.model::<B::InnerBackend>(device)?;
    evaluate_report(&model, task.as_ref(), protocol.as_ref(), &config, opts)
}

/// A run's held-out pass@1 during RL with the tokens and seconds spent up to each evaluation.
pub fn training_curve(run: &RunDir) -> Vec<TrainPoint> {
    let records = read_metrics(&run.metrics_path()).unwrap_or_default();
    let (mut tokens, mut seconds) = (0.0, 0.0);
    let mut curve = Vec::new();
    for r in records
        .iter()
        .filter(|r| r.get("phase").and_then(Value::as_str) == Some("rl"))
    {
        tokens += r.get("perf/sampled_tokens").and_then(Value::as_f64).unwrap_or(0.0);
        seconds += r.get("perf/step_s").and_then(Value::as_f64).unwrap_or(0.0);
        if let (Some(step), Some(pass1)) = (
            r.get("step").and_then(Value::as_f64),
            r.get("eval/pass@1").and_then(Value::as_f64),
        ) {
            curve.push(TrainPoint {
                step,
                pass1,
                sampled_tokens: tokens,
                seconds,
            });
        }
    }
    curve
}

/// Evaluates a finished run (its warm start and final checkpoint), writes `eval.json`, the
/// fine-tuned model's completions (`eval_samples.jsonl`: what it wrote, episode by episode, with
/// J and the reward) and the plots into the run directory. A given `base` report (a shared warm
/// start's) is reused.
pub fn evaluate_run<B: AutodiffBackend>(
    run_dir: &Path,
    opts: &ReportOptions,
    base: Option<&EvalReport>,
    warm_start: u64,
    device: &B::Device,
) -> Result<RunEval> {
    let run = RunDir::new(run_dir);
    let (config, _) = run.open()?;
    let final_ckpt = run.checkpoint("final");
    if !final_ckpt.exists() {
        return Err(Error::config(
            "run",
            run_dir.display(),
            "has no checkpoints/final.ckpt: the run has not finished (continue it with `train --resume`)",
        ));
    }
    let base = match base {
        Some(b) => b.clone(),
        None => evaluate_checkpoint::<B>(&run, &run.checkpoint("warm_start"), opts, device)?,
    };
    let with_samples = ReportOptions {
        samples_file: Some(run.root.join("eval_samples.jsonl")),
        ..opts.clone()
    };
    let fine_tuned = evaluate_checkpoint::<B>(&run, &final_ckpt, &with_samples, device)?;
    let eval = RunEval {
        run: run_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        algo: config.rl.algo.name().to_string(),
        seed: config.seed,
        warm_start,
        base,
        fine_tuned,
        training: training_curve(&run),
    };
    write_json(&run.root.join("eval.json"), &eval)?;
    plots(&run.root, std::slice::from_ref(&eval), &format!(" — {}", eval.run))?;
    Ok(eval)
}

/// Runs the pipeline into `dir` unless it has finished there already (an interrupted run is
/// resumed).
pub(super) fn ensure_run<B: AutodiffBackend>(
    config: RunConfig,
    dir: &Path,
    init: Option<PathBuf>,
    device: &B::Device,
) -> Result<()> {
    let resume = dir.join("config.json").exists();
    if resume {
        // Reuse only what this very config made: a regime edited since must not be mixed
        // with runs of its old version. A warm start depends on the seed, task, model and
        // warm-start settings only, so editing the RL settings keeps it.
        let saved: SavedConfig = read_json(&dir.join("config.json"))?;
        let identity = |c: &RunConfig| {
            let v = serde_json::to_value(c).ok();
            if c.rl.steps > 0 {
                return v;
            }
            v.map(|v| serde_json::json!([v["seed"], v["task"], v["model"], v["warm_start"]]))
        };
        if identity(&saved.config) != identity(&config) {
            return Err(Error::config(
                "experiment output",
                dir.display(),
                "holds a run made with a different configuration (the regime changed?): remove it or pass another \
                    --out",
            ));
        }
    }
    let done = if config.rl.steps == 0 {
        RunDir::new(dir).checkpoint("warm_start")
    } else {
        RunDir::new(dir).checkpoint("final")
    };
    if done.exists() {
        return Ok(());
    }
    // Runs go side by side: their progress bars would garble each other, so the experiment
    // prints one line per finished run instead.
    run_pipeline::<B>(
        &PipelineOptions {
            resume,
            init,
            quiet: true,
            final_eval: false,
            ..PipelineOptions::new(config, dir)
        },
        device,
    )?;
    Ok(())
}

pub(super) fn report_options(r: &Regime) -> ReportOptions {
    ReportOptions {
        problems: r.report.problems,
        samples: r.report.samples,
        extended_samples: r.report.extended_samples,
        seed: EVAL_SEED,
        samples_file: None,
        progress: false,
    }
}

/// Runs the headline experiment of every regime given and writes each regime's `REPORT.md` and
/// `summary.json`. Everything shares one queue of `workers`: the warm starts first (longest
/// first), then every algorithm × seed with its evaluation (costliest objectives first), each
/// RL run waiting only for its own warm start. So a worker that finds no warm start left to
/// take trains RL runs of a regime whose warm start is done instead of idling until the last
/// warm start ends (≈ 3.5 min of one worker on the 2-core CPU when they were two phases).
pub fn run_regimes<B: AutodiffBackend>(
    list: &[ExperimentOptions],
    workers: usize,
    device: &B::Device,
) -> Result<Vec<RegimeSummary>> {
    let t0 = Instant::now();

    // 1. Warm starts and their evaluations, filled in by their jobs for the RL jobs to read;
    // `warm_job[r][i]`: the job of regime r's i-th warm start.
    let bases: Vec<Vec<OnceLock<(PathBuf, EvalReport)>>> = list
        .iter()
        .map(|o| o.regime.warm_start_seeds.iter().map(|_| OnceLock::new()).collect())
        .collect();
    let mut warm = warm_start_list(list)?;
    warm.sort_by_key(|&(cost, ..)| std::cmp::Reverse(cost));
    let mut jobs: Vec<(Vec<usize>, Job<Option<RunEval>>)> = Vec::new();
    let mut warm_job: Vec<Vec<usize>> = bases.iter().map(|b| vec![0; b.len()]).collect();
    for &(_, r, i, w) in &warm {
        let (opts, cell) = (&list[r], &bases[r][i]);
        warm_job[r][i] = jobs.len();
        jobs.push((
            Vec::new(),
            Box::new(move || {
                let _ = cell.set(warm_start::<B>(
                    opts,
                    w,
                    &report_options(&opts.regime),
                    Split::HeldOut,
                    device,
                )?);
                Ok(None)
            }),
        ));
    }

    // 2. Every algorithm × seed, each evaluated as soon as it has trained.
    let total: usize = list
        .iter()
        .map(|o| o.regime.rl_seeds as usize * o.regime.algos.len())
        .sum();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let mut order = Vec::new();
    for (r, opts) in list.iter().enumerate() {
        for seed in 0..opts.regime.rl_seeds {
            for (a, spec) in opts.regime.algos.iter().enumerate() {
                order.push((cost_rank(&spec.algo), r, seed, a));
            }
        }
    }
    // Costliest objectives first, so that the last jobs to finish are short ones; results are
    // put back in (regime, seed, algorithm) order below.
    order.sort_by_key(|o| o.0);
    let first_rl = jobs.len();
    for &(_, r, seed, a) in &order {
        let (opts, done) = (&list[r], &done);
        let (regime, spec) = (&opts.regime, &opts.regime.algos[a]);
        let i = (seed as usize) % regime.warm_start_seeds.len();
        let (w, cell) = (regime.warm_start_seeds[i], &bases[r][i]);
        let needs = vec![warm_job[r][i]];
        let report = report_options(regime);
        jobs.push((
            needs,
            Box::new(move || {
                let t = Instant::now();
                let (ckpt, base) = cell.get().expect("the warm start finished before its RL runs");
                let dir = opts.out.join(format!("{}-s{seed}", spec.algo));
                ensure_run::<B>(regime.run_config(spec, seed)?, &dir, Some(ckpt.clone()), device)?;
                let eval = match read_json::<RunEval>(&dir.join("eval.json")) {
                    Ok(e) => e,
                    Err(_) => evaluate_run::<B>(&dir, &report, Some(base), w, device)?,
                };
                let n = done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                say(
                    opts,
                    format!(
                        "[{n}/{total}] {} {}-s{seed}: pass@1 {:.3} → {:.3} ({:.0} s)",
                        regime.name,
                        spec.algo,
                        eval.base.natural.pass1,
                        eval.fine_tuned.natural.pass1,
                        t.elapsed().as_secs_f64()
                    ),
                );
                Ok(Some(eval))
            }),
        ));
    }
    let results = run_when_ready(jobs, workers)?;
    let rl = results
        .into_iter()
        .skip(first_rl)
        .map(|e| e.expect("an RL job's evaluation"));
    let mut finished: Vec<_> = order.iter().map(|o| (o.1, o.2, o.3)).zip(rl).collect();
    finished.sort_by_key(|f| f.0);
    let mut evals = finished.into_iter().map(|f| f.1);

    // 3. Per regime: plots, comparison, report.
    let minutes = t0.elapsed().as_secs_f64() / 60.0;
    let mut summaries = Vec::new();
    for opts in list {
        let regime = &opts.regime;
        let runs: Vec<RunEval> = evals
            .by_ref()
            .take(regime.rl_seeds as usize * regime.algos.len())
            .collect();
        let files = plots(&opts.out, &runs, &format!(" — {}", regime.name))?;
        write_json(&opts.out.join("evals.json"), &runs)?;
        let summary = summarize(regime, &runs, minutes);
        let text = render_report(opts, &runs, &summary, &files);
        write_atomic(&opts.out.join("REPORT.md"), text.as_bytes())?;
        write_json(&opts.out.join("summary.json"), &summary)?;
        summaries.push(summary);
    }
    Ok(summaries)
}

fn summarize(regime: &Regime, evals: &[RunEval], minutes: f64) -> RegimeSummary {
    let groups = by_algo(evals);
    let mut algos = Vec::new();
    for spec in &regime.algos {
        let Some(rs) = groups.get(&spec.algo) else { continue };
        let (gain, verdict) = learns(rs);
        algos.push(AlgoSummary {
            algo: spec.algo.clone(),
            seeds: rs.len(),
            base_pass1: rs.iter().map(|r| r.base.natural.pass1).sum::<f64>() / rs.len() as f64,
            pass1: interval(rs, &super::compare::pass1),
            gain,
            regret: interval(rs, &super::compare::regret_at_budget),
            learns: verdict,
        });
    }
    let versus_all = match groups.get("grpo") {
        Some(grpo) => regime
            .algos
            .iter()
            .filter(|a| a.algo != "grpo")
            .filter_map(|a| groups.get(&a.algo).map(|rs| versus(grpo, rs, &a.algo)))
            .collect(),
        None => Vec::new(),
    };
    RegimeSummary {
        regime: regime.name.clone(),
        about: regime.about.clone(),
        algos,
        versus: versus_all,
        minutes,
    }
}
