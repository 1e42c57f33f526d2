//! The RL loop, top to bottom: sample problems → rollouts (with the meta-prover's J after each
//! episode when the objective needs it) → advantages → loss → backward → optimizer step →
//! metrics → evaluation / checkpoint. GRPO and the MRT variants share all of it and differ in
//! [`score`], which turns rollouts into per-token advantages (see `advantage.rs`).

use std::time::Instant;

use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use rand::rngs::StdRng;
use rand::Rng;

use super::advantage::{dense_token_advantages, grpo, mrt_continuations, progress, progress_per_episode};
use super::batch::rollout_batch;
use super::config::{Algo, RlConfig};
use super::loss::{policy_loss, sft_loss, PgBatch};
use super::metrics::Record;
use super::optim::{step as optim_step, Adam};
use super::rollout::{Engine, Finish, Rollout};
use super::run::{save_state, step_rng, Progress, Stage};
use super::stage::{due, eval_line, Ctx};
use crate::data::{sample_problem, Problem, Split};
use crate::error::{Error, Result};
use crate::model::{token_logprobs, Transformer};

/// Rollouts of one step with their training signal.
pub struct Scored {
    pub rollouts: Vec<Rollout>,
    /// Per rollout, per token: the advantage (indexed like the rollout's tokens).
    pub token_advantages: Vec<Vec<f32>>,
    /// Whether a rollout takes part in the loss.
    pub keep: Vec<bool>,
    /// Groups (problems or prefixes) and those whose outcomes were all equal.
    pub groups: usize,
    pub degenerate_groups: usize,
    /// `mrt`: prefixes that answered before reaching their length (not continued).
    pub prefixes_finished: usize,
}

/// Rollouts and advantages for one step of `algo` on `problems`.
pub fn score<B: Backend>(engine: &Engine<B>, problems: &[Problem], cfg: &RlConfig, rng: &mut StdRng) -> Result<Scored> {
    if cfg.algo == Algo::Mrt {
        return score_mrt(engine, problems, cfg, rng);
    }
    let g = cfg.group_size;
    let rollouts = engine.rollouts(problems, g, rng)?;
    let rewards: Vec<f32> = rollouts.iter().map(|r| r.reward).collect();
    let (adv, mut keep, degenerate) = grpo(&rewards, g, cfg.scale_by_std);
    let alpha = cfg.alpha as f32;
    if cfg.algo == Algo::MrtDense && alpha > 0.0 {
        // A group whose outcomes are all equal has no outcome signal (its outcome advantage is
        // 0), but its episodes still differ in progress: that is exactly where outcome RL goes
        // blind once a problem is always solved, and where the bonus should act.
        keep.iter_mut().for_each(|k| *k = true);
    }
    let mut token_advantages: Vec<Vec<f32>> = rollouts
        .iter()
        .zip(&adv)
        .map(|(r, &a)| match cfg.algo {
            Algo::MrtDense => {
                let prg: Vec<f32> = progress(&r.j).into_iter().map(|p| if p.is_finite() { p } else { 0.0 }).collect();
                dense_token_advantages(r.tokens.len(), a, &r.episodes, &prg, alpha)
            }
            _ => vec![a; r.tokens.len()],
        })
        .collect();
    if matches!(cfg.algo, Algo::Star | Algo::MrtStar) {
        // Supervised on selected correct streams: weight 1 on their tokens.
        for (group, chunk) in rollouts.chunks(g).enumerate() {
            let mut correct: Vec<usize> = (0..g).filter(|&i| chunk[i].reward > 0.0).map(|i| group * g + i).collect();
            if cfg.algo == Algo::MrtStar {
                correct.sort_by(|&a, &b| progress_per_episode(&rollouts[b].j).total_cmp(&progress_per_episode(&rollouts[a].j)));
                let n = ((correct.len() as f64 * cfg.star_keep).ceil() as usize).max(1).min(correct.len());
                correct.truncate(n);
            }
            for i in group * g..(group + 1) * g {
                keep[i] = correct.contains(&i);
                token_advantages[i].iter_mut().for_each(|a| *a = 1.0);
            }
        }
    }
    Ok(Scored {
        rollouts,
        token_advantages,
        keep,
        groups: problems.len(),
        degenerate_groups: degenerate,
        prefixes_finished: 0,
    })
}

/// The paper's recipe: a prefix of a random number of episodes per problem, then m
/// continuations of it, the first `terminate_fraction · m` forced to answer at once. A
/// continuation's advantage is its outcome against the termination baseline of its prefix
/// (the terminated continuations' mean reward, or the prover's J of the prefix when none are
/// terminated).
///
/// A prefix that answers before reaching its drawn length k has only e < k episodes; it is
/// drawn again with k' uniform in 0..e, so that problems the policy solves quickly still
/// contribute (otherwise long draws would mostly be wasted on them).
fn score_mrt<B: Backend>(engine: &Engine<B>, problems: &[Problem], cfg: &RlConfig, rng: &mut StdRng) -> Result<Scored> {
    let m = cfg.group_size;
    let n_term = ((cfg.terminate_fraction * m as f64).round() as usize).min(m - 1);
    let continuation = Engine { model: engine.model, task: engine.task, vocab: engine.vocab, config: engine.config, prover: None };
    let (mut rollouts, mut baselines) = (Vec::new(), Vec::new());
    let mut pending: Vec<(usize, usize)> = problems.iter().enumerate().map(|(p, _)| (p, rng.random_range(0..=cfg.max_prefix_episodes))).collect();
    let mut prefixes_finished = 0;
    for round in 0..2 {
        if pending.is_empty() {
            break;
        }
        let subset: Vec<Problem> = pending.iter().map(|&(p, _)| problems[p].clone()).collect();
        let lengths: Vec<usize> = pending.iter().map(|&(_, k)| k).collect();
        let mut prefixes = engine.start(&subset, 1, rng)?;
        Engine::pause_at(&mut prefixes, &lengths);
        engine.run(&mut prefixes, &subset, rng)?;
        let paused = Engine::paused(&prefixes);
        let (mut rows, mut terminate) = (Vec::new(), Vec::new());
        let mut redraw = Vec::new();
        for (i, r) in Engine::rollouts_of(&prefixes).enumerate() {
            if paused[i] {
                rows.extend(std::iter::repeat_n(i, m));
                terminate.extend((0..m).map(|c| c < n_term));
                baselines.push(r.j.last().copied().unwrap_or(f32::NAN));
            } else if round == 0 && !r.episodes.is_empty() {
                redraw.push((pending[i].0, rng.random_range(0..r.episodes.len())));
            } else {
                prefixes_finished += 1;
            }
        }
        let mut cont = Engine::fork(&prefixes, &rows, &terminate);
        continuation.run(&mut cont, &subset, rng)?;
        rollouts.extend(Engine::finish(cont).into_iter().map(|mut r| {
            r.problem = pending[r.problem].0;
            r
        }));
        pending = redraw;
    }

    let mut token_advantages = Vec::with_capacity(rollouts.len());
    let mut keep = Vec::with_capacity(rollouts.len());
    let mut degenerate = 0;
    let alpha = cfg.alpha as f32;
    for (group, chunk) in rollouts.chunks(m).enumerate() {
        let term: Vec<f32> = chunk[..n_term].iter().map(|r| r.reward).collect();
        let cont_rewards: Vec<f32> = chunk[n_term..].iter().map(|r| r.reward).collect();
        let baseline = if n_term > 0 { term.iter().sum::<f32>() / n_term as f32 } else { baselines[group] };
        let baseline = if baseline.is_finite() { baseline } else { 0.0 };
        degenerate += chunk.iter().all(|r| r.reward == chunk[0].reward) as usize;
        let adv = mrt_continuations(&cont_rewards, baseline, alpha, cfg.scale_by_std);
        for (i, r) in chunk.iter().enumerate() {
            let a = if i < n_term { 0.0 } else { adv[i - n_term] };
            token_advantages.push(vec![a; r.tokens.len()]);
            keep.push(i >= n_term);
        }
    }
    Ok(Scored {
        groups: rollouts.len() / m,
        rollouts,
        token_advantages,
        keep,
        degenerate_groups: degenerate,
        prefixes_finished,
    })
}

/// Runs RL steps `start..steps`; returns the model, optimizer and whether the stage completed.
pub fn train_rl<B: AutodiffBackend>(
    ctx: &mut Ctx,
    mut model: Transformer<B>,
    mut optim: Adam<B>,
    reference: Option<&Transformer<B::InnerBackend>>,
    start: usize,
) -> Result<(Transformer<B>, Adam<B>, bool)> {
    let cfg = ctx.config.rl.clone();
    let device = model.device();
    let bar = ctx.progress_bar(cfg.algo.name(), cfg.steps, start);
    let log_every = (cfg.steps / 20).max(1);
    for step in start..cfg.steps {
        if ctx.interrupt_after.is_some_and(|n| step - start >= n) {
            return Ok((model, optim, false));
        }
        let t0 = Instant::now();
        let mut rng = step_rng(ctx.config.seed, "rl", step);
        let problems: Vec<Problem> = (0..cfg.problems_per_step).map(|_| sample_problem(ctx.task, Split::Train, &mut rng)).collect();

        // 1. Rollouts and advantages, on the inference copy of the policy.
        let policy = model.valid();
        let prover = cfg.algo.needs_prover().then_some(&cfg.prover);
        let engine = Engine { model: &policy, task: ctx.task, vocab: ctx.vocab, config: &cfg.rollout, prover };
        let scored = score(&engine, &problems, &cfg, &mut rng)?;
        let rollout_s = t0.elapsed().as_secs_f64();

        // 2. Loss on the policy's own tokens, 3. update.
        let refs: Vec<&Rollout> = scored.rollouts.iter().collect();
        let batch = rollout_batch::<B>(&refs, &scored.token_advantages, &scored.keep, ctx.vocab.specials.pad, &device);
        let supervised = matches!(cfg.algo, Algo::Star | Algo::MrtStar);
        let lr = cfg.optim.lr_at(step, cfg.steps);
        let mut rec = Record::new("rl", step + 1);
        if batch.trained_tokens > 0 {
            let old_logp = (cfg.ppo_epochs > 1).then(|| {
                Tensor::<B, 2>::from_inner(token_logprobs(&policy, batch.tokens.clone().inner(), Some(batch.mask.clone().inner()), false).logprobs)
            });
            let ref_logp = reference.filter(|_| cfg.kl_beta > 0.0).map(|r| {
                Tensor::<B, 2>::from_inner(token_logprobs(r, batch.tokens.clone().inner(), Some(batch.mask.clone().inner()), false).logprobs)
            });
            for epoch in 0..cfg.ppo_epochs {
                let lp = token_logprobs(&model, batch.tokens.clone(), Some(batch.mask.clone()), epoch == 0);
                if let Some(entropy) = &lp.entropy {
                    let e: f64 = ((entropy.clone() * batch.mask.clone()).sum() / batch.trained_tokens as f32).into_scalar().elem();
                    rec.set("train/entropy", e);
                }
                let loss = if supervised {
                    sft_loss(lp.logprobs, &batch.mask)
                } else {
                    let old = old_logp.clone().unwrap_or_else(|| lp.logprobs.clone().detach());
                    let out = policy_loss(
                        PgBatch { logp: lp.logprobs, old_logp: old, ref_logp: ref_logp.clone(), advantages: batch.advantages.clone(), mask: batch.mask.clone() },
                        cfg.clip_eps,
                        cfg.kl_beta,
                    );
                    rec.set("train/approx_kl", out.approx_kl.into_scalar().elem::<f64>())
                        .set("train/clip_frac", out.clip_fraction.into_scalar().elem::<f64>())
                        .set("train/ref_kl", out.ref_kl.into_scalar().elem::<f64>());
                    out.loss
                };
                let value: f64 = loss.clone().into_scalar().elem();
                if !value.is_finite() {
                    return Err(Error::Diverged { step: step + 1, what: "RL loss".into(), value });
                }
                rec.set("train/loss", value);
                let (next, norm) = optim_step(model, &mut optim, loss, lr, cfg.optim.grad_clip);
                model = next;
                rec.set("train/grad_norm", norm);
            }
        }
        let step_s = t0.elapsed().as_secs_f64();
        log_rollouts(&mut rec, &scored, cfg.group_size);
        let generated: usize = scored.rollouts.iter().map(|r| r.tokens.len() - r.context_len).sum();
        rec.set("train/lr", lr)
            .set("train/trained_tokens", batch.trained_tokens)
            .set("perf/step_s", step_s)
            .set("perf/rollout_s", rollout_s)
            .set("perf/tok_s", generated as f64 / rollout_s.max(1e-9));
        ctx.metrics.write(&rec)?;

        let done = step + 1;
        let reward = rec.get("rollout/reward").unwrap_or(f64::NAN);
        bar.set_position(done as u64);
        bar.set_message(format!("reward {reward:.3}"));
        if done % log_every == 0 || done == cfg.steps {
            ctx.say(
                &bar,
                format!(
                    "{:>10} {done:>5}/{} | reward {reward:.3} | loss {:.4} | all-equal {:.2} | tokens {:.1} | progress {:+.3} | {:.0} ms",
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
        if due(cfg.eval_every, done, cfg.steps) {
            let summary = ctx.evaluate(&model.valid(), "rl", done)?;
            ctx.say(&bar, eval_line("rl", done, &summary));
        }
        if due(cfg.checkpoint_every, done, cfg.steps) {
            save_state(&ctx.run.checkpoint("latest"), &model, &optim, Progress { stage: Stage::Rl, step: done })?;
        }
    }
    bar.finish_and_clear();
    Ok((model, optim, true))
}

/// `rollout/…` and `prover/…` metrics of one step.
fn log_rollouts(rec: &mut Record, s: &Scored, group: usize) {
    let n = s.rollouts.len().max(1) as f64;
    let mean = |f: &dyn Fn(&Rollout) -> f64| s.rollouts.iter().map(f).sum::<f64>() / n;
    rec.set("rollout/reward", mean(&|r| r.reward as f64))
        .set("rollout/len_tokens", mean(&|r| (r.tokens.len() - r.context_len) as f64))
        .set("rollout/episodes", mean(&|r| r.episodes.len() as f64))
        .set("rollout/forced", mean(&|r| (r.finish == Finish::Forced) as u8 as f64))
        .set("rollout/all_equal_frac", s.degenerate_groups as f64 / s.groups.max(1) as f64)
        .set("rollout/kept", s.keep.iter().filter(|&&k| k).count())
        .set("rollout/prefixes_finished", s.prefixes_finished);
    let pass: usize = s.rollouts.chunks(group).filter(|c| c.iter().any(|r| r.reward > 0.0)).count();
    rec.set("rollout/pass_rate", pass as f64 / s.rollouts.chunks(group).count().max(1) as f64);
    let prg: Vec<f32> = s.rollouts.iter().flat_map(|r| progress(&r.j)).filter(|p| p.is_finite()).collect();
    if !prg.is_empty() {
        rec.set("prover/progress_mean", prg.iter().sum::<f32>() as f64 / prg.len() as f64);
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
        let max_j = s.rollouts.iter().map(|r| r.j.len()).max().unwrap_or(0);
        for j in 0..max_j {
            let v: Vec<f32> = s.rollouts.iter().filter_map(|r| r.j.get(j).copied()).filter(|x| x.is_finite()).collect();
            if !v.is_empty() {
                rec.set(&format!("prover/j@{j}"), v.iter().sum::<f32>() as f64 / v.len() as f64);
            }
        }
        let wf: Vec<f32> = s.rollouts.iter().flat_map(|r| r.j_well_formed.iter().copied()).filter(|x| x.is_finite()).collect();
        if !wf.is_empty() {
            rec.set("prover/well_formed", wf.iter().sum::<f32>() as f64 / wf.len() as f64);
        }
    }
}
