//! The RL loop, top to bottom: sample problems → rollouts (with the meta-prover's J after each
//! episode when the objective needs it) → training signal → loss → backward → optimizer step →
//! metrics → evaluation / checkpoint. GRPO and the MRT variants share all of it and differ in
//! [`score`], which turns rollouts into each rollout's training signal.

use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;

use super::advantage::progress;
use super::batch::{shard_batch, RolloutBatch};
use super::config::{Algo, RlConfig};
use super::eval::samples::{append as append_samples, samples};
use super::metrics::Record;
use super::optim::{step_grads, Adam};
use super::parallel::Peer;
use super::passes::{batch_gradients, frozen_logprobs, row_chunks, LossSpec};
use super::rollout::{Engine, Finish, Rollout};
use super::run::{save_state, step_rng, Progress, Stage};
use super::score::{sample, signal, Scored};
use super::stage::{due, eval_line, Ctx};
use crate::data::{sample_problem, Problem, Split};
use crate::error::{Error, Result};
use crate::model::{split_rngs, Transformer};

/// Runs RL steps `start..steps`; returns the model, optimizer and whether the stage completed.
/// With `peer`, this is one peer of a data-parallel group (`parallel.rs`): it samples its
/// share of each step's problems (and of each evaluation's), the gradients are summed over the
/// group, and only the leader writes metrics, samples and checkpoints.
pub fn train_rl<B: AutodiffBackend>(
    ctx: &mut Ctx,
    mut model: Transformer<B>,
    mut optim: Adam<B>,
    reference: Option<&Transformer<B::InnerBackend>>,
    start: usize,
    peer: Option<&Peer<B>>,
) -> Result<(Transformer<B>, Adam<B>, bool)> {
    let cfg = ctx.config.rl.clone();
    let leader = peer.is_none_or(|p| p.leader());
    let device = model.device();
    if let Some(p) = peer {
        let setup = serde_json::json!({ "config": ctx.config, "start": start });
        p.agree("configuration, seed or start step", setup.to_string().as_bytes())?;
    }
    let bar = ctx.progress_bar(cfg.algo.name(), cfg.steps, start);
    let log_every = (cfg.steps / 20).max(1);
    for step in start..cfg.steps {
        if ctx.interrupt_after.is_some_and(|n| step - start >= n) {
            return Ok((model, optim, false));
        }
        let t0 = Instant::now();
        let mut rng = step_rng(ctx.config.seed, "rl", step);
        // Problems first, from the step's own RNG: every algorithm of a seed sees the same ones.
        let problems: Vec<Problem> = (0..cfg.problems_per_step)
            .map(|_| sample_problem(ctx.task, Split::Train, &mut rng))
            .collect::<Result<_>>()?;

        // 1. Rollouts and advantages, on the inference copy of the policy.
        let policy = model.valid();
        let prover = cfg.algo.needs_prover().then_some(&cfg.prover);
        let engine = Engine {
            model: &policy,
            protocol: ctx.protocol,
            config: &cfg.rollout,
            prover,
        };
        // One generator per problem: its rollouts are the same on whichever peer samples it.
        let mut rngs = split_rngs(&mut rng, problems.len());
        let share = peer.map_or(0..problems.len(), |p| p.shard(problems.len()));
        let sampled = sample(&engine, &problems[share.clone()], &cfg, &mut rngs[share])?;
        let rollout_s = t0.elapsed().as_secs_f64();
        let mut rec = Record::new("rl", step + 1);
        let (sampled, mine) = match peer {
            None => {
                let n = sampled.rollouts.len();
                (sampled, 0..n)
            }
            Some(p) => {
                let mut times = vec![0.0; p.count];
                times[p.rank] = rollout_s;
                for (rank, t) in p.sum(&times)?.into_iter().enumerate() {
                    rec.set(&format!("perf/rollout_s/peer{rank}"), t);
                }
                p.sampled(sampled)?
            }
        };
        let scored = signal(sampled, &cfg);
        if cfg.samples_per_step > 0 && leader {
            let shown = &scored.rollouts[..cfg.samples_per_step.min(scored.rollouts.len())];
            append_samples(
                &ctx.run.root.join("samples.jsonl"),
                &samples(ctx.protocol, shown, Some(step + 1))?,
            )?;
        }

        // 2. Loss on the policy's own tokens, 3. update.
        let refs: Vec<&Rollout> = scored.rollouts.iter().collect();
        let batch = shard_batch::<B>(&refs, &scored.signals, mine, ctx.protocol.pad(), &device);
        let lr = cfg.optim.lr_at(step, cfg.steps);
        let fit = Fit {
            policy: &policy,
            reference,
            cfg: &cfg,
            lr,
            step,
            peer,
        };
        (model, optim) = update(model, optim, &batch, &fit, &mut rec)?;
        let step_s = t0.elapsed().as_secs_f64();
        log_rollouts(&mut rec, &scored);
        // Every token the policy sampled this step (an `mrt` step samples its prefix streams
        // and the continuations); the prover's forced answers are not counted.
        let generated: usize = scored
            .rollouts
            .iter()
            .chain(&scored.prefix_streams)
            .map(|r| r.policy_tokens_after_context())
            .sum();
        rec.set("train/lr", lr)
            .set("train/trained_tokens", batch.trained_tokens)
            .set("train/outcome_tokens", batch.outcome_tokens)
            .set("train/progress_tokens", batch.progress_tokens)
            .set("update/outcome_share", batch.outcome_share())
            .set("adv/outcome_abs", scored.outcome_abs)
            .set("adv/progress_abs", scored.progress_abs)
            .set("perf/sampled_tokens", generated)
            .set("perf/step_s", step_s)
            .set("perf/rollout_s", rollout_s)
            .set("perf/tok_s", generated as f64 / rollout_s.max(1e-9));
        let done = step + 1;
        if leader {
            ctx.metrics.write(&rec)?;
            let reward = rec.get("rollout/reward").unwrap_or(f64::NAN);
            bar.set_position(done as u64);
            bar.set_message(format!("reward {reward:.3}"));
            if done % log_every == 0 || done == cfg.steps {
                ctx.say(
                    &bar,
                    format!(
                        "{:>10} {done:>5}/{} | reward {reward:.3} | loss {:.4} | all-equal {:.2} | tokens {:.1} | \
                            progress {:+.3} | {:.0} ms",
                        cfg.algo.name(),
                        cfg.steps,
                        rec.get("train/loss").unwrap_or(f64::NAN),
                        rec.get("rollout/all_equal_frac").unwrap_or(f64::NAN),
                        rec.get("rollout/len_tokens").unwrap_or(f64::NAN),
                        rec.get("prover/progress_mean").unwrap_or(f64::NAN),
                        step_s * 1e3
                    ),
                );
            }
        }
        if due(cfg.eval_every, done, cfg.steps) {
            // Every peer samples its share of the held-out problems; the leader reports.
            if let Some(summary) = ctx.evaluate_shared(&model.valid(), "rl", done, peer)? {
                ctx.say(&bar, eval_line("rl", done, &summary));
            }
        }
        if leader && due(cfg.checkpoint_every, done, cfg.steps) {
            save_state(
                &ctx.run.checkpoint("latest"),
                &model,
                &optim,
                Progress {
                    stage: Stage::Rl,
                    step: done,
                },
            )?;
        }
    }
    bar.finish_and_clear();
    Ok((model, optim, true))
}

/// What an update is made with besides the batch: `policy` is the inference copy that sampled
/// it (the behaviour policy of PPO's ratio), `reference` the frozen model of the KL penalty,
/// `peer` the data-parallel group the gradients are summed over.
struct Fit<'a, B: AutodiffBackend> {
    policy: &'a Transformer<B::InnerBackend>,
    reference: Option<&'a Transformer<B::InnerBackend>>,
    cfg: &'a RlConfig,
    lr: f64,
    step: usize,
    peer: Option<&'a Peer<B>>,
}

/// The policy-gradient update of one step on `batch`: `ppo_epochs` passes of loss and
/// gradients (in micro-batches of rows, `rl.micro_batch`), each followed by an optimizer step;
/// `train/…` metrics into `rec`.
fn update<B: AutodiffBackend>(
    mut model: Transformer<B>,
    mut optim: Adam<B>,
    batch: &RolloutBatch<B>,
    fit: &Fit<B>,
    rec: &mut Record,
) -> Result<(Transformer<B>, Adam<B>)> {
    let Fit {
        policy,
        reference,
        cfg,
        lr,
        step,
        peer,
    } = *fit;
    // The whole step's count: every peer of a group returns here together.
    if batch.trained_tokens == 0 {
        return Ok((model, optim));
    }
    let supervised = matches!(cfg.algo, Algo::Star | Algo::MrtStar);
    let temperature = cfg.rollout.sampler.temperature;
    let chunks = row_chunks(batch.tokens.dims()[0], cfg.micro_batch);
    let old_logp = (cfg.ppo_epochs > 1).then(|| frozen_logprobs(policy, batch, &chunks, temperature));
    let ref_logp = reference
        .filter(|_| cfg.kl_beta > 0.0)
        .map(|r| frozen_logprobs(r, batch, &chunks, temperature));
    let mut allreduce_s = 0.0;
    for epoch in 0..cfg.ppo_epochs {
        let spec = LossSpec {
            supervised,
            temperature,
            clip_eps: cfg.clip_eps,
            kl_beta: cfg.kl_beta,
            entropy: epoch == 0,
            checkpointing: cfg.activation_checkpointing,
        };
        let (mut grads, mut st) = batch_gradients(&model, batch, &chunks, old_logp.as_ref(), ref_logp.as_ref(), spec);
        if let Some(p) = peer {
            let t = Instant::now();
            grads = p.grads(&model, grads)?;
            st = p.stats(st)?;
            allreduce_s += t.elapsed().as_secs_f64();
            rec.set("perf/allreduce_s", allreduce_s);
        }
        if !st.loss.is_finite() {
            return Err(Error::Diverged {
                step: step + 1,
                what: "RL loss".into(),
                value: st.loss,
            });
        }
        if epoch == 0 {
            rec.set("train/entropy", st.entropy);
        }
        if !supervised {
            rec.set("train/approx_kl", st.approx_kl)
                .set("train/clip_frac", st.clip_frac)
                .set("train/ref_kl", st.ref_kl);
        }
        rec.set("train/loss", st.loss);
        let (next, norm) = step_grads(model, &mut optim, grads, lr, cfg.optim.grad_clip);
        model = next;
        rec.set("train/grad_norm", norm);
    }
    Ok((model, optim))
}

/// `rollout/…` and `prover/…` metrics of one step, over the full streams sampled from the
/// prompts (for `mrt` its prefix streams, not the continuations), plus `mrt/…` for the recipe.
fn log_rollouts(rec: &mut Record, s: &Scored) {
    let streams = s.streams();
    let n = streams.len().max(1) as f64;
    let mean = |f: &dyn Fn(&Rollout) -> f64| streams.iter().map(f).sum::<f64>() / n;
    rec.set("rollout/reward", mean(&|r| r.reward as f64))
        .set("rollout/len_tokens", mean(&|r| r.policy_tokens_after_context() as f64))
        .set("rollout/episodes", mean(&|r| r.episodes.len() as f64))
        .set("rollout/forced", mean(&|r| (r.finish == Finish::Forced) as u8 as f64))
        .set(
            "rollout/all_equal_frac",
            s.degenerate_groups as f64 / s.groups.max(1) as f64,
        )
        .set(
            "rollout/kept",
            s.signals.iter().filter(|x| x.in_outcome || x.bonus.is_some()).count(),
        );
    if !s.prefix_streams.is_empty() {
        let prefix_episodes = |r: &Rollout| r.episodes.iter().filter(|e| e.end <= r.context_len).count() as f64;
        rec.set(
            "mrt/continuation_reward",
            s.rollouts.iter().map(|r| r.reward as f64).sum::<f64>() / s.rollouts.len().max(1) as f64,
        )
        .set(
            "mrt/baseline",
            s.baselines.iter().map(|&b| b as f64).sum::<f64>() / s.baselines.len().max(1) as f64,
        )
        .set(
            "mrt/prefix_episodes",
            s.rollouts.iter().map(prefix_episodes).sum::<f64>() / s.rollouts.len().max(1) as f64,
        );
    }
    let prg: Vec<f32> = streams
        .iter()
        .flat_map(|r| progress(&r.j))
        .filter(|p| p.is_finite())
        .collect();
    if prg.is_empty() {
        return;
    }
    rec.set(
        "prover/progress_mean",
        prg.iter().sum::<f32>() as f64 / prg.len() as f64,
    );
    let buckets: [(&str, fn(f32) -> bool); 5] = [
        ("le-0.1", |p| p <= -0.1),
        ("-0.1..-0.01", |p| p > -0.1 && p <= -0.01),
        ("zero", |p| p.abs() < 0.01),
        ("0.01..0.1", |p| (0.01..0.1).contains(&p)),
        ("ge0.1", |p| p >= 0.1),
    ];
    for (name, inside) in buckets {
        let c = prg.iter().filter(|&&p| inside(p)).count();
        rec.set(&format!("prover/progress_hist/{name}"), c as f64 / prg.len() as f64);
    }
    let max_j = streams.iter().map(|r| r.j.len()).max().unwrap_or(0);
    for j in 0..max_j {
        let v: Vec<f32> = streams
            .iter()
            .filter_map(|r| r.j.get(j).copied())
            .filter(|x| x.is_finite())
            .collect();
        if !v.is_empty() {
            rec.set(&format!("prover/j@{j}"), v.iter().sum::<f32>() as f64 / v.len() as f64);
        }
    }
    let wf: Vec<f32> = streams
        .iter()
        .flat_map(|r| r.j_well_formed.iter().copied())
        .filter(|x| x.is_finite())
        .collect();
    if !wf.is_empty() {
        rec.set("prover/well_formed", wf.iter().sum::<f32>() as f64 / wf.len() as f64);
    }
}
