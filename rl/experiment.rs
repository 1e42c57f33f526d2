//! Evaluating finished runs, and the MRT-vs-GRPO experiment: one warm start, then every
//! algorithm from it for several seeds, all evaluated on the same held-out set, compared in
//! `REPORT.md` with plots. Re-running skips the runs and evaluations already done.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::backend::AutodiffBackend;
use serde_json::Value;

use super::compare::{plots, table, RunEval};
use super::config::{Algo, RunConfig};
use super::metrics::read_metrics;
use super::pipeline::{run_pipeline, PipelineOptions};
use super::report::{evaluate_report, EvalReport, ReportOptions};
use super::run::{git_commit, RunDir};
use crate::error::{Error, Result};
use crate::fsutil::{read_json, write_atomic, write_json};
use crate::model::checkpoint;

/// Held-out pass@1 of a run's periodic RL evaluations, from its metrics.
fn eval_curve(run: &RunDir) -> Vec<(f64, f64)> {
    read_metrics(&run.metrics_path())
        .unwrap_or_default()
        .iter()
        .filter(|r| r.get("phase").and_then(Value::as_str) == Some("rl"))
        .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get("eval/pass@1")?.as_f64()?)))
        .collect()
}

/// Evaluates a checkpoint file of a run.
pub fn evaluate_checkpoint<B: AutodiffBackend>(run: &RunDir, path: &Path, opts: &ReportOptions, device: &B::Device) -> Result<EvalReport> {
    let (config, vocab) = run.open()?;
    let task = config.task.build()?;
    let model = checkpoint::load(path, Some(&config.model))?.model::<B::InnerBackend>(device)?;
    evaluate_report(&model, task.as_ref(), &vocab, &config, opts)
}

/// Evaluates a finished run (warm start and final checkpoint), writes `eval.json` and its
/// plots into the run directory. A given `base` report (shared warm start) is reused.
pub fn evaluate_run<B: AutodiffBackend>(run_dir: &Path, opts: &ReportOptions, base: Option<&EvalReport>, device: &B::Device) -> Result<RunEval> {
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
    let fine_tuned = evaluate_checkpoint::<B>(&run, &final_ckpt, opts, device)?;
    let eval = RunEval {
        run: run_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        algo: config.rl.algo.name().to_string(),
        seed: config.seed,
        base,
        fine_tuned,
        training_reward: eval_curve(&run),
    };
    write_json(&run.root.join("eval.json"), &eval)?;
    plots(&run.root, std::slice::from_ref(&eval), &format!(" — {}", eval.run))?;
    Ok(eval)
}

/// What the experiment runs.
#[derive(Debug, Clone)]
pub struct ExperimentOptions {
    /// Config of the warm start and the template of every RL run (algo and seed replaced).
    pub config: RunConfig,
    pub algos: Vec<Algo>,
    pub seeds: Vec<u64>,
    pub out: PathBuf,
    pub report: ReportOptions,
    pub quiet: bool,
    /// Words describing the device, for the report.
    pub device_label: String,
    /// The command line, for the report.
    pub command: String,
}

/// Runs the experiment and writes `REPORT.md`; returns its path.
pub fn run_experiment<B: AutodiffBackend>(opts: &ExperimentOptions, device: &B::Device) -> Result<PathBuf> {
    std::fs::create_dir_all(&opts.out).map_err(|e| Error::io(&opts.out, e))?;
    let t_all = Instant::now();
    let say = |msg: String| {
        if !opts.quiet {
            eprintln!("{msg}");
        }
    };

    // 1. One warm start, shared by every run.
    let ws_dir = opts.out.join("warm-start");
    let ws_ckpt = RunDir::new(&ws_dir).checkpoint("warm_start");
    let t0 = Instant::now();
    if !ws_ckpt.exists() {
        let mut cfg = opts.config.clone();
        cfg.rl.steps = 0;
        let resume = ws_dir.join("config.json").exists();
        say(format!("experiment: warm start → {}", ws_dir.display()));
        run_pipeline::<B>(&PipelineOptions { config: cfg, run_dir: ws_dir.clone(), resume, init: None, quiet: opts.quiet, interrupt_after: None }, device)?;
    }
    let warm_s = t0.elapsed().as_secs_f64();

    // 2. Every algorithm × seed from it.
    let mut run_dirs = Vec::new();
    for &seed in &opts.seeds {
        for &algo in &opts.algos {
            let dir = opts.out.join(format!("{}-s{seed}", algo.name()));
            run_dirs.push(dir.clone());
            if RunDir::new(&dir).checkpoint("final").exists() {
                continue;
            }
            let mut cfg = opts.config.clone();
            cfg.seed = seed;
            cfg.rl.algo = algo;
            let resume = dir.join("config.json").exists();
            say(format!("experiment: {} seed {seed} → {}", algo.name(), dir.display()));
            run_pipeline::<B>(&PipelineOptions { config: cfg, run_dir: dir.clone(), resume, init: Some(ws_ckpt.clone()), quiet: opts.quiet, interrupt_after: None }, device)?;
        }
    }

    // 3. Evaluate everything on the same held-out set (the warm start once).
    say("experiment: evaluating".into());
    let ws_run = RunDir::new(&ws_dir);
    let base_path = opts.out.join("warm-start").join("eval_base.json");
    let base: EvalReport = match read_json(&base_path) {
        Ok(b) => b,
        Err(_) => {
            let b = evaluate_checkpoint::<B>(&ws_run, &ws_ckpt, &opts.report, device)?;
            write_json(&base_path, &b)?;
            b
        }
    };
    let mut evals = Vec::new();
    for dir in &run_dirs {
        let cached: Option<RunEval> = read_json(&dir.join("eval.json")).ok();
        let eval = match cached {
            Some(e) => e,
            None => evaluate_run::<B>(dir, &opts.report, Some(&base), device)?,
        };
        evals.push(eval);
    }

    // 4. Compare and report.
    let files = plots(&opts.out, &evals, &format!(" — {}", opts.config.task.name()))?;
    let report = render_report(opts, &evals, &files, warm_s, t_all.elapsed().as_secs_f64());
    let path = opts.out.join("REPORT.md");
    write_atomic(&path, report.as_bytes())?;
    write_json(&opts.out.join("evals.json"), &evals)?;
    Ok(path)
}

/// Seconds a run spent in training steps and evaluations, from its metrics (so the figure
/// survives resumes and cached re-renders of the report).
fn run_seconds(dir: &Path) -> f64 {
    read_metrics(&RunDir::new(dir).metrics_path())
        .unwrap_or_default()
        .iter()
        .map(|r| r.get("perf/step_s").and_then(Value::as_f64).unwrap_or(0.0) + r.get("eval/seconds").and_then(Value::as_f64).unwrap_or(0.0))
        .sum()
}

/// Mean RL step time of the runs of an algorithm, from their metrics.
fn mean_step_seconds(out: &Path, algo: &str, seeds: &[u64]) -> Option<f64> {
    let mut v = Vec::new();
    for s in seeds {
        let m = read_metrics(&RunDir::new(out.join(format!("{algo}-s{s}"))).metrics_path()).ok()?;
        v.extend(m.iter().filter(|r| r.get("phase").and_then(Value::as_str) == Some("rl")).filter_map(|r| r.get("perf/step_s")?.as_f64()));
    }
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn render_report(opts: &ExperimentOptions, evals: &[RunEval], files: &[String], warm_s: f64, total_s: f64) -> String {
    let c = &opts.config;
    let mut s = String::new();
    let _ = writeln!(s, "# MRT vs GRPO on `{}`\n", c.task.name());
    let _ = writeln!(s, "Produced by `{}` on {} (git commit {}).\n", opts.command, opts.device_label, git_commit());
    let _ = writeln!(s, "## Setup\n");
    let _ = writeln!(s, "- Task: `{}`", serde_json::to_string(&c.task).unwrap_or_default());
    let _ = writeln!(s, "- Model: preset `{}`, {} parameters (d_model {}, {} layers, {} heads, vocab {}).", c.preset, c.model.num_params(), c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.vocab_size);
    let _ = writeln!(s, "- Warm start: {} steps × {} scripted traces (one shared warm start, seed {}).", c.warm_start.steps, c.warm_start.batch_size, c.seed);
    let _ = writeln!(
        s,
        "- RL: {} steps × {} problems × {} rollouts (for `mrt`: prefixes × continuations, terminate fraction {}), episode budget {}, α = {}, seeds {:?}.",
        c.rl.steps, c.rl.problems_per_step, c.rl.group_size, c.rl.terminate_fraction, c.rl.rollout.max_episodes, c.rl.alpha, opts.seeds
    );
    let _ = writeln!(
        s,
        "- Evaluation: {} held-out problems (never trained on) × {} samples at temperature {}; meta-prover `{:?}`; past the budget (to {} episodes, free to stop and with budget forcing) with {} samples.",
        opts.report.problems, opts.report.samples, c.eval.temperature, c.eval.prover.mode, 2 * c.rl.rollout.max_episodes, opts.report.extended_samples
    );
    if let Ok(task) = c.task.build() {
        let problems = super::eval::eval_problems(task.as_ref(), opts.report.problems);
        let scripted: Vec<String> = task
            .strategies()
            .iter()
            .map(|st| format!("`{st}` {:.3}", super::eval::scripted_pass1(task.as_ref(), &problems, st, opts.report.samples, 7)))
            .collect();
        let _ = writeln!(s, "- Reference points on the same held-out problems, pass@1 within the budget of the scripted strategies the warm-start data mixes: {}.", scripted.join(", "));
        if let Some(first) = evals.first() {
            if let Some(opt) = &first.fine_tuned.natural.optimal {
                let _ = writeln!(s, "- The Bayes-optimal policy (bisection) solves {:.3} within the budget.", opt.last().copied().unwrap_or(f64::NAN));
            }
        }
    }
    let _ = writeln!(s, "\nMean ± standard error over seeds. Regrets are normalised (per episode or token) cumulative regrets over the budget; lower is better.\n");
    let _ = writeln!(s, "## Results\n");
    s.push_str(&table(evals));
    let _ = writeln!(s, "\n## Cost\n");
    let _ = writeln!(
        s,
        "- Warm start: {:.0} s of steps and evaluations; this invocation of `experiment`: {total_s:.0} s (the warm start {warm_s:.0} s of it).",
        run_seconds(&opts.out.join("warm-start"))
    );
    for algo in opts.algos.iter().map(|a| a.name()) {
        let runs: Vec<f64> = opts.seeds.iter().map(|seed| run_seconds(&opts.out.join(format!("{algo}-s{seed}")))).collect();
        let step = mean_step_seconds(&opts.out, algo, &opts.seeds);
        let _ = writeln!(
            s,
            "- `{algo}`: {:.0} s per run (steps and evaluations), {} per RL step.",
            runs.iter().sum::<f64>() / runs.len().max(1) as f64,
            step.map(|x| format!("{:.3} s", x)).unwrap_or_else(|| "n/a".into())
        );
    }
    if let Some(g) = mean_step_seconds(&opts.out, "grpo", &opts.seeds) {
        for variant in ["mrt", "mrt-dense", "mrt-star"] {
            if let Some(m) = mean_step_seconds(&opts.out, variant, &opts.seeds) {
                let _ = writeln!(s, "- One `{variant}` step costs {:.2}× one GRPO step (rollouts, meta-prover and update together).", m / g);
            }
        }
    }
    let _ = writeln!(s, "\n## Plots\n");
    for f in files {
        let _ = writeln!(s, "![{f}]({f})\n");
    }
    s
}
