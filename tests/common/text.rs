//! Free-text fixtures: a character-level tokenizer, math problems, and models whose
//! writing is scripted through their embedding and head (no transformer blocks).

use std::fs;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::prelude::*;
use mrt::data::math::MathProblem;
use mrt::data::{Problem, TextTokenizer};
use mrt::model::{Transformer, TransformerConfig};

use super::B;

/// A fresh scratch directory for the test named `name` (removed if it was there).
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mrt-math-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    d
}

/// A tokenizer with one id per character (and an end-of-sequence token), so that text
/// boundaries fall between tokens exactly where the test expects them.
pub fn char_tokenizer(dir: &Path) -> TextTokenizer {
    char_tokenizer_with(dir, &[])
}

/// [`char_tokenizer`] with `extra` strings as whole tokens (such as `</think>`), matched
/// before the characters.
pub fn char_tokenizer_with(dir: &Path, extra: &[&str]) -> TextTokenizer {
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

pub fn problem(answer: &str) -> Problem {
    Problem::Math(MathProblem {
        question: "What is 6 times 7?".into(),
        answer: answer.into(),
    })
}

/// A model of width `d` with no transformer blocks: the residual stream is the embedding
/// itself, so the tests below set the embedding and the head to script what it writes.
pub fn blockless(vocab: usize, d: usize) -> Transformer<B> {
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
pub fn unigram(vocab: usize, logits: &[(u32, f32)]) -> Transformer<B> {
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
pub fn bigram(vocab: usize, chain: &[u32]) -> Transformer<B> {
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
