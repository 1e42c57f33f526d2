//! The free-text path on the CPU: the cache rewinds that free-text episodes need, the text
//! protocol's episodes, forced answers and verdicts on a character-level tokenizer, and a
//! pretrained (tiny random) Hugging Face model fine-tuned on the sample JSONL end to end.

use std::fs;
use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use mrt::data::math::MathProblem;
use mrt::data::math_task::TextFormat;
use mrt::data::{Problem, TextTokenizer};
use mrt::model::hf;
use mrt::rl::config::{Algo, RunConfig};
use mrt::rl::metrics::read_metrics;
use mrt::rl::pipeline::{run_pipeline, PipelineOptions};
use mrt::rl::protocol::{Protocol, TextProtocol, Thinking};

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
    let model = hf::load_with_context::<B>(&root().join("tests/fixtures/hf/llama"), Some(256), &Default::default()).unwrap();
    let prefix: Vec<u32> = (0..10).map(|i| 20 + i).collect();
    let more = [40u32, 41, 42];
    let mut rewound = model.new_cache(1, 64);
    model.forward_cached(ids(&prefix), &mut rewound, None).unwrap();
    rewound.rewind(&[(0, 6)]).unwrap();
    assert_eq!(rewound.lengths(), &[6]);
    let a: Vec<f32> = model.forward_cached(ids(&more), &mut rewound, None).unwrap().into_data().to_vec().unwrap();
    let mut short = model.new_cache(1, 64);
    model.forward_cached(ids(&prefix[..6]), &mut short, None).unwrap();
    let b: Vec<f32> = model.forward_cached(ids(&more), &mut short, None).unwrap().into_data().to_vec().unwrap();
    let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "max |Δ logit| {worst}");
    assert_eq!(rewound.lengths(), &[9]);
    assert!(rewound.clone().rewind(&[(0, 10)]).is_err(), "a row cannot grow by rewinding");
}

/// A tokenizer with one id per character (and an end-of-sequence token), so that text
/// boundaries fall between tokens exactly where the test expects them.
fn char_tokenizer(dir: &Path) -> TextTokenizer {
    fs::create_dir_all(dir).unwrap();
    let chars: Vec<char> = " \n.,:?!{}\\=+-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'<>/".chars().collect();
    let mut vocab = serde_json::Map::new();
    vocab.insert("<eos>".into(), 0.into());
    for (i, c) in chars.iter().enumerate() {
        vocab.insert(c.to_string(), (i + 1).into());
    }
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{"id": 0, "content": "<eos>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Fuse"},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": []}
    });
    fs::write(dir.join("tokenizer.json"), serde_json::to_string(&tokenizer).unwrap()).unwrap();
    fs::write(dir.join("tokenizer_config.json"), r#"{"eos_token": "<eos>"}"#).unwrap();
    TextTokenizer::load(dir).unwrap()
}

fn problem(answer: &str) -> Problem {
    Problem::Math(MathProblem { question: "What is 6 times 7?".into(), answer: answer.into() })
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
    assert_eq!(read, head.len() + "Wait,".len(), "decided at the comma after the marker");
    assert_eq!(tok.decode(&tokens[..read - carry]).unwrap(), head);
    // Too few paragraphs before the marker, or a longer word: no boundary.
    for early in ["Six sevens.\n\nWait, 42.", "A.\n\nB.\n\nC.\n\nWaiting for 42."] {
        assert_eq!(first_episode_end(&protocol, &tok.encode(early).unwrap()), None, "{early:?}");
    }
    // The end of the output while thinking ends the rollout; `</think>` is not in this
    // vocabulary as one token, so nothing else opens an answer.
    assert_eq!(protocol.thinking(&problem("42"), &[tok.eos]).unwrap(), Thinking::Finished);
}

#[test]
fn forced_and_free_answers_are_read_and_judged() {
    let tok = char_tokenizer(&scratch("answers"));
    let format = TextFormat::default();
    let protocol = TextProtocol::new(&tok, &format).unwrap();
    assert_eq!(tok.decode(protocol.suffix()).unwrap(), format.suffix);
    // A forced answer closes with the suffix's brace, nested braces included.
    let forced = tok.encode("\\frac{84}{2}} and more").unwrap();
    let closes = (1..=forced.len()).find(|&n| protocol.answer_closed(&forced[..n], true).unwrap()).unwrap();
    assert_eq!(tok.decode(&forced[..closes]).unwrap(), "\\frac{84}{2}}");
    let verdict = protocol.judge(&problem("42"), &forced[..closes], true).unwrap();
    assert_eq!((verdict.reward, verdict.well_formed), (1.0, true));
    assert_eq!(protocol.judge(&problem("41"), &forced[..closes], true).unwrap().reward, 0.0);
    // A free answer ends at end-of-sequence and is the last boxed expression.
    let mut free = tok.encode("so \\boxed{41}, no: \\boxed{42}.").unwrap();
    assert!(!protocol.answer_closed(&free, false).unwrap());
    free.push(tok.eos);
    assert!(protocol.answer_closed(&free, false).unwrap());
    assert_eq!(protocol.judge(&problem("42"), &free, false).unwrap().reward, 1.0);
    let unboxed = protocol.judge(&problem("42"), &tok.encode("42").unwrap(), false).unwrap();
    assert_eq!((unboxed.reward, unboxed.well_formed), (0.0, false));
}

/// `train --model <fixture> --task math --data <sample>` in miniature: a couple of RL steps of
/// a random Llama on the sample file write the usual run directory.
#[test]
fn a_pretrained_model_fine_tunes_on_the_sample_file_end_to_end() {
    let model_dir = root().join("tests/fixtures/hf/llama");
    let patch = serde_json::json!({
        "task": {"data": root().join("data/samples/math.jsonl"), "max_episodes": 2},
        "model": {"max_seq_len": 512},
        "rl": {"steps": 2, "problems_per_step": 2, "group_size": 2, "eval_every": 0, "checkpoint_every": 1,
               "rollout": {"max_tokens": 24, "max_answer_tokens": 6}, "prover": {"samples": 2, "max_answer_tokens": 6}},
        "eval": {"problems": 2, "samples": 1, "max_tokens": 24, "prover": {"samples": 2, "max_answer_tokens": 6}}
    });
    let config = RunConfig::pretrained_with_patch("math", &model_dir, Algo::MrtDense, 0, Some(patch)).unwrap();
    assert_eq!(config.warm_start.steps, 0);
    let run_dir = scratch("run");
    let opts = PipelineOptions { config, run_dir: run_dir.clone(), resume: false, init: None, quiet: true, interrupt_after: None, final_eval: true };
    let out = run_pipeline::<Autodiff<Flex>>(&opts, &Default::default()).unwrap();
    assert!(out.completed && out.pretrained);
    for file in ["config.json", "tokenizer.json", "tokenizer_config.json", "metrics.jsonl", "summary.json", "checkpoints/final.ckpt", "checkpoints/warm_start.ckpt"] {
        assert!(run_dir.join(file).is_file(), "{file}");
    }
    let metrics = read_metrics(&run_dir.join("metrics.jsonl")).unwrap();
    let rl: Vec<_> = metrics.iter().filter(|r| r["phase"] == "rl").collect();
    assert_eq!(rl.iter().filter(|r| r.get("train/loss").is_some() || r.get("rollout/reward").is_some()).count(), 2);
    let (base, tuned) = (out.base.unwrap(), out.fine_tuned.unwrap());
    assert_eq!((base.problems, base.rollouts, tuned.rollouts), (2, 2, 2));
    assert!(base.pass1.is_finite() && tuned.pass1.is_finite());
    // Text runs refuse what only synthetic runs can do, by name.
    let mut bad = RunConfig::pretrained_with_patch("math", &model_dir, Algo::Grpo, 0, None).unwrap();
    bad.warm_start.steps = 10;
    assert!(bad.validate().unwrap_err().to_string().contains("warm_start.steps"));
    let err = RunConfig::with_patch("math", "cpu-tiny", Algo::Grpo, 0, true, None).and_then(|c| c.validate()).unwrap_err().to_string();
    assert!(err.contains("--model"), "{err}");
}
