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
//!
//! A GGUF file carries its tokenizer too ([`super::gguf_tokenizer`]); [`TextTokenizer::load`]
//! takes either, and [`TextTokenizer::save`] writes one as a directory's files, so a run or an
//! export of a GGUF model has the usual `tokenizer.json` and `tokenizer_config.json`.
//!
//! The chat template comes from `chat_template.jinja`, else `tokenizer_config.json`'s
//! `chat_template` (a string, or a list of named templates of which `default` counts), or a
//! GGUF file's `tokenizer.chat_template`.

use std::path::Path;

use serde_json::Value;
use tokenizers::Tokenizer;

use super::chat::{ChatTemplate, Message};
use super::gguf_tokenizer;
use crate::error::{Error, Result};
use crate::fsutil::{read_json, write_atomic, write_json};
use crate::gguf::{is_gguf, GgufFile};

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
    /// The model's chat template, when it has one.
    pub chat: Option<ChatTemplate>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TextTokenizer({} tokens, eos {})", self.size(), self.eos)
    }
}

impl TextTokenizer {
    /// Reads a model's tokenizer: `dir/tokenizer.json` and the special tokens from the files
    /// beside it, or the tokenizer inside a GGUF file.
    pub fn load(dir: &Path) -> Result<Self> {
        if is_gguf(dir) {
            return Self::from_gguf(&GgufFile::open(dir)?);
        }
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::Tokenizer(format!("{}: file not found", path.display())));
        }
        let tokenizer =
            Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let [config, generation, model] =
            ["tokenizer_config.json", "generation_config.json", "config.json"].map(|f| read_if_present(&dir.join(f)));
        let (config, generation, model) = (config?, generation?, model?);
        // A token named in tokenizer_config.json must exist; ids from the other files are used as given.
        let named = |field: &str| -> Result<Option<u32>> {
            let Some(text) = config.as_ref().and_then(|c| token_text(&c[field])) else {
                return Ok(None);
            };
            tokenizer.token_to_id(&text).map(Some).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{}: {field} `{text}` is not in the vocabulary of {}",
                    dir.join("tokenizer_config.json").display(),
                    path.display()
                ))
            })
        };
        let by_id = |field: &str| {
            [&generation, &model]
                .into_iter()
                .flatten()
                .find_map(|j| first_id(&j[field]))
        };
        let bos = named("bos_token")?.or_else(|| by_id("bos_token_id"));
        let eos = named("eos_token")?.or_else(|| by_id("eos_token_id")).ok_or_else(|| {
            Error::Tokenizer(format!(
                "{}: no end-of-sequence token (neither `eos_token` in tokenizer_config.json nor `eos_token_id` in \
                    generation_config.json or config.json)",
                dir.display()
            ))
        })?;
        let pad = named("pad_token")?.unwrap_or(eos);
        let size = tokenizer.get_vocab_size(true) as u32;
        for (what, id) in [("bos", bos), ("eos", Some(eos)), ("pad", Some(pad))] {
            if let Some(id) = id.filter(|&id| id >= size) {
                return Err(Error::Tokenizer(format!(
                    "{}: {what} token id {id} is outside the vocabulary ({size} tokens)",
                    dir.display()
                )));
            }
        }
        let end_think = tokenizer.token_to_id("</think>");
        let source = match std::fs::read_to_string(dir.join("chat_template.jinja")) {
            Ok(text) => Some(text),
            Err(_) => config.as_ref().and_then(|c| template_text(&c["chat_template"])),
        };
        let mut text = Self {
            tokenizer,
            bos,
            eos,
            pad,
            end_think,
            chat: None,
        };
        text.chat = text.template(source.as_deref())?;
        Ok(text)
    }

    /// The tokenizer stored in a GGUF file.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let built = gguf_tokenizer::from_gguf(file)?;
        let tokenizer: Tokenizer = built
            .json
            .to_string()
            .parse()
            .map_err(|e| Error::Tokenizer(format!("{}: cannot build its tokenizer: {e}", file.path.display())))?;
        let end_think = tokenizer.token_to_id("</think>");
        let mut text = Self {
            tokenizer,
            bos: built.bos,
            eos: built.eos,
            pad: built.pad.unwrap_or(built.eos),
            end_think,
            chat: None,
        };
        text.chat = text.template(built.chat_template.as_deref())?;
        Ok(text)
    }

    fn token_text(&self, id: Option<u32>) -> String {
        id.and_then(|id| self.tokenizer.id_to_token(id)).unwrap_or_default()
    }

    fn template(&self, source: Option<&str>) -> Result<Option<ChatTemplate>> {
        source
            .map(|s| ChatTemplate::new(s, &self.token_text(self.bos), &self.token_text(Some(self.eos))))
            .transpose()
    }

    /// Writes this tokenizer as a model directory's `tokenizer.json` and
    /// `tokenizer_config.json` (special tokens, chat template), which [`Self::load`] reads back.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let json = self
            .tokenizer
            .to_string(true)
            .map_err(|e| Error::Tokenizer(format!("cannot serialise: {e}")))?;
        write_atomic(&dir.join("tokenizer.json"), json.as_bytes())?;
        let mut config = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.token_text(Some(self.eos)),
            "pad_token": self.token_text(Some(self.pad)),
            "bos_token": self.bos.map(|b| self.token_text(Some(b))),
            "add_bos_token": self.encode_with_specials("a")?.first() != self.encode("a")?.first(),
            "clean_up_tokenization_spaces": false,
        });
        if let Some(chat) = &self.chat {
            config["chat_template"] = chat.source().into();
        }
        write_json(&dir.join("tokenizer_config.json"), &config)
    }

    /// The prompt text of a one-question conversation through the chat template, the
    /// assistant's turn opened; `None` for a model without a template.
    pub fn chat_prompt(&self, system: Option<&str>, user: &str) -> Result<Option<String>> {
        let Some(chat) = &self.chat else { return Ok(None) };
        let mut messages: Vec<Message> = system.map(|s| Message::new("system", s)).into_iter().collect();
        messages.push(Message::new("user", user));
        chat.render(&messages, true).map(Some)
    }

    /// Ids of `text` as `transformers`' `tokenizer(text)` gives them: with whatever special
    /// tokens the tokenizer's post-processor adds (a beginning-of-sequence token, for most).
    pub fn encode_with_specials(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Number of ids, added tokens included (the model's `vocab_size` may be larger: padded).
    pub fn size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Ids of `text`, without any special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))
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
    v.as_str()
        .or_else(|| v.get("content").and_then(Value::as_str))
        .map(str::to_string)
}

/// A `chat_template` field: the template, or from a list of `{"name", "template"}` the one
/// named `default`.
fn template_text(v: &Value) -> Option<String> {
    v.as_str().map(str::to_string).or_else(|| {
        let list = v.as_array()?;
        let default = list.iter().find(|t| t["name"] == "default")?;
        default["template"].as_str().map(str::to_string)
    })
}

/// `7` or `[7, 8]` (several stop tokens: the first is the end-of-sequence token).
fn first_id(v: &Value) -> Option<u32> {
    v.as_u64()
        .or_else(|| v.as_array().and_then(|a| a.first()).and_then(Value::as_u64))
        .map(|id| id as u32)
}
