//! Per-token log-probabilities and entropies of given sequences: the building block of every
//! loss (policy gradient, SFT, KL) and of the behaviour log-probs stored with a rollout.

use burn::prelude::*;
use burn::tensor::IndexingUpdateOp::Add;

use super::lowmem::{head_logprobs, HeadOptions};
use super::transformer::Transformer;

/// Log-probs of each next token and the policy's entropy at each position.
///
/// Computed through [`head_logprobs`] in chunks of rows, so that neither the forward nor the
/// backward pass holds the `[B, T, V]` logits beyond a constant (1 GiB).
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
    let hidden = model.forward_hidden(tokens.clone());
    logprobs_of_hidden(model, hidden, tokens, mask, with_entropy, temperature)
}

/// [`token_logprobs`] from the final hidden states `[B, T, C]` of `tokens` (the output of
/// [`Transformer::forward_hidden`]), for callers that run the layers themselves.
pub fn logprobs_of_hidden<B: Backend>(
    model: &Transformer<B>,
    hidden: Tensor<B, 3>,
    tokens: Tensor<B, 2, Int>,
    mask: Option<Tensor<B, 2>>,
    with_entropy: bool,
    temperature: f64,
) -> TokenLogprobs<B> {
    let [b, t] = tokens.dims();
    let c = model.config.d_model;
    let n = b * (t - 1);
    let hidden = hidden.narrow(1, 0, t - 1).reshape([n, c]);
    let targets = tokens.narrow(1, 1, t - 1).reshape([n]);
    // Only the rows the mask keeps go through the output head (prompts and padding are often
    // half of a batch's positions); the others are 0.
    let kept = mask
        .as_ref()
        .map(kept_rows)
        .filter(|rows| !rows.is_empty() && rows.len() < n);
    let weight = model.head_weight();
    let (logprobs, entropy) = match kept {
        None => head_logprobs(
            hidden,
            weight,
            targets,
            temperature,
            with_entropy,
            HeadOptions::default(),
        ),
        Some(rows) => {
            let device = hidden.device();
            let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(rows.clone(), [rows.len()]), &device);
            let (lp, entropy) = head_logprobs(
                hidden.select(0, idx.clone()),
                weight,
                targets.select(0, idx.clone()),
                temperature,
                with_entropy,
                HeadOptions::default(),
            );
            let spread = |x: Tensor<B, 1>| Tensor::zeros([n], &device).select_assign(0, idx.clone(), x, Add);
            (spread(lp), entropy.map(spread))
        }
    };
    let mut logprobs = logprobs.reshape([b, t - 1]);
    let mut entropy = entropy.map(|e| e.reshape([b, t - 1]));
    if let Some(mask) = mask {
        logprobs = logprobs * mask.clone();
        entropy = entropy.map(|e| e * mask);
    }
    TokenLogprobs { logprobs, entropy }
}

/// Flat indices (row-major over `[B, T − 1]`) of the positions `mask` keeps.
fn kept_rows<B: Backend>(mask: &Tensor<B, 2>) -> Vec<i64> {
    let values = mask.to_data().convert::<f32>();
    let values = values.as_slice::<f32>().expect("converted to f32");
    (0..values.len() as i64)
        .filter(|&i| values[i as usize] != 0.0)
        .collect()
}
