//! What one sampled token does to a row of a rollout batch: the per-row state machine of
//! thinking, episode boundaries (with the environment's reply), forced suffixes and answers.
//! rl/rollout/mod.rs feeds the chunks it returns and forks the boundaries to the prover.

use burn::prelude::*;

use super::{AnswerLimit, Engine, Finish, Phase, Row};
use crate::data::{Problem, Role};
use crate::error::Result;
use crate::rl::protocol::Thinking;

/// What one sampled token did to a row.
pub(super) struct Advance {
    /// Tokens to feed this step.
    pub(super) chunk: Vec<u32>,
    /// The row now has an episode boundary after this many tokens (for the prover).
    pub(super) boundary: Option<usize>,
    /// Forget the row's cached tokens after this many before feeding (a free-text row at its
    /// episode cap goes back to the boundary before its forced answer).
    pub(super) rewind: Option<usize>,
}

impl Advance {
    fn feed(chunk: Vec<u32>) -> Self {
        Self {
            chunk,
            boundary: None,
            rewind: None,
        }
    }
}

impl<B: Backend> Engine<'_, B> {
    /// Records a closed answer's verdict and ends the row.
    fn conclude(&self, row: &mut Row, problem: &Problem, answer: std::ops::Range<usize>, forced: bool) -> Result<()> {
        let verdict = self.protocol.judge(problem, &row.r.tokens[answer], forced)?;
        row.r.reward = verdict.reward;
        row.r.answer = Some(verdict.answer);
        row.r.finish = if forced { Finish::Forced } else { Finish::Answered };
        row.phase = Phase::Done;
        Ok(())
    }

    /// Applies one sampled token to a row: what to feed, and whether the row now sits at an
    /// episode boundary. `replace`: budget forcing feeds the second list instead of any token
    /// of the first.
    pub(super) fn advance_row(
        &self,
        row: &mut Row,
        token: u32,
        problem: &Problem,
        replace: Option<(&[u32], &[u32])>,
    ) -> Result<Advance> {
        match row.phase {
            Phase::Done => Ok(Advance::feed(Vec::new())),
            Phase::NeedsSuffix => {
                let suffix = self.protocol.suffix();
                let r = &mut row.r;
                r.tokens.extend_from_slice(suffix);
                r.roles.extend(std::iter::repeat_n(Role::Forced, suffix.len()));
                row.phase = Phase::Answering {
                    forced: true,
                    start: r.tokens.len(),
                };
                Ok(Advance::feed(suffix.to_vec()))
            }
            Phase::Answering { forced, start } => {
                row.r.tokens.push(token);
                row.r.roles.push(Role::Policy);
                let end = row.r.tokens.len();
                if self.protocol.answer_closed(&row.r.tokens[start..], forced)? {
                    self.conclude(row, problem, start..end, forced)?;
                    return Ok(Advance::feed(Vec::new()));
                }
                let spent = match (forced, self.config.free_answer) {
                    (false, AnswerLimit::Budget) => row.r.policy_tokens() + row.forced >= self.config.max_tokens,
                    _ => end - start >= self.config.max_answer_tokens,
                };
                if spent {
                    row.r.finish = Finish::Unfinished;
                    row.phase = Phase::Done;
                    return Ok(Advance::feed(Vec::new()));
                }
                Ok(Advance::feed(vec![token]))
            }
            Phase::Thinking => {
                let mut chunk = match replace.filter(|(stops, _)| !row.solved && stops.contains(&token)) {
                    // Budget forcing: the policy would stop thinking; it is told to go on.
                    Some((_, instead)) => {
                        row.r.tokens.extend_from_slice(instead);
                        row.r.roles.extend(std::iter::repeat_n(Role::Forced, instead.len()));
                        row.forced += instead.len();
                        instead.to_vec()
                    }
                    None => {
                        row.r.tokens.push(token);
                        row.r.roles.push(Role::Policy);
                        vec![token]
                    }
                };
                let mut step = Advance {
                    chunk: Vec::new(),
                    boundary: None,
                    rewind: None,
                };
                match self.protocol.thinking(problem, &row.r.tokens[row.episode_start..])? {
                    Thinking::Continue => {}
                    Thinking::AnswerOpens => {
                        row.phase = Phase::Answering {
                            forced: false,
                            start: row.r.tokens.len(),
                        }
                    }
                    Thinking::Finished => {
                        let (start, end) = (row.r.boundaries[0], row.r.tokens.len());
                        self.conclude(row, problem, start..end, false)?;
                        return Ok(Advance::feed(Vec::new()));
                    }
                    Thinking::EpisodeEnd { carry, reply, confirms } => {
                        let r = &mut row.r;
                        let end = r.tokens.len() - carry;
                        r.episodes.push(row.episode_start..end);
                        row.solved |= confirms;
                        if carry == 0 {
                            r.tokens.extend_from_slice(&reply);
                            r.roles.extend(std::iter::repeat_n(Role::Env, reply.len()));
                            chunk.extend(reply);
                        }
                        let b = if carry == 0 { r.tokens.len() } else { end };
                        row.episode_start = b;
                        r.boundaries.push(b);
                        step.boundary = Some(b);
                        if r.episodes.len() >= self.config.max_episodes {
                            row.phase = Phase::NeedsSuffix;
                            if carry > 0 {
                                // The next episode has begun: forget it, answer from the boundary.
                                let fed = r.tokens.len() - chunk.len();
                                r.tokens.truncate(end);
                                r.roles.truncate(end);
                                chunk.clear();
                                if fed > end {
                                    step.rewind = Some(end);
                                }
                            }
                        }
                    }
                }
                if row.phase == Phase::Thinking && row.r.policy_tokens() + row.forced >= self.config.max_tokens {
                    row.phase = Phase::NeedsSuffix;
                }
                step.chunk = chunk;
                Ok(step)
            }
        }
    }
}
