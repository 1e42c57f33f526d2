//! Supervised warm start on scripted traces: AdamW, warmup + cosine, global-norm clipping, loss
//! on the policy's own tokens only (never on prompts, environment replies, forced suffixes or
//! padding). Fresh traces every step from training problems, so there are no epochs.
//!
//! Data-parallel (`parallel.rs`): every peer writes the step's whole batch of traces from the
//! step RNG (scripted traces cost nothing next to the model), trains on its consecutive share of
//! them with the whole batch's token count as the mean's denominator, and the gradients are
//! summed: the update is the one-device update up to summation order.

use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use super::loss::sft_loss;
use super::metrics::Record;
use super::optim::{step_grads, Adam};
use super::parallel::Peer;
use super::run::{save_state, step_rng, Progress, Stage};
use super::stage::{due, eval_line, Ctx};
use crate::data::batch::collate;
use crate::data::{sample_problem, warm_start_trace, Split, Tokenized};
use crate::error::{Error, Result};
use crate::model::{token_logprobs, Transformer};

/// Runs warm-start steps `start..steps`; returns the model and whether the stage completed.
/// With `peer`, one peer of a data-parallel group: it trains on its share of each step's
/// traces, the gradients are summed over the group, and only the leader writes metrics and
/// checkpoints.
pub fn warm_start<B: AutodiffBackend>(
    ctx: &mut Ctx,
    mut model: Transformer<B>,
    mut optim: Adam<B>,
    start: usize,
    peer: Option<&Peer<B>>,
) -> Result<(Transformer<B>, Adam<B>, bool)> {
    let cfg = ctx.config.warm_start.clone();
    let device = model.device();
    let mix = ctx
        .config
        .task
        .warm_start()
        .ok_or_else(|| {
            Error::config(
                "warm_start.steps",
                cfg.steps,
                "this task has no scripted traces: a pretrained model starts RL directly (use 0)",
            )
        })?
        .clone();
    let vocab = ctx.vocab.ok_or_else(|| {
        Error::config(
            "warm_start.steps",
            cfg.steps,
            "a warm start needs the task's word vocabulary",
        )
    })?;
    let bar = ctx.progress_bar("warm-start", cfg.steps, start);
    let log_every = (cfg.steps / 20).max(1);
    for step in start..cfg.steps {
        if ctx.interrupt_after.is_some_and(|n| step - start >= n) {
            return Ok((model, optim, false));
        }
        let t0 = Instant::now();
        let mut rng = step_rng(ctx.config.seed, "warm-start", step);
        let traces: Vec<Tokenized> = (0..cfg.batch_size)
            .map(|_| {
                let p = sample_problem(ctx.task, Split::Train, &mut rng)?;
                warm_start_trace(ctx.task, &p, &mix, &mut rng).tokenize(vocab)
            })
            .collect::<Result<_>>()?;
        let share = peer.map_or(0..traces.len(), |p| p.shard(traces.len()));
        let refs: Vec<&Tokenized> = traces[share].iter().collect();
        let batch = collate::<B>(&refs, vocab.specials.pad, &device);
        let lp = token_logprobs(&model, batch.tokens, Some(batch.mask.clone()), false, 1.0);
        // The whole step's tokens, on every peer (each wrote every trace).
        let targets: usize = traces.iter().map(Tokenized::targets).sum();
        let tokens: usize = traces.iter().map(|t| t.ids.len()).sum();
        let loss = match peer {
            None => sft_loss(lp.logprobs, &batch.mask),
            Some(_) => -(lp.logprobs * batch.mask).sum() / targets.max(1) as f64,
        };
        let mut loss_value: f64 = loss.clone().into_scalar().elem();
        let mut grads = GradientsParams::from_grads(loss.backward(), &model);
        let mut allreduce_s = None;
        if let Some(p) = peer {
            let t = Instant::now();
            grads = p.grads(&model, grads)?;
            loss_value = p.sum(&[loss_value])?[0];
            allreduce_s = Some(t.elapsed().as_secs_f64());
        }
        // The whole step's loss: every peer of a group stops here together.
        if !loss_value.is_finite() {
            return Err(Error::Diverged {
                step,
                what: "warm-start loss".into(),
                value: loss_value,
            });
        }
        let lr = cfg.optim.lr_at(step, cfg.steps);
        let (next, grad_norm) = step_grads(model, &mut optim, grads, lr, cfg.optim.grad_clip);
        model = next;
        let dt = t0.elapsed().as_secs_f64();
        let done = step + 1;

        let mut rec = Record::new("warm-start", done);
        rec.set("train/loss", loss_value)
            .set("train/lr", lr)
            .set("train/grad_norm", grad_norm)
            .set("train/tokens", targets)
            .set("perf/step_s", dt)
            .set("perf/tok_s", tokens as f64 / dt);
        if let Some(s) = allreduce_s {
            rec.set("perf/allreduce_s", s);
        }
        ctx.metrics.write(&rec)?;
        bar.set_position(done as u64);
        bar.set_message(format!("loss {loss_value:.4}"));
        if done % log_every == 0 || done == cfg.steps {
            ctx.say(
                &bar,
                format!(
                    "warm-start {done:>5}/{} | loss {loss_value:.4} | lr {lr:.2e} | grad {grad_norm:.3} | {:.0} ms",
                    cfg.steps,
                    dt * 1e3
                ),
            );
        }
        if due(cfg.eval_every, done, cfg.steps) {
            // Every peer samples its share of the held-out problems; the leader reports.
            if let Some(summary) = ctx.evaluate_shared(&model.valid(), "warm-start", done, peer)? {
                ctx.say(&bar, eval_line("warm-start", done, &summary));
            }
        }
        if due(cfg.checkpoint_every, done, cfg.steps) && peer.is_none_or(|p| p.leader()) {
            save_state(
                &ctx.run.checkpoint("latest"),
                &model,
                &optim,
                Progress {
                    stage: Stage::WarmStart,
                    step: done,
                },
            )?;
        }
    }
    bar.finish_and_clear();
    Ok((model, optim, true))
}
