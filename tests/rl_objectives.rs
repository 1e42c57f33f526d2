//! The objectives on a small warm-started `search` policy: training signals, loss masks and
//! normalisation, gradients, and the `mrt` recipe's prefixes and baselines.

mod common;

use burn::module::{AutodiffModule, Module, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use common::{exact, problems, rollouts_with_j, search_policy, AD, B};
use mrt::data::{Problem, Role};
use mrt::model::{split_rngs, token_logprobs, Transformer};
use mrt::rl::batch::{rollout_batch, RolloutBatch, Signal};
use mrt::rl::config::{Algo, RlConfig, RunConfig};
use mrt::rl::loss::{policy_loss, PgBatch};
use mrt::rl::optim::{adamw, require_grad, OptimConfig};
use mrt::rl::protocol::WordProtocol;
use mrt::rl::rollout::{Engine, Rollout};
use mrt::rl::score::{score, Scored};
use rand::rngs::StdRng;
use rand::SeedableRng;

fn rl_config(algo: Algo, alpha: f64) -> RlConfig {
    let mut cfg = RunConfig::default_for("search", "cpu-tiny", algo, 0, true).unwrap().rl;
    cfg.alpha = alpha;
    cfg.group_size = 4;
    cfg
}

/// One step's samples of `algo` on a fixed set of problems and seed.
fn scored(algo: Algo, alpha: f64, seed: u64) -> (Vec<Problem>, Scored) {
    let f = search_policy();
    let cfg = rl_config(algo, alpha);
    let ps = problems(12, 9);
    let prover = exact();
    let protocol = WordProtocol::new(f.task.as_ref(), &f.vocab);
    let engine = Engine {
        model: &f.model,
        protocol: &protocol,
        config: &cfg.rollout,
        prover: algo.needs_prover().then_some(&prover),
    };
    let s = score(
        &engine,
        &ps,
        &cfg,
        &mut split_rngs(&mut StdRng::seed_from_u64(seed), ps.len()),
    )
    .unwrap();
    (ps, s)
}

fn batch_of(rollouts: &[Rollout], signals: &[Signal]) -> RolloutBatch<AD> {
    let refs: Vec<&Rollout> = rollouts.iter().collect();
    rollout_batch::<AD>(&refs, signals, search_policy().vocab.specials.pad, &Default::default())
}

/// Loss (one PPO pass, ratio 1) and gradients of a batch under the fixture policy.
fn loss_and_grads_of(batch: RolloutBatch<AD>) -> (f32, Vec<Vec<f32>>) {
    let model: Transformer<AD> = require_grad(search_policy().model.clone().train::<AD>());
    let lp = token_logprobs(&model, batch.tokens, Some(batch.mask.clone()), false, 1.0);
    let out = policy_loss(
        PgBatch {
            old_logp: lp.logprobs.clone().detach(),
            logp: lp.logprobs,
            ref_logp: None,
            coef: batch.coef,
            mask: batch.mask,
        },
        0.2,
        0.0,
    );
    let loss: f32 = out.loss.clone().into_scalar();
    let grads = GradientsParams::from_grads(out.loss.backward(), &model);
    (loss, collect_grads(&model, &grads))
}

/// Loss and gradients of one objective on the rollouts of a fixed seed.
fn loss_and_grads(algo: Algo, alpha: f64) -> (f32, Vec<Vec<f32>>) {
    let (_, s) = scored(algo, alpha, 11);
    loss_and_grads_of(batch_of(&s.rollouts, &s.signals))
}
fn collect_grads(model: &Transformer<AD>, grads: &GradientsParams) -> Vec<Vec<f32>> {
    common::param_grads(model, grads)
}

#[test]
fn mrt_dense_with_alpha_zero_is_exactly_grpo() {
    let (l_grpo, g_grpo) = loss_and_grads(Algo::Grpo, 0.0);
    let (l_dense, g_dense) = loss_and_grads(Algo::MrtDense, 0.0);
    assert_eq!(l_grpo.to_bits(), l_dense.to_bits(), "{l_grpo} vs {l_dense}");
    assert!(!g_grpo.is_empty());
    assert_eq!(g_grpo, g_dense);
    assert!(g_grpo.iter().flatten().any(|&g| g != 0.0));
    // With α > 0 the progress bonus changes the gradient.
    let (_, g_bonus) = loss_and_grads(Algo::MrtDense, 1.0);
    assert_ne!(g_grpo, g_bonus);
}

#[test]
fn environment_tokens_and_forced_suffixes_get_no_gradient() {
    let f = search_policy();
    let (_, rs) = rollouts_with_j(6, 4, 5);
    let refs: Vec<&Rollout> = rs.iter().collect();
    let device = Default::default();
    let adv: Vec<Vec<f32>> = rs.iter().map(|r| vec![1.0; r.tokens.len()]).collect();
    // Same rollouts with absurd advantages on every token that is not the policy's own.
    let poisoned: Vec<Vec<f32>> = rs
        .iter()
        .map(|r| {
            r.roles
                .iter()
                .map(|&role| if role == Role::Policy { 1.0 } else { 1e6 })
                .collect()
        })
        .collect();
    let model: Transformer<AD> = require_grad(f.model.clone().train::<AD>());
    let grads_of = |adv: &[Vec<f32>]| {
        // Per-token values through the progress term, which takes any per-token signal.
        let signals: Vec<Signal> = adv
            .iter()
            .map(|a| Signal {
                outcome: 0.0,
                in_outcome: false,
                bonus: Some(a.clone()),
            })
            .collect();
        let batch = rollout_batch::<AD>(&refs, &signals, f.vocab.specials.pad, &device);
        let mask: Vec<f32> = batch.mask.clone().into_data().to_vec().unwrap();
        let lp = token_logprobs(&model, batch.tokens, Some(batch.mask.clone()), false, 1.0);
        let out = policy_loss(
            PgBatch {
                old_logp: lp.logprobs.clone().detach(),
                logp: lp.logprobs,
                ref_logp: None,
                coef: batch.coef,
                mask: batch.mask,
            },
            0.2,
            0.0,
        );
        (
            mask,
            collect_grads(&model, &GradientsParams::from_grads(out.loss.backward(), &model)),
        )
    };
    let (mask, g1) = grads_of(&adv);
    let (_, g2) = grads_of(&poisoned);
    assert_eq!(g1, g2);
    // The mask is exactly "policy token after the context" (targets are shifted by one).
    let t = rs.iter().map(|r| r.tokens.len()).max().unwrap();
    let mut forced = 0;
    for (i, r) in rs.iter().enumerate() {
        for pos in 1..t {
            let expected = pos < r.tokens.len() && r.roles[pos] == Role::Policy;
            assert_eq!(mask[i * (t - 1) + pos - 1] == 1.0, expected, "rollout {i} token {pos}");
            forced += (pos < r.tokens.len() && r.roles[pos] == Role::Forced) as usize;
        }
    }
    assert!(forced > 0, "the sample contains forced suffixes");
}

#[test]
fn one_update_with_positive_advantage_raises_the_sampled_tokens_log_prob() {
    let f = search_policy();
    let (_, rs) = rollouts_with_j(4, 4, 6);
    let refs: Vec<&Rollout> = rs.iter().collect();
    let device = Default::default();
    for sign in [1.0f32, -1.0] {
        let signals: Vec<Signal> = rs.iter().map(|_| Signal::outcome(sign, true)).collect();
        let batch = rollout_batch::<AD>(&refs, &signals, f.vocab.specials.pad, &device);
        let model: Transformer<AD> = require_grad(f.model.clone().train::<AD>());
        let total = |m: &Transformer<AD>| -> f32 {
            token_logprobs(
                &m.valid(),
                batch.tokens.clone().inner(),
                Some(batch.mask.clone().inner()),
                false,
                1.0,
            )
            .logprobs
            .sum()
            .into_scalar()
        };
        let before = total(&model);
        let lp = token_logprobs(&model, batch.tokens.clone(), Some(batch.mask.clone()), false, 1.0);
        let out = policy_loss(
            PgBatch {
                old_logp: lp.logprobs.clone().detach(),
                logp: lp.logprobs,
                ref_logp: None,
                coef: batch.coef.clone(),
                mask: batch.mask.clone(),
            },
            0.2,
            0.0,
        );
        let cfg = OptimConfig {
            lr: 1e-3,
            warmup_steps: 0,
            min_lr_ratio: 1.0,
            weight_decay: 0.0,
            grad_clip: 0.0,
        };
        let mut optim = adamw::<AD>(&cfg);
        let (model, _) = mrt::rl::optim::step(model, &mut optim, out.loss, cfg.lr, 0.0);
        let after = total(&model);
        assert!(
            sign * (after - before) > 0.1,
            "advantage {sign}: log-prob {before} → {after}"
        );
    }
}

#[test]
fn mrt_dense_outcome_term_is_grpo_s_whatever_the_progress_term_adds() {
    let (_, grpo) = scored(Algo::Grpo, 0.0, 11);
    let (_, dense) = scored(Algo::MrtDense, 2.0, 11);
    assert!(grpo.degenerate_groups > 0, "the batch has all-equal groups");
    assert_eq!(
        grpo.rollouts.iter().map(|r| &r.tokens).collect::<Vec<_>>(),
        dense.rollouts.iter().map(|r| &r.tokens).collect::<Vec<_>>()
    );
    let g = batch_of(&grpo.rollouts, &grpo.signals);
    let d = batch_of(&dense.rollouts, &dense.signals);
    // The progress term trains every rollout, the outcome term exactly GRPO's tokens.
    assert_eq!(d.outcome_tokens, g.trained_tokens);
    assert!(d.progress_tokens > g.trained_tokens && d.trained_tokens == d.progress_tokens);
    // The outcome part of the loss: the dense coefficients minus the progress term alone.
    let progress_only: Vec<Signal> = dense
        .signals
        .iter()
        .map(|s| Signal {
            in_outcome: false,
            ..s.clone()
        })
        .collect();
    let p = batch_of(&dense.rollouts, &progress_only);
    let diff: Vec<f32> = (d.coef.clone() - p.coef.clone()).into_data().to_vec().unwrap();
    let want: Vec<f32> = g.coef.clone().into_data().to_vec().unwrap();
    for (a, b) in diff.iter().zip(&want) {
        assert!((a - b).abs() < 1e-7, "{a} vs {b}");
    }
    // … and its gradient (the loss is linear in the coefficients at ratio 1).
    let (_, g_grpo) = loss_and_grads_of(g);
    let (_, g_dense) = loss_and_grads_of(d);
    let (_, g_prog) = loss_and_grads_of(p);
    let scale = g_grpo.iter().flatten().fold(0.0f32, |m, x| m.max(x.abs()));
    for ((a, b), c) in g_dense
        .iter()
        .flatten()
        .zip(g_prog.iter().flatten())
        .zip(g_grpo.iter().flatten())
    {
        assert!((a - b - c).abs() <= 1e-4 * scale, "{} vs {c}", a - b);
    }
}

#[test]
fn mrt_continues_one_stream_cut_at_a_boundary_against_the_prover_baseline() {
    let (ps, s) = scored(Algo::Mrt, 1.0, 3);
    let m = 4;
    // Every problem yields one stream and m trained continuations: GRPO's trained samples.
    assert_eq!(s.prefix_streams.len(), ps.len());
    assert_eq!(s.rollouts.len(), m * ps.len());
    let mut cut_inside = 0;
    for (g, chunk) in s.rollouts.chunks(m).enumerate() {
        let stream = &s.prefix_streams[g];
        let ctx = chunk[0].context_len;
        // The prefix is the stream up to one of its boundaries before its last episode.
        let k = stream
            .boundaries
            .iter()
            .position(|&b| b == ctx)
            .expect("cut at a boundary");
        assert!(
            k == 0 || k < stream.episodes.len(),
            "k {k} of {} episodes",
            stream.episodes.len()
        );
        cut_inside += (k > 0) as usize;
        for r in chunk {
            assert_eq!(r.problem, stream.problem);
            assert_eq!((r.context_len, &r.tokens[..ctx]), (ctx, &stream.tokens[..ctx]));
            assert!(r.policy_tokens_after_context() > 0);
        }
        // The termination baseline is the prover's J at the cut.
        assert_eq!(s.baselines[g], stream.j[k]);
    }
    assert!(cut_inside > 0);
    let rewards: Vec<f32> = s.rollouts.iter().map(|r| r.reward).collect();
    let expect = mrt::rl::advantage::mrt(&rewards, &s.baselines, m, 1.0, true);
    // The outcome term is GRPO's (mixed groups only); α(r̄ − b) is a bonus on every token.
    assert_eq!(s.signals.iter().map(|x| x.outcome).collect::<Vec<_>>(), expect.outcome);
    for (i, x) in s.signals.iter().enumerate() {
        let group = &rewards[i / m * m..(i / m + 1) * m];
        assert_eq!(x.in_outcome, group.iter().any(|&r| r != group[0]));
        match &x.bonus {
            Some(b) => assert!(b.iter().all(|&v| v == expect.progress[i]) && expect.progress[i] != 0.0),
            None => assert_eq!(expect.progress[i], 0.0),
        }
    }
    // Only the continuations' own tokens are trained.
    let b = batch_of(&s.rollouts, &s.signals);
    let in_loss = |x: &Signal| x.in_outcome || x.bonus.is_some();
    let own: usize = s
        .rollouts
        .iter()
        .zip(&s.signals)
        .filter(|(_, x)| in_loss(x))
        .map(|(r, _)| r.policy_tokens_after_context())
        .sum();
    assert_eq!(b.trained_tokens, own);
    // The step's stream metrics describe the streams, not the continuations.
    assert_eq!(s.streams().len(), ps.len());
}

#[test]
fn log_probs_are_scored_at_the_sampling_temperature() {
    let f = search_policy();
    let (_, rs) = rollouts_with_j(2, 2, 8);
    let r = &rs[0];
    let n = r.tokens.len();
    let ids: Vec<i64> = r.tokens.iter().map(|&t| t as i64).collect();
    let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, n]), &Default::default());
    let t = 0.7;
    let lp: Vec<f32> = token_logprobs(&f.model, tokens.clone(), None, false, t)
        .logprobs
        .into_data()
        .to_vec()
        .unwrap();
    let logp = burn::tensor::activation::log_softmax(f.model.forward(tokens) / t, 2);
    for (pos, &got) in lp.iter().enumerate().take(n - 1) {
        let y = r.tokens[pos + 1] as usize;
        let want: f32 = logp.clone().slice([0..1, pos..pos + 1, y..y + 1]).into_scalar();
        assert!((got - want).abs() < 1e-5, "position {pos}: {got} vs {want}");
    }
}

#[test]
fn micro_batches_give_the_one_pass_gradient_for_every_objective() {
    use mrt::model::lowmem::Checkpointing;
    use mrt::rl::passes::{batch_gradients, frozen_logprobs, row_chunks, LossSpec};
    let model: Transformer<AD> = require_grad(search_policy().model.clone().train::<AD>());
    for algo in [Algo::Grpo, Algo::Mrt, Algo::MrtDense, Algo::Star, Algo::MrtStar] {
        let (_, s) = scored(algo, 1.0, 11);
        let batch = batch_of(&s.rollouts, &s.signals);
        let n = batch.tokens.dims()[0];
        assert!(n >= 8 && batch.trained_tokens > 0, "{algo:?}: {n} rows");
        let supervised = matches!(algo, Algo::Star | Algo::MrtStar);
        let spec = LossSpec {
            supervised,
            temperature: 1.0,
            clip_eps: 0.2,
            kl_beta: 0.0,
            entropy: true,
            checkpointing: Checkpointing::Off,
        };
        let (one, chunked) = (row_chunks(n, 0), row_chunks(n, 1));
        assert_eq!((one.len(), chunked.len()), (1, n));
        // The second PPO epoch's case too: a behaviour policy other than the current one, as
        // a perturbed copy of the policy gives (ratios ≠ 1, so clipping acts).
        let mut behaviour = search_policy().model.clone();
        behaviour.norm = behaviour.norm.map(&mut Scale(1.1));
        let old = frozen_logprobs::<AD>(&behaviour, &batch, &chunked, 1.0);
        // Equal values; not equal bytes, since an untrained position is +0 when the pass
        // leaves it out of the output head and −0 (a log-prob times a 0 mask) when not.
        let one_pass = frozen_logprobs::<AD>(&behaviour, &batch, &one, 1.0);
        let diff: f32 = (old.clone() - one_pass).abs().max().into_scalar();
        assert_eq!(diff, 0.0, "behaviour log-probs differ between passes");
        for old_logp in [None, Some(&old)] {
            let (g1, s1) = batch_gradients(&model, &batch, &one, old_logp, None, spec);
            let (gm, sm) = batch_gradients(&model, &batch, &chunked, old_logp, None, spec);
            let (g1, gm) = (collect_grads(&model, &g1), collect_grads(&model, &gm));
            let scale = g1.iter().flatten().fold(0.0f32, |m, x| m.max(x.abs()));
            assert!(scale > 0.0, "{algo:?}: zero gradient");
            for (a, b) in g1.iter().flatten().zip(gm.iter().flatten()) {
                assert!(
                    (a - b).abs() <= 1e-5 * scale.max(1.0),
                    "{algo:?}: {a} vs {b} (scale {scale})"
                );
            }
            assert!(
                (s1.loss - sm.loss).abs() < 1e-5,
                "{algo:?}: loss {} vs {}",
                s1.loss,
                sm.loss
            );
            assert!(
                (s1.entropy - sm.entropy).abs() < 1e-4,
                "{algo:?}: entropy {} vs {}",
                s1.entropy,
                sm.entropy
            );
            assert!((s1.clip_frac - sm.clip_frac).abs() < 1e-5 && (s1.approx_kl - sm.approx_kl).abs() < 1e-5);
            // Activation checkpointing (blocks recomputed in the backward pass, one backward
            // pass per segment) gives the same gradient and statistics.
            let ckpt = LossSpec {
                checkpointing: Checkpointing::On,
                ..spec
            };
            let (gc, sc) = batch_gradients(&model, &batch, &one, old_logp, None, ckpt);
            let gc = collect_grads(&model, &gc);
            assert_eq!(gc.len(), g1.len());
            for (a, b) in g1.iter().flatten().zip(gc.iter().flatten()) {
                assert!(
                    (a - b).abs() <= 1e-6 * scale,
                    "{algo:?} checkpointed: {b} vs {a} (scale {scale})"
                );
            }
            assert_eq!((s1.loss, s1.entropy), (sc.loss, sc.entropy), "{algo:?} checkpointed");
        }
    }
}

/// Multiplies every float parameter by a constant.
struct Scale(f32);
impl burn::module::ModuleMapper<B> for Scale {
    fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let s = self.0;
        p.map(|t| t * s)
    }
}
