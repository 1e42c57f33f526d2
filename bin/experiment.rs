//! `experiment`: the MRT-vs-GRPO experiment in one command, over named regimes (the JSON files
//! in `experiments/`): warm starts, every algorithm × RL seed from them, every checkpoint
//! evaluated on the same held-out problems, and `REPORT.md` with 95 % intervals, paired
//! differences and the verdicts fixed in advance. `--sweep` chooses α on the validation split
//! instead. Interrupted experiments continue where they stopped when re-run with the same `--out`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::AutodiffBackend;
use clap::Parser;
use mrt::backend::{dispatch, exit_code, tune_allocator, BackendTask, DeviceChoice};
use mrt::rl::eval::experiment::{render_overview, run_regimes, warm_starts, ExperimentOptions, RegimeSummary};
use mrt::rl::eval::regime::{names, Regime};
use mrt::rl::eval::sweep::run_sweeps;

/// Compare MRT with GRPO over seeds, per regime, with intervals and pre-registered verdicts.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Regime: search, search-tight, countdown, or all (the three in turn, then an overview).
    #[arg(long, default_value = "all")]
    regime: String,
    /// A regime of your own: a JSON file in the format of experiments/*.json (overrides --regime).
    #[arg(long, value_name = "FILE")]
    regime_file: Option<PathBuf>,
    /// Choose α on the validation split (writes sweep/REPORT.md and sweep/choice.json) instead
    /// of running the headline experiment.
    #[arg(long)]
    sweep: bool,
    /// Only the warm starts and their held-out evaluations (cached in each regime's folder),
    /// e.g. to prepare them once for the sweep and the headline runs, or to copy elsewhere.
    #[arg(long, conflicts_with = "sweep")]
    warm_starts: bool,
    /// Smoke mode: every stage with tiny step counts and two seeds (the numbers mean nothing).
    #[arg(long)]
    quick: bool,
    /// RL seeds per algorithm (override of the regime's).
    #[arg(long)]
    seeds: Option<u64>,
    /// auto, cpu, wgpu or cuda.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Runs side by side, each on one thread (default: the CPU's cores on the CPU, 1 on a GPU).
    /// Results do not depend on it.
    #[arg(long)]
    jobs: Option<usize>,
    /// Output directory; each regime gets a folder inside it.
    #[arg(long, default_value = "runs/experiment")]
    out: PathBuf,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

struct Job {
    regimes: Vec<Regime>,
    args: Args,
    command: String,
}

impl BackendTask for Job {
    type Output = mrt::Result<()>;
    fn run<B: AutodiffBackend>(self, device: B::Device, label: String) -> Self::Output {
        let cpu = label.starts_with("cpu");
        let workers = self.args.jobs.unwrap_or(if cpu {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        } else {
            1
        });
        let label = if cpu {
            format!("cpu (flex; {workers} runs side by side, one thread each)")
        } else {
            label
        };
        eprintln!("device: {label}");
        let t0 = Instant::now();
        let list: Vec<ExperimentOptions> = self
            .regimes
            .into_iter()
            .map(|regime| ExperimentOptions {
                out: self.args.out.join(&regime.name),
                regime,
                quiet: self.args.quiet,
                device_label: label.clone(),
                command: self.command.clone(),
            })
            .collect();
        let mut summaries: Vec<RegimeSummary> = Vec::new();
        if self.args.warm_starts {
            for (opts, starts) in list.iter().zip(warm_starts::<B>(&list, workers, &device)?) {
                for (w, ckpt, eval) in starts {
                    println!(
                        "{} warm start {w}: held-out pass@1 {:.3} ({})",
                        opts.regime.name,
                        eval.natural.pass1,
                        ckpt.display()
                    );
                }
            }
        } else if self.args.sweep {
            for report in run_sweeps::<B>(&list, workers, &device)? {
                println!("{}", std::fs::read_to_string(&report).unwrap_or_default());
                println!("sweep report: {}", report.display());
            }
        } else {
            summaries = run_regimes::<B>(&list, workers, &device)?;
            for opts in &list {
                println!("report: {}", opts.out.join("REPORT.md").display());
            }
        }
        if !summaries.is_empty() {
            let overview = render_overview(&summaries, &self.command, &label, t0.elapsed().as_secs_f64() / 60.0);
            if summaries.len() > 1 {
                let path = self.args.out.join("REPORT.md");
                mrt::fsutil::write_atomic(&path, overview.as_bytes())?;
                println!("overview: {}", path.display());
            }
            println!("\n{overview}");
        }
        Ok(())
    }
}

fn run(args: Args) -> Result<()> {
    let mut regimes = match &args.regime_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("--regime-file {}", path.display()))?;
            vec![Regime::parse(&text, &path.display().to_string())?]
        }
        None if args.regime == "all" => names().into_iter().map(Regime::named).collect::<mrt::Result<_>>()?,
        None => vec![Regime::named(&args.regime)?],
    };
    if args.seeds == Some(0) || args.jobs == Some(0) {
        bail!("--seeds and --jobs must be positive");
    }
    for r in &mut regimes {
        if args.quick {
            *r = r.quick();
        }
        if let Some(n) = args.seeds {
            r.rl_seeds = n;
        }
    }
    let command = std::env::args()
        .map(|a| if a.contains(' ') { format!("'{a}'") } else { a })
        .collect::<Vec<_>>()
        .join(" ");
    let choice: DeviceChoice = args.device.parse()?;
    dispatch(choice, Job { regimes, args, command })??;
    Ok(())
}

fn main() -> ExitCode {
    tune_allocator();
    exit_code(run(Args::parse()))
}
