//! Per-token log-probabilities and entropies of given sequences: the building block of every
//! loss (policy gradient, SFT, KL) and of the behaviour log-probs stored with a rollout.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;

use super::transformer::Transformer;

/// Log-probs of each next token and the policy's entropy at each position.
#[derive(Debug, Clone)]
pub struct TokenLogprobs<B: Backend> {
    /// `[B, T − 1]`: `logprobs[b, t] = log π(tokens[b, t + 1] | tokens[b, ..= t])`.
    pub logprobs: Tensor<B, 2>,
    /// `[B, T − 1]`: entropy of π(· | tokens[b, ..= t]), detached (a metric, not a loss term).
    pub entropy: Tensor<B, 2>,
}

/// Scores `tokens` under `model`. Gradients flow into `logprobs` when `B` is an autodiff backend.
///
/// # Shapes
/// - `tokens`: `[B, T]` right-padded, T ≥ 2
/// - `valid`: `[B, T]`, true for real tokens (`None` = no padding). Positions whose target is
///   padding get meaningless values; the caller's loss mask must exclude them.
pub fn token_logprobs<B: Backend>(
    model: &Transformer<B>,
    tokens: Tensor<B, 2, Int>,
    valid: Option<Tensor<B, 2, Bool>>,
) -> TokenLogprobs<B> {
    let [b, t] = tokens.dims();
    let logits = model.forward(tokens.clone(), valid).narrow(1, 0, t - 1);
    let logp = log_softmax(logits, 2);
    let targets = tokens.narrow(1, 1, t - 1).reshape([b, t - 1, 1]);
    let logprobs = logp.clone().gather(2, targets).reshape([b, t - 1]);
    let logp = logp.detach();
    let entropy = -(logp.clone().exp() * logp).sum_dim(2).reshape([b, t - 1]);
    TokenLogprobs { logprobs, entropy }
}
