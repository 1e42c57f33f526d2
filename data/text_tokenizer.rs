//! A pretrained model's own tokenizer: `tokenizer.json` through the `tokenizers` crate, with the
//! special tokens that `transformers` would use, read from the files a Hugging Face model
//! directory ships. Unlike [`Vocab`](super::Vocab) it tokenizes free text (any word, sub-word
//! pieces), and its special tokens are whatever the model was trained with.
//!
//! Where a special token is named: `tokenizer_config.json` (`bos_token`, `eos_token`,
//! `pad_token`, each a string or an `{"content": …}` object), else `generation_config.json`
//! and then `config.json` (`bos_token_id`, `eos_token_id`: a number or a list whose first
//! entry counts). `</think>` is looked up in the vocabulary (reasoning models such as
//! DeepSeek-R1-Distill have it).

use std::path::Path;

use serde_json::Value;
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::fsutil::read_json;

/// A model directory's tokenizer and special token ids.
#[derive(Clone)]
pub struct TextTokenizer {
    tokenizer: Tokenizer,
    /// Beginning of sequence, when the model uses one.
    pub bos: Option<u32>,
    /// End of sequence (required: generation needs a stop token).
    pub eos: u32,
    /// Padding; the end-of-sequence token when none is named, as `transformers` users do.
    pub pad: u32,
    /// `</think>`, when the vocabulary has it as one token.
    pub end_think: Option<u32>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TextTokenizer({} tokens, eos {})", self.size(), self.eos)
    }
}

impl TextTokenizer {
    /// Reads `dir/tokenizer.json` and the special tokens from the files beside it.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::Tokenizer(format!("{}: file not found", path.display())));
        }
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let [config, generation, model] = ["tokenizer_config.json", "generation_config.json", "config.json"].map(|f| read_if_present(&dir.join(f)));
        let (config, generation, model) = (config?, generation?, model?);
        // A token named in tokenizer_config.json must exist; ids from the other files are used as given.
        let named = |field: &str| -> Result<Option<u32>> {
            let Some(text) = config.as_ref().and_then(|c| token_text(&c[field])) else {
                return Ok(None);
            };
            tokenizer.token_to_id(&text).map(Some).ok_or_else(|| {
                Error::Tokenizer(format!("{}: {field} `{text}` is not in the vocabulary of {}", dir.join("tokenizer_config.json").display(), path.display()))
            })
        };
        let by_id = |field: &str| [&generation, &model].into_iter().flatten().find_map(|j| first_id(&j[field]));
        let bos = named("bos_token")?.or_else(|| by_id("bos_token_id"));
        let eos = named("eos_token")?.or_else(|| by_id("eos_token_id")).ok_or_else(|| {
            Error::Tokenizer(format!(
                "{}: no end-of-sequence token (neither `eos_token` in tokenizer_config.json nor `eos_token_id` in generation_config.json or config.json)",
                dir.display()
            ))
        })?;
        let pad = named("pad_token")?.unwrap_or(eos);
        let size = tokenizer.get_vocab_size(true) as u32;
        for (what, id) in [("bos", bos), ("eos", Some(eos)), ("pad", Some(pad))] {
            if let Some(id) = id.filter(|&id| id >= size) {
                return Err(Error::Tokenizer(format!("{}: {what} token id {id} is outside the vocabulary ({size} tokens)", dir.display())));
            }
        }
        let end_think = tokenizer.token_to_id("</think>");
        Ok(Self { tokenizer, bos, eos, pad, end_think })
    }

    /// Number of ids, added tokens included (the model's `vocab_size` may be larger: padded).
    pub fn size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Ids of `text`, without any special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.tokenizer.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, false).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The single id of `token`, when the vocabulary has it.
    pub fn id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }
}

/// A JSON file's value, `None` when the file is absent; malformed JSON is an error.
fn read_if_present(path: &Path) -> Result<Option<Value>> {
    path.is_file().then(|| read_json(path)).transpose()
}

/// `"<s>"` or `{"content": "<s>", …}` (how `transformers` writes an added token).
fn token_text(v: &Value) -> Option<String> {
    v.as_str().or_else(|| v.get("content").and_then(Value::as_str)).map(str::to_string)
}

/// `7` or `[7, 8]` (several stop tokens: the first is the end-of-sequence token).
fn first_id(v: &Value) -> Option<u32> {
    v.as_u64().or_else(|| v.as_array().and_then(|a| a.first()).and_then(Value::as_u64)).map(|id| id as u32)
}
