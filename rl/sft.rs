//! Supervised warm start on scripted traces: AdamW, warmup + cosine, global-norm clipping, loss
//! on the policy's own tokens only (never on prompts, environment replies, forced suffixes or
//! padding). Fresh traces every step from training problems, so there are no epochs.

use std::time::Instant;

use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use super::loss::sft_loss;
use super::metrics::Record;
use super::optim::{step as optim_step, Adam};
use super::run::{save_state, step_rng, Progress, Stage};
use super::stage::{due, eval_line, Ctx};
use crate::data::batch::collate;
use crate::data::{sample_problem, warm_start_trace, Split, Tokenized};
use crate::error::{Error, Result};
use crate::model::{token_logprobs, Transformer};

/// Runs warm-start steps `start..steps`; returns the model and whether the stage completed.
pub fn warm_start<B: AutodiffBackend>(
    ctx: &mut Ctx,
    mut model: Transformer<B>,
    mut optim: Adam<B>,
    start: usize,
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
        let refs: Vec<&Tokenized> = traces.iter().collect();
        let batch = collate::<B>(&refs, vocab.specials.pad, &device);
        let lp = token_logprobs(&model, batch.tokens, Some(batch.mask.clone()), false, 1.0);
        let loss = sft_loss(lp.logprobs, &batch.mask);
        let loss_value: f64 = loss.clone().into_scalar().elem();
        if !loss_value.is_finite() {
            return Err(Error::Diverged {
                step,
                what: "warm-start loss".into(),
                value: loss_value,
            });
        }
        let lr = cfg.optim.lr_at(step, cfg.steps);
        let (next, grad_norm) = optim_step(model, &mut optim, loss, lr, cfg.optim.grad_clip);
        model = next;
        let dt = t0.elapsed().as_secs_f64();
        let done = step + 1;

        let mut rec = Record::new("warm-start", done);
        rec.set("train/loss", loss_value)
            .set("train/lr", lr)
            .set("train/grad_norm", grad_norm)
            .set("train/tokens", batch.targets)
            .set("perf/step_s", dt)
            .set("perf/tok_s", batch.lengths.iter().sum::<usize>() as f64 / dt);
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
            let summary = ctx.evaluate(&model.valid(), "warm-start", done)?;
            ctx.say(&bar, eval_line("warm-start", done, &summary));
        }
        if due(cfg.checkpoint_every, done, cfg.steps) {
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
