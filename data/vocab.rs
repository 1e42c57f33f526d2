//! The word-level tokenizer: a `tokenizers` `Tokenizer` (WordLevel model, whitespace split)
//! with the project's named special tokens, saved as `tokenizer.json` in the format any
//! pretrained model's tokenizer uses, plus cached ids for the hot loops.
//!
//! Unknown words are an error, never a silent `<unk>`: every sequence in this project is built
//! from a task's own vocabulary, so an unknown word means a bug or a foreign tokenizer.

use std::collections::HashMap;
use std::path::Path;

use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Error, Result};

/// Spellings of the special tokens, in id order (ids 0…9).
pub const SPECIAL_TOKENS: [&str; 10] = [
    "<pad>",
    "<bos>",
    "<eos>",
    "<unk>",
    "<think>",
    "</think>",
    "<ep>",
    "<timeup>",
    "<answer>",
    "</answer>",
];

/// Ids of the special tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Specials {
    pub pad: u32,
    pub bos: u32,
    pub eos: u32,
    pub unk: u32,
    /// Opens the thinking stream (last prompt token).
    pub think: u32,
    /// Ends thinking; budget forcing replaces it by a new episode.
    pub end_think: u32,
    /// Episode delimiter: ends one attempt.
    pub ep: u32,
    /// Forced termination marker ("time is up") that starts the meta-prover's suffix.
    pub time_up: u32,
    pub answer: u32,
    pub end_answer: u32,
}

/// A loaded tokenizer with fast word ↔ id maps.
#[derive(Clone)]
pub struct Vocab {
    tokenizer: Tokenizer,
    ids: HashMap<String, u32>,
    words: Vec<String>,
    pub specials: Specials,
}

impl std::fmt::Debug for Vocab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Vocab({} tokens)", self.words.len())
    }
}

impl Vocab {
    /// Special tokens first, then `words` in order (duplicates and specials skipped).
    pub fn build(words: &[String]) -> Result<Self> {
        let mut vocab = ahash::AHashMap::new();
        for w in SPECIAL_TOKENS
            .iter()
            .map(|s| s.to_string())
            .chain(words.iter().cloned())
        {
            if w.is_empty() || w.chars().any(char::is_whitespace) {
                return Err(Error::Tokenizer(format!("word `{w}` is empty or contains whitespace")));
            }
            let next = vocab.len() as u32;
            vocab.entry(w).or_insert(next);
        }
        let model = WordLevel::builder()
            .vocab(vocab)
            .unk_token("<unk>".into())
            .build()
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut tokenizer = Tokenizer::new(model);
        tokenizer.with_pre_tokenizer(Some(WhitespaceSplit));
        let specials: Vec<AddedToken> = SPECIAL_TOKENS.iter().map(|s| AddedToken::from(*s, true)).collect();
        tokenizer.add_special_tokens(&specials);
        Self::from_tokenizer(tokenizer)
    }

    /// Reads `tokenizer.json`; every special token must be present.
    pub fn load(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::Tokenizer(format!("{}: file not found", path.display())));
        }
        let tokenizer = Tokenizer::from_file(path).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Self::from_tokenizer(tokenizer).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
    }

    /// Writes `tokenizer.json` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = self
            .tokenizer
            .to_string(true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        crate::fsutil::write_atomic(path, json.as_bytes())
    }

    fn from_tokenizer(tokenizer: Tokenizer) -> Result<Self> {
        let ids: HashMap<String, u32> = tokenizer.get_vocab(true).into_iter().collect();
        let size = ids.values().map(|&i| i as usize + 1).max().unwrap_or(0);
        let mut words = vec![String::new(); size];
        for (w, &i) in &ids {
            words[i as usize] = w.clone();
        }
        if let Some(hole) = words.iter().position(String::is_empty) {
            return Err(Error::Tokenizer(format!("vocabulary has no token with id {hole}")));
        }
        let get = |s: &str| {
            ids.get(s)
                .copied()
                .ok_or_else(|| Error::Tokenizer(format!("missing special token `{s}`")))
        };
        let specials = Specials {
            pad: get("<pad>")?,
            bos: get("<bos>")?,
            eos: get("<eos>")?,
            unk: get("<unk>")?,
            think: get("<think>")?,
            end_think: get("</think>")?,
            ep: get("<ep>")?,
            time_up: get("<timeup>")?,
            answer: get("<answer>")?,
            end_answer: get("</answer>")?,
        };
        Ok(Self {
            tokenizer,
            ids,
            words,
            specials,
        })
    }

    /// Number of ids (the model's `vocab_size` must be at least this).
    pub fn size(&self) -> usize {
        self.words.len()
    }

    pub fn id(&self, word: &str) -> Option<u32> {
        self.ids.get(word).copied()
    }

    pub fn word(&self, id: u32) -> &str {
        self.words.get(id as usize).map(String::as_str).unwrap_or("<unk>")
    }

    /// Ids of known words; an unknown word is an error naming it.
    pub fn encode_words<S: AsRef<str>>(&self, words: &[S]) -> Result<Vec<u32>> {
        words
            .iter()
            .map(|w| {
                let w = w.as_ref();
                self.id(w)
                    .ok_or_else(|| Error::Tokenizer(format!("word `{w}` is not in the vocabulary")))
            })
            .collect()
    }

    /// Encodes whitespace-separated text through the `tokenizers` pipeline.
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        for (pos, _) in enc
            .get_ids()
            .iter()
            .enumerate()
            .filter(|(_, &i)| i == self.specials.unk)
        {
            let (start, end) = enc.get_offsets()[pos];
            let word = text.get(start..end).unwrap_or("?");
            if word != "<unk>" {
                return Err(Error::Tokenizer(format!("word `{word}` is not in the vocabulary")));
            }
        }
        Ok(enc.get_ids().to_vec())
    }

    /// Words of ids (specials included), for display and verification.
    pub fn decode(&self, ids: &[u32]) -> Vec<String> {
        ids.iter().map(|&i| self.word(i).to_string()).collect()
    }

    /// Space-joined text of ids through the `tokenizers` pipeline.
    pub fn decode_text(&self, ids: &[u32]) -> String {
        self.tokenizer
            .decode(ids, false)
            .unwrap_or_else(|_| self.decode(ids).join(" "))
    }
}
