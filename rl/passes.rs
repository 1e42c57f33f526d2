//! One optimizer step's gradients, computed in passes of at most `micro_batch` rows so that
//! long rows fit in memory. The loss is a sum over tokens whose coefficients already carry the
//! whole batch's normalisation (`batch.rs`), so the passes' gradients add up to the one-pass
//! gradient exactly (up to float summation order); the token-mean diagnostics are weighted by
//! each pass's share of the trained tokens.

use std::ops::Range;

use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use super::batch::RolloutBatch;
use super::loss::{policy_loss, sft_loss, PgBatch};
use crate::model::lowmem::{hidden_gradients, Checkpointing};
use crate::model::{logprobs_of_hidden, token_logprobs, Transformer};

/// Row ranges of the training passes: `micro_batch` rows each (0: one pass over all).
pub fn row_chunks(rows: usize, micro_batch: usize) -> Vec<Range<usize>> {
    if micro_batch == 0 || micro_batch >= rows {
        return vec![0..rows];
    }
    (0..rows)
        .step_by(micro_batch)
        .map(|s| s..(s + micro_batch).min(rows))
        .collect()
}

/// How the loss of a batch is formed.
#[derive(Debug, Clone, Copy)]
pub struct LossSpec {
    /// STaR: supervised on the batch's trained tokens (token mean), instead of the policy loss.
    pub supervised: bool,
    pub temperature: f64,
    pub clip_eps: f64,
    pub kl_beta: f64,
    /// Compute the policy's entropy (the first PPO epoch logs it).
    pub entropy: bool,
    /// Recompute each block in the backward pass instead of keeping its activations.
    pub checkpointing: Checkpointing,
}

/// The summed loss and token-mean diagnostics of one gradient computation.
#[derive(Debug, Clone, Copy, Default)]
pub struct PassStats {
    pub loss: f64,
    pub entropy: f64,
    pub approx_kl: f64,
    pub clip_frac: f64,
    pub ref_kl: f64,
}

/// Log-probs of a frozen model (the behaviour policy for PPO epochs past the first, or the KL
/// reference) over the batch, pass by pass.
pub fn frozen_logprobs<B: AutodiffBackend>(
    m: &Transformer<B::InnerBackend>,
    batch: &RolloutBatch<B>,
    chunks: &[Range<usize>],
    temperature: f64,
) -> Tensor<B, 2> {
    let parts: Vec<Tensor<B::InnerBackend, 2>> = chunks
        .iter()
        .map(|rows| {
            token_logprobs(
                m,
                rows_of_int(&batch.tokens, rows).inner(),
                Some(rows_of(&batch.mask, rows).inner()),
                false,
                temperature,
            )
            .logprobs
        })
        .collect();
    Tensor::<B, 2>::from_inner(Tensor::cat(parts, 0))
}

fn rows_of<B: Backend>(x: &Tensor<B, 2>, rows: &Range<usize>) -> Tensor<B, 2> {
    if *rows == (0..x.dims()[0]) {
        x.clone()
    } else {
        x.clone().slice([rows.clone(), 0..x.dims()[1]])
    }
}

fn rows_of_int<B: Backend>(x: &Tensor<B, 2, Int>, rows: &Range<usize>) -> Tensor<B, 2, Int> {
    if *rows == (0..x.dims()[0]) {
        x.clone()
    } else {
        x.clone().slice([rows.clone(), 0..x.dims()[1]])
    }
}

/// Gradients of the batch's loss under `model`, accumulated over the passes `chunks`.
/// `old_logp` is the behaviour policy's log-probs (ratio 1 when absent), `ref_logp` the KL
/// reference's (used when `spec.kl_beta > 0`).
pub fn batch_gradients<B: AutodiffBackend>(
    model: &Transformer<B>,
    batch: &RolloutBatch<B>,
    chunks: &[Range<usize>],
    old_logp: Option<&Tensor<B, 2>>,
    ref_logp: Option<&Tensor<B, 2>>,
    spec: LossSpec,
) -> (GradientsParams, PassStats) {
    // One pass over the whole step's rows (not a peer's share of them).
    let single = chunks.len() == 1 && !batch.sharded;
    let trained = batch.trained_tokens as f32;
    let mut grads = GradientsAccumulator::<Transformer<B>>::new();
    let mut st = PassStats::default();
    for rows in chunks {
        let mask = rows_of(&batch.mask, rows);
        // This pass's share of the trained tokens (1 with a single pass).
        let share = if single {
            1.0
        } else {
            mask.clone().sum().into_scalar().elem::<f64>() / batch.trained_tokens as f64
        };
        let tokens = rows_of_int(&batch.tokens, rows);
        let checkpoint = spec.checkpointing.applies(tokens.dims()[1]);
        let pass = hidden_gradients(model, tokens.clone(), checkpoint, |hidden| {
            let lp = logprobs_of_hidden(
                model,
                hidden,
                tokens,
                Some(mask.clone()),
                spec.entropy,
                spec.temperature,
            );
            if let Some(e) = &lp.entropy {
                st.entropy += ((e.clone() * mask.clone()).sum() / trained).into_scalar().elem::<f64>();
            }
            let loss = if spec.supervised {
                // A mean over the whole batch's trained tokens, summed over the passes.
                if single {
                    sft_loss(lp.logprobs, &mask)
                } else {
                    -(lp.logprobs * mask.clone()).sum() / trained
                }
            } else {
                let old = old_logp
                    .map(|o| rows_of(o, rows))
                    .unwrap_or_else(|| lp.logprobs.clone().detach());
                let out = policy_loss(
                    PgBatch {
                        logp: lp.logprobs,
                        old_logp: old,
                        ref_logp: ref_logp.map(|q| rows_of(q, rows)),
                        coef: rows_of(&batch.coef, rows),
                        mask,
                    },
                    spec.clip_eps,
                    spec.kl_beta,
                );
                st.approx_kl += share * out.approx_kl.into_scalar().elem::<f64>();
                st.clip_frac += share * out.clip_fraction.into_scalar().elem::<f64>();
                st.ref_kl += share * out.ref_kl.into_scalar().elem::<f64>();
                out.loss
            };
            st.loss += loss.clone().into_scalar().elem::<f64>();
            loss
        });
        grads.accumulate(model, pass);
    }
    (grads.grads(), st)
}
