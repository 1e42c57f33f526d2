//! The free-text path on the CPU: the cache rewinds that free-text episodes need, the text
//! protocol's episodes, forced answers and verdicts on a character-level tokenizer (a pretrained
//! model fine-tuned end to end: tests/math_pretrained.rs).

use std::fs;
use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::module::Param;
use burn::prelude::*;
use mrt::data::math::MathProblem;
use mrt::data::math_task::TextFormat;
use mrt::data::{Problem, Role, TextTokenizer};
use mrt::model::{hf, SamplerConfig, Transformer, TransformerConfig};
use mrt::rl::config::{Algo, RunConfig};
use mrt::rl::protocol::{Protocol, TextProtocol, Thinking};
use mrt::rl::prover::{ProverConfig, ProverMode};
use mrt::rl::rollout::{AnswerLimit, Engine, Finish, Rollout, RolloutConfig};
use mrt::rl::score::score;
use rand::rngs::StdRng;
use rand::SeedableRng;

type B = Flex;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mrt-math-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    d
}

fn ids(values: &[u32]) -> Tensor<B, 2, Int> {
    let v: Vec<i64> = values.iter().map(|&t| t as i64).collect();
    Tensor::from_data(TensorData::new(v, [1, values.len()]), &Default::default())
}

/// A row rewound to k tokens continues exactly as a row that only ever held those k.
#[test]
fn rewind_equals_a_shorter_prefix() {
    let model =
        hf::load_with_context::<B>(&root().join("tests/fixtures/hf/llama"), Some(256), &Default::default()).unwrap();
    let prefix: Vec<u32> = (0..10).map(|i| 20 + i).collect();
    let more = [40u32, 41, 42];
    let mut rewound = model.new_cache(1, 64);
    model.forward_cached(ids(&prefix), &mut rewound, None).unwrap();
    rewound.rewind(&[(0, 6)]).unwrap();
    assert_eq!(rewound.lengths(), &[6]);
    let a: Vec<f32> = model
        .forward_cached(ids(&more), &mut rewound, None)
        .unwrap()
        .into_data()
        .to_vec()
        .unwrap();
    let mut short = model.new_cache(1, 64);
    model.forward_cached(ids(&prefix[..6]), &mut short, None).unwrap();
    let b: Vec<f32> = model
        .forward_cached(ids(&more), &mut short, None)
        .unwrap()
        .into_data()
        .to_vec()
        .unwrap();
    let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "max |Δ logit| {worst}");
    assert_eq!(rewound.lengths(), &[9]);
    assert!(
        rewound.clone().rewind(&[(0, 10)]).is_err(),
        "a row cannot grow by rewinding"
    );
}

/// A tokenizer with one id per character (and an end-of-sequence token), so that text
/// boundaries fall between tokens exactly where the test expects them.
fn char_tokenizer(dir: &Path) -> TextTokenizer {
    char_tokenizer_with(dir, &[])
}

/// [`char_tokenizer`] with `extra` strings as whole tokens (such as `</think>`), matched
/// before the characters.
fn char_tokenizer_with(dir: &Path, extra: &[&str]) -> TextTokenizer {
    fs::create_dir_all(dir).unwrap();
    let chars: Vec<char> = " \n.,:?!{}\\=+-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'<>/"
        .chars()
        .collect();
    let mut vocab = serde_json::Map::new();
    vocab.insert("<eos>".into(), 0.into());
    for (i, c) in chars.iter().enumerate() {
        vocab.insert(c.to_string(), (i + 1).into());
    }
    let mut added = vec![serde_json::json!({
        "id": 0, "content": "<eos>", "single_word": false, "lstrip": false, "rstrip": false,
        "normalized": false, "special": true
    })];
    for (i, token) in extra.iter().enumerate() {
        let id = chars.len() + 1 + i;
        vocab.insert(token.to_string(), id.into());
        added.push(serde_json::json!({
            "id": id, "content": token, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": false
        }));
    }
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Fuse"},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    });
    fs::write(dir.join("tokenizer.json"), serde_json::to_string(&tokenizer).unwrap()).unwrap();
    fs::write(dir.join("tokenizer_config.json"), r#"{"eos_token": "<eos>"}"#).unwrap();
    TextTokenizer::load(dir).unwrap()
}

fn problem(answer: &str) -> Problem {
    Problem::Math(MathProblem {
        question: "What is 6 times 7?".into(),
        answer: answer.into(),
    })
}

/// Feeds `text` one token at a time; returns (tokens read, carry) at the first episode end.
fn first_episode_end(protocol: &TextProtocol, tokens: &[u32]) -> Option<(usize, usize)> {
    (1..=tokens.len()).find_map(|k| match protocol.thinking(&problem("42"), &tokens[..k]).unwrap() {
        Thinking::EpisodeEnd { carry, reply, confirms } => {
            assert!(reply.is_empty() && !confirms);
            Some((k, carry))
        }
        _ => None,
    })
}

#[test]
fn text_episodes_end_before_their_marker() {
    let tok = char_tokenizer(&scratch("chars"));
    let format = TextFormat::default();
    let protocol = TextProtocol::new(&tok, &format).unwrap();
    // Three paragraphs, then one that opens with a marker: the episode ends before "Wait",
    // once the character after it shows that the word is "Wait" and not "Waiting".
    let head = "Six sevens.\n\nSo 42.\n\nCheck it.\n\n";
    let text = format!("{head}Wait, 6 times 7 is 42.");
    let tokens = tok.encode(&text).unwrap();
    let (read, carry) = first_episode_end(&protocol, &tokens).expect("an episode ends");
    assert_eq!(
        read,
        head.len() + "Wait,".len(),
        "decided at the comma after the marker"
    );
    assert_eq!(tok.decode(&tokens[..read - carry]).unwrap(), head);
    // Too few paragraphs before the marker, or a longer word: no boundary.
    for early in ["Six sevens.\n\nWait, 42.", "A.\n\nB.\n\nC.\n\nWaiting for 42."] {
        assert_eq!(
            first_episode_end(&protocol, &tok.encode(early).unwrap()),
            None,
            "{early:?}"
        );
    }
    // The end of the output while thinking ends the rollout; `</think>` is not in this
    // vocabulary as one token, so nothing else opens an answer.
    assert_eq!(
        protocol.thinking(&problem("42"), &[tok.eos]).unwrap(),
        Thinking::Finished
    );
}

#[test]
fn forced_and_free_answers_are_read_and_judged() {
    let tok = char_tokenizer(&scratch("answers"));
    let format = TextFormat::default();
    let protocol = TextProtocol::new(&tok, &format).unwrap();
    assert_eq!(tok.decode(protocol.suffix()).unwrap(), format.suffix);
    // A forced answer closes with the suffix's brace, nested braces included.
    let forced = tok.encode("\\frac{84}{2}} and more").unwrap();
    let closes = (1..=forced.len())
        .find(|&n| protocol.answer_closed(&forced[..n], true).unwrap())
        .unwrap();
    assert_eq!(tok.decode(&forced[..closes]).unwrap(), "\\frac{84}{2}}");
    let verdict = protocol.judge(&problem("42"), &forced[..closes], true).unwrap();
    assert_eq!((verdict.reward, verdict.well_formed), (1.0, true));
    assert_eq!(
        protocol.judge(&problem("41"), &forced[..closes], true).unwrap().reward,
        0.0
    );
    // A free answer ends at end-of-sequence and is the last boxed expression.
    let mut free = tok.encode("so \\boxed{41}, no: \\boxed{42}.").unwrap();
    assert!(!protocol.answer_closed(&free, false).unwrap());
    free.push(tok.eos);
    assert!(protocol.answer_closed(&free, false).unwrap());
    assert_eq!(protocol.judge(&problem("42"), &free, false).unwrap().reward, 1.0);
    let unboxed = protocol
        .judge(&problem("42"), &tok.encode("42").unwrap(), false)
        .unwrap();
    assert_eq!((unboxed.reward, unboxed.well_formed), (0.0, false));
}

/// A model of width `d` with no transformer blocks: the residual stream is the embedding
/// itself, so the tests below set the embedding and the head to script what it writes.
fn blockless(vocab: usize, d: usize) -> Transformer<B> {
    let config = TransformerConfig {
        vocab_size: vocab,
        d_model: d,
        n_layers: 1,
        n_heads: 1,
        n_kv_heads: 1,
        d_ff: 8,
        max_seq_len: 512,
        rope_theta: 10_000.0,
        norm_eps: 1e-6,
        tie_embeddings: false,
        qkv_bias: false,
    };
    let mut model = Transformer::<B>::new(&config, 0, &Default::default()).unwrap();
    model.blocks.clear();
    model
}

/// A model that samples every token from one fixed distribution, whatever it has read: every
/// embedding is the same unit vector and the head reads only that direction, so token t's
/// logit is `logits[t]` (0 for those not listed) at every position, and each rollout is a
/// pure function of the protocol's rules and the sampler's uniforms.
fn unigram(vocab: usize, logits: &[(u32, f32)]) -> Transformer<B> {
    let device = Default::default();
    let mut model = blockless(vocab, 16);
    let mut embed = vec![0.0f32; vocab * 16];
    (0..vocab).for_each(|t| embed[t * 16] = 1.0);
    model.embed.weight = Param::from_tensor(Tensor::from_data(TensorData::new(embed, [vocab, 16]), &device));
    // RMSNorm turns e₀ into 4·e₀; the head is [d_model, vocab].
    let mut head = vec![0.0f32; 16 * vocab];
    for &(t, logit) in logits {
        head[t as usize] = logit / 4.0;
    }
    model.head.as_mut().unwrap().weight =
        Param::from_tensor(Tensor::from_data(TensorData::new(head, [16, vocab]), &device));
    model
}

/// A model that follows one fixed chain of tokens: after token a it always writes `next[a]`
/// (greedy decoding). Each embedding is its own unit vector, there are no blocks, and the
/// head maps direction a to `next[a]`, so the rollout is scripted by the chain.
fn bigram(vocab: usize, chain: &[u32]) -> Transformer<B> {
    let device = Default::default();
    let mut model = blockless(vocab, vocab);
    let mut embed = vec![0.0f32; vocab * vocab];
    (0..vocab).for_each(|t| embed[t * vocab + t] = 1.0);
    model.embed.weight = Param::from_tensor(Tensor::from_data(TensorData::new(embed, [vocab, vocab]), &device));
    let mut head = vec![0.0f32; vocab * vocab];
    for pair in chain.windows(2) {
        assert_eq!(
            head[pair[0] as usize * vocab..(pair[0] as usize + 1) * vocab]
                .iter()
                .sum::<f32>(),
            0.0,
            "token {} repeats",
            pair[0]
        );
        head[pair[0] as usize * vocab + pair[1] as usize] = 1.0;
    }
    model.head.as_mut().unwrap().weight =
        Param::from_tensor(Tensor::from_data(TensorData::new(head, [vocab, vocab]), &device));
    model
}

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
    let mut rl = RunConfig::pretrained_with_patch("math", &root().join("tests/fixtures/hf/llama"), Algo::Mrt, 0, None)
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
    let problems: Vec<Problem> = ["42", "7", "12"].map(problem).to_vec();
    let scored = score(&engine, &problems, &rl, &mut StdRng::seed_from_u64(3)).unwrap();
    assert_eq!(
        (
            scored.prefix_streams.len(),
            scored.rollouts.len(),
            scored.baselines.len()
        ),
        (3, 9, 3)
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
