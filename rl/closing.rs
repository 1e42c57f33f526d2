//! The run's closing evaluations, of the base (the start policy) and of the fine-tuned model,
//! shared over a data-parallel group as the stages' evaluations are: every peer samples its
//! share of the held-out problems and the leader writes the records. An evaluation this process
//! already made of the same model (the last of a stage) is reused instead: same seed, same
//! problems, same numbers.
//!
//! Threads get copies of the models; nodes get a message from the leader naming the models in
//! order: the fine-tuned policy, which each node holds already (its copy has the leader's bits:
//! every node took the same optimizer steps on the same sums), or a checkpoint sent along.

use std::sync::Mutex;

use burn::module::Module;
use burn::prelude::Backend;
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use super::data_parallel::{checkpoint_bytes, follower_ctx, frame, read_checkpoint, unframe};
use super::eval::EvalSummary;
use super::parallel::{run_peers, Peer};
use super::protocol::Tokens;
use super::stage::Ctx;
use crate::error::{Error, Result};
use crate::model::Transformer;

/// Which model a closing evaluation is of.
pub(super) enum Subject<B: Backend> {
    /// Evaluated already by this process: its summary and the seconds it took.
    Reused(EvalSummary, f64),
    /// The fine-tuned policy, which every peer holds.
    Policy,
    /// Another model (the base), which the leader alone may hold.
    Model(Box<Transformer<B>>),
}

/// One closing evaluation: its record's stage and step, and its model.
pub(super) struct Closing<B: Backend> {
    pub(super) stage: &'static str,
    pub(super) step: usize,
    pub(super) subject: Subject<B>,
}

/// How a node other than the leader gets each closing evaluation's model.
#[derive(Serialize, Deserialize)]
enum Sent {
    Reused,
    Policy,
    /// A checkpoint of this many bytes, next in the message.
    Checkpoint(usize),
}

/// Runs the closing evaluations in order, over the group of nodes (`node`, as its leader), over
/// `devices` when there are several, or on the one device; returns the leader's summaries.
pub(super) fn closing_on<B: AutodiffBackend>(
    ctx: &mut Ctx,
    jobs: Vec<Closing<B::InnerBackend>>,
    policy: &Transformer<B::InnerBackend>,
    tokens: &Tokens,
    devices: &[B::Device],
    node: Option<&Peer<B>>,
) -> Result<Vec<EvalSummary>> {
    if let Some(peer) = node {
        let group = peer.nodes().expect("a peer of a group of nodes");
        let mut order = Vec::with_capacity(jobs.len());
        let mut models = Vec::new();
        for job in &jobs {
            order.push(match &job.subject {
                Subject::Reused(..) => Sent::Reused,
                Subject::Policy => Sent::Policy,
                Subject::Model(m) => {
                    models.push(checkpoint_bytes(m, vec![])?);
                    Sent::Checkpoint(models[models.len() - 1].len())
                }
            });
        }
        let bytes = frame(&order, models, "the closing evaluations")?;
        group.gather(&bytes, true)?;
        drop(bytes);
        let out = run_closing(ctx, jobs, policy, Some(peer));
        // The last exchange of this process: the others fetch what it exposed before it exits.
        group.finish();
        return out;
    }
    let nothing_to_share = jobs.iter().all(|j| matches!(j.subject, Subject::Reused(..)));
    if devices.len() == 1 || nothing_to_share {
        return run_closing::<B>(ctx, jobs, policy, None);
    }
    // Each other device's copies of the models, taken once by its thread.
    type Copies<Bk> = Mutex<Option<(Vec<Closing<Bk>>, Transformer<Bk>)>>;
    let copies: Vec<Copies<B::InnerBackend>> = devices[1..]
        .iter()
        .map(|d| {
            let mine = jobs.iter().map(|j| j.copy_to(d)).collect();
            Mutex::new(Some((mine, policy.clone().to_device(d))))
        })
        .collect();
    let (config, run) = (ctx.config, ctx.run);
    let worker = |peer: &Peer<B>| -> Result<()> {
        let (jobs, policy) = copies[peer.rank - 1]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .expect("each peer takes its copies once");
        let task = config.task.build()?;
        let protocol = tokens.protocol(task.as_ref(), &config.task)?;
        let mut own = follower_ctx(config, task.as_ref(), protocol.as_ref(), tokens, run, None)?;
        run_closing(&mut own, jobs, &policy, Some(peer)).map(|_| ())
    };
    run_peers::<B, _>(devices, |peer| run_closing(ctx, jobs, policy, Some(peer)), worker)
}

impl<B: Backend> Closing<B> {
    /// This evaluation with its model on `device`.
    fn copy_to(&self, device: &B::Device) -> Self {
        Self {
            stage: self.stage,
            step: self.step,
            subject: match &self.subject {
                Subject::Reused(s, t) => Subject::Reused(s.clone(), *t),
                Subject::Policy => Subject::Policy,
                Subject::Model(m) => Subject::Model(Box::new(m.as_ref().clone().to_device(device))),
            },
        }
    }
}

/// The closing evaluations on one peer (or, without one, alone); the leader's summaries.
fn run_closing<B: AutodiffBackend>(
    ctx: &mut Ctx,
    jobs: Vec<Closing<B::InnerBackend>>,
    policy: &Transformer<B::InnerBackend>,
    peer: Option<&Peer<B>>,
) -> Result<Vec<EvalSummary>> {
    let mut out = Vec::with_capacity(jobs.len());
    for job in jobs {
        let summary = match job.subject {
            Subject::Reused(summary, seconds) => {
                if peer.is_none_or(|p| p.leader()) {
                    ctx.log_reused(job.stage, job.step, &summary, seconds)?;
                }
                Some(summary)
            }
            Subject::Policy => ctx.evaluate_shared(policy, job.stage, job.step, peer)?,
            Subject::Model(m) => ctx.evaluate_shared(&m, job.stage, job.step, peer)?,
        };
        out.extend(summary);
    }
    Ok(out)
}

/// A node other than the leader, after RL: takes its share of the closing evaluations the
/// leader's message names, with `policy` (its own fine-tuned copy) where it names the policy.
pub(super) fn follow_closing<B: AutodiffBackend>(
    ctx: &mut Ctx,
    policy: &Transformer<B::InnerBackend>,
    peer: &Peer<B>,
    device: &B::Device,
) -> Result<()> {
    let group = peer.nodes().expect("a peer of a group of nodes");
    let mut msg = group.gather(&[], true)?.swap_remove(0);
    let order: Vec<Sent> = unframe(&mut msg, "closing evaluations")?;
    for sent in order {
        // The stage and step label only the leader's records.
        match sent {
            Sent::Reused => {}
            Sent::Policy => {
                ctx.evaluate_shared(policy, "closing", 0, Some(peer))?;
            }
            Sent::Checkpoint(len) => {
                if msg.len() < len {
                    return Err(Error::Peer {
                        rank: 0,
                        reason: "sent closing evaluations shorter than the lengths they name".into(),
                    });
                }
                let rest = msg.split_off(len);
                let bytes = std::mem::replace(&mut msg, rest);
                let model =
                    read_checkpoint(bytes, ctx.config, "model to evaluate")?.model::<B::InnerBackend>(device)?;
                ctx.evaluate_shared(&model, "closing", 0, Some(peer))?;
            }
        }
    }
    Ok(())
}
