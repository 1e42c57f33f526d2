//! Free-text rollouts on the CPU with models whose writing is scripted (tests/common/text.rs):
//! natural answers and their limit, budget forcing, and `mrt`'s cuts at episode boundaries,
//! each decided by the protocol's rules alone.

mod common;

use std::path::Path;

use common::text::{bigram, char_tokenizer, char_tokenizer_with, problem, scratch, unigram};
use mrt::data::math_task::TextFormat;
use mrt::data::{Problem, Role};
use mrt::model::{split_rngs, SamplerConfig};
use mrt::rl::config::{Algo, RunConfig};
use mrt::rl::protocol::{Protocol, TextProtocol};
use mrt::rl::prover::{ProverConfig, ProverMode};
use mrt::rl::rollout::{AnswerLimit, Engine, Finish, Rollout, RolloutConfig};
use mrt::rl::score::score;
use rand::rngs::StdRng;
use rand::SeedableRng;

/// The policy's own answer is not cut at the forced answers' limit: after `</think>` the
/// scripted model writes "Sum: \boxed{7}" (9 tokens) and ends. With the synthetic tasks'
/// limit (4 tokens, `free_answer = forced`) it is unfinished; with the pretrained default
/// (`budget`) it is read and correct. A model that never writes `</think>` has its whole
/// output as the answer (its last `\boxed{}`).
#[test]
fn free_answers_run_to_the_budget_and_models_without_think_tags_answer_in_their_output() {
    let tok = char_tokenizer_with(&scratch("bigram"), &["</think>", "\\boxed{"]);
    let end_think = tok.end_think.expect("</think> is one token");
    let format = TextFormat {
        prompt: Some("Q: {question}=".into()),
        ..TextFormat::default()
    };
    let protocol = TextProtocol::new(&tok, &format).unwrap();
    let problems = [problem("7")];
    let prompt = protocol.prompt(&problems[0]).unwrap();
    let run = |chain: &[u32], free_answer| -> Rollout {
        let model = bigram(tok.size(), chain);
        let sampler = SamplerConfig::greedy();
        let config = RolloutConfig {
            max_episodes: 2,
            max_tokens: 64,
            max_answer_tokens: 4,
            free_answer,
            sampler,
            budget_forcing: false,
        };
        let engine = Engine {
            model: &model,
            protocol: &protocol,
            config: &config,
            prover: None,
        };
        engine
            .rollouts(&problems, 1, &mut StdRng::seed_from_u64(0))
            .unwrap()
            .remove(0)
    };
    let text = |s: &str| tok.encode(s).unwrap();
    // The prompt's last token starts the chain: "Think" </think> "Sum: \boxed{7}" <eos>.
    let answer = text("Sum: \\boxed{7}");
    assert_eq!(answer.len(), 8, "one token for \\boxed{{");
    let mut chain = vec![*prompt.last().unwrap()];
    chain.extend(text("Think"));
    chain.push(end_think);
    chain.extend(&answer);
    chain.push(tok.eos);
    let capped = run(&chain, AnswerLimit::Forced);
    assert_eq!((capped.finish, capped.reward), (Finish::Unfinished, 0.0));
    let free = run(&chain, AnswerLimit::Budget);
    assert_eq!((free.finish, free.reward), (Finish::Answered, 1.0));
    assert_eq!(
        tok.decode(&free.tokens[prompt.len()..]).unwrap(),
        "Think</think>Sum: \\boxed{7}<eos>"
    );
    // Without `</think>`: everything after the prompt is the answer.
    let mut plain = vec![*prompt.last().unwrap()];
    plain.extend(text("Think"));
    plain.extend(&answer);
    plain.push(tok.eos);
    let r = run(&plain, AnswerLimit::Forced);
    assert_eq!(
        (r.finish, r.reward, r.answer.clone()),
        (Finish::Answered, 1.0, Some(vec!["7".to_string()]))
    );
}

/// Budget forcing on free text: each end of output the policy samples is replaced by "Wait",
/// which opens a paragraph, so episodes end at the markers until the episode cap forces the
/// answer; a forcing text without a paragraph break is bounded by `max_tokens` instead.
#[test]
fn budget_forcing_replaces_the_end_of_thinking_by_wait() {
    let tok = char_tokenizer(&scratch("forcing"));
    // It ends its output at once (logit 40 against 0).
    let model = unigram(tok.size(), &[(tok.eos, 40.0)]);
    let problems = [problem("42")];
    let prover = ProverConfig {
        mode: ProverMode::Sample,
        samples: 2,
        temperature: 1.0,
        max_answer_tokens: 4,
    };
    let run = |format: &TextFormat, budget_forcing: bool, max_tokens: usize| -> Rollout {
        let protocol = TextProtocol::new(&tok, format).unwrap();
        let sampler = SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        };
        let config = RolloutConfig {
            max_episodes: 2,
            max_tokens,
            max_answer_tokens: 4,
            free_answer: Default::default(),
            sampler,
            budget_forcing,
        };
        let engine = Engine {
            model: &model,
            protocol: &protocol,
            config: &config,
            prover: Some(&prover),
        };
        engine
            .rollouts(&problems, 1, &mut StdRng::seed_from_u64(0))
            .unwrap()
            .remove(0)
    };
    let format = TextFormat::default();
    let prompt = TextProtocol::new(&tok, &format)
        .unwrap()
        .prompt(&problems[0])
        .unwrap()
        .len();

    // Free to stop: the first token ends the output, an answer without a boxed expression.
    let free = run(&format, false, 200);
    assert_eq!(free.tokens.len(), prompt + 1);
    assert_eq!(
        (free.finish, free.reward, free.episodes.len()),
        (Finish::Answered, 0.0, 0)
    );

    // Forced: "\n\nWait" again and again. Episode 1 ends before the fourth "Wait" paragraph
    // (min_paragraphs 3), known once the fifth has begun; episode 2, which starts with the
    // carried "Wait", ends the same way and reaches the cap, so what was decoded after it is
    // dropped and the suffix follows; the forced answer (end of output at once) is empty.
    let forced = run(&format, true, 200);
    let wait = "\n\nWait";
    let episode_1 = format!("{}\n\n", wait.repeat(3));
    let episode_2 = "Wait\n\n".repeat(3);
    let thought = tok
        .decode(&forced.tokens[prompt..prompt + episode_1.len() + episode_2.len()])
        .unwrap();
    assert_eq!(thought, format!("{episode_1}{episode_2}"));
    assert_eq!(
        forced.boundaries,
        vec![
            prompt,
            prompt + episode_1.len(),
            prompt + episode_1.len() + episode_2.len()
        ]
    );
    assert_eq!(forced.episodes.len(), 2);
    let suffix = TextProtocol::new(&tok, &format).unwrap().suffix().to_vec();
    let after = prompt + episode_1.len() + episode_2.len();
    assert_eq!(&forced.tokens[after..after + suffix.len()], suffix.as_slice());
    assert_eq!(forced.tokens[after + suffix.len()..], [tok.eos]);
    assert!(
        forced.roles[prompt..after + suffix.len()]
            .iter()
            .all(|&r| r == Role::Forced),
        "forcing and suffix are not the policy's"
    );
    assert_eq!(
        (forced.finish, forced.reward, forced.policy_tokens()),
        (Finish::Forced, 0.0, 1)
    );
    // The prover answered at every boundary, the two behind the cached stream included.
    assert_eq!(
        (forced.j.clone(), forced.j_well_formed.clone()),
        (vec![0.0; 3], vec![0.0; 3])
    );

    // A forcing text that never opens a paragraph: the token budget ends the thinking.
    let inline = TextFormat {
        wait: " Wait".into(),
        ..TextFormat::default()
    };
    let bounded = run(&inline, true, 20);
    let end = bounded.tokens.len() - suffix.len() - 1;
    assert_eq!(tok.decode(&bounded.tokens[prompt..end]).unwrap(), " Wait".repeat(4));
    assert_eq!((bounded.finish, bounded.episodes.len()), (Finish::Forced, 0));
}

/// The paper's recipe on free text: a stream whose episodes end at paragraph breaks is cut at
/// one of its boundaries (never inside the next episode's carried opening), the prover's J
/// there is the baseline, and the continuations resume from exactly that prefix.
#[test]
fn mrt_cuts_free_text_streams_at_their_episode_boundaries() {
    let tok = char_tokenizer(&scratch("mrt"));
    let newline = tok.encode("\n").unwrap()[0];
    // Line breaks often (p ≈ 0.3), the end of output rarely.
    let model = unigram(tok.size(), &[(newline, 3.57), (tok.eos, -2.0)]);
    let mut format = TextFormat::default();
    format.episodes.min_paragraphs = 1;
    format.episodes.max_paragraphs = 1; // every paragraph is an episode
    let protocol = TextProtocol::new(&tok, &format).unwrap();
    let mut rl = RunConfig::pretrained_with_patch(
        "math",
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/llama"),
        Algo::Mrt,
        0,
        None,
    )
    .unwrap()
    .rl;
    rl.group_size = 3;
    rl.rollout.max_episodes = 4;
    rl.rollout.max_tokens = 40;
    rl.rollout.max_answer_tokens = 4;
    rl.prover.samples = 2;
    rl.prover.max_answer_tokens = 4;
    let engine = Engine {
        model: &model,
        protocol: &protocol,
        config: &rl.rollout,
        prover: Some(&rl.prover),
    };
    // Enough streams that some are cut after an episode (k ~ U{0 … e − 1} per stream).
    let problems: Vec<Problem> = ["42", "7", "12", "3", "99", "18", "5", "60"].map(problem).to_vec();
    let scored = score(
        &engine,
        &problems,
        &rl,
        &mut split_rngs(&mut StdRng::seed_from_u64(3), problems.len()),
    )
    .unwrap();
    assert_eq!(
        (
            scored.prefix_streams.len(),
            scored.rollouts.len(),
            scored.baselines.len()
        ),
        (8, 24, 8)
    );
    let mut cut_inside = 0;
    for (g, stream) in scored.prefix_streams.iter().enumerate() {
        assert_eq!(stream.j.len(), stream.boundaries.len(), "J at every boundary");
        let prompt = stream.boundaries[0];
        for continuation in &scored.rollouts[g * 3..(g + 1) * 3] {
            let b = continuation.context_len;
            let k = stream
                .boundaries
                .iter()
                .position(|&x| x == b)
                .expect("cut at a boundary");
            assert_eq!(continuation.tokens[..b], stream.tokens[..b]);
            assert_eq!(scored.baselines[g], stream.j[k]);
            assert!(
                continuation.trainable()[..b].iter().all(|t| !t),
                "the prefix is context"
            );
            assert!(continuation.tokens.len() > b, "the continuation samples its own tokens");
            if k > 0 {
                cut_inside += 1;
                let text = tok.decode(&stream.tokens[prompt..b]).unwrap();
                // It ends in the blank line (and any spaces) before the next paragraph's text.
                assert!(
                    text[text.trim_end().len()..].contains("\n\n"),
                    "{text:?} ends before a new paragraph"
                );
            }
        }
    }
    assert!(cut_inside > 0, "some stream is cut after an episode");
}
