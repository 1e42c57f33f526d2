//! The tokenizer inside a GGUF file (`tokenizer.ggml.*`), rebuilt as a Hugging Face
//! `tokenizer.json` for the `tokenizers` crate, so that a GGUF model tokenizes exactly as the
//! model it was converted from (and as `transformers` does when it loads the same file).
//!
//! A GGUF file stores the byte-level BPE model (`tokenizer.ggml.model = "gpt2"`: vocabulary,
//! merges as `"a b"` strings, a type per token) but not the pre-tokenizer's definition, only
//! its name (`tokenizer.ggml.pre`, llama.cpp's table of known tokenizers). The pre-tokenizers
//! of the families this project supports are written out here from their original
//! `tokenizer.json` files: SmolLM's splits every digit and then applies GPT-2's byte-level
//! regex; Llama 3's and Qwen2's split with their own regex (numbers in runs of up to three
//! digits for Llama 3, one digit for Qwen2, which also NFC-normalises). Control tokens
//! (type 3) and user-defined ones (type 4) are added tokens, matched whole in any text.

use serde_json::{json, Value as Json};

use crate::error::{Error, Result};
use crate::gguf::{GgufFile, Value};

/// Llama 3's split (its `tokenizer.json`).
const LLAMA3_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
/// Qwen2's split: Llama 3's with single digits.
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `tokenizer.ggml.pre` names this builder knows.
pub const PRE_TOKENIZERS: [&str; 5] = ["smollm", "llama-bpe", "qwen2", "gpt2", "default"];

/// ggml's token types.
const CONTROL: u64 = 3;
const USER_DEFINED: u64 = 4;

/// What the tokenizer side of a GGUF file holds.
pub struct GgufTokenizer {
    /// A `tokenizer.json` document.
    pub json: Json,
    pub bos: Option<u32>,
    pub eos: u32,
    pub pad: Option<u32>,
    /// Whether the model expects its beginning-of-sequence token before a plain prompt.
    pub add_bos: bool,
    pub chat_template: Option<String>,
}

fn split(pattern: &str) -> Json {
    json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false})
}

fn byte_level(use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

/// The normalizer and pre-tokenizer of the tokenizer llama.cpp calls `pre`.
fn pre_tokenizer(pre: &str) -> Option<(Json, Json)> {
    Some(match pre {
        "smollm" => (
            Json::Null,
            json!({
                "type": "Sequence",
                "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]
            }),
        ),
        "llama-bpe" => (
            Json::Null,
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]}),
        ),
        "qwen2" => (
            json!({"type": "NFC"}),
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]}),
        ),
        "gpt2" | "default" => (Json::Null, byte_level(true)),
        _ => return None,
    })
}

/// Builds the tokenizer of `file`, or an error naming the metadata that is missing or not
/// supported.
pub fn from_gguf(file: &GgufFile) -> Result<GgufTokenizer> {
    let bad = |what: String| Error::Tokenizer(format!("{}: {what}", file.path.display()));
    let strings = |key: &str| -> Result<Vec<String>> {
        let v = file
            .get(key)
            .ok_or_else(|| bad(format!("metadata `{key}` is missing")))?;
        v.as_array()
            .and_then(|a| {
                a.iter()
                    .map(|s| s.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| bad(format!("metadata `{key}` is not an array of strings")))
    };
    let model = file
        .get("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .unwrap_or("(missing)");
    if model != "gpt2" {
        return Err(bad(format!(
            "tokenizer.ggml.model = {model:?}: only byte-level BPE (\"gpt2\", as in Llama 3, Qwen2 and SmolLM2) is \
                supported"
        )));
    }
    let pre = file
        .get("tokenizer.ggml.pre")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let (normalizer, pre_tokenizer) = pre_tokenizer(pre).ok_or_else(|| {
        bad(format!(
            "tokenizer.ggml.pre = {pre:?} is not supported (supported: {})",
            PRE_TOKENIZERS.join(", ")
        ))
    })?;
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<u64> = match file.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
        Some(a) if a.len() == tokens.len() => a.iter().map(|t| t.as_u64().unwrap_or(1)).collect(),
        Some(a) => return Err(bad(format!("{} token types for {} tokens", a.len(), tokens.len()))),
        None => vec![1; tokens.len()],
    };
    let id = |key: &str| -> Result<Option<u32>> {
        match file.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(id) if (id as usize) < tokens.len() => Ok(Some(id as u32)),
                _ => Err(bad(format!(
                    "metadata `{key}` = {v:?} is not a token id below {}",
                    tokens.len()
                ))),
            },
        }
    };
    let (bos, pad) = (
        id("tokenizer.ggml.bos_token_id")?,
        id("tokenizer.ggml.padding_token_id")?,
    );
    let eos = id("tokenizer.ggml.eos_token_id")?
        .ok_or_else(|| bad("metadata `tokenizer.ggml.eos_token_id` is missing".into()))?;
    let add_bos = file
        .get("tokenizer.ggml.add_bos_token")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let chat_template = file
        .get("tokenizer.chat_template")
        .and_then(Value::as_str)
        .map(str::to_string);

    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (i, (token, &kind)) in tokens.iter().zip(&types).enumerate() {
        if vocab.insert(token.clone(), json!(i)).is_some() {
            return Err(bad(format!("token {token:?} (id {i}) is listed twice")));
        }
        if kind == CONTROL || kind == USER_DEFINED {
            added.push(json!({
                "id": i, "content": token, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": kind == USER_DEFINED, "special": kind == CONTROL,
            }));
        }
    }
    let post_processor = match (add_bos, bos) {
        (true, Some(b)) => {
            let text = &tokens[b as usize];
            json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": text, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {text: {"id": text, "ids": [b], "tokens": [text]}},
            })
        }
        _ => json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}),
    };
    let json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    });
    Ok(GgufTokenizer {
        json,
        bos,
        eos,
        pad,
        add_bos,
        chat_template,
    })
}
