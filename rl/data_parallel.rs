//! The RL stage of the pipeline on a data-parallel group: one peer per device (`--devices`,
//! threads of this process) or per process (`--nodes`). The first peer leads with the run's
//! context; every other gets a copy of the policy and a context of its own that writes
//! nothing. Threads share the leader's memory; a node gets the leader's state over the
//! network when RL starts (`Handoff`), so it needs no run directory of its own. The
//! transport is rl/parallel.rs (and rl/nodes.rs).

use std::sync::Mutex;

use burn::module::Module;
use burn::prelude::Backend;
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use super::config::RunConfig;
use super::eval::eval_problems;
use super::metrics::MetricsWriter;
use super::optim::{adamw, load_optimizer, optimizer_section, require_grad, Adam};
use super::parallel::{run_peers, Peer};
use super::pipeline::{frozen_base_precision, Outcome, PipelineOptions};
use super::protocol::{Protocol, Tokens};
use super::run::RunDir;
use super::stage::Ctx;
use super::train::train_rl;
use crate::data::{Task, TextTokenizer, Vocab};
use crate::error::{Error, Result};
use crate::model::checkpoint::{self, Section};
use crate::model::Transformer;

/// Where RL starts, for peers that set up their own context.
pub(super) struct RlStart<'a, B: AutodiffBackend> {
    pub(super) reference: Option<&'a Transformer<B::InnerBackend>>,
    pub(super) start: usize,
    pub(super) tokens: &'a Tokens,
    pub(super) interrupt_after: Option<usize>,
}

/// The RL stage on a data-parallel group: this thread leads with `ctx`; every other device
/// gets a copy of the policy, optimizer and reference (the same parameter ids, which the
/// gradient all-reduce pairs by) and a context of its own that writes nothing.
pub(super) fn rl_data_parallel<B: AutodiffBackend>(
    ctx: &mut Ctx,
    model: Transformer<B>,
    optim: Adam<B>,
    rl: RlStart<B>,
    devices: &[B::Device],
) -> Result<(Transformer<B>, Adam<B>, bool)> {
    type Copy<B> = (
        Transformer<B>,
        Adam<B>,
        Option<Transformer<<B as AutodiffBackend>::InnerBackend>>,
    );
    let copies: Vec<Mutex<Option<Copy<B>>>> = devices[1..]
        .iter()
        .map(|d| {
            let reference = rl.reference.map(|r| r.clone().to_device(d));
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
        let protocol = rl.tokens.protocol(task.as_ref(), &config.task)?;
        let mut own = follower_ctx(
            config,
            task.as_ref(),
            protocol.as_ref(),
            rl.tokens,
            run,
            rl.interrupt_after,
        )?;
        train_rl(&mut own, model, optim, reference.as_ref(), rl.start, Some(peer)).map(|_| ())
    };
    run_peers::<B, _>(
        devices,
        |peer| train_rl(ctx, model, optim, rl.reference, rl.start, Some(peer)),
        worker,
    )
}

/// The context of a peer that is not the leader: the run's settings, writing nothing.
fn follower_ctx<'a>(
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

/// What the leader of a group of nodes sends the others when RL starts; after it, in the
/// same message, the policy's checkpoint (with the optimizer's state) and the reference's.
#[derive(Serialize, Deserialize)]
struct Handoff {
    config: RunConfig,
    start: usize,
    interrupt_after: Option<usize>,
    state_len: usize,
    reference_len: usize,
}

/// A checkpoint of `model` (adapters inline, not over a base file another machine may not
/// have) with `sections`, as bytes.
fn checkpoint_bytes<Bk: Backend>(model: &Transformer<Bk>, sections: Vec<Section>, tag: &str) -> Result<Vec<u8>> {
    let path = std::env::temp_dir().join(format!("mrt-handoff-{tag}-{}.ckpt", std::process::id()));
    let mut inline = model.clone();
    inline.lora_base = None;
    checkpoint::save(&path, &inline, sections, serde_json::json!({}))?;
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e));
    let _ = std::fs::remove_file(&path);
    bytes
}

/// The checkpoint in `bytes`, read back (through a file: checkpoints are read mapped).
fn read_checkpoint(bytes: &[u8], config: &RunConfig, tag: &str) -> Result<checkpoint::Checkpoint> {
    let path = std::env::temp_dir().join(format!("mrt-handoff-{tag}-{}.ckpt", std::process::id()));
    std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
    let ck = checkpoint::load(&path, Some(&config.model));
    // The map outlives the name.
    let _ = std::fs::remove_file(&path);
    ck
}

/// The RL stage on the leader of a group of nodes: sends the others where RL starts, then
/// trains as one of the group.
pub(super) fn rl_on_nodes<B: AutodiffBackend>(
    ctx: &mut Ctx,
    model: Transformer<B>,
    optim: Adam<B>,
    rl: RlStart<B>,
    peer: &Peer<B>,
) -> Result<(Transformer<B>, Adam<B>, bool)> {
    let group = peer.nodes().expect("a peer of a group of nodes");
    let state = checkpoint_bytes(&model, vec![optimizer_section(&optim)], "state")?;
    let reference = match rl.reference {
        Some(r) => checkpoint_bytes(r, vec![], "reference")?,
        None => Vec::new(),
    };
    let handoff = Handoff {
        config: ctx.config.clone(),
        start: rl.start,
        interrupt_after: rl.interrupt_after,
        state_len: state.len(),
        reference_len: reference.len(),
    };
    let head = serde_json::to_vec(&handoff).map_err(|e| Error::Peer {
        rank: 0,
        reason: format!("encoding the RL start: {e}"),
    })?;
    let mut bytes = (head.len() as u64).to_le_bytes().to_vec();
    bytes.extend(head);
    bytes.extend(state);
    bytes.extend(reference);
    group.gather(&bytes, true)?;
    drop(bytes);
    let out = train_rl(ctx, model, optim, rl.reference, rl.start, Some(peer))?;
    group.finish();
    Ok(out)
}

/// A node other than the leader: checks its configuration against the leader's, waits for
/// the leader's RL start (the leader may warm-start first), trains as one of the group, and
/// writes nothing.
pub(super) fn follow<B: AutodiffBackend>(
    opts: &PipelineOptions,
    peer: &Peer<B>,
    device: &B::Device,
) -> Result<Outcome> {
    let group = peer.nodes().expect("a peer of a group of nodes");
    check_nodes(peer, (!opts.resume).then_some(&opts.config))?;
    let all = group.gather(&[], true)?;
    let bad = |reason: &str| Error::Peer {
        rank: 0,
        reason: format!("sent an unreadable RL start ({reason})"),
    };
    let msg = &all[0];
    let head_len = msg
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
        .ok_or_else(|| bad("too short"))?;
    let handoff: Handoff = msg
        .get(8..8 + head_len)
        .ok_or_else(|| bad("too short"))
        .and_then(|h| serde_json::from_slice(h).map_err(|e| bad(&e.to_string())))?;
    let at = 8 + head_len;
    let (state, reference) = match msg.get(at..at + handoff.state_len + handoff.reference_len) {
        Some(b) => b.split_at(handoff.state_len),
        None => return Err(bad("too short")),
    };
    let config = &handoff.config;

    let ck = read_checkpoint(state, config, "state")?;
    let model = require_grad(ck.model::<B>(device)?);
    let model = frozen_base_precision(model, config, device, true)?;
    let optim = load_optimizer(adamw::<B>(&config.rl.optim), &ck.path, ck.section("optimizer")?, device)?;
    drop(ck);
    let reference = if reference.is_empty() {
        None
    } else {
        Some(read_checkpoint(reference, config, "reference")?.model::<B::InnerBackend>(device)?)
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
    let (_, _, completed) = train_rl(&mut ctx, model, optim, reference.as_ref(), handoff.start, Some(peer))?;
    group.finish();
    Ok(Outcome {
        run_dir: opts.run_dir.clone(),
        completed,
        pretrained: config.pretrained.is_some(),
        base: None,
        fine_tuned: None,
    })
}
