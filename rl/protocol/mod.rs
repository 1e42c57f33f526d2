//! The token-level rules of a task's output stream, which the rollout engine and the
//! meta-prover follow: how a prompt is encoded, where an episode ends, what the environment
//! replies, how an answer opens, closes and is judged, what the forced-termination suffix is,
//! and what budget forcing does.
//!
//! - [`WordProtocol`]: the synthetic tasks, over a word-level vocabulary with special tokens
//!   (`<ep>` ends an episode, `<answer> … </answer>` holds the answer, the suffix is
//!   `<timeup> </think> <answer>`, budget forcing masks `</think>`).
//! - [`TextProtocol`]: free text through a pretrained model's tokenizer (an episode ends
//!   before a paragraph that begins with "Wait", "Alternatively", …; the answer is the last
//!   `\boxed{…}`; the suffix is the paper's "Time is up." sentence, `</think>` and the opening
//!   of a boxed answer; budget forcing replaces the end of thinking by "Wait").
//!
//! The engine never looks at token ids itself, so both kinds of task share it, the
//! objectives, the metrics and the evaluation.

mod text;
mod word;

pub use text::TextProtocol;
pub use word::{suffix_ids, WordProtocol};

use std::path::Path;

use crate::data::{Problem, Task, TaskConfig, TextTokenizer, Vocab};
use crate::error::{Error, Result};

/// Files of a Hugging Face model directory that define its tokenizer; a text run keeps copies
/// so that it reads the same tokens when resumed or evaluated.
pub const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
];

/// A run's tokenizer: the word vocabulary a synthetic task builds, or a pretrained model's.
#[derive(Debug, Clone)]
pub enum Tokens {
    Words(Vocab),
    Text(TextTokenizer),
}

impl Tokens {
    /// The rules of `task`'s stream in these tokens.
    pub fn protocol<'a>(&'a self, task: &'a dyn Task, config: &'a TaskConfig) -> Result<Box<dyn Protocol + 'a>> {
        match (self, config) {
            (Self::Words(vocab), c) if !c.is_text() => Ok(Box::new(WordProtocol::new(task, vocab))),
            (Self::Text(tokenizer), TaskConfig::Math(m)) => Ok(Box::new(TextProtocol::new(tokenizer, &m.format)?)),
            (_, c) => Err(Error::config(
                "task",
                c.name(),
                if c.is_text() {
                    "needs a pretrained model's tokenizer (--model DIR)"
                } else {
                    "is a synthetic task: it builds its own vocabulary (no --model)"
                },
            )),
        }
    }

    /// Writes the tokenizer into a run directory: `tokenizer.json` for words; for a text
    /// tokenizer, copies of the files in `source` (the model directory) that define it, or for
    /// a GGUF model the files that [`TextTokenizer::save`] writes.
    pub fn save(&self, dir: &Path, source: Option<&Path>) -> Result<()> {
        match self {
            Self::Words(vocab) => vocab.save(&dir.join("tokenizer.json")),
            Self::Text(text) if source.is_some_and(|s| !s.is_dir()) => text.save(dir),
            Self::Text(_) => {
                let source = source
                    .ok_or_else(|| Error::Tokenizer("a text tokenizer is saved from its model directory".into()))?;
                for name in TOKENIZER_FILES {
                    let from = source.join(name);
                    if from.is_file() {
                        let bytes = std::fs::read(&from).map_err(|e| Error::io(&from, e))?;
                        crate::fsutil::write_atomic(&dir.join(name), &bytes)?;
                    }
                }
                Ok(())
            }
        }
    }

    /// Reads what [`Self::save`] wrote.
    pub fn load(dir: &Path, text: bool) -> Result<Self> {
        if text {
            Ok(Self::Text(TextTokenizer::load(dir)?))
        } else {
            Ok(Self::Words(Vocab::load(&dir.join("tokenizer.json"))?))
        }
    }

    /// The word vocabulary, for what only synthetic tasks do (scripted warm-start traces).
    pub fn words(&self) -> Option<&Vocab> {
        match self {
            Self::Words(v) => Some(v),
            Self::Text(_) => None,
        }
    }
}

/// What the thinking token just read means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Thinking {
    /// Keep decoding.
    Continue,
    /// An episode ended. Its boundary lies `carry` tokens before the end of the stream: those
    /// tokens (a marker such as "Wait" that opens the next episode) belong to the next one.
    /// `reply` is the environment's answer, appended after the boundary and part of it;
    /// `confirms` says that it confirmed a solution.
    EpisodeEnd {
        carry: usize,
        reply: Vec<u32>,
        confirms: bool,
    },
    /// The policy stopped thinking and opened its answer.
    AnswerOpens,
    /// The policy ended its output while thinking (a model that does not think in tags):
    /// everything it wrote after the prompt is its answer.
    Finished,
}

/// The verdict on a complete answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Judgement {
    /// 1 when the answer is correct, else 0.
    pub reward: f32,
    /// The answer has the task's format, right or wrong.
    pub well_formed: bool,
    /// The answer as the task reads it (words, or one normalised string for free text).
    pub answer: Vec<String>,
}

/// What budget forcing does to a row that would stop thinking before its episode budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forcing {
    /// Mask this token's logit.
    Suppress(u32),
    /// When the policy samples one of `stops`, feed `instead` (forced tokens that open a new
    /// episode, "Wait") in its place.
    Replace { stops: Vec<u32>, instead: Vec<u32> },
}

/// The rules of one task's token stream. Object safe: a run picks its task at run time.
pub trait Protocol: Send + Sync {
    /// The id that fills ragged batches (never attended).
    fn pad(&self) -> u32;
    /// The prompt's ids, ending where the policy starts thinking.
    fn prompt(&self, problem: &Problem) -> Result<Vec<u32>>;
    /// Reads the thinking tokens just appended; `episode` holds the current episode's tokens
    /// so far, those included.
    fn thinking(&self, problem: &Problem, episode: &[u32]) -> Result<Thinking>;
    /// Whether a completed episode (its tokens as recorded, reply excluded) confirmed a
    /// solution: budget forcing never keeps such a row thinking.
    fn confirms(&self, problem: &Problem, episode: &[u32]) -> Result<bool>;
    /// Whether `answer` (the tokens since the answer opened, the last one just sampled) is
    /// complete. A `forced` answer follows the suffix.
    fn answer_closed(&self, answer: &[u32], forced: bool) -> Result<bool>;
    /// The verdict on a complete answer.
    fn judge(&self, problem: &Problem, answer: &[u32], forced: bool) -> Result<Judgement>;
    /// Ids that end an answer early when sampled (the meta-prover's decoding stops there).
    fn answer_stops(&self) -> Vec<u32>;
    /// The forced-termination suffix: after it, the policy's next tokens are its answer.
    fn suffix(&self) -> &[u32];
    /// What budget forcing does.
    fn forcing(&self) -> Forcing;
    /// `ids` as text, for people (samples, logs): words separated by spaces, or free text.
    fn text(&self, ids: &[u32]) -> Result<String>;
    /// Every correct forced answer of `problem` as ids, each ending with the token that
    /// closes it, when the task can list them (the exact meta-prover).
    fn correct_answers(&self, _problem: &Problem) -> Option<Result<Vec<Vec<u32>>>> {
        None
    }
    /// Per id, whether a well-formed answer can begin with it (the exact prover's
    /// well-formedness mass), when the task can tell.
    fn answer_starts(&self) -> Option<Vec<bool>> {
        None
    }
}
