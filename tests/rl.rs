//! The rollout engine and the meta-prover on a small warm-started `search` policy: episode
//! structure, cached J = recomputed J, continuations from prefixes, budget forcing.

mod common;

use burn::prelude::*;
use common::{exact, exact_at, full_forward_last_logits, problems, rollout_config, rollouts_with_j, search_policy, B};
use mrt::data::{Problem, Role};
use mrt::model::{split_rngs, Transformer};
use mrt::rl::advantage::progress;
use mrt::rl::protocol::{suffix_ids, WordProtocol};
use mrt::rl::prover::{estimate, ProverConfig, ProverMode};
use mrt::rl::rollout::{Engine, Finish, Rollout};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// J from a full forward over `prefix + suffix (+ answer)` at temperature `t`: no cache involved.
fn recomputed_j(model: &Transformer<B>, prefix: &[u32], suffix: [u32; 3], answer: u32, end: u32, t: f64) -> f32 {
    let mut seq: Vec<u32> = prefix.to_vec();
    seq.extend(suffix);
    seq.push(answer);
    let n = seq.len();
    let ids: Vec<i64> = seq.iter().map(|&t| t as i64).collect();
    let logits = model.forward(Tensor::from_data(TensorData::new(ids, [1, n]), &model.device()));
    let logp = burn::tensor::activation::log_softmax(logits / t, 2);
    let at = |pos: usize, tok: u32| -> f32 {
        logp.clone()
            .slice([0..1, pos..pos + 1, tok as usize..tok as usize + 1])
            .into_scalar()
    };
    (at(n - 2, answer) + at(n - 1, end)).exp()
}

/// On a GPU every read-back is a synchronisation: the engine reads the sampled tokens of the
/// whole batch once per decoding step, never once per row.
#[test]
fn the_engine_reads_tokens_back_once_per_decoding_step_for_the_whole_batch() {
    search_policy();
    let before = mrt::model::token_reads();
    let (_, rs) = rollouts_with_j(6, 4, 2);
    let reads = mrt::model::token_reads() - before;
    // Each step appends at least one token to every row still running, so the last row to
    // finish holds at least one token per step; one read per row would be ~24× more.
    let longest = rs.iter().map(|r| r.tokens.len() - r.context_len).max().unwrap() as u64;
    assert_eq!(rs.len(), 24);
    assert!(
        reads >= 1 && reads <= longest,
        "{reads} reads for {longest} decoding steps at most"
    );
}

#[test]
fn rollouts_are_episode_structured_with_environment_and_forced_tokens() {
    let f = search_policy();
    let (ps, rs) = rollouts_with_j(6, 4, 1);
    assert_eq!(rs.len(), 24);
    for r in &rs {
        let p = &ps[r.problem];
        assert_eq!(
            &r.tokens[..r.context_len],
            f.vocab.encode_words(&f.task.prompt(p)).unwrap().as_slice()
        );
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
fn forked_cache_prover_equals_recomputing_the_prefix_at_its_temperature() {
    let f = search_policy();
    let (ps, rs) = rollouts_with_j(4, 2, 2);
    let mut checked = 0;
    for t in [1.0, 0.6] {
        for r in &rs {
            let answer = &f.task.correct_answers(&ps[r.problem]).unwrap()[0];
            let x = f.vocab.id(&answer[0]).unwrap();
            // J of the same boundaries at temperature t, from forks of a cache prefilled anew.
            let seeds: Vec<Rollout> = (0..r.boundaries.len())
                .map(|k| {
                    let mut s = r.prefix(k);
                    s.j.clear();
                    s.j_well_formed.clear();
                    s
                })
                .collect();
            let rc = rollout_config();
            let prover = exact_at(t);
            let protocol = WordProtocol::new(f.task.as_ref(), &f.vocab);
            let engine = Engine {
                model: &f.model,
                protocol: &protocol,
                config: &rc,
                prover: Some(&prover),
            };
            let batch = engine
                .start_from(
                    &seeds,
                    &ps,
                    1,
                    &mut split_rngs(&mut StdRng::seed_from_u64(0), seeds.len()),
                )
                .unwrap();
            for (k, row) in Engine::rollouts_of(&batch).enumerate() {
                let again = recomputed_j(
                    &f.model,
                    &r.tokens[..r.boundaries[k]],
                    suffix_ids(&f.vocab),
                    x,
                    f.vocab.specials.end_answer,
                    t,
                );
                let cached = row.j[k];
                assert!(
                    (again - cached).abs() < 1e-4,
                    "T {t}, boundary {k}: cached {cached} vs recomputed {again}"
                );
                if t == 1.0 {
                    assert!(
                        (r.j[k] - cached).abs() < 1e-4,
                        "during the rollout {} vs from a prefill {cached}",
                        r.j[k]
                    );
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 30, "{checked}");
}

#[test]
fn continuations_start_from_the_full_forward_logits_of_their_prefix() {
    let f = search_policy();
    let (ps, rs) = rollouts_with_j(8, 1, 31);
    // Each stream cut at a different boundary, as `mrt` cuts its prefixes.
    let seeds: Vec<Rollout> = rs
        .iter()
        .enumerate()
        .map(|(i, r)| r.prefix(i % r.boundaries.len()))
        .collect();
    assert!(seeds.iter().any(|s| !s.episodes.is_empty()));
    let rc = rollout_config();
    let protocol = WordProtocol::new(f.task.as_ref(), &f.vocab);
    let engine = Engine {
        model: &f.model,
        protocol: &protocol,
        config: &rc,
        prover: None,
    };
    let batch = engine
        .start_from(
            &seeds,
            &ps,
            2,
            &mut split_rngs(&mut StdRng::seed_from_u64(1), seeds.len()),
        )
        .unwrap();
    let v = f.model.config.vocab_size;
    let logits: Vec<f32> = batch.next_logits().clone().into_data().to_vec().unwrap();
    for (row, r) in Engine::rollouts_of(&batch).enumerate() {
        let seed = &seeds[row / 2];
        assert_eq!(r.tokens, seed.tokens);
        assert_eq!(r.context_len, seed.tokens.len(), "the whole prefix is context");
        let full = full_forward_last_logits(&f.model, &seed.tokens);
        let worst = full
            .iter()
            .zip(&logits[row * v..(row + 1) * v])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "row {row}: max |Δ logit| {worst}");
    }
}

#[test]
fn the_meta_prover_is_sure_after_the_environment_confirms_a_solution() {
    // Warm-start traces are cut after the solving episode too, so `… correct <timeup> </think>
    // <answer>` is in distribution: J there is the probability of repeating the confirmed guess.
    let f = search_policy();
    let (_, rs) = rollouts_with_j(32, 4, 5);
    let correct = f.vocab.id("correct").unwrap();
    let js: Vec<f32> = rs
        .iter()
        .flat_map(|r| {
            r.boundaries
                .iter()
                .enumerate()
                .skip(1)
                .filter(|&(_, &b)| r.tokens[b - 1] == correct)
                .map(|(j, _)| r.j[j])
        })
        .collect();
    let mean = js.iter().sum::<f32>() / js.len() as f32;
    assert!(
        js.len() > 30 && mean >= 0.95,
        "mean J {mean} at {} confirmed boundaries",
        js.len()
    );
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
    let prompts: Vec<Vec<u32>> = ps
        .iter()
        .map(|p| f.vocab.encode_words(&f.task.prompt(p)).unwrap())
        .collect();
    // Prefixes: each prompt followed by one scripted bisection episode and its reply.
    let rows: Vec<Vec<u32>> = ps
        .iter()
        .zip(&prompts)
        .map(|(p, prompt)| {
            let t = f
                .task
                .scripted_trace(p, "bisect", Some(1), &mut StdRng::seed_from_u64(0));
            let mut ids = f.vocab.encode_words(&t.words).unwrap();
            ids.truncate(prompt.len() + 3);
            ids
        })
        .collect();
    let width = rows.iter().map(Vec::len).max().unwrap();
    let ids: Vec<i64> = rows
        .iter()
        .flat_map(|r| (0..width).map(move |i| *r.get(i).unwrap_or(&0) as i64))
        .collect();
    let counts: Vec<usize> = rows.iter().map(Vec::len).collect();
    let mut cache = f.model.new_cache(rows.len(), width + 16);
    f.model
        .forward_cached(
            Tensor::from_data(TensorData::new(ids, [rows.len(), width]), &f.model.device()),
            &mut cache,
            Some(&counts),
        )
        .unwrap();
    let refs: Vec<&Problem> = ps.iter().collect();
    let k = 64;
    let sample = ProverConfig {
        mode: ProverMode::Sample,
        samples: k,
        temperature: 1.0,
        max_answer_tokens: 4,
    };
    let ex = estimate(
        &f.model,
        cache.clone(),
        &refs,
        &WordProtocol::new(f.task.as_ref(), &f.vocab),
        &exact(),
        &mut StdRng::seed_from_u64(0),
    )
    .unwrap();
    let sm = estimate(
        &f.model,
        cache,
        &refs,
        &WordProtocol::new(f.task.as_ref(), &f.vocab),
        &sample,
        &mut StdRng::seed_from_u64(5),
    )
    .unwrap();
    let (mut sum_e, mut sum_s, mut var) = (0.0f64, 0.0f64, 0.0f64);
    for (e, s) in ex.iter().zip(&sm) {
        let p = e.j as f64;
        let se = (p * (1.0 - p) / k as f64).sqrt();
        assert!(
            (p - s.j as f64).abs() <= 4.5 * se + 1.5 / k as f64,
            "exact {p} vs sampled {}",
            s.j
        );
        sum_e += p;
        sum_s += s.j as f64;
        var += p * (1.0 - p) / k as f64;
    }
    let n = ex.len() as f64;
    assert!(
        ((sum_e - sum_s) / n).abs() <= 4.0 * var.sqrt() / n + 1e-3,
        "means {} vs {}",
        sum_e / n,
        sum_s / n
    );
    assert!(sum_e / n > 0.05, "J is informative: mean {}", sum_e / n);
}

#[test]
fn budget_forcing_keeps_unsolved_rows_thinking_and_lets_solved_rows_stop() {
    let f = search_policy();
    let ps = problems(8, 21);
    let mut rc = rollout_config();
    rc.max_episodes = 8;
    rc.max_tokens = 64;
    rc.budget_forcing = true;
    let protocol = WordProtocol::new(f.task.as_ref(), &f.vocab);
    let engine = Engine {
        model: &f.model,
        protocol: &protocol,
        config: &rc,
        prover: None,
    };
    let rs = engine.rollouts(&ps, 2, &mut StdRng::seed_from_u64(4)).unwrap();
    let end_think = f.vocab.specials.end_think;
    let correct = f.vocab.id("correct").unwrap();
    let stops_by_itself = |r: &Rollout| {
        r.tokens
            .iter()
            .zip(&r.roles)
            .position(|(&t, &role)| t == end_think && role == Role::Policy)
    };
    for r in &rs {
        // The policy ends its thinking only after the environment confirmed a solution;
        // otherwise `</think>` appears only in the forced suffix at the extended budget.
        if let Some(pos) = stops_by_itself(r) {
            let confirmed = r.tokens[..pos]
                .iter()
                .zip(&r.roles)
                .any(|(&t, &role)| t == correct && role == Role::Env);
            assert!(confirmed, "{}", f.vocab.decode(&r.tokens).join(" "));
        }
    }
    // Solved rows are not pushed past their solution.
    assert!(
        rs.iter().any(|r| stops_by_itself(r).is_some()),
        "no solved row ended its thinking"
    );
    // Without forcing, the same policy does end its thinking by itself.
    rc.budget_forcing = false;
    let protocol = WordProtocol::new(f.task.as_ref(), &f.vocab);
    let engine = Engine {
        model: &f.model,
        protocol: &protocol,
        config: &rc,
        prover: None,
    };
    let free = engine.rollouts(&ps, 2, &mut StdRng::seed_from_u64(4)).unwrap();
    assert!(free.iter().any(|r| r
        .tokens
        .iter()
        .zip(&r.roles)
        .any(|(t, role)| *t == end_think && *role == Role::Policy)));
}
