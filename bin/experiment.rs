//! `experiment`: the MRT-vs-GRPO experiment in one command. Warm start once, fine-tune with
//! each algorithm for several seeds from that warm start, evaluate every run on the same
//! held-out set and write `REPORT.md` (mean ± standard error over seeds) with plots.
//! Interrupted experiments continue where they stopped when re-run with the same `--out`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use burn::tensor::backend::AutodiffBackend;
use clap::Parser;
use mrt::backend::{dispatch, exit_code, tune_allocator, BackendTask, DeviceChoice};
use mrt::rl::config::{Algo, RunConfig};
use mrt::rl::experiment::{run_experiment, ExperimentOptions};
use mrt::rl::report::ReportOptions;

/// Compare MRT with GRPO (or any algorithms) over seeds from one shared warm start.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Task family: search or countdown.
    #[arg(long, default_value = "search")]
    task: String,
    /// Model preset: cpu-tiny, tiny, small.
    #[arg(long, default_value = "cpu-tiny")]
    preset: String,
    /// Algorithms, comma-separated.
    #[arg(long, default_value = "grpo,mrt-dense,mrt", value_delimiter = ',')]
    algos: Vec<String>,
    /// Number of RL seeds (1, 2, …).
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    /// auto, cpu, wgpu or cuda.
    #[arg(long, default_value = "auto")]
    device: String,
    /// JSON overrides of the run config (as for `train --config`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Warm-start steps (override).
    #[arg(long)]
    warm_start_steps: Option<usize>,
    /// RL steps per run (override).
    #[arg(long)]
    rl_steps: Option<usize>,
    /// Held-out problems in the final evaluation.
    #[arg(long, default_value_t = 96)]
    problems: usize,
    /// Samples per problem in the final evaluation (maj@k goes up to this; at most 16).
    #[arg(long, default_value_t = 8)]
    samples: usize,
    /// Output directory (default: runs/experiment-{task}).
    #[arg(long)]
    out: Option<PathBuf>,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

struct Job(ExperimentOptions);

impl BackendTask for Job {
    type Output = mrt::Result<PathBuf>;
    fn run<B: AutodiffBackend>(mut self, device: B::Device, label: String) -> Self::Output {
        eprintln!("device: {label}");
        self.0.device_label = label;
        run_experiment::<B>(&self.0, &device)
    }
}

fn run(args: Args) -> Result<()> {
    let algos: Vec<Algo> = args.algos.iter().map(|a| Algo::parse(a)).collect::<mrt::Result<_>>()?;
    if args.seeds == 0 || args.samples == 0 || args.samples > 16 {
        anyhow::bail!("--seeds must be positive and --samples in 1..=16");
    }
    let patch = args.config.as_deref().map(RunConfig::read_patch).transpose()?;
    let mut config = RunConfig::with_patch(&args.task, &args.preset, algos[0], 0, true, patch)?;
    if let Some(n) = args.warm_start_steps {
        config.warm_start.steps = n;
    }
    if let Some(n) = args.rl_steps {
        config.rl.steps = n;
    }
    config.validate()?;
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from(format!("runs/experiment-{}", args.task)));
    let opts = ExperimentOptions {
        config,
        algos,
        seeds: (0..args.seeds).collect(),
        out,
        report: ReportOptions { problems: args.problems, samples: args.samples, extended_samples: 2, seed: 1234 },
        quiet: args.quiet,
        device_label: String::new(),
        command: std::env::args().map(|a| if a.contains(' ') { format!("'{a}'") } else { a }).collect::<Vec<_>>().join(" "),
    };
    let report = dispatch(args.device.parse::<DeviceChoice>()?, Job(opts))??;
    println!("{}", std::fs::read_to_string(&report).unwrap_or_default());
    println!("report: {}", report.display());
    Ok(())
}

fn main() -> ExitCode {
    tune_allocator();
    exit_code(run(Args::parse()))
}
