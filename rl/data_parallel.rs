//! The RL stage of the pipeline on a data-parallel group (`--devices`): one peer per device,
//! the first leading with the run's context, every other with a copy of the policy and a
//! context of its own that writes nothing. The transport is rl/parallel.rs.

use std::sync::Mutex;

use burn::module::Module;
use burn::tensor::backend::AutodiffBackend;

use super::eval::eval_problems;
use super::metrics::MetricsWriter;
use super::optim::Adam;
use super::parallel::{run_peers, Peer};
use super::protocol::Tokens;
use super::stage::Ctx;
use super::train::train_rl;
use crate::error::Result;
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
        let mut own = Ctx {
            config,
            task: task.as_ref(),
            protocol: protocol.as_ref(),
            vocab: rl.tokens.words(),
            run,
            metrics: MetricsWriter::discard(),
            eval_problems: eval_problems(task.as_ref(), config.eval.problems, config.eval.split)?,
            quiet: true,
            interrupt_after: rl.interrupt_after,
            latest_evals: Vec::new(),
        };
        train_rl(&mut own, model, optim, reference.as_ref(), rl.start, Some(peer)).map(|_| ())
    };
    run_peers::<B, _>(
        devices,
        |peer| train_rl(ctx, model, optim, rl.reference, rl.start, Some(peer)),
        worker,
    )
}
