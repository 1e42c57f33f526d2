//! The synthetic tasks' stream: words of a [`Vocab`] with its special tokens.

use super::{Forcing, Judgement, Protocol, Thinking};
use crate::data::{Problem, Task, Vocab};
use crate::error::Result;

/// A word-level [`Task`] read through its [`Vocab`].
pub struct WordProtocol<'a> {
    pub task: &'a dyn Task,
    pub vocab: &'a Vocab,
    suffix: [u32; 3],
}

impl<'a> WordProtocol<'a> {
    pub fn new(task: &'a dyn Task, vocab: &'a Vocab) -> Self {
        Self {
            task,
            vocab,
            suffix: suffix_ids(vocab),
        }
    }
}

/// The forced termination suffix `<timeup> </think> <answer>` as ids.
pub fn suffix_ids(vocab: &Vocab) -> [u32; 3] {
    let s = vocab.specials;
    [s.time_up, s.end_think, s.answer]
}

impl Protocol for WordProtocol<'_> {
    fn text(&self, ids: &[u32]) -> Result<String> {
        Ok(self.vocab.decode(ids).join(" "))
    }

    fn pad(&self) -> u32 {
        self.vocab.specials.pad
    }

    fn prompt(&self, problem: &Problem) -> Result<Vec<u32>> {
        self.vocab.encode_words(&self.task.prompt(problem))
    }

    fn thinking(&self, problem: &Problem, episode: &[u32]) -> Result<Thinking> {
        let sp = self.vocab.specials;
        Ok(match episode.last() {
            Some(&t) if t == sp.ep => {
                let words = self.vocab.decode(&episode[..episode.len() - 1]);
                let reply = match self.task.reply(problem, &words) {
                    Some(reply) => self.vocab.encode_words(&reply)?,
                    None => Vec::new(),
                };
                Thinking::EpisodeEnd {
                    carry: 0,
                    reply,
                    confirms: self.task.confirms_solution(problem, &words),
                }
            }
            Some(&t) if t == sp.answer => Thinking::AnswerOpens,
            _ => Thinking::Continue,
        })
    }

    fn confirms(&self, problem: &Problem, episode: &[u32]) -> Result<bool> {
        let words = self
            .vocab
            .decode(episode.strip_suffix(&[self.vocab.specials.ep]).unwrap_or(episode));
        Ok(self.task.confirms_solution(problem, &words))
    }

    fn answer_closed(&self, answer: &[u32], _forced: bool) -> Result<bool> {
        Ok(answer.last() == Some(&self.vocab.specials.end_answer))
    }

    fn judge(&self, problem: &Problem, answer: &[u32], _forced: bool) -> Result<Judgement> {
        let words = self
            .vocab
            .decode(answer.strip_suffix(&[self.vocab.specials.end_answer]).unwrap_or(answer));
        Ok(Judgement {
            reward: self.task.verify(problem, &words) as u8 as f32,
            well_formed: self.task.well_formed(&words),
            answer: words,
        })
    }

    fn answer_stops(&self) -> Vec<u32> {
        vec![self.vocab.specials.end_answer]
    }

    fn suffix(&self) -> &[u32] {
        &self.suffix
    }

    fn forcing(&self) -> Forcing {
        Forcing::Suppress(self.vocab.specials.end_think)
    }

    fn correct_answers(&self, problem: &Problem) -> Option<Result<Vec<Vec<u32>>>> {
        let end = self.vocab.specials.end_answer;
        let list = self.task.correct_answers(problem)?;
        Some(
            list.iter()
                .map(|a| {
                    let mut ids = self.vocab.encode_words(a)?;
                    ids.push(end);
                    Ok(ids)
                })
                .collect(),
        )
    }

    fn answer_starts(&self) -> Option<Vec<bool>> {
        Some(
            (0..self.vocab.size() as u32)
                .map(|i| self.task.starts_answer(self.vocab.word(i)))
                .collect(),
        )
    }
}
