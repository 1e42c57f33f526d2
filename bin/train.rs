//! `train`: warm start a small transformer on scripted traces of a task, then fine-tune it with
//! MRT (or GRPO / STaR), and report whether it spends its test-time tokens well.
//!
//! With no arguments: the `search` task, the `cpu-tiny` model, MRT (dense progress bonus), on
//! the best device found. With `--model DIR --task math --data FILE`: a pretrained Hugging Face
//! model fine-tuned on a JSONL file of problems (no warm start). With `--lora-rank R`, RL trains
//! LoRA adapters on the frozen model instead of all of its weights.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::AutodiffBackend;
use clap::Parser;
use mrt::backend::{device_at, dispatch, exit_code, tune_allocator, BackendTask, DeviceChoice, DeviceList};
use mrt::model::lora::{LoraConfig, Target};
use mrt::rl::config::{merge_json, Algo, RunConfig};
use mrt::rl::eval::stats::paired_difference;
use mrt::rl::eval::EvalSummary;
use mrt::rl::nodes::NodeGroup;
use mrt::rl::pipeline::{run_pipeline_on, Outcome, PipelineOptions};
use mrt::rl::run::{RunDir, SavedConfig};

/// Warm-start and RL-fine-tune a reasoning policy (MRT, GRPO, STaR) on a synthetic task.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// Task family: search or countdown (synthetic), or math (free text; needs --model).
    #[arg(long, default_value = "search")]
    task: String,
    /// A pretrained model to fine-tune instead of training a small model from scratch, with
    /// --task math: a Hugging Face directory (Llama or Qwen2, safetensors) or a GGUF file
    /// (llama or qwen2, quantised or not).
    #[arg(long, value_name = "DIR|FILE.gguf")]
    model: Option<PathBuf>,
    /// The math task's problems, JSONL: GSM8K, MATH, MATH-500, SVAMP, ASDiv or MAWPS files as
    /// distributed, or {"question", "answer"} objects.
    #[arg(long, value_name = "FILE")]
    data: Option<PathBuf>,
    /// RL objective: grpo, mrt (the paper's prefix/terminate/continue recipe), mrt-dense (MRT's
    /// per-episode progress bonus), star, mrt-star.
    #[arg(long, default_value = "mrt-dense")]
    algo: String,
    /// Model preset: cpu-tiny, tiny or small (the vocabulary always comes from the task).
    #[arg(long, default_value = "cpu-tiny")]
    preset: String,
    /// auto (CUDA, else a wgpu GPU, else CPU), cpu, wgpu or cuda.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Data-parallel training over several devices of one backend, one peer (thread) each:
    /// `cuda:0,cuda:1`, `wgpu:0,wgpu:1`, or `cpu,cpu` (warm start, RL and evaluations shared).
    /// Replaces --device.
    #[arg(long)]
    devices: Option<String>,
    /// Data-parallel training over several processes (one per machine, one device each): the
    /// HOST:PORT of every node in rank order, the same list on every node. Each node serves
    /// its data on its own entry's port. Rank 0 leads and alone writes the run directory; the
    /// others train and evaluate with it, from the state rank 0 sends as each stage starts.
    #[arg(long, value_name = "HOST:PORT,…", conflicts_with = "devices")]
    nodes: Option<String>,
    /// This process's rank in --nodes.
    #[arg(long, requires = "nodes", default_value_t = 0)]
    node_rank: usize,
    /// Seconds to wait for the other nodes at start-up and for a node that stops answering
    /// (one that exits is noticed at once).
    #[arg(long, requires = "nodes", default_value_t = 600)]
    node_timeout: u64,
    /// Seed of everything random in the run.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// JSON file whose fields override the defaults (any subset of a run's config.json).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Warm-start steps (override).
    #[arg(long)]
    warm_start_steps: Option<usize>,
    /// RL steps (override).
    #[arg(long)]
    rl_steps: Option<usize>,
    /// Multiply the default step counts by 4 (longer, better runs; meant for a GPU).
    #[arg(long)]
    long: bool,
    /// Directory holding run directories.
    #[arg(long, default_value = "runs")]
    out: PathBuf,
    /// Run directory name (default: {task}-{algo}-s{seed}).
    #[arg(long)]
    name: Option<String>,
    /// Replace an existing run directory of the same name.
    #[arg(long)]
    force: bool,
    /// Continue the run in this directory from its last checkpoint.
    #[arg(long, value_name = "RUN_DIR")]
    resume: Option<PathBuf>,
    /// Skip the warm start: begin RL from this checkpoint (e.g. RUN/checkpoints/warm_start.ckpt).
    #[arg(long, value_name = "CKPT")]
    init: Option<PathBuf>,
    /// Train rank-R LoRA adapters on a frozen base instead of every weight in RL (the base:
    /// --model, --init, or the run's own warm start). Checkpoints then hold the adapters.
    #[arg(long, value_name = "R")]
    lora_rank: Option<usize>,
    /// LoRA scaling α: the update is (α / R)·A·B (default 2·R).
    #[arg(long, requires = "lora_rank")]
    lora_alpha: Option<f64>,
    /// Projections that get adapters, comma-separated (default all: q,k,v,o,gate,up,down).
    #[arg(long, requires = "lora_rank", value_delimiter = ',')]
    lora_targets: Vec<String>,
    /// What the frozen base's matrices are stored in: auto (bf16 on a GPU, f16 where it lacks
    /// bf16; f32 on the CPU), f32, bf16 or f16. Adapters and optimizer state stay f32.
    #[arg(long, requires = "lora_rank", value_name = "TYPE")]
    lora_base_precision: Option<String>,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

/// The run, with the device ordinal of each data-parallel peer (one: no data parallelism).
struct Job(PipelineOptions, Vec<usize>);

impl BackendTask for Job {
    type Output = mrt::Result<Outcome>;
    fn run<B: AutodiffBackend>(self, device: B::Device, label: String) -> Self::Output {
        let devices = self
            .1
            .iter()
            .map(|&i| device_at::<B>(&device, i))
            .collect::<mrt::Result<Vec<_>>>()?;
        if devices.len() > 1 {
            eprintln!("devices: {} peers on {label} ({:?})", devices.len(), devices);
        } else {
            eprintln!("device: {label}");
        }
        run_pipeline_on::<B>(&self.0, &devices)
    }
}

fn build_config(args: &Args) -> Result<RunConfig> {
    let algo = Algo::parse(&args.algo)?;
    let mut patch = args.config.as_deref().map(RunConfig::read_patch).transpose()?;
    if let Some(data) = &args.data {
        if args.task != "math" {
            bail!("--data gives the math task's problems: pass --task math");
        }
        if !data.is_file() {
            bail!("--data {}: file not found", data.display());
        }
        merge_json(
            patch.get_or_insert_with(|| serde_json::json!({})),
            serde_json::json!({ "task": { "name": "math", "data": data } }),
        );
    }
    if let Some(rank) = args.lora_rank {
        let mut lora = LoraConfig::new(rank);
        lora.alpha = args.lora_alpha;
        if !args.lora_targets.is_empty() {
            lora.targets = args
                .lora_targets
                .iter()
                .map(|t| Target::parse(t.trim()))
                .collect::<mrt::Result<_>>()?;
        }
        if let Some(p) = &args.lora_base_precision {
            lora.base_precision = serde_json::from_value(serde_json::json!(p))
                .map_err(|_| anyhow::anyhow!("--lora-base-precision {p}: expected auto, f32, bf16 or f16"))?;
        }
        merge_json(
            patch.get_or_insert_with(|| serde_json::json!({})),
            serde_json::json!({ "rl": { "lora": lora } }),
        );
    }
    let mut config = match &args.model {
        Some(dir) => {
            if !dir.is_dir() && !mrt::gguf::is_gguf(dir) {
                bail!("--model {}: neither a model directory nor a GGUF file", dir.display());
            }
            RunConfig::pretrained_with_patch(&args.task, dir, algo, args.seed, patch)?
        }
        None => RunConfig::with_patch(&args.task, &args.preset, algo, args.seed, !args.long, patch)?,
    };
    if let Some(n) = args.warm_start_steps {
        config.warm_start.steps = n;
    }
    if let Some(n) = args.rl_steps {
        config.rl.steps = n;
    }

    config.validate()?;
    Ok(config)
}

fn print_summary(outcome: &Outcome) {
    let (Some(base), Some(ft)) = (&outcome.base, &outcome.fine_tuned) else {
        return;
    };
    let cell = |v: f64| if v.is_finite() { format!("{v:.3}") } else { "n/a".into() };
    let row =
        |name: &str, f: &dyn Fn(&EvalSummary) -> f64| println!("{name:<28} {:>10} {:>12}", cell(f(base)), cell(f(ft)));
    println!();
    println!(
        "{:<28} {:>10} {:>12}",
        "held-out",
        if outcome.pretrained { "pretrained" } else { "warm start" },
        "fine-tuned"
    );
    row("pass@1", &|s| s.pass1);
    row("mean tokens to solve", &|s| s.tokens_to_solve);
    row("mean episodes to solve", &|s| s.episodes_to_solve);
    row("mean tokens per rollout", &|s| s.mean_tokens);
    row("normalised regret (J*=1)", &|s| s.regret);
    if base.regret_vs_optimal.is_some() {
        row("regret vs Bayes-optimal", &|s| s.regret_vs_optimal.unwrap_or(f64::NAN));
    }
    row("forced answers well-formed", &|s| s.forced_well_formed);
    // The same held-out problems before and after: a paired bootstrap over them.
    let (a, b) = (&base.pass1_by_problem, &ft.pass1_by_problem);
    if a.len() == b.len() {
        if let Some(i) = paired_difference(a, b, &vec![0; a.len()], 0x5eed) {
            println!(
                "pass@1 gain {:+.3}, 95 % interval over the {} held-out problems [{:+.3}, {:+.3}]",
                i.point,
                a.len(),
                i.lo,
                i.hi
            );
        }
    }
    println!();
    println!("run directory: {}", outcome.run_dir.display());
}

fn run(args: Args) -> Result<()> {
    // Ranks other than 0 leave the run directory to rank 0 (it may be the same directory on
    // a shared file system): their configuration is checked against rank 0's, not written.
    let follower = args.nodes.is_some() && args.node_rank > 0;
    let (choice, peers) = match &args.devices {
        Some(list) => {
            let list: DeviceList = list.parse()?;
            (list.choice, list.indices)
        }
        None => (args.device.parse::<DeviceChoice>()?, vec![0]),
    };
    let options = match &args.resume {
        Some(dir) if follower => PipelineOptions {
            resume: true,
            quiet: true,
            ..PipelineOptions::new(
                RunConfig::default_for("search", "cpu-tiny", Algo::MrtDense, 0, true)?,
                dir,
            )
        },
        Some(dir) => {
            let saved: SavedConfig = mrt::fsutil::read_json(&RunDir::new(dir).config_path())
                .with_context(|| format!("--resume {}: not a run directory", dir.display()))?;
            PipelineOptions {
                resume: true,
                quiet: args.quiet,
                ..PipelineOptions::new(saved.config, dir)
            }
        }
        None => {
            let config = build_config(&args)?;
            let name = args
                .name
                .clone()
                .unwrap_or_else(|| format!("{}-{}-s{}", args.task, args.algo, args.seed));
            let dir = args.out.join(name);
            if dir.exists() && !follower {
                if !args.force {
                    bail!(
                        "{} already exists: pass --resume {} to continue it, or --force to replace it",
                        dir.display(),
                        dir.display()
                    );
                }
                std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
            }
            if let Some(init) = &args.init {
                if !init.exists() && !follower {
                    bail!("--init {}: file not found", init.display());
                }
            }
            eprintln!("config: {}", serde_json::to_string(&config)?);
            PipelineOptions {
                init: args.init.clone(),
                quiet: args.quiet || follower,
                ..PipelineOptions::new(config, dir)
            }
        }
    };
    let options = match &args.nodes {
        None => options,
        Some(nodes) => {
            let count = NodeGroup::addresses(nodes)?.len();
            eprintln!(
                "nodes: rank {} of {count}; waiting up to {} s for the others",
                args.node_rank, args.node_timeout
            );
            let group = NodeGroup::join(nodes, args.node_rank, Duration::from_secs(args.node_timeout))?;
            eprintln!("nodes: all {count} connected");
            PipelineOptions {
                nodes: Some(Arc::new(group)),
                ..options
            }
        }
    };
    let outcome = dispatch(choice, Job(options, peers))??;
    if follower {
        eprintln!(
            "nodes: rank {} {}; rank 0 reports the run",
            args.node_rank,
            if outcome.completed { "finished" } else { "stopped" }
        );
    }
    print_summary(&outcome);
    Ok(())
}

fn main() -> ExitCode {
    tune_allocator();
    exit_code(run(Args::parse()))
}
