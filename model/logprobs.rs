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
    /// `[B, T − 1]`: entropy of π(· | tokens[b, ..= t]), detached (a metric, not a loss term);
    /// computed only when asked for, since it costs a `[B, T, V]` pass.
    pub entropy: Option<Tensor<B, 2>>,
}

/// Scores `tokens` under `model` at sampling temperature `temperature` (log-probs of
/// softmax(logits / T), the distribution the tokens were sampled from; T = 1 for supervised
/// data). Gradients flow into `logprobs` when `B` is an autodiff backend.
///
/// # Shapes
/// - `tokens`: `[B, T]` right-padded, T ≥ 2
/// - `mask`: `[B, T − 1]`, 1 where the target token `tokens[b, t + 1]` counts (the policy's own
///   tokens), 0 elsewhere (prompt, environment replies, forced suffixes, padding); masked
///   log-probs and entropies are returned as 0. `None` keeps every position.
pub fn token_logprobs<B: Backend>(
    model: &Transformer<B>,
    tokens: Tensor<B, 2, Int>,
    mask: Option<Tensor<B, 2>>,
    with_entropy: bool,
    temperature: f64,
) -> TokenLogprobs<B> {
    assert!(
        temperature > 0.0,
        "log-probs need a positive temperature, got {temperature}"
    );
    let [b, t] = tokens.dims();
    let mut logits = model.forward(tokens.clone()).narrow(1, 0, t - 1);
    if temperature != 1.0 {
        logits = logits / temperature;
    }
    let logp = log_softmax(logits, 2);
    let targets = tokens.narrow(1, 1, t - 1).reshape([b, t - 1, 1]);
    let mut logprobs = logp.clone().gather(2, targets).reshape([b, t - 1]);
    let mut entropy = with_entropy.then(|| {
        let logp = logp.detach();
        -(logp.clone().exp() * logp).sum_dim(2).reshape([b, t - 1])
    });
    if let Some(mask) = mask {
        logprobs = logprobs * mask.clone();
        entropy = entropy.map(|e| e * mask);
    }
    TokenLogprobs { logprobs, entropy }
}
