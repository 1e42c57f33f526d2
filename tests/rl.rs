//! The RL machinery on a small warm-started `search` policy: the meta-prover, the objectives'
//! advantages, masks and gradients.

mod common;

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use common::{search_policy, AD, B};
use mrt::data::{sample_problem, Problem, Role, Split};
use mrt::model::{token_logprobs, SamplerConfig, Transformer};
use mrt::rl::advantage::progress;
use mrt::rl::batch::rollout_batch;
use mrt::rl::config::{Algo, RunConfig};
use mrt::rl::loss::{policy_loss, PgBatch};
use mrt::rl::optim::{adamw, require_grad, OptimConfig};
use mrt::rl::prover::{estimate, suffix_ids, ProverConfig, ProverMode};
use mrt::rl::rollout::{Engine, Finish, Rollout, RolloutConfig};
use mrt::rl::train::score;
use rand::rngs::StdRng;
use rand::SeedableRng;

fn problems(n: usize, seed: u64) -> Vec<Problem> {
    let f = search_policy();
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| sample_problem(f.task.as_ref(), Split::Train, &mut rng)).collect()
}

fn rollout_config() -> RolloutConfig {
    RolloutConfig { max_episodes: 6, max_tokens: 32, max_answer_tokens: 4, sampler: SamplerConfig::default(), budget_forcing: false }
}

fn exact() -> ProverConfig {
    ProverConfig { mode: ProverMode::Exact, samples: 8, temperature: 1.0, max_answer_tokens: 4 }
}

fn rollouts_with_j(n: usize, group: usize, seed: u64) -> (Vec<Problem>, Vec<Rollout>) {
    let f = search_policy();
    let ps = problems(n, seed);
    let rc = rollout_config();
    let prover = exact();
    let engine = Engine { model: &f.model, task: f.task.as_ref(), vocab: &f.vocab, config: &rc, prover: Some(&prover) };
    let rs = engine.rollouts(&ps, group, &mut StdRng::seed_from_u64(seed)).unwrap();
    (ps, rs)
}

/// J from a full forward over `prefix + suffix (+ answer)`: no cache involved.
fn recomputed_j(model: &Transformer<B>, prefix: &[u32], suffix: [u32; 3], answer: u32, end: u32) -> f32 {
    let mut seq: Vec<u32> = prefix.to_vec();
    seq.extend(suffix);
    seq.push(answer);
    let n = seq.len();
    let ids: Vec<i64> = seq.iter().map(|&t| t as i64).collect();
    let logits = model.forward(Tensor::from_data(TensorData::new(ids, [1, n]), &model.device()));
    let logp = burn::tensor::activation::log_softmax(logits, 2);
    let at = |pos: usize, tok: u32| -> f32 { logp.clone().slice([0..1, pos..pos + 1, tok as usize..tok as usize + 1]).into_scalar() };
    (at(n - 2, answer) + at(n - 1, end)).exp()
}

#[test]
fn rollouts_are_episode_structured_with_environment_and_forced_tokens() {
    let f = search_policy();
    let (ps, rs) = rollouts_with_j(6, 4, 1);
    assert_eq!(rs.len(), 24);
    for r in &rs {
        let p = &ps[r.problem];
        assert_eq!(&r.tokens[..r.context_len], f.vocab.encode_words(&f.task.prompt(p)).unwrap().as_slice());
        assert_eq!(r.boundaries.len(), r.episodes.len() + 1);
        assert_eq!(r.j.len(), r.boundaries.len(), "one J per boundary");
        assert!(r.episodes.len() <= 6);
        for (e, span) in r.episodes.iter().enumerate() {
            assert_eq!(r.tokens[span.end - 1], f.vocab.specials.ep);
            assert!(r.roles[span.clone()].iter().all(|&x| x == Role::Policy));
            // The environment's reply follows each delimiter, as non-trainable tokens.
            let b = r.boundaries[e + 1];
            assert!(r.roles[span.end..b].iter().all(|&x| x == Role::Env) && b > span.end);
        }
        if r.finish == Finish::Forced {
            let k = r.tokens.iter().position(|&t| t == f.vocab.specials.time_up).unwrap();
            assert_eq!(&r.tokens[k..k + 3], &suffix_ids(&f.vocab));
            assert!(r.roles[k..k + 3].iter().all(|&x| x == Role::Forced));
        }
        if let Some(answer) = &r.answer {
            assert_eq!(r.reward, f.task.verify(p, answer) as u8 as f32);
        } else {
            assert_eq!(r.reward, 0.0);
        }
    }
    assert!(rs.iter().any(|r| r.reward > 0.0) && rs.iter().any(|r| r.episodes.len() >= 2));
}

#[test]
fn forked_cache_prover_equals_recomputing_the_prefix() {
    let f = search_policy();
    let (ps, rs) = rollouts_with_j(4, 2, 2);
    let mut checked = 0;
    for r in &rs {
        let x = f.vocab.id(&f.task.exact_answer(&ps[r.problem]).unwrap()).unwrap();
        for (j, &b) in r.boundaries.iter().enumerate() {
            let again = recomputed_j(&f.model, &r.tokens[..b], suffix_ids(&f.vocab), x, f.vocab.specials.end_answer);
            assert!((again - r.j[j]).abs() < 1e-4, "boundary {j}: cached {} vs recomputed {again}", r.j[j]);
            checked += 1;
        }
    }
    assert!(checked > 15, "{checked}");
}

#[test]
fn progress_telescopes_on_real_rollouts() {
    let (_, rs) = rollouts_with_j(6, 4, 3);
    for r in &rs {
        let p = progress(&r.j);
        let total: f32 = p.iter().sum();
        assert!((total - (r.j[r.j.len() - 1] - r.j[0])).abs() < 1e-5);
    }
    // J is not constant: the policy does make (and lose) progress.
    assert!(rs.iter().flat_map(|r| progress(&r.j)).any(|p| p.abs() > 0.05));
}

#[test]
fn exact_and_sampled_j_agree_within_sampling_error() {
    let f = search_policy();
    let ps = problems(24, 4);
    let prompts: Vec<Vec<u32>> = ps.iter().map(|p| f.vocab.encode_words(&f.task.prompt(p)).unwrap()).collect();
    // Prefixes: each prompt followed by one scripted bisection episode and its reply.
    let rows: Vec<Vec<u32>> = ps
        .iter()
        .zip(&prompts)
        .map(|(p, prompt)| {
            let t = f.task.scripted_trace(p, "bisect", Some(1), &mut StdRng::seed_from_u64(0));
            let mut ids = f.vocab.encode_words(&t.words).unwrap();
            ids.truncate(prompt.len() + 3);
            ids
        })
        .collect();
    let width = rows.iter().map(Vec::len).max().unwrap();
    let ids: Vec<i64> = rows.iter().flat_map(|r| (0..width).map(move |i| *r.get(i).unwrap_or(&0) as i64)).collect();
    let counts: Vec<usize> = rows.iter().map(Vec::len).collect();
    let mut cache = f.model.new_cache(rows.len(), width + 16);
    f.model.forward_cached(Tensor::from_data(TensorData::new(ids, [rows.len(), width]), &f.model.device()), &mut cache, Some(&counts)).unwrap();
    let refs: Vec<&Problem> = ps.iter().collect();
    let k = 64;
    let sample = ProverConfig { mode: ProverMode::Sample, samples: k, temperature: 1.0, max_answer_tokens: 4 };
    let ex = estimate(&f.model, cache.clone(), &refs, f.task.as_ref(), &f.vocab, &exact(), &mut StdRng::seed_from_u64(0)).unwrap();
    let sm = estimate(&f.model, cache, &refs, f.task.as_ref(), &f.vocab, &sample, &mut StdRng::seed_from_u64(5)).unwrap();
    let (mut sum_e, mut sum_s, mut var) = (0.0f64, 0.0f64, 0.0f64);
    for (e, s) in ex.iter().zip(&sm) {
        let p = e.j as f64;
        let se = (p * (1.0 - p) / k as f64).sqrt();
        assert!((p - s.j as f64).abs() <= 4.5 * se + 1.5 / k as f64, "exact {p} vs sampled {}", s.j);
        sum_e += p;
        sum_s += s.j as f64;
        var += p * (1.0 - p) / k as f64;
    }
    let n = ex.len() as f64;
    assert!(((sum_e - sum_s) / n).abs() <= 4.0 * var.sqrt() / n + 1e-3, "means {} vs {}", sum_e / n, sum_s / n);
    assert!(sum_e / n > 0.05, "J is informative: mean {}", sum_e / n);
}

/// Loss and gradients of one objective on the rollouts of a fixed seed.
fn loss_and_grads(algo: Algo, alpha: f64) -> (f32, Vec<Vec<f32>>) {
    let f = search_policy();
    let mut cfg = RunConfig::default_for("search", "cpu-tiny", algo, 0, true).unwrap().rl;
    cfg.alpha = alpha;
    cfg.group_size = 4;
    let ps = problems(6, 9);
    let prover = exact();
    let engine = Engine { model: &f.model, task: f.task.as_ref(), vocab: &f.vocab, config: &cfg.rollout, prover: algo.needs_prover().then_some(&prover) };
    let scored = score(&engine, &ps, &cfg, &mut StdRng::seed_from_u64(11)).unwrap();
    let model: Transformer<AD> = require_grad(f.model.clone().train::<AD>());
    let refs: Vec<&Rollout> = scored.rollouts.iter().collect();
    let device = Default::default();
    let batch = rollout_batch::<AD>(&refs, &scored.token_advantages, &scored.keep, f.vocab.specials.pad, &device);
    let lp = token_logprobs(&model, batch.tokens, Some(batch.mask.clone()), false);
    let out = policy_loss(PgBatch { old_logp: lp.logprobs.clone().detach(), logp: lp.logprobs, ref_logp: None, advantages: batch.advantages, mask: batch.mask }, 0.2, 0.0);
    let loss: f32 = out.loss.clone().into_scalar();
    let grads = GradientsParams::from_grads(out.loss.backward(), &model);
    (loss, collect_grads(&model, &grads))
}

fn collect_grads(model: &Transformer<AD>, grads: &GradientsParams) -> Vec<Vec<f32>> {
    struct Collect<'a>(&'a GradientsParams, Vec<Vec<f32>>);
    impl ModuleVisitor<AD> for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<AD, D>>) {
            if let Some(g) = self.0.get::<B, D>(p.id) {
                self.1.push(g.into_data().to_vec().unwrap());
            }
        }
    }
    let mut c = Collect(grads, Vec::new());
    model.visit(&mut c);
    c.1
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
        .map(|r| r.roles.iter().map(|&role| if role == Role::Policy { 1.0 } else { 1e6 }).collect())
        .collect();
    let keep = vec![true; rs.len()];
    let model: Transformer<AD> = require_grad(f.model.clone().train::<AD>());
    let grads_of = |adv: &[Vec<f32>]| {
        let batch = rollout_batch::<AD>(&refs, adv, &keep, f.vocab.specials.pad, &device);
        let mask: Vec<f32> = batch.mask.clone().into_data().to_vec().unwrap();
        let lp = token_logprobs(&model, batch.tokens, Some(batch.mask.clone()), false);
        let out = policy_loss(PgBatch { old_logp: lp.logprobs.clone().detach(), logp: lp.logprobs, ref_logp: None, advantages: batch.advantages, mask: batch.mask }, 0.2, 0.0);
        (mask, collect_grads(&model, &GradientsParams::from_grads(out.loss.backward(), &model)))
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
        let adv: Vec<Vec<f32>> = rs.iter().map(|r| vec![sign; r.tokens.len()]).collect();
        let batch = rollout_batch::<AD>(&refs, &adv, &vec![true; rs.len()], f.vocab.specials.pad, &device);
        let model: Transformer<AD> = require_grad(f.model.clone().train::<AD>());
        let total = |m: &Transformer<AD>| -> f32 { token_logprobs(&m.valid(), batch.tokens.clone().inner(), Some(batch.mask.clone().inner()), false).logprobs.sum().into_scalar() };
        let before = total(&model);
        let lp = token_logprobs(&model, batch.tokens.clone(), Some(batch.mask.clone()), false);
        let out = policy_loss(PgBatch { old_logp: lp.logprobs.clone().detach(), logp: lp.logprobs, ref_logp: None, advantages: batch.advantages.clone(), mask: batch.mask.clone() }, 0.2, 0.0);
        let cfg = OptimConfig { lr: 1e-3, warmup_steps: 0, min_lr_ratio: 1.0, weight_decay: 0.0, grad_clip: 0.0 };
        let mut optim = adamw::<AD>(&cfg);
        let (model, _) = mrt::rl::optim::step(model, &mut optim, out.loss, cfg.lr, 0.0);
        let after = total(&model);
        assert!(sign * (after - before) > 0.1, "advantage {sign}: log-prob {before} → {after}");
    }
}

#[test]
fn mrt_continuations_branch_from_their_prefix() {
    let f = search_policy();
    let mut cfg = RunConfig::default_for("search", "cpu-tiny", Algo::Mrt, 0, true).unwrap().rl;
    cfg.group_size = 4;
    cfg.terminate_fraction = 0.5;
    let ps = problems(6, 12);
    let prover = exact();
    let engine = Engine { model: &f.model, task: f.task.as_ref(), vocab: &f.vocab, config: &cfg.rollout, prover: Some(&prover) };
    let s = score(&engine, &ps, &cfg, &mut StdRng::seed_from_u64(3)).unwrap();
    assert_eq!(s.rollouts.len(), 4 * s.groups);
    assert_eq!(s.groups + s.prefixes_finished, 6);
    for (g, chunk) in s.rollouts.chunks(4).enumerate() {
        // All continuations share the prefix; the first two were forced to answer at once.
        let ctx = chunk[0].context_len;
        assert!(chunk.iter().all(|r| r.context_len == ctx && r.tokens[..ctx] == chunk[0].tokens[..ctx]));
        for r in &chunk[..2] {
            assert_eq!(&r.tokens[ctx..ctx + 3], &suffix_ids(&f.vocab));
            assert_eq!(r.finish, Finish::Forced);
        }
        assert_eq!(&s.keep[g * 4..g * 4 + 4], &[false, false, true, true]);
        // α = 1: advantage = reward − mean termination reward.
        let b = (chunk[0].reward + chunk[1].reward) / 2.0;
        for (i, r) in chunk.iter().enumerate().skip(2) {
            let a = s.token_advantages[g * 4 + i][0];
            let (_, std) = mrt::rl::advantage::mean_std(&[chunk[2].reward, chunk[3].reward]);
            let raw = r.reward - b;
            let scaled = if std > 0.0 { raw / (std + mrt::rl::advantage::STD_EPS) } else { raw };
            assert!((a - scaled).abs() < 1e-5, "{a} vs {scaled}");
        }
    }
}

#[test]
fn budget_forcing_suppresses_end_of_thinking_until_the_budget_is_spent() {
    let f = search_policy();
    let ps = problems(8, 21);
    let mut rc = rollout_config();
    rc.max_episodes = 8;
    rc.max_tokens = 64;
    rc.budget_forcing = true;
    let engine = Engine { model: &f.model, task: f.task.as_ref(), vocab: &f.vocab, config: &rc, prover: None };
    let rs = engine.rollouts(&ps, 2, &mut StdRng::seed_from_u64(4)).unwrap();
    let end_think = f.vocab.specials.end_think;
    for r in &rs {
        // `</think>` only ever appears inside the forced suffix, never sampled by the policy.
        for (t, role) in r.tokens.iter().zip(&r.roles) {
            assert!(!(*t == end_think && *role == Role::Policy), "{}", f.vocab.decode(&r.tokens).join(" "));
        }
    }
    // Without forcing, the same policy does end its thinking by itself.
    rc.budget_forcing = false;
    let engine = Engine { model: &f.model, task: f.task.as_ref(), vocab: &f.vocab, config: &rc, prover: None };
    let free = engine.rollouts(&ps, 2, &mut StdRng::seed_from_u64(4)).unwrap();
    assert!(free.iter().any(|r| r.tokens.iter().zip(&r.roles).any(|(t, role)| *t == end_think && *role == Role::Policy)));
}
