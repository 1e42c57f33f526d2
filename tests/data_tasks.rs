//! Tasks, verifiers, tokenizer, loss masks and the train / held-out split.

use std::collections::HashSet;

use mrt::data::batch::collate;
use mrt::data::countdown::{replay, Countdown, CountdownConfig, CountdownProblem};
use mrt::data::search::{bayes_optimal_curve, Interval, Search, SearchConfig, SearchProblem};
use mrt::data::task::{push_forced_suffix, TASKS};
use mrt::data::vocab::SPECIAL_TOKENS;
use mrt::data::{sample_problem, split_of, warm_start_trace, Problem, Role, Split, Task, TaskConfig, Trace, Vocab};
use rand::rngs::StdRng;
use rand::SeedableRng;

fn tasks() -> Vec<Box<dyn Task>> {
    TASKS
        .iter()
        .map(|n| TaskConfig::by_name(n).unwrap().build().unwrap())
        .collect()
}

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(String::from).collect()
}

/// The words between `<answer>` and `</answer>` of a trace.
fn answer_of(trace: &Trace) -> Vec<String> {
    trace.answer().expect("every scripted trace answers").to_vec()
}

#[test]
fn generators_are_deterministic_per_seed() {
    for task in tasks() {
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..50).map(|_| task.generate(&mut rng)).collect::<Vec<Problem>>()
        };
        assert_eq!(draw(1), draw(1), "{}", task.name());
        assert_ne!(draw(1), draw(2), "{}", task.name());
        let mix = TaskConfig::by_name(task.name())
            .unwrap()
            .warm_start()
            .expect("a word task")
            .clone();
        let traces = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            draw(3)
                .iter()
                .map(|p| warm_start_trace(task.as_ref(), p, &mix, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(traces(4), traces(4), "{}", task.name());
    }
}

#[test]
fn verifiers_accept_every_scripted_correct_answer() {
    let mut rng = StdRng::seed_from_u64(7);
    for task in tasks() {
        let mix = TaskConfig::by_name(task.name())
            .unwrap()
            .warm_start()
            .expect("a word task")
            .clone();
        let (mut solved, mut forced) = (0, 0);
        for _ in 0..300 {
            let p = task.generate(&mut rng);
            let trace = warm_start_trace(task.as_ref(), &p, &mix, &mut rng);
            let answer = answer_of(&trace);
            assert!(task.well_formed(&answer), "{}: {}", task.name(), trace.text());
            if trace.words.contains(&"<timeup>".to_string()) {
                forced += 1;
            } else {
                // An unforced trace ends because its last attempt succeeded.
                assert!(task.verify(&p, &answer), "{}: {}", task.name(), trace.text());
                solved += 1;
            }
        }
        assert!(
            solved > 50 && forced > 50,
            "{}: {solved} solved, {forced} forced",
            task.name()
        );
    }
}

#[test]
fn search_verifier_rejects_wrong_and_malformed_answers() {
    let task = Search::new(SearchConfig::default()).unwrap();
    let p = Problem::Search(SearchProblem {
        hidden: 13,
        lo: 5,
        hi: 21,
    });
    assert!(task.verify(&p, &words("13")));
    for bad in [
        "12",
        "14",
        "",
        "13 13",
        "013",
        "+13",
        "thirteen",
        "<ep>",
        "</answer>",
        "32",
        "-1",
        "13 </answer>",
        "higher",
    ] {
        assert!(!task.verify(&p, &words(bad)), "accepted `{bad}`");
    }
    assert!(task.well_formed(&words("31")) && !task.well_formed(&words("32")) && !task.well_formed(&words("1 2")));
    assert_eq!(task.reply(&p, &words("4")), Some(words("higher")));
    assert_eq!(task.reply(&p, &words("20")), Some(words("lower")));
    assert_eq!(task.reply(&p, &words("13")), Some(words("correct")));
    assert_eq!(task.reply(&p, &words("4 5")), Some(words("invalid")));
    assert_eq!(task.reply(&p, &words("<think>")), Some(words("invalid")));
}

#[test]
fn countdown_verifier_replays_lines_exactly() {
    let task = Countdown::new(CountdownConfig::default()).unwrap();
    let p = Problem::Countdown(CountdownProblem {
        numbers: vec![3, 5, 4],
        target: 32,
    });
    assert!(task.verify(&p, &words("3 + 5 = 8 , 8 * 4 = 32")));
    assert!(task.verify(&p, &words("5 + 3 = 8 , 4 * 8 = 32")));
    let rejected = [
        "3 + 5 = 8 , 8 * 4 = 31",               // wrong arithmetic
        "3 + 5 = 8",                            // does not use every number
        "3 + 5 = 8 , 8 * 5 = 40",               // 5 used twice
        "3 + 5 = 8 , 8 * 4 = 32 , 32 - 0 = 32", // 0 was never available
        "3 * 5 = 15 , 15 + 4 = 19",             // valid line, wrong target
        "5 / 3 = 1 , 1 + 4 = 5",                // inexact division
        "3 - 5 = 0 , 0 + 4 = 4",                // negative intermediate
        "",
        "3 + 5 = 8 8 * 4 = 32",
        "3 + 5 = 8 , , 8 * 4 = 32",
        "3 ++ 5 = 8 , 8 * 4 = 32",
        "<ep> </answer> 32",
        "target 32",
    ];
    for bad in rejected {
        assert!(!task.verify(&p, &words(bad)), "accepted `{bad}`");
    }
    assert_eq!(replay(&[3, 5, 4], &words("3 * 5 = 15 , 15 + 4 = 19"), 60), Some(19));
    assert!(task.well_formed(&words("3 * 5 = 15 , 15 + 4 = 19")));
    assert!(!task.well_formed(&words("3 * 5 = 15 ,")) && !task.well_formed(&words("32")));
}

#[test]
fn garbage_token_streams_are_never_accepted() {
    let mut rng = StdRng::seed_from_u64(11);
    for task in tasks() {
        let vocab = Vocab::build(&task.words()).unwrap();
        let p = task.generate(&mut rng);
        let mut accepted = 0;
        for len in 0..2000 {
            let n = len % 9;
            let ids: Vec<u32> = (0..n)
                .map(|_| rand::Rng::random_range(&mut rng, 0..vocab.size() as u32))
                .collect();
            accepted += task.verify(&p, &vocab.decode(&ids)) as usize;
        }
        // Random streams can hit a correct answer only by chance: one number token for search
        // (≈ 1/9 lengths × 1/vocab), essentially never a full countdown line.
        assert!(accepted < 10, "{}: {accepted} garbage streams accepted", task.name());
    }
}

#[test]
fn tokenizer_round_trips_every_special_token_and_file() {
    let task = Search::new(SearchConfig::default()).unwrap();
    let vocab = Vocab::build(&task.words()).unwrap();
    for (i, s) in SPECIAL_TOKENS.iter().enumerate() {
        assert_eq!(vocab.id(s), Some(i as u32));
        assert_eq!(vocab.encode_text(s).unwrap(), vec![i as u32]);
        assert_eq!(vocab.decode(&[i as u32]), vec![s.to_string()]);
    }
    let text = "<bos> search 5 21 <think> 13 <ep> correct </think> <answer> 13 </answer>";
    let ids = vocab.encode_text(text).unwrap();
    assert_eq!(ids, vocab.encode_words(&words(text)).unwrap());
    assert_eq!(vocab.decode(&ids).join(" "), text);
    assert!(vocab
        .encode_text("13 banana")
        .unwrap_err()
        .to_string()
        .contains("banana"));

    let dir = std::env::temp_dir().join(format!("mrt-vocab-{}", std::process::id()));
    let path = dir.join("tokenizer.json");
    vocab.save(&path).unwrap();
    let back = Vocab::load(&path).unwrap();
    assert_eq!(back.size(), vocab.size());
    assert_eq!(back.encode_text(text).unwrap(), ids);
    std::fs::write(dir.join("bad.json"), "{ not json").unwrap();
    assert!(Vocab::load(&dir.join("bad.json")).is_err());
    assert!(Vocab::load(&dir.join("missing.json"))
        .unwrap_err()
        .to_string()
        .contains("not found"));
}

#[test]
fn loss_mask_covers_policy_tokens_only() {
    let task = Search::new(SearchConfig::default()).unwrap();
    let vocab = Vocab::build(&task.words()).unwrap();
    let p = Problem::Search(SearchProblem {
        hidden: 13,
        lo: 5,
        hi: 21,
    });
    let mut trace = task.scripted_trace(&p, "scan", Some(2), &mut StdRng::seed_from_u64(0));
    assert_eq!(
        trace.text(),
        "<bos> search 5 21 <think> 5 <ep> higher 6 <ep> higher <timeup> </think> <answer> 14 </answer>"
    );
    let tok = trace.tokenize(&vocab).unwrap();
    let trainable: Vec<&str> = trace
        .words
        .iter()
        .zip(&tok.trainable)
        .filter(|(_, &t)| t)
        .map(|(w, _)| w.as_str())
        .collect();
    assert_eq!(trainable, ["5", "<ep>", "6", "<ep>", "14", "</answer>"]);
    // Batched: the mask over targets is the trainable flag shifted by one.
    trace.push(Role::Env, ["higher"]);
    let other = trace.tokenize(&vocab).unwrap();
    let batch = collate::<burn::backend::Flex>(&[&tok, &other], vocab.specials.pad, &Default::default());
    let mask: Vec<f32> = batch.mask.into_data().to_vec().unwrap();
    let t = tok.ids.len().max(other.ids.len());
    let expected: Vec<f32> = [&tok, &other]
        .iter()
        .flat_map(|s| (1..t).map(|k| if s.trainable.get(k) == Some(&true) { 1.0 } else { 0.0 }))
        .collect();
    assert_eq!(mask, expected);
    assert_eq!(batch.targets, 12);
    // The forced suffix is never trained.
    let mut forced = Trace::default();
    push_forced_suffix(&mut forced);
    assert!(forced.tokenize(&vocab).unwrap().trainable.iter().all(|&t| !t));
}

#[test]
fn train_validation_and_held_out_problems_never_share_a_prompt() {
    for task in tasks() {
        let mut rng = StdRng::seed_from_u64(5);
        let mut draw = |split, n| -> HashSet<Vec<String>> {
            (0..n)
                .map(|_| task.prompt(&sample_problem(task.as_ref(), split, &mut rng).unwrap()))
                .collect()
        };
        let train = draw(Split::Train, 3000);
        let validation = draw(Split::Validation, 500);
        let held = draw(Split::HeldOut, 1000);
        assert!(
            train.is_disjoint(&held) && train.is_disjoint(&validation) && validation.is_disjoint(&held),
            "{}",
            task.name()
        );
        assert!(
            held.len() >= 8 && validation.len() >= 2 && train.len() > held.len(),
            "{}: {} / {} / {}",
            task.name(),
            train.len(),
            validation.len(),
            held.len()
        );
        // The split is a function of the prompt: every problem with one prompt is on one side.
        let mut seen: std::collections::HashMap<Vec<String>, Split> = Default::default();
        let mut rng = StdRng::seed_from_u64(6);
        for _ in 0..5000 {
            let p = task.generate(&mut rng);
            let split = split_of(task.as_ref(), &p);
            assert_eq!(
                *seen.entry(task.prompt(&p)).or_insert(split),
                split,
                "{}: {:?}",
                task.name(),
                task.prompt(&p)
            );
        }
    }
}

#[test]
fn warm_start_cuts_reach_the_boundary_after_the_solving_episode() {
    for task in tasks() {
        let mut mix = TaskConfig::by_name(task.name())
            .unwrap()
            .warm_start()
            .expect("a word task")
            .clone();
        mix.cut_fraction = 1.0;
        let mut rng = StdRng::seed_from_u64(8);
        let mut after_solution = 0;
        for _ in 0..400 {
            let p = task.generate(&mut rng);
            let trace = warm_start_trace(task.as_ref(), &p, &mix, &mut rng);
            let k = trace
                .words
                .iter()
                .position(|w| w == "<timeup>")
                .expect("every cut trace is forced");
            // Cut right after an episode that solved the problem: the forced answer is that solution.
            let last_solved = trace.words[..k].iter().rposition(|w| w == "<ep>").is_some_and(|end| {
                // The episode: the policy's words before that delimiter.
                let mut start = end;
                while start > 0 && trace.roles[start - 1] == Role::Policy && trace.words[start - 1] != "<ep>" {
                    start -= 1;
                }
                let episode = &trace.words[start..end];
                task.confirms_solution(&p, episode) || task.verify(&p, episode)
            });
            if last_solved {
                after_solution += 1;
                assert!(task.verify(&p, &answer_of(&trace)), "{}: {}", task.name(), trace.text());
            }
        }
        assert!(
            after_solution > 20,
            "{}: {after_solution} cuts after a solving episode",
            task.name()
        );
    }
}

/// Best achievable probability that the forced answer after `j` more guesses is right, with x
/// uniform on `set`, maximised over every adaptive guessing policy (exhaustive recursion).
fn brute_force(set: &[u32], j: usize) -> f64 {
    if set.is_empty() {
        return 0.0;
    }
    let n = set.len() as f64;
    if j == 0 {
        return 1.0 / n;
    }
    let lo = *set.first().unwrap();
    let hi = *set.last().unwrap();
    (lo..=hi)
        .map(|g| {
            let below: Vec<u32> = set.iter().copied().filter(|&x| x < g).collect();
            let above: Vec<u32> = set.iter().copied().filter(|&x| x > g).collect();
            let hit = set.contains(&g) as u32 as f64;
            (hit + below.len() as f64 * brute_force(&below, j - 1) + above.len() as f64 * brute_force(&above, j - 1))
                / n
        })
        .fold(0.0, f64::max)
}

#[test]
fn bayes_optimal_comparator_matches_brute_force() {
    for size in 1..=9u32 {
        let window = Interval {
            lo: 3,
            hi: 3 + size - 1,
        };
        let curve = bayes_optimal_curve(window, 4);
        let set: Vec<u32> = (window.lo..=window.hi).collect();
        for (j, &c) in curve.iter().enumerate() {
            let best = brute_force(&set, j);
            assert!(
                (c - best).abs() < 1e-12,
                "size {size}, j {j}: bisection {c} vs optimum {best}"
            );
        }
        // Closed form of a balanced search tree: min(1, (2^(j+1) − 1) / size).
        for (j, &c) in curve.iter().enumerate() {
            let closed = ((1u32 << (j + 1)) - 1).min(size) as f64 / size as f64;
            assert!((c - closed).abs() < 1e-12);
        }
    }
}

#[test]
fn countdown_lists_each_correct_line_once_and_only_correct_lines() {
    let task = Countdown::new(CountdownConfig::default()).unwrap();
    // A repeated number: both orders of the two 3s write the same lines.
    let p = Problem::Countdown(CountdownProblem {
        numbers: vec![3, 3, 2],
        target: 12,
    });
    let lines = task.correct_answers(&p).unwrap();
    let distinct: HashSet<&Vec<String>> = lines.iter().collect();
    assert_eq!(distinct.len(), lines.len(), "{lines:?}");
    assert!(lines.iter().all(|l| task.verify(&p, l)));
    // (3 + 3) × 2, with the last step in either operand order, is among them.
    assert!(lines.contains(&words("3 + 3 = 6 , 6 * 2 = 12")) && lines.contains(&words("3 + 3 = 6 , 2 * 6 = 12")));
}
