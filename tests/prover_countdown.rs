//! The exact meta-prover on a task with multi-token answers (`countdown`): J is the total
//! probability of every line that reaches the target, equal to recomputing it with full
//! forwards, and to the fraction of K sampled forced answers that verify.

mod common;

use burn::prelude::*;
use common::B;
use mrt::data::{sample_problem, Problem, Split, Task, Vocab};
use mrt::model::{split_rngs, Transformer};
use mrt::rl::protocol::{suffix_ids, Protocol, WordProtocol};
use mrt::rl::prover::{estimate, ProverConfig, ProverMode};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// A small countdown policy, briefly warm-started (deterministic).
fn policy(steps: usize) -> (Box<dyn Task>, Vocab, Transformer<B>) {
    let f = common::warm_started("countdown", steps, 3, 5, "countdown-fixture");
    (f.task, f.vocab, f.model)
}

/// Prefixes: each prompt followed by the first `j` lines of a scripted trace.
fn prefixes(task: &dyn Task, vocab: &Vocab, problems: &[Problem], j: usize) -> Vec<Vec<u32>> {
    problems
        .iter()
        .map(|p| {
            let t = task.scripted_trace(p, "pruned", Some(j), &mut StdRng::seed_from_u64(1));
            // Cut where the forced suffix begins, or, if a line reached the target within `j`
            // attempts, where the trace answers of its own accord.
            let end = t.words.iter().position(|w| w == "<timeup>" || w == "</think>").unwrap();
            vocab.encode_words(&t.words[..end]).unwrap()
        })
        .collect()
}

fn prefilled(model: &Transformer<B>, rows: &[Vec<u32>]) -> mrt::model::KvCache<B> {
    let width = rows.iter().map(Vec::len).max().unwrap();
    let ids: Vec<i64> = rows
        .iter()
        .flat_map(|r| (0..width).map(move |i| *r.get(i).unwrap_or(&0) as i64))
        .collect();
    let counts: Vec<usize> = rows.iter().map(Vec::len).collect();
    let mut cache = model.new_cache(rows.len(), width + 32);
    model
        .forward_cached(
            Tensor::from_data(TensorData::new(ids, [rows.len(), width]), &model.device()),
            &mut cache,
            Some(&counts),
        )
        .unwrap();
    cache
}

/// Σ over correct lines of P(line ++ </answer> | prefix, suffix) by full forwards.
fn recomputed(model: &Transformer<B>, task: &dyn Task, vocab: &Vocab, p: &Problem, prefix: &[u32], t: f64) -> f64 {
    let mut total = 0.0f64;
    for answer in task.correct_answers(p).unwrap() {
        let mut seq = prefix.to_vec();
        seq.extend(suffix_ids(vocab));
        let start = seq.len();
        seq.extend(vocab.encode_words(&answer).unwrap());
        seq.push(vocab.specials.end_answer);
        let n = seq.len();
        let ids: Vec<i64> = seq.iter().map(|&x| x as i64).collect();
        let logp = burn::tensor::activation::log_softmax(
            model.forward(Tensor::from_data(TensorData::new(ids, [1, n]), &model.device())) / t,
            2,
        );
        let lp: Vec<f32> = logp.into_data().to_vec().unwrap();
        let v = model.config.vocab_size;
        let sum: f64 = (start..n).map(|k| lp[(k - 1) * v + seq[k] as usize] as f64).sum();
        total += sum.exp();
    }
    total
}

#[test]
fn exact_j_over_every_correct_line_equals_recomputation_and_sampling() {
    let (task, vocab, model) = policy(400);
    let mut rng = StdRng::seed_from_u64(11);
    let problems: Vec<Problem> = (0..16)
        .map(|_| sample_problem(task.as_ref(), Split::Train, &mut rng).unwrap())
        .collect();
    let refs: Vec<&Problem> = problems.iter().collect();
    for (j, t) in [(0, 1.0), (2, 1.0), (2, 0.7)] {
        let rows = prefixes(task.as_ref(), &vocab, &problems, j);
        let exact = ProverConfig {
            mode: ProverMode::Exact,
            samples: 1,
            temperature: t,
            max_answer_tokens: 24,
        };
        let ex = estimate(
            &model,
            prefilled(&model, &rows),
            &refs,
            &WordProtocol::new(task.as_ref(), &vocab),
            &exact,
            &mut StdRng::seed_from_u64(0),
        )
        .unwrap();
        for ((e, p), prefix) in ex.iter().zip(&problems).zip(&rows) {
            let again = recomputed(&model, task.as_ref(), &vocab, p, prefix, t);
            assert!(
                (e.j as f64 - again).abs() <= 1e-4 + 1e-3 * again,
                "{} lines in: exact {} vs recomputed {again}",
                j,
                e.j
            );
        }
        if t != 1.0 {
            continue;
        }
        let k = 128;
        let sample = ProverConfig {
            mode: ProverMode::Sample,
            samples: k,
            temperature: t,
            max_answer_tokens: 24,
        };
        let sm = estimate(
            &model,
            prefilled(&model, &rows),
            &refs,
            &WordProtocol::new(task.as_ref(), &vocab),
            &sample,
            &mut StdRng::seed_from_u64(5),
        )
        .unwrap();
        let (mut se, mut ss, mut var) = (0.0f64, 0.0f64, 0.0f64);
        for (e, s) in ex.iter().zip(&sm) {
            let p = e.j as f64;
            assert!(
                (p - s.j as f64).abs() <= 4.5 * (p * (1.0 - p) / k as f64).sqrt() + 2.0 / k as f64,
                "exact {p} vs sampled {}",
                s.j
            );
            se += p;
            ss += s.j as f64;
            var += p * (1.0 - p) / k as f64;
        }
        let n = ex.len() as f64;
        assert!(
            ((se - ss) / n).abs() <= 4.0 * var.sqrt() / n + 2e-3,
            "means {} vs {}",
            se / n,
            ss / n
        );
    }
}

/// J the way the exact prover computed it before answer trees: every (row, correct answer)
/// pair on its own copy of the row's cache, one pass over the answer per pair.
fn per_answer(
    model: &Transformer<B>,
    mut cache: mrt::model::KvCache<B>,
    task: &dyn Task,
    vocab: &Vocab,
    problems: &[Problem],
    t: f64,
    max_answer_tokens: usize,
) -> Vec<f32> {
    use burn::tensor::activation::log_softmax;
    let (rows, dev, v) = (cache.rows(), model.device(), vocab.size());
    let suffix: Vec<i64> = (0..rows).flat_map(|_| suffix_ids(vocab).map(|i| i as i64)).collect();
    cache.ensure_capacity(3);
    let logits = model
        .forward_cached(
            Tensor::from_data(TensorData::new(suffix, [rows, 3]), &dev),
            &mut cache,
            None,
        )
        .unwrap();
    let first = log_softmax(mrt::model::last_logits(logits, &vec![3; rows]) / t, 1);
    let mut j = vec![0f32; rows];
    for (r, p) in problems.iter().enumerate() {
        let mut answers: Vec<Vec<u32>> = task
            .correct_answers(p)
            .unwrap()
            .iter()
            .map(|a| vocab.encode_words(a).unwrap())
            .filter(|a| a.len() < max_answer_tokens)
            .collect();
        answers.sort_unstable();
        answers.dedup();
        for a in answers {
            let mut one = cache.select_rows(&[r]);
            one.ensure_capacity(a.len());
            let ids: Vec<i64> = a.iter().map(|&x| x as i64).collect();
            let lp = log_softmax(
                model
                    .forward_cached(
                        Tensor::from_data(TensorData::new(ids, [1, a.len()]), &dev),
                        &mut one,
                        None,
                    )
                    .unwrap()
                    / t,
                2,
            );
            let lp: Vec<f32> = lp.into_data().to_vec().unwrap();
            let head: Vec<f32> = first.clone().slice([r..r + 1, 0..v]).into_data().to_vec().unwrap();
            let tail: f32 = (0..a.len())
                .map(|k| lp[k * v + *a.get(k + 1).unwrap_or(&vocab.specials.end_answer) as usize])
                .sum();
            j[r] += (head[a[0] as usize] + tail).exp();
        }
    }
    j
}

/// Scoring each problem's correct answers as one token tree (shared prefixes once, rows grouped
/// by tree size, copies per row rather than per answer) gives the J of scoring every answer on
/// its own copy of the cache.
#[test]
fn answer_trees_give_the_j_of_one_pass_per_answer() {
    let (task, vocab, model) = policy(400);
    let mut rng = StdRng::seed_from_u64(12);
    let problems: Vec<Problem> = (0..24)
        .map(|_| sample_problem(task.as_ref(), Split::Train, &mut rng).unwrap())
        .collect();
    let refs: Vec<&Problem> = problems.iter().collect();
    let sizes: Vec<usize> = problems
        .iter()
        .map(|p| task.correct_answers(p).unwrap().len())
        .collect();
    let (fewest, most) = (*sizes.iter().min().unwrap(), *sizes.iter().max().unwrap());
    assert!(
        most > 2 * fewest,
        "trees of different sizes, so rows fall into several groups: {sizes:?}"
    );
    for (j, t) in [(0, 1.0), (3, 0.7)] {
        let rows = prefixes(task.as_ref(), &vocab, &problems, j);
        let exact = ProverConfig {
            mode: ProverMode::Exact,
            samples: 1,
            temperature: t,
            max_answer_tokens: 24,
        };
        let tree = estimate(
            &model,
            prefilled(&model, &rows),
            &refs,
            &WordProtocol::new(task.as_ref(), &vocab),
            &exact,
            &mut StdRng::seed_from_u64(0),
        )
        .unwrap();
        let reference = per_answer(
            &model,
            prefilled(&model, &rows),
            task.as_ref(),
            &vocab,
            &problems,
            t,
            24,
        );
        let worst = tree
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a.j - b).abs())
            .fold(0f32, f32::max);
        eprintln!("{j} lines, T = {t}: largest |J_tree − J_per_answer| = {worst:e}");
        assert!(
            worst <= 1e-6,
            "{j} lines, T = {t}: trees and per-answer passes differ by {worst}"
        );
        assert!(
            reference.iter().any(|&x| x > 0.01),
            "some J is far from 0: {reference:?}"
        );
    }
}

/// A seed rollout: the prompt, then `line` as the first episode (its `<ep>` included).
fn seeded(task: &dyn Task, vocab: &Vocab, p: &Problem, index: usize, line: &[String]) -> mrt::rl::rollout::Rollout {
    use mrt::data::Role;
    let prompt = vocab.encode_words(&task.prompt(p)).unwrap();
    let mut words = line.to_vec();
    words.push("<ep>".into());
    let episode = vocab.encode_words(&words).unwrap();
    let (ctx, end) = (prompt.len(), prompt.len() + episode.len());
    let roles = [vec![Role::Prompt; ctx], vec![Role::Policy; episode.len()]].concat();
    mrt::rl::rollout::Rollout {
        problem: index,
        tokens: [prompt, episode].concat(),
        roles,
        context_len: ctx,
        episodes: vec![ctx..end],
        boundaries: vec![ctx, end],
        answer: None,
        reward: 0.0,
        finish: mrt::rl::rollout::Finish::Unfinished,
        j: Vec::new(),
        j_well_formed: Vec::new(),
    }
}

#[test]
fn budget_forcing_lets_a_countdown_row_whose_line_reaches_the_target_end() {
    use mrt::data::Role;
    use mrt::rl::rollout::Engine;
    let (task, vocab, model) = policy(400);
    let mut rng = StdRng::seed_from_u64(8);
    let problems: Vec<Problem> = (0..6)
        .map(|_| sample_problem(task.as_ref(), Split::Train, &mut rng).unwrap())
        .collect();
    let solving: Vec<Vec<String>> = problems
        .iter()
        .map(|p| task.correct_answers(p).unwrap()[0].clone())
        .collect();
    // A well-formed line that misses: the first number minus itself is 0, never a target.
    let missing: Vec<Vec<String>> = solving
        .iter()
        .map(|l| vec![l[0].clone(), "-".into(), l[0].clone(), "=".into(), "0".into()])
        .collect();
    let protocol = WordProtocol::new(task.as_ref(), &vocab);
    let mut config = common::rollout_config();
    (
        config.max_episodes,
        config.max_tokens,
        config.max_answer_tokens,
        config.budget_forcing,
    ) = (4, 48, 24, true);
    let engine = Engine {
        model: &model,
        protocol: &protocol,
        config: &config,
        prover: None,
    };
    let end_think = vocab.id("</think>").unwrap();
    let stopped_by_itself = |lines: &[Vec<String>]| -> (usize, usize) {
        let seeds: Vec<_> = problems
            .iter()
            .enumerate()
            .map(|(i, p)| seeded(task.as_ref(), &vocab, p, i, &lines[i]))
            .collect();
        let mut batch = engine
            .start_from(
                &seeds,
                &problems,
                8,
                &mut split_rngs(&mut StdRng::seed_from_u64(3), seeds.len()),
            )
            .unwrap();
        engine.run(&mut batch, &problems).unwrap();
        let rs = Engine::finish(batch);
        // (rows that ended their thinking, those of them with no confirmed solving line). A
        // `</think>` the policy writes after a forced suffix is inside its forced answer.
        let ended: Vec<_> = rs
            .iter()
            .filter(|r| {
                r.tokens
                    .iter()
                    .zip(&r.roles)
                    .skip(r.context_len)
                    .take_while(|(_, &role)| role != Role::Forced)
                    .any(|(&t, &role)| t == end_think && role == Role::Policy)
            })
            .collect();
        let unconfirmed = ended
            .iter()
            .filter(|r| {
                !r.episodes
                    .iter()
                    .any(|e| protocol.confirms(&problems[r.problem], &r.tokens[e.clone()]).unwrap())
            })
            .count();
        (ended.len(), unconfirmed)
    };
    // The warm start taught the policy to answer after a line that reaches the target: under
    // forcing it is now free to (none did before countdown confirmed a solving line).
    let (solved, _) = stopped_by_itself(&solving);
    assert!(solved >= 6, "{solved} of 48 solved rows ended their thinking");
    // Rows seeded with a line that misses stay thinking, unless they reach the target in a
    // later episode of their own (which the environment confirms, freeing them too).
    assert_eq!(stopped_by_itself(&missing).1, 0);
}
