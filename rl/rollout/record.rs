//! What a rollout is: its limits (`RolloutConfig`), the sampled stream with its episodes,
//! boundaries, outcome and J estimates (`Rollout`), and how it ended (`Finish`). The engine that
//! produces them is in `mod.rs`.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::data::Role;
use crate::model::SamplerConfig;

/// Limits and sampling of a rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutConfig {
    /// Episodes before the row is forced to answer.
    pub max_episodes: usize,
    /// Policy tokens (episodes and answer), and tokens budget forcing fed in their place,
    /// before the row is forced to answer.
    pub max_tokens: usize,
    /// Tokens of a forced answer (after the meta-prover's suffix) before it counts as
    /// unfinished; also the limit of the policy's own answer unless `free_answer` says otherwise.
    pub max_answer_tokens: usize,
    /// How long the policy's own answer (after the end of thinking) may run.
    #[serde(default, skip_serializing_if = "AnswerLimit::is_forced")]
    pub free_answer: AnswerLimit,
    pub sampler: SamplerConfig,
    /// Keep the row thinking until `max_episodes` episodes are done (the protocol's
    /// [`Forcing`](crate::rl::protocol::Forcing): `</think>` masked, or replaced by "Wait").
    #[serde(default)]
    pub budget_forcing: bool,
}

/// How many tokens the policy's own answer may take before it counts as unfinished.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnswerLimit {
    /// `max_answer_tokens`, as a forced answer (the synthetic tasks' one-word answers).
    #[default]
    Forced,
    /// What remains of `max_tokens`: free text may write a sentence or a worked line before
    /// its `\boxed{}` (the pretrained models' default).
    Budget,
}

impl AnswerLimit {
    pub fn is_forced(&self) -> bool {
        *self == AnswerLimit::Forced
    }
}

/// How a rollout ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Finish {
    /// The policy answered on its own.
    Answered,
    /// The policy was forced to answer (episode cap or token budget).
    Forced,
    /// The answer never closed within `max_answer_tokens`.
    Unfinished,
}

/// One sampled output stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rollout {
    /// Index of the problem in the slice the rollouts were made from.
    pub problem: usize,
    pub tokens: Vec<u32>,
    pub roles: Vec<Role>,
    /// Tokens that were given, not generated here: the prompt, plus the seed prefix of an MRT
    /// continuation. Only policy tokens at or after this index are trained.
    pub context_len: usize,
    /// Token ranges of the policy's completed episodes (delimiter included).
    pub episodes: Vec<Range<usize>>,
    /// Token counts at the meta-prover's evaluation points: `boundaries[0]` is the start,
    /// `boundaries[j]` is after episode j and its environment reply.
    pub boundaries: Vec<usize>,
    /// The answer as the task reads it (the words between `<answer>` and `</answer>`, or a
    /// free-text answer's normalised content), when the answer closed.
    pub answer: Option<Vec<String>>,
    /// Outcome reward: 1 if the answer verifies, else 0.
    pub reward: f32,
    pub finish: Finish,
    /// J estimates at `boundaries` (empty without a prover).
    pub j: Vec<f32>,
    /// Well-formedness of the forced answers at `boundaries` (empty without a prover).
    pub j_well_formed: Vec<f32>,
}

impl Rollout {
    /// Policy tokens in the whole rollout (an MRT continuation counts its prefix's too).
    pub fn policy_tokens(&self) -> usize {
        self.roles.iter().filter(|&&r| r == Role::Policy).count()
    }

    /// Policy tokens sampled here, after the context.
    pub fn policy_tokens_after_context(&self) -> usize {
        self.roles[self.context_len..]
            .iter()
            .filter(|&&r| r == Role::Policy)
            .count()
    }

    /// Trainable flags: policy tokens after the context.
    pub fn trainable(&self) -> Vec<bool> {
        self.roles
            .iter()
            .enumerate()
            .map(|(i, &r)| r == Role::Policy && i >= self.context_len)
            .collect()
    }

    /// The rollout cut at boundary `k` (after its first k episodes and their replies): a seed
    /// for continuations, with the J estimates it had up to there. Outcome fields are reset.
    pub fn prefix(&self, k: usize) -> Rollout {
        let end = self.boundaries[k];
        Rollout {
            problem: self.problem,
            tokens: self.tokens[..end].to_vec(),
            roles: self.roles[..end].to_vec(),
            context_len: self.context_len.min(end),
            episodes: self.episodes[..k].to_vec(),
            boundaries: self.boundaries[..=k].to_vec(),
            answer: None,
            reward: 0.0,
            finish: Finish::Unfinished,
            j: self.j.iter().copied().take(k + 1).collect(),
            j_well_formed: self.j_well_formed.iter().copied().take(k + 1).collect(),
        }
    }
}
