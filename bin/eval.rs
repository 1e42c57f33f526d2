//! `eval`: evaluate finished runs on their task's held-out set: pass@1 at the training budget
//! and past it (budget forcing), anytime accuracy against episodes and tokens, cumulative
//! regret, maj@k against tokens and where episodes made no progress. Writes `eval.json` and
//! SVG plots into each run directory; with several runs (or `--compare`) also overlays them.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::AutodiffBackend;
use clap::Parser;
use mrt::backend::{dispatch, exit_code, tune_allocator, BackendTask, DeviceChoice};
use mrt::rl::config::{Algo, RunConfig};
use mrt::rl::eval::compare::{table, verdicts, RunEval};
use mrt::rl::eval::experiment::evaluate_run;
use mrt::rl::eval::figures::plots;
use mrt::rl::eval::pretrained::evaluate_pretrained;
use mrt::rl::eval::report::{EvalReport, ReportOptions};

/// Evaluate runs (and compare them).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Run directories (each with checkpoints/final.ckpt).
    #[arg(required_unless_present = "model", value_name = "RUN_DIR")]
    runs: Vec<PathBuf>,
    /// Instead of runs: a pretrained model (a Hugging Face directory or a GGUF file),
    /// evaluated as it is on --task math --data FILE (results in --out).
    #[arg(long, value_name = "DIR|FILE.gguf", conflicts_with = "runs")]
    model: Option<PathBuf>,
    /// The text task of --model.
    #[arg(long, default_value = "math")]
    task: String,
    /// The math task's problems (JSONL) for --model.
    #[arg(long, value_name = "FILE")]
    data: Option<PathBuf>,
    /// With --model: a JSON file whose fields override the evaluation's config (as `train
    /// --config`), e.g. {"eval": {"temperature": 0, "max_tokens": 384}, "task": {"format": {"answer": "gsm8k"}}}.
    #[arg(long, value_name = "FILE", requires = "model")]
    config: Option<PathBuf>,
    /// Overlay the runs in comparison plots and print the comparison table.
    #[arg(long)]
    compare: bool,
    /// Where comparison plots go.
    #[arg(long, default_value = "runs/compare")]
    out: PathBuf,
    /// auto, cpu, wgpu or cuda.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Held-out problems.
    #[arg(long, default_value_t = 96)]
    problems: usize,
    /// Samples per problem at the training budget (maj@k goes up to this; at most 16).
    #[arg(long, default_value_t = 8)]
    samples: usize,
    /// Samples per problem past the budget (budget forcing); 0 with --model skips those two
    /// evaluations (pass@1 and regret at the budget only: one evaluation instead of three).
    #[arg(long, default_value_t = 2)]
    extended_samples: usize,
    /// Seed of the evaluation's sampling.
    #[arg(long, default_value_t = 1234)]
    seed: u64,
}

struct Job(Vec<PathBuf>, ReportOptions);

/// `eval --model`: one pretrained model directory.
struct Pretrained(PathBuf, RunConfig, ReportOptions, PathBuf);

impl BackendTask for Pretrained {
    type Output = mrt::Result<EvalReport>;
    fn run<B: AutodiffBackend>(self, device: B::Device, label: String) -> Self::Output {
        eprintln!("device: {label}");
        evaluate_pretrained::<B>(&self.0, &self.1, &self.2, &self.3, &device)
    }
}

impl BackendTask for Job {
    type Output = mrt::Result<Vec<RunEval>>;
    fn run<B: AutodiffBackend>(self, device: B::Device, label: String) -> Self::Output {
        eprintln!("device: {label}");
        self.0
            .iter()
            .map(|dir| evaluate_run::<B>(dir, &self.1, None, 0, &device))
            .collect()
    }
}

fn run(args: Args) -> Result<()> {
    if args.samples == 0 || args.samples > 16 || args.problems == 0 {
        bail!("--samples must be in 1..=16 and --problems positive");
    }
    if args.extended_samples == 0 && args.model.is_none() {
        bail!(
            "--extended-samples 0 (no evaluation past the budget) is for --model only: a run's report plots those \
            curves"
        );
    }
    for r in &args.runs {
        if !r.is_dir() {
            bail!("{}: not a directory", r.display());
        }
    }
    let choice: DeviceChoice = args.device.parse()?;
    let mut opts = ReportOptions {
        problems: args.problems,
        samples: args.samples,
        extended_samples: args.extended_samples,
        seed: args.seed,
        samples_file: None,
        progress: true,
    };
    if let Some(dir) = &args.model {
        if !dir.is_dir() && !mrt::gguf::is_gguf(dir) {
            bail!("--model {}: neither a model directory nor a GGUF file", dir.display());
        }
        let mut patch = match &args.config {
            Some(file) => RunConfig::read_patch(file)?,
            None => serde_json::json!({}),
        };
        if let Some(data) = &args.data {
            if !data.is_file() {
                bail!("--data {}: file not found", data.display());
            }
            let task = serde_json::json!({ "name": args.task, "data": data });
            mrt::rl::config::merge_json(&mut patch, serde_json::json!({ "task": task }));
        }
        let patch = Some(patch);
        let config = RunConfig::pretrained_with_patch(&args.task, dir, Algo::Grpo, args.seed, patch)?;
        opts.samples_file = Some(args.out.join("samples.jsonl"));
        std::fs::create_dir_all(&args.out).with_context(|| args.out.display().to_string())?;
        let report = dispatch(choice, Pretrained(dir.clone(), config, opts, args.out.clone()))??;
        let n = &report.natural;
        println!(
            "{}: pass@1 {:.3} | answered {:.2} | episodes {:.2} | tokens {:.1} (solved {:.1}) | regret {:.3} | \
                forced well-formed {:.3} | eval.json in {}",
            dir.display(),
            n.pass1,
            n.answered,
            n.mean_episodes,
            n.mean_tokens,
            n.tokens_to_solve,
            n.regret,
            n.forced_well_formed,
            args.out.display()
        );
        return Ok(());
    }
    let evals = dispatch(choice, Job(args.runs.clone(), opts))??;
    for (dir, e) in args.runs.iter().zip(&evals) {
        let (b, f) = (&e.base.natural, &e.fine_tuned.natural);
        println!(
            "{}: {} seed {} | pass@1 {:.3} → {:.3} | regret {:.3} → {:.3} | tokens to solve {:.1} → {:.1} | \
                eval.json, eval_samples.jsonl and plots written",
            dir.display(),
            e.algo,
            e.seed,
            b.pass1,
            f.pass1,
            b.regret,
            f.regret,
            b.tokens_to_solve,
            f.tokens_to_solve
        );
    }
    if args.compare || evals.len() > 1 {
        let files = plots(&args.out, &evals, "")?;
        println!("\n{}", table(&evals));
        println!("{}", verdicts(&evals));
        println!("comparison plots in {}: {}", args.out.display(), files.join(", "));
    }
    Ok(())
}

fn main() -> ExitCode {
    tune_allocator();
    exit_code(run(Args::parse()))
}
