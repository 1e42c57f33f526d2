//! A trace is a sequence of words, each tagged with who wrote it. The tag decides the loss mask:
//! only the policy's own words are trained; the prompt, the environment's replies and the forced
//! termination suffix are context the model reads but is never asked to produce.

use serde::{Deserialize, Serialize};

use super::vocab::Vocab;
use crate::error::Result;

/// Who wrote a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// The problem statement (up to and including `<think>`).
    Prompt,
    /// Sampled by (or, in warm-start data, attributed to) the policy: trained.
    Policy,
    /// Appended by an interactive environment after an episode.
    Env,
    /// The forced termination suffix (`<timeup> </think> <answer>`), or a budget-forcing token.
    Forced,
}

/// Words and their authors.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Trace {
    pub words: Vec<String>,
    pub roles: Vec<Role>,
}

/// Token ids and the per-token trainable flag.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokenized {
    pub ids: Vec<u32>,
    /// True where the token was written by the policy.
    pub trainable: Vec<bool>,
}

impl Tokenized {
    /// The tokens trained on as next-token targets: the policy's, after the first.
    pub fn targets(&self) -> usize {
        self.trainable.iter().skip(1).filter(|&&t| t).count()
    }
}

impl Trace {
    pub fn push<S: Into<String>>(&mut self, role: Role, words: impl IntoIterator<Item = S>) {
        for w in words {
            self.words.push(w.into());
            self.roles.push(role);
        }
    }

    pub fn len(&self) -> usize {
        self.words.len()
    }

    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    pub fn tokenize(&self, vocab: &Vocab) -> Result<Tokenized> {
        Ok(Tokenized {
            ids: vocab.encode_words(&self.words)?,
            trainable: self.roles.iter().map(|&r| r == Role::Policy).collect(),
        })
    }

    /// The words between the last `<answer>` and the `</answer>` after it, if both are there.
    pub fn answer(&self) -> Option<&[String]> {
        let start = self.words.iter().rposition(|w| w == "<answer>")? + 1;
        let end = start + self.words[start..].iter().position(|w| w == "</answer>")?;
        Some(&self.words[start..end])
    }

    /// The words as one line, for logs and test messages.
    pub fn text(&self) -> String {
        self.words.join(" ")
    }
}
