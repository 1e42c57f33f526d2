//! The free-text path on the CPU: the cache rewinds that free-text episodes need, the text
//! protocol's episodes, forced answers and verdicts on a character-level tokenizer (rollouts of
//! scripted models: tests/math_rollouts.rs; a pretrained model fine-tuned end to end:
//! tests/math_pretrained.rs).

mod common;

use std::path::Path;

use burn::prelude::*;
use common::text::{char_tokenizer, problem, scratch};
use common::B;
use mrt::data::math_task::TextFormat;
use mrt::model::hf;
use mrt::rl::protocol::{Protocol, TextProtocol, Thinking};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
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
