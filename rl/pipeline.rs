//! The main job: warm start on scripted traces (or a pretrained model, for a text task), then
//! RL fine-tuning, with evaluation, checkpoints and resume. `bin/train.rs` only parses
//! arguments and picks the backend.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use serde::Serialize;

use super::closing::{closing_on, Closing, Subject};
use super::config::RunConfig;
use super::data_parallel::{check_nodes, follow, run_stage_on, stage_optim, StageStart};
use super::eval::{eval_problems, EvalSummary};
use super::metrics::{read_metrics, MetricsWriter};
use super::nodes::NodeGroup;
use super::optim::require_grad;
use super::parallel::Peer;
use super::policy::{frozen_base_precision, start_policy, with_adapters};
use super::protocol::Tokens;
use super::run::{load_state, Progress, RunDir, Stage};
use super::stage::Ctx;
use crate::data::{TextTokenizer, Vocab};
use crate::error::{Error, Result};
use crate::fsutil::write_json;
use crate::model::{checkpoint, hf, Transformer};

/// What to run.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    pub config: RunConfig,
    pub run_dir: PathBuf,
    /// Continue the run in `run_dir` from its last checkpoint.
    pub resume: bool,
    /// Start RL from this checkpoint instead of warm-starting (e.g. a shared warm start).
    pub init: Option<PathBuf>,
    pub quiet: bool,
    /// Stop after this many steps of the current stage (simulated kill, for tests).
    pub interrupt_after: Option<usize>,
    /// Evaluate the warm start and the fine-tuned model on `config.eval` at the end (the
    /// experiment skips this: it evaluates every checkpoint more thoroughly itself).
    pub final_eval: bool,
    /// This process's place in a group of nodes (`train --nodes`): RL is data-parallel over
    /// them, one peer per process; the leader (rank 0) runs everything else and writes the
    /// run, the others only train (rl/data_parallel.rs).
    pub nodes: Option<Arc<NodeGroup>>,
}

impl PipelineOptions {
    /// A new run of `config` in `run_dir` with progress bars and the final evaluation; the
    /// other fields are set with struct update syntax where they differ.
    pub fn new(config: RunConfig, run_dir: impl Into<PathBuf>) -> Self {
        Self {
            config,
            run_dir: run_dir.into(),
            resume: false,
            init: None,
            quiet: false,
            interrupt_after: None,
            final_eval: true,
            nodes: None,
        }
    }
}

/// What a finished (or interrupted) run reports.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub run_dir: PathBuf,
    pub completed: bool,
    /// The run started from a pretrained model (its "base" is that model, not a warm start).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub pretrained: bool,
    pub base: Option<EvalSummary>,
    pub fine_tuned: Option<EvalSummary>,
}

/// Runs (or resumes) the pipeline on backend `B`.
pub fn run_pipeline<B: AutodiffBackend>(opts: &PipelineOptions, device: &B::Device) -> Result<Outcome> {
    run_pipeline_on::<B>(opts, std::slice::from_ref(device))
}

/// [`run_pipeline`] data-parallel over `devices` (one peer each, `parallel.rs`): the warm
/// start, RL and every evaluation (the closing ones included) are shared; only the first
/// writes checkpoints and metrics.
pub fn run_pipeline_on<B: AutodiffBackend>(opts: &PipelineOptions, devices: &[B::Device]) -> Result<Outcome> {
    let device = &devices[0];
    let node = match &opts.nodes {
        Some(_) if devices.len() > 1 => {
            return Err(Error::config(
                "devices",
                devices.len(),
                "one device per process in a group of nodes",
            ))
        }
        Some(group) => Some(Peer::<B>::node(group.clone(), device.clone())),
        None => None,
    };
    if let Some(peer) = node.as_ref().filter(|p| !p.leader()) {
        return follow(opts, peer, device);
    }
    let run = RunDir::new(&opts.run_dir);
    let (config, tokens) = if opts.resume {
        run.open()?
    } else {
        opts.config.validate()?;
        let tokens = match &opts.config.pretrained {
            Some(dir) => Tokens::Text(TextTokenizer::load(dir)?),
            None => Tokens::Words(Vocab::build(&opts.config.task.build()?.words())?),
        };
        (opts.config.clone(), tokens)
    };
    if let Some(peer) = &node {
        // Before anything is written: nodes that would train different things are refused.
        check_nodes(peer, Some(&config))?;
    }
    if !opts.resume {
        run.init(&config, &tokens, config.pretrained.as_deref())?;
    }
    if let Tokens::Text(t) = &tokens {
        if t.size() > config.model.vocab_size {
            return Err(Error::config(
                "model.vocab_size",
                config.model.vocab_size,
                format!("the model's tokenizer has {} ids", t.size()),
            ));
        }
    }
    let peers = node.as_ref().map_or(devices.len(), |p| p.count);
    if peers > config.rl.problems_per_step {
        // Before the warm start: each peer samples whole problems.
        return Err(Error::config(
            "rl.problems_per_step",
            config.rl.problems_per_step,
            format!("must be at least the number of peers ({peers})"),
        ));
    }
    let task = config.task.build()?;
    let protocol = tokens.protocol(task.as_ref(), &config.task)?;
    let latest = run.checkpoint("latest");
    let optim_for = |stage: Stage| stage_optim::<B>(&config, stage);

    // Where to start: a checkpoint of this run, a given init checkpoint, or a fresh model.
    let (mut model, mut optim, progress) = if opts.resume && latest.exists() {
        let stage = saved_stage(&latest)?;
        load_state::<B>(&latest, &config, optim_for(stage), device)?
    } else if opts.resume && run.checkpoint("warm_start").exists() {
        let path = run.checkpoint("warm_start");
        let ck = checkpoint::load(&path, Some(&config.model))?;
        (
            with_adapters(require_grad(ck.model::<B>(device)?), &config, &path)?,
            optim_for(Stage::Rl),
            Progress {
                stage: Stage::Rl,
                step: 0,
            },
        )
    } else if let Some(init) = &opts.init {
        let ck = checkpoint::load(init, Some(&config.model))?;
        (
            with_adapters(require_grad(ck.model::<B>(device)?), &config, init)?,
            optim_for(Stage::Rl),
            Progress {
                stage: Stage::Rl,
                step: 0,
            },
        )
    } else if let Some(dir) = &config.pretrained {
        let model = hf::load_with_context::<B>(dir, Some(config.model.max_seq_len), device)?;
        if model.config != config.model {
            return Err(Error::config(
                "model",
                serde_json::to_string(&config.model).unwrap_or_default(),
                format!(
                    "differs from {}/config.json (only max_seq_len may be changed)",
                    dir.display()
                ),
            ));
        }
        (
            with_adapters(require_grad(model), &config, dir)?,
            optim_for(Stage::Rl),
            Progress {
                stage: Stage::Rl,
                step: 0,
            },
        )
    } else {
        let model = Transformer::<B>::new(&config.model, config.seed, device)?;
        (
            model,
            optim_for(Stage::WarmStart),
            Progress {
                stage: Stage::WarmStart,
                step: 0,
            },
        )
    };
    model = frozen_base_precision(model, &config, device, opts.quiet)?;
    truncate_metrics(&run, progress)?;
    let mut ctx = Ctx {
        config: &config,
        task: task.as_ref(),
        protocol: protocol.as_ref(),
        vocab: tokens.words(),
        run: &run,
        metrics: MetricsWriter::open(&run.metrics_path())?,
        eval_problems: eval_problems(task.as_ref(), config.eval.problems, config.eval.split)?,
        quiet: opts.quiet,
        interrupt_after: opts.interrupt_after,
        latest_evals: Vec::new(),
    };
    let pretrained = config.pretrained.is_some();
    let incomplete = |ctx: &Ctx| Outcome {
        run_dir: ctx.run.root.clone(),
        completed: false,
        pretrained,
        base: None,
        fine_tuned: None,
    };

    let mut rl_start = progress.step;
    if progress.stage == Stage::WarmStart {
        if peers > config.warm_start.batch_size {
            // Each peer trains on whole traces.
            return Err(Error::config(
                "warm_start.batch_size",
                config.warm_start.batch_size,
                format!("must be at least the number of peers ({peers})"),
            ));
        }
        let at = StageStart {
            stage: Stage::WarmStart,
            reference: None,
            start: progress.step,
            tokens: &tokens,
            interrupt_after: opts.interrupt_after,
        };
        let (m, o, done) = run_stage_on(&mut ctx, model, optim, at, devices, node.as_ref())?;
        if !done {
            return Ok(incomplete(&ctx));
        }
        checkpoint::save(
            &run.checkpoint("warm_start"),
            &m,
            vec![],
            serde_json::json!({ "stage": "warm-start" }),
        )?;
        // RL starts with fresh optimizer state and its own schedule (and, with LoRA, with
        // adapters over the warm start just saved).
        model = with_adapters(m, &config, &run.checkpoint("warm_start"))?;
        model = frozen_base_precision(model, &config, device, ctx.quiet)?;
        drop(o);
        optim = optim_for(Stage::Rl);
        rl_start = 0;
    }
    if !run.checkpoint("warm_start").exists() {
        checkpoint::save(
            &run.checkpoint("warm_start"),
            &model,
            vec![],
            serde_json::json!({ "stage": "init" }),
        )?;
    }

    // The frozen start policy: the KL reference and the "base" of the comparison. Loaded
    // only when needed: for a pretrained model it is a second copy of the weights, unless the
    // policy is LoRA over the same base, whose tensors it then shares.
    let shared_base = model.lora_base.clone().map(|b| (b, model.valid().without_lora()));
    let load_base =
        || start_policy::<B::InnerBackend>(&run.checkpoint("warm_start"), &config, shared_base.clone(), device);
    let reference = if config.rl.kl_beta > 0.0 {
        Some(load_base()?)
    } else {
        None
    };
    let at = StageStart {
        stage: Stage::Rl,
        reference: reference.as_ref(),
        start: rl_start,
        tokens: &tokens,
        interrupt_after: opts.interrupt_after,
    };
    let (model, optim, done) = run_stage_on(&mut ctx, model, optim, at, devices, node.as_ref())?;
    if !done {
        return Ok(incomplete(&ctx));
    }
    drop(optim);
    checkpoint::save(
        &run.checkpoint("final"),
        &model,
        vec![],
        serde_json::json!({ "stage": "final" }),
    )?;

    // The closing evaluations, each reused when this process's last evaluation of a stage was
    // of that very model, else shared over the group (which, for nodes, the exchange of even
    // an empty list ends).
    let mut jobs = Vec::new();
    if opts.final_eval {
        let base = match ctx.reusable(("warm-start", config.warm_start.steps)) {
            Some((summary, seconds)) => Subject::Reused(summary, seconds),
            None => Subject::Model(Box::new(match reference {
                Some(m) => m,
                None => load_base()?,
            })),
        };
        let fine_tuned = match ctx.reusable(("rl", config.rl.steps)) {
            Some((summary, seconds)) => Subject::Reused(summary, seconds),
            None => Subject::Policy,
        };
        jobs.push(Closing {
            stage: "base",
            step: 0,
            subject: base,
        });
        jobs.push(Closing {
            stage: "final",
            step: config.rl.steps,
            subject: fine_tuned,
        });
    }
    let mut summaries = closing_on::<B>(&mut ctx, jobs, &model.valid(), &tokens, devices, node.as_ref())?.into_iter();
    let (base, fine_tuned) = (summaries.next(), summaries.next());
    if !opts.final_eval {
        return Ok(Outcome {
            run_dir: run.root.clone(),
            completed: true,
            pretrained,
            base: None,
            fine_tuned: None,
        });
    }
    let outcome = Outcome {
        run_dir: run.root.clone(),
        completed: true,
        pretrained,
        base,
        fine_tuned,
    };
    write_json(&run.root.join("summary.json"), &outcome)?;
    Ok(outcome)
}

/// On resume, drops metric records written after the checkpoint we resume from, so the file
/// reads as if the run had never been interrupted.
fn truncate_metrics(run: &RunDir, progress: Progress) -> Result<()> {
    let path = run.metrics_path();
    if !path.exists() {
        return Ok(());
    }
    let stage_rank = |phase: &str| match phase {
        "warm-start" => Some(0),
        "rl" => Some(1),
        _ => None,
    };
    let limit = (progress.stage as u8 as usize, progress.step);
    let keep: Vec<String> = read_metrics(&path)?
        .into_iter()
        .filter(|r| {
            let phase = r.get("phase").and_then(|v| v.as_str()).unwrap_or("");
            let step = r.get("step").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
            match stage_rank(phase) {
                Some(rank) => (rank, step) <= limit,
                None => false,
            }
        })
        .map(|r| serde_json::to_string(&r).unwrap_or_default())
        .collect();
    let text = if keep.is_empty() {
        String::new()
    } else {
        keep.join("\n") + "\n"
    };
    crate::fsutil::write_atomic(&path, text.as_bytes())
}

/// The stage recorded in a training-state checkpoint.
fn saved_stage(path: &Path) -> Result<Stage> {
    let ck = checkpoint::load(path, None)?;
    let progress: Progress = serde_json::from_value(ck.meta["progress"].clone())
        .map_err(|e| Error::checkpoint(path, format!("no training progress in metadata: {e}")))?;
    Ok(progress.stage)
}
