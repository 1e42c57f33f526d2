//! Free text through a pretrained model's tokenizer: the `math` task's stream.
//!
//! Episodes are found while decoding: after each token the current episode's text is checked
//! for a paragraph that starts a new episode
//! ([`EpisodeMarkers`](crate::data::math::EpisodeMarkers): a marker such as "Wait" at least
//! `min_paragraphs` paragraphs in, or `max_paragraphs` reached). A marker is known only
//! once the character after it has been decoded ("Wait" is not "Waiting"), so the episode
//! ends `carry` tokens back, before the marker; the engine rewinds a fork of the cache to
//! that boundary for the meta-prover.
//!
//! The policy's answer is read from what it writes after `</think>` (or from its whole output,
//! for a model that does not think in tags, such as SmolLM2), closed by the end-of-sequence
//! token: the last `\boxed{…}`, or by GSM8K's convention (`task.format.answer`). A forced
//! answer follows the suffix, which ends with `\boxed{`: it is complete when that brace closes.

use super::{Forcing, Judgement, Protocol, Thinking};
use crate::data::math::{equivalent, normalize};
use crate::data::math_task::TextFormat;
use crate::data::{Problem, TextTokenizer};
use crate::error::{Error, Result};

/// Fewest tokens looked at for a paragraph break (a blank line) before the whole episode is
/// decoded: a marker completes within a few tokens of the break that precedes it, so most
/// tokens cost one short decode, and single line breaks (frequent in worked equations) none
/// more. Longer markers widen the window (see [`TextProtocol::new`]).
const WINDOW: usize = 12;

/// The `math` task's stream through `tokenizer`.
pub struct TextProtocol<'a> {
    pub tokenizer: &'a TextTokenizer,
    pub config: &'a TextFormat,
    suffix: Vec<u32>,
    wait: Vec<u32>,
    /// Tokens after which a paragraph break can no longer open an unconfirmed episode.
    window: usize,
}

impl<'a> TextProtocol<'a> {
    pub fn new(tokenizer: &'a TextTokenizer, config: &'a TextFormat) -> Result<Self> {
        config.validate()?;
        // The break, the longest marker and the character that confirms it, with slack for
        // tokenizers that merge differently in context.
        let mut window = WINDOW;
        for marker in &config.episodes.markers {
            let text = format!("\n\n{marker}, ");
            window = window.max(tokenizer.encode(&text).map_or(text.len(), |t| t.len()) + 4);
        }
        Ok(Self {
            tokenizer,
            config,
            suffix: tokenizer.encode(&config.suffix)?,
            wait: tokenizer.encode(&config.wait)?,
            window,
        })
    }

    fn gold(problem: &Problem) -> Result<&str> {
        match problem {
            Problem::Math(p) => Ok(&p.answer),
            other => Err(Error::config(
                "task",
                format!("{other:?}"),
                "the text protocol reads `math` problems only",
            )),
        }
    }

    /// Where the next episode begins in `episode`'s tokens, when a boundary is confirmed: the
    /// number of tokens before it.
    fn boundary(&self, episode: &[u32]) -> Result<Option<usize>> {
        let tail = &episode[episode.len().saturating_sub(self.window)..];
        if !self.tokenizer.decode(tail)?.contains("\n\n") {
            return Ok(None);
        }
        let text = self.tokenizer.decode(episode)?;
        let Some(&start) = self.config.episodes.episode_starts(&text).first() else {
            return Ok(None);
        };
        // A marker must be followed by something that ends it before it counts.
        let rest = &text[start..];
        let marker = self
            .config
            .episodes
            .markers
            .iter()
            .filter(|m| rest.starts_with(m.as_str()))
            .map(|m| m.len())
            .max()
            .unwrap_or(0);
        if marker > 0 && rest.len() <= marker {
            return Ok(None);
        }
        // The last token count whose text ends at or before the new paragraph.
        let mut keep = episode.len();
        while keep > 0 && self.tokenizer.decode(&episode[..keep])?.len() > start {
            keep -= 1;
        }
        Ok(Some(keep))
    }

    /// Text of a forced answer up to the brace that closes the suffix's `\boxed{`.
    fn closed_forced(text: &str) -> Option<&str> {
        let mut depth = 0i32;
        for (i, c) in text.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => return Some(&text[..i]),
                '}' => depth -= 1,
                _ => {}
            }
        }
        None
    }
}

impl Protocol for TextProtocol<'_> {
    fn text(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids)
    }

    fn pad(&self) -> u32 {
        self.tokenizer.pad
    }

    fn prompt(&self, problem: &Problem) -> Result<Vec<u32>> {
        let Problem::Math(p) = problem else {
            return Err(Error::config(
                "task",
                format!("{problem:?}"),
                "the text protocol reads `math` problems only",
            ));
        };
        // A chat template writes every special token itself (as `apply_chat_template` does);
        // a plain prompt gets what the tokenizer adds to any text (its post-processor).
        let chat = if self.config.prompt.is_none() {
            self.tokenizer
                .chat_prompt(self.config.system.as_deref(), &self.config.user_turn(&p.question))?
        } else {
            None
        };
        match chat {
            Some(text) => self.tokenizer.encode(&text),
            None => self
                .tokenizer
                .encode_with_specials(&self.config.plain_prompt(&p.question)),
        }
    }

    fn thinking(&self, _problem: &Problem, episode: &[u32]) -> Result<Thinking> {
        let last = episode.last().copied();
        if last == Some(self.tokenizer.eos) {
            return Ok(Thinking::Finished);
        }
        if last.is_some() && last == self.tokenizer.end_think {
            return Ok(Thinking::AnswerOpens);
        }
        Ok(match self.boundary(episode)? {
            Some(keep) if keep > 0 => Thinking::EpisodeEnd {
                carry: episode.len() - keep,
                reply: Vec::new(),
                confirms: false,
            },
            _ => Thinking::Continue,
        })
    }

    fn confirms(&self, _problem: &Problem, _episode: &[u32]) -> Result<bool> {
        Ok(false)
    }

    fn answer_closed(&self, answer: &[u32], forced: bool) -> Result<bool> {
        if answer.last() == Some(&self.tokenizer.eos) {
            return Ok(true);
        }
        Ok(forced && Self::closed_forced(&self.tokenizer.decode(answer)?).is_some())
    }

    fn judge(&self, problem: &Problem, answer: &[u32], forced: bool) -> Result<Judgement> {
        let gold = Self::gold(problem)?;
        let ids = answer.strip_suffix(&[self.tokenizer.eos]).unwrap_or(answer);
        let text = self.tokenizer.decode(ids)?;
        let given = if forced {
            Self::closed_forced(&text).map(str::to_string)
        } else {
            self.config.answer.extract(&text)
        };
        Ok(match given {
            Some(a) if !a.trim().is_empty() => Judgement {
                reward: equivalent(&a, gold) as u8 as f32,
                well_formed: true,
                answer: vec![normalize(&a)],
            },
            _ => Judgement {
                reward: 0.0,
                well_formed: false,
                answer: Vec::new(),
            },
        })
    }

    fn answer_stops(&self) -> Vec<u32> {
        vec![self.tokenizer.eos]
    }

    fn suffix(&self) -> &[u32] {
        &self.suffix
    }

    fn forcing(&self) -> Forcing {
        let stops = self
            .tokenizer
            .end_think
            .into_iter()
            .chain([self.tokenizer.eos])
            .collect();
        Forcing::Replace {
            stops,
            instead: self.wait.clone(),
        }
    }
}
