//! The training stages of the pipeline on a data-parallel group: one peer per device
//! (`--devices`, threads of this process) or per process (`--nodes`). The first peer leads
//! with the run's context; every other gets a copy of the policy and a context of its own that
//! writes nothing. Threads share the leader's memory; a node gets the leader's state over the
//! network when each stage starts (`Handoff`), so it needs no run directory of its own. The
//! transport is rl/parallel.rs (and rl/nodes.rs).

use std::sync::Mutex;

use burn::module::{AutodiffModule, Module};
use burn::prelude::Backend;
use burn::tensor::backend::AutodiffBackend;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::closing::follow_closing;
use super::config::RunConfig;
use super::eval::eval_problems;
use super::metrics::MetricsWriter;
use super::optim::{adamw, load_optimizer, optimizer_section, require_grad, Adam};
use super::parallel::{run_peers, Peer};
use super::pipeline::{Outcome, PipelineOptions};
use super::policy::frozen_base_precision;
use super::protocol::{Protocol, Tokens};
use super::run::{RunDir, Stage};
use super::sft::warm_start;
use super::stage::Ctx;
use super::train::train_rl;
use crate::data::{Task, TextTokenizer, Vocab};
use crate::error::{Error, Result};
use crate::model::checkpoint::{self, Section};
use crate::model::Transformer;

/// Where a stage starts, for peers that set up their own context.
pub(super) struct StageStart<'a, B: AutodiffBackend> {
    pub(super) stage: Stage,
    /// The KL penalty's frozen model (RL only).
    pub(super) reference: Option<&'a Transformer<B::InnerBackend>>,
    /// Steps of the stage already done.
    pub(super) start: usize,
    pub(super) tokens: &'a Tokens,
    pub(super) interrupt_after: Option<usize>,
}

type Trained<B> = (Transformer<B>, Adam<B>, bool);

/// Runs `stage` from step `start` as one peer (or, without one, as the only process).
fn run_stage<B: AutodiffBackend>(
    stage: Stage,
    ctx: &mut Ctx,
    model: Transformer<B>,
    optim: Adam<B>,
    reference: Option<&Transformer<B::InnerBackend>>,
    start: usize,
    peer: Option<&Peer<B>>,
) -> Result<Trained<B>> {
    match stage {
        Stage::WarmStart => warm_start(ctx, model, optim, start, peer),
        Stage::Rl => train_rl(ctx, model, optim, reference, start, peer),
    }
}

/// Runs a stage of the pipeline: on this process's group of nodes (`node`), data-parallel on
/// `devices` when there are several, or on the one device.
pub(super) fn run_stage_on<B: AutodiffBackend>(
    ctx: &mut Ctx,
    model: Transformer<B>,
    optim: Adam<B>,
    at: StageStart<B>,
    devices: &[B::Device],
    node: Option<&Peer<B>>,
) -> Result<Trained<B>> {
    match node {
        Some(peer) => stage_on_nodes(ctx, model, optim, at, peer),
        None if devices.len() > 1 => stage_on_devices(ctx, model, optim, at, devices),
        None => run_stage(at.stage, ctx, model, optim, at.reference, at.start, None),
    }
}

/// A stage on a data-parallel group of devices: this thread leads with `ctx`; every other
/// device gets a copy of the policy, optimizer and reference (the same parameter ids, which
/// the gradient all-reduce pairs by) and a context of its own that writes nothing.
fn stage_on_devices<B: AutodiffBackend>(
    ctx: &mut Ctx,
    model: Transformer<B>,
    optim: Adam<B>,
    at: StageStart<B>,
    devices: &[B::Device],
) -> Result<Trained<B>> {
    type Copy<B> = (
        Transformer<B>,
        Adam<B>,
        Option<Transformer<<B as AutodiffBackend>::InnerBackend>>,
    );
    let copies: Vec<Mutex<Option<Copy<B>>>> = devices[1..]
        .iter()
        .map(|d| {
            let reference = at.reference.map(|r| r.clone().to_device(d));
            Mutex::new(Some((model.clone().fork(d), optim.clone(), reference)))
        })
        .collect();
    let config = ctx.config;
    let run = ctx.run;
    let worker = |peer: &Peer<B>| -> Result<()> {
        let (model, optim, reference) = copies[peer.rank - 1]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .expect("each peer takes its copy once");
        let task = config.task.build()?;
        let protocol = at.tokens.protocol(task.as_ref(), &config.task)?;
        let mut own = follower_ctx(
            config,
            task.as_ref(),
            protocol.as_ref(),
            at.tokens,
            run,
            at.interrupt_after,
        )?;
        run_stage(
            at.stage,
            &mut own,
            model,
            optim,
            reference.as_ref(),
            at.start,
            Some(peer),
        )
        .map(|_| ())
    };
    run_peers::<B, _>(
        devices,
        |peer| run_stage(at.stage, ctx, model, optim, at.reference, at.start, Some(peer)),
        worker,
    )
}

/// The context of a peer that is not the leader: the run's settings, writing nothing.
pub(super) fn follower_ctx<'a>(
    config: &'a RunConfig,
    task: &'a dyn Task,
    protocol: &'a dyn Protocol,
    tokens: &'a Tokens,
    run: &'a RunDir,
    interrupt_after: Option<usize>,
) -> Result<Ctx<'a>> {
    Ok(Ctx {
        config,
        task,
        protocol,
        vocab: tokens.words(),
        run,
        metrics: MetricsWriter::discard(),
        eval_problems: eval_problems(task, config.eval.problems, config.eval.split)?,
        quiet: true,
        interrupt_after,
        latest_evals: Vec::new(),
    })
}

/// Checks at start-up, before any work, that every node runs this build and (where it was
/// given one: a node started with `--resume` takes the leader's) the leader's configuration.
/// Every node gets every node's answer, so all refuse together, with the same message.
pub(super) fn check_nodes<B: AutodiffBackend>(peer: &Peer<B>, config: Option<&RunConfig>) -> Result<()> {
    let mine = serde_json::json!({ "version": env!("CARGO_PKG_VERSION"), "config": config }).to_string();
    let all = peer.gather_values(&mine, "start-up configuration")?;
    let verdict = compare_starts(&all);
    if verdict.is_err() {
        // Every node refuses; each stays until the others have its configuration, or a node
        // that leaves first would look lost to one still downloading from it.
        if let Some(group) = peer.nodes() {
            group.finish();
        }
    }
    verdict
}

/// The first node whose start-up configuration (`all`, in rank order) differs from the leader's.
fn compare_starts(all: &[String]) -> Result<()> {
    let parse = |rank: usize, s: &str| {
        serde_json::from_str::<serde_json::Value>(s).map_err(|e| Error::Peer {
            rank,
            reason: format!("sent an unreadable configuration: {e}"),
        })
    };
    let leader = parse(0, &all[0])?;
    for (rank, s) in all.iter().enumerate().skip(1) {
        let theirs = parse(rank, s)?;
        if theirs["version"] != leader["version"] {
            return Err(Error::Peer {
                rank,
                reason: format!("runs mrt {}, peer 0 runs {}", theirs["version"], leader["version"]),
            });
        }
        if !theirs["config"].is_null() && theirs["config"] != leader["config"] {
            let mut fields = Vec::new();
            differing(&theirs["config"], &leader["config"], "", &mut fields);
            return Err(Error::Peer {
                rank,
                reason: format!(
                    "started with a different configuration than peer 0 (differs in: {})",
                    fields.join(", ")
                ),
            });
        }
    }
    Ok(())
}

/// The dotted paths at which two JSON values differ.
fn differing(a: &serde_json::Value, b: &serde_json::Value, at: &str, out: &mut Vec<String>) {
    match (a, b) {
        (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let null = serde_json::Value::Null;
                let path = if at.is_empty() { k.clone() } else { format!("{at}.{k}") };
                differing(x.get(k).unwrap_or(&null), y.get(k).unwrap_or(&null), &path, out);
            }
        }
        _ if a != b => out.push(at.to_string()),
        _ => {}
    }
}

/// What the leader of a group of nodes sends the others when a stage starts; after it, in the
/// same message, the policy's checkpoint (with the optimizer's state) and the reference's.
#[derive(Serialize, Deserialize)]
struct Handoff {
    config: RunConfig,
    stage: Stage,
    start: usize,
    interrupt_after: Option<usize>,
    state_len: usize,
    reference_len: usize,
}

/// A checkpoint of `model` (adapters inline, not over a base file another machine may not
/// have) with `sections`, as bytes.
pub(super) fn checkpoint_bytes<Bk: Backend>(model: &Transformer<Bk>, sections: Vec<Section>) -> Result<Vec<u8>> {
    let mut inline = model.clone();
    inline.lora_base = None;
    checkpoint::to_bytes(&inline, sections, serde_json::json!({}))
}

/// The checkpoint rank 0 sent as `bytes` (`what` names it in errors).
pub(super) fn read_checkpoint(bytes: Vec<u8>, config: &RunConfig, what: &str) -> Result<checkpoint::Checkpoint> {
    let label = format!("(rank 0's {what})");
    checkpoint::from_bytes(std::path::Path::new(&label), bytes, Some(&config.model))
}

/// A message from rank 0 to the other nodes: its header's length (8 bytes), the header (JSON),
/// then `payload` (checkpoints, whose lengths the header names).
pub(super) fn frame<T: Serialize>(head: &T, payload: Vec<Vec<u8>>, what: &str) -> Result<Vec<u8>> {
    let head = serde_json::to_vec(head).map_err(|e| Error::Peer {
        rank: 0,
        reason: format!("encoding {what}: {e}"),
    })?;
    let len = 8 + head.len() + payload.iter().map(Vec::len).sum::<usize>();
    let mut bytes = Vec::with_capacity(len);
    bytes.extend((head.len() as u64).to_le_bytes());
    bytes.extend(head);
    for p in payload {
        bytes.extend(p);
    }
    Ok(bytes)
}

/// The header of a message [`frame`] made, leaving its payload in `msg`.
pub(super) fn unframe<T: DeserializeOwned>(msg: &mut Vec<u8>, what: &str) -> Result<T> {
    let bad = |reason: String| Error::Peer {
        rank: 0,
        reason: format!("sent unreadable {what} ({reason})"),
    };
    let len = msg
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
        .filter(|&len| msg.len() >= 8 + len)
        .ok_or_else(|| bad("too short".into()))?;
    let head = serde_json::from_slice(&msg[8..8 + len]).map_err(|e| bad(e.to_string()))?;
    msg.drain(..8 + len);
    Ok(head)
}

/// The optimizer of `stage` (its own weight decay).
pub(super) fn stage_optim<B: AutodiffBackend>(config: &RunConfig, stage: Stage) -> Adam<B> {
    match stage {
        Stage::WarmStart => adamw::<B>(&config.warm_start.optim),
        Stage::Rl => adamw::<B>(&config.rl.optim),
    }
}

/// A stage on the leader of a group of nodes: sends the others where it starts, then trains as
/// one of the group.
fn stage_on_nodes<B: AutodiffBackend>(
    ctx: &mut Ctx,
    model: Transformer<B>,
    optim: Adam<B>,
    at: StageStart<B>,
    peer: &Peer<B>,
) -> Result<Trained<B>> {
    let group = peer.nodes().expect("a peer of a group of nodes");
    let state = checkpoint_bytes(&model, vec![optimizer_section(&optim)])?;
    let reference = match at.reference {
        Some(r) => checkpoint_bytes(r, vec![])?,
        None => Vec::new(),
    };
    let handoff = Handoff {
        config: ctx.config.clone(),
        stage: at.stage,
        start: at.start,
        interrupt_after: at.interrupt_after,
        state_len: state.len(),
        reference_len: reference.len(),
    };
    let bytes = frame(&handoff, vec![state, reference], "the stage's start")?;
    group.gather(&bytes, true)?;
    drop(bytes);
    let out = run_stage(at.stage, ctx, model, optim, at.reference, at.start, Some(peer))?;
    if !out.2 {
        // The last exchange of this process (after a completed RL stage the closing
        // evaluations are): the others fetch what it exposed before it exits.
        group.finish();
    }
    Ok(out)
}

/// A node other than the leader: checks its configuration against the leader's, then, for
/// each stage the leader starts (the warm start, if the run has one, then RL), receives the
/// stage's start and trains as one of the group; after RL, takes its share of the closing
/// evaluations. It writes nothing.
pub(super) fn follow<B: AutodiffBackend>(
    opts: &PipelineOptions,
    peer: &Peer<B>,
    device: &B::Device,
) -> Result<Outcome> {
    let group = peer.nodes().expect("a peer of a group of nodes");
    check_nodes(peer, (!opts.resume).then_some(&opts.config))?;
    loop {
        let msg = group.gather(&[], true)?.swap_remove(0);
        let (stage, pretrained, completed) = follow_stage(opts, peer, device, msg)?;
        if stage == Stage::Rl || !completed {
            group.finish();
            return Ok(Outcome {
                run_dir: opts.run_dir.clone(),
                completed,
                pretrained,
                base: None,
                fine_tuned: None,
            });
        }
    }
}

/// One stage on a node other than the leader, from the leader's message `msg`: returns the
/// stage, whether the run is of a pretrained model, and whether the stage completed.
fn follow_stage<B: AutodiffBackend>(
    opts: &PipelineOptions,
    peer: &Peer<B>,
    device: &B::Device,
    mut msg: Vec<u8>,
) -> Result<(Stage, bool, bool)> {
    let handoff: Handoff = unframe(&mut msg, "stage start")?;
    if msg.len() != handoff.state_len + handoff.reference_len {
        return Err(Error::Peer {
            rank: 0,
            reason: "sent a stage start whose length differs from the lengths it names".into(),
        });
    }
    // The state and the reference, taken apart without copying the state.
    let reference = msg.split_off(handoff.state_len);
    let config = &handoff.config;

    let ck = read_checkpoint(msg, config, "training state")?;
    let model = require_grad(ck.model::<B>(device)?);
    let model = frozen_base_precision(model, config, device, true)?;
    let optim = stage_optim::<B>(config, handoff.stage);
    let optim = load_optimizer(optim, &ck.path, ck.section("optimizer")?, device)?;
    drop(ck);
    let reference = if reference.is_empty() {
        None
    } else {
        Some(read_checkpoint(reference, config, "reference model")?.model::<B::InnerBackend>(device)?)
    };
    let task = config.task.build()?;
    let tokens = match &config.pretrained {
        Some(dir) => Tokens::Text(TextTokenizer::load(dir)?),
        None => Tokens::Words(Vocab::build(&task.words())?),
    };
    let protocol = tokens.protocol(task.as_ref(), &config.task)?;
    let run = RunDir::new(&opts.run_dir);
    let mut ctx = follower_ctx(
        config,
        task.as_ref(),
        protocol.as_ref(),
        &tokens,
        &run,
        handoff.interrupt_after,
    )?;
    let (stage, start) = (handoff.stage, handoff.start);
    let (model, _, completed) = run_stage(stage, &mut ctx, model, optim, reference.as_ref(), start, Some(peer))?;
    if stage == Stage::Rl && completed {
        follow_closing(&mut ctx, &model.valid(), peer, device)?;
    }
    Ok((stage, config.pretrained.is_some(), completed))
}
