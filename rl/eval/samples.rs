//! What the model wrote, as text: `samples.jsonl`, one completion per line with its prompt,
//! its episodes, the meta-prover's J at each boundary, how it ended and its reward. Numbers
//! say whether a model improves; the samples say why (a model that never closes its
//! `\boxed{}`, one that writes no episodes). Evaluation writes every completion it scores;
//! training appends the first few of each step (`rl.samples_per_step`), as TRL and verl log
//! completion tables.

use std::io::Write;
use std::path::Path;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::rl::protocol::Protocol;
use crate::rl::rollout::Rollout;

/// One completion.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// The training step it was sampled at (absent in an evaluation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<usize>,
    /// Index of its problem among those of the step or evaluation.
    pub problem: usize,
    pub prompt: String,
    /// Everything after the prompt: the policy's tokens and any forced or environment text.
    pub text: String,
    /// Each completed episode's text.
    pub episodes: Vec<String>,
    /// The meta-prover's J at each boundary (before the first episode, after each), where
    /// it was estimated.
    pub j: Vec<Option<f32>>,
    pub finish: String,
    /// The answer as read, when it closed.
    pub answer: Option<String>,
    pub reward: f32,
    /// Tokens the policy sampled.
    pub policy_tokens: usize,
}

/// `rollouts` as text through `protocol`.
pub fn samples(protocol: &dyn Protocol, rollouts: &[Rollout], step: Option<usize>) -> Result<Vec<Sample>> {
    rollouts
        .iter()
        .map(|r| {
            let episodes = r
                .episodes
                .iter()
                .map(|e| protocol.text(&r.tokens[e.clone()]))
                .collect::<Result<_>>()?;
            Ok(Sample {
                step,
                problem: r.problem,
                prompt: protocol.text(&r.tokens[..r.context_len])?,
                text: protocol.text(&r.tokens[r.context_len..])?,
                episodes,
                j: r.j.iter().map(|&j| (!j.is_nan()).then_some(j)).collect(),
                finish: format!("{:?}", r.finish),
                answer: r.answer.as_ref().map(|a| a.join(" ")),
                reward: r.reward,
                policy_tokens: r.policy_tokens(),
            })
        })
        .collect()
}

/// Appends `samples` to the JSONL file `path` (created when absent), one line each.
pub fn append(path: &Path, samples: &[Sample]) -> Result<()> {
    let mut text = String::new();
    for s in samples {
        text.push_str(&serde_json::to_string(s).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?);
        text.push('\n');
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    file.write_all(text.as_bytes()).map_err(|e| Error::io(path, e))
}
