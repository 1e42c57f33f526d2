//! The linear-memory operations (model/lowmem) against the materialised computations they
//! replace: values and gradients of blocked causal attention (GQA, odd lengths, block sizes
//! that do not divide T) and of chunked head log-probs and entropies, within 1e-5 relative.

mod common;

use burn::backend::{Autodiff, Flex};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::activation::{log_softmax, softmax};
use mrt::model::lowmem::{causal_attention, head_logprobs, set_blocked_always, tracked_ops, HeadOptions};
use mrt::model::{token_logprobs, Transformer, TransformerConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

type B = Flex;
type AD = Autodiff<Flex>;

/// Largest |a − b| over the largest |b|: a relative error that ignores the scale.
fn rel_err<const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
    let scale = b.clone().abs().max().into_scalar().max(1e-12);
    (a - b).abs().max().into_scalar() / scale
}

/// Normal(0, 1) values from a seeded host RNG (the backend's RNG is shared by the test
/// threads, so two draws from the same seed need not match when tests run side by side).
fn random<const D: usize>(shape: [usize; D], seed: u64) -> Tensor<B, D> {
    let mut rng = StdRng::seed_from_u64(seed);
    let values: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|_| rng.sample(StandardNormal))
        .collect();
    Tensor::from_data(TensorData::new(values, shape), &Default::default())
}

/// (output, dq, dk, dv) of `f` with a random linear read-out of the output as the loss.
fn attention_and_grads(
    f: impl Fn(Tensor<AD, 4>, Tensor<AD, 4>, Tensor<AD, 4>) -> Tensor<AD, 4>,
    [b, h, kvh, t, d]: [usize; 5],
) -> [Tensor<B, 4>; 4] {
    let q = Tensor::<AD, 4>::from_inner(random([b, h, t, d], 1)).require_grad();
    let k = Tensor::<AD, 4>::from_inner(random([b, kvh, t, d], 2) * 2.0).require_grad();
    let v = Tensor::<AD, 4>::from_inner(random([b, kvh, t, d], 3)).require_grad();
    let w = Tensor::<AD, 4>::from_inner(random([b, h, t, d], 4));
    let y = f(q.clone(), k.clone(), v.clone());
    let grads = (y.clone() * w).sum().backward();
    [
        y.inner(),
        q.grad(&grads).unwrap(),
        k.grad(&grads).unwrap(),
        v.grad(&grads).unwrap(),
    ]
}

#[test]
fn blocked_attention_matches_materialised_values_and_gradients() {
    // (B, H, KVH, T, D) with query-block sizes that do and do not divide T, one block, one row.
    for (shape, blocks) in [
        ([2, 4, 2, 37, 8], vec![5, 16, 37, 64]),
        ([1, 6, 1, 23, 4], vec![1, 7]),
        ([3, 2, 2, 9, 16], vec![2, 4]),
    ] {
        let reference = attention_and_grads(mrt::model::lowmem::materialised_attention, shape);
        for rows in blocks {
            let before = tracked_ops();
            let ours = attention_and_grads(|q, k, v| causal_attention(q, k, v, Some(rows)), shape);
            // Its own autodiff node ran (not a composition of Burn's differentiable operations).
            assert_eq!(tracked_ops(), before + 1);
            for (name, (a, b)) in ["output", "dq", "dk", "dv"]
                .iter()
                .zip(ours.into_iter().zip(reference.clone()))
            {
                let err = rel_err(a, b);
                assert!(err < 1e-5, "{shape:?}, {rows} rows per block: {name} off by {err:e}");
            }
        }
    }
}

#[test]
fn blocked_attention_without_autodiff_gives_the_same_values() {
    let (q, k, v) = (
        random([2, 4, 19, 8], 5),
        random([2, 2, 19, 8], 6),
        random([2, 2, 19, 8], 7),
    );
    let before = tracked_ops();
    let plain = causal_attention(q.clone(), k.clone(), v.clone(), Some(6));
    assert_eq!(tracked_ops(), before, "no autodiff node without autodiff");
    let tracked = causal_attention(
        Tensor::<AD, 4>::from_inner(q).require_grad(),
        Tensor::<AD, 4>::from_inner(k),
        Tensor::<AD, 4>::from_inner(v),
        Some(6),
    );
    assert_eq!(plain.to_data(), tracked.inner().to_data());
}

/// (log-probs, entropy, dh, dw) of log softmax(h W / τ)[y] read out with weights `g`: through
/// [`head_logprobs`] with `chunked`'s options, else from the full logits. dw is zeros for a
/// `frozen` head (no gradient asked for).
fn head_and_grads(
    chunked: Option<HeadOptions>,
    frozen: bool,
    [n, c, v]: [usize; 3],
    temperature: f64,
) -> [Tensor<B, 2>; 4] {
    let h = Tensor::<AD, 2>::from_inner(random([n, c], 11)).require_grad();
    let mut w = Tensor::<AD, 2>::from_inner(random([c, v], 12) * 0.5);
    if !frozen {
        w = w.require_grad();
    }
    let g = Tensor::<AD, 1>::from_inner(random([n], 13));
    let targets: Vec<i64> = (0..n as i64).map(|i| (i * 7 + 3) % v as i64).collect();
    let targets = Tensor::<AD, 1, Int>::from_data(TensorData::new(targets, [n]), &Default::default());
    let (lp, entropy) = match chunked {
        Some(options) => {
            let (lp, e) = head_logprobs(h.clone(), w.clone(), targets, temperature, true, options);
            (lp, e.unwrap())
        }
        None => {
            let logp = log_softmax(h.clone().matmul(w.clone()) / temperature, 1);
            let lp = logp.clone().gather(1, targets.reshape([n, 1])).reshape([n]);
            let entropy = -(logp.clone().exp() * logp).sum_dim(1).reshape([n]);
            (lp, entropy.detach())
        }
    };
    let grads = (lp.clone() * g).sum().backward();
    [
        lp.inner().reshape([1, n]),
        entropy.inner().reshape([1, n]),
        h.grad(&grads).unwrap(),
        w.grad(&grads)
            .unwrap_or_else(|| Tensor::zeros([c, v], &Default::default())),
    ]
}

#[test]
fn chunked_head_logprobs_match_the_full_logits() {
    // Every way the backward pass can work: recomputing the logits, from the kept softmax,
    // and a frozen head's input gradient computed in the forward pass.
    for (frozen, keep) in [(false, false), (false, true), (true, false), (true, true)] {
        for temperature in [1.0, 0.7] {
            let reference = head_and_grads(None, frozen, [30, 12, 50], temperature);
            for rows in [1, 7, 30, 64] {
                let before = tracked_ops();
                let options = HeadOptions {
                    block_rows: Some(rows),
                    keep_elements: if keep { usize::MAX } else { 0 },
                };
                let ours = head_and_grads(Some(options), frozen, [30, 12, 50], temperature);
                assert_eq!(tracked_ops(), before + 1);
                for (name, (a, b)) in ["log-probs", "entropy", "dh", "dw"]
                    .iter()
                    .zip(ours.into_iter().zip(reference.clone()))
                {
                    let err = rel_err(a, b);
                    assert!(
                        err < 1e-5,
                        "frozen {frozen}, keep {keep}, τ {temperature}, {rows} rows per chunk: \
                         {name} off by {err:e}"
                    );
                }
            }
        }
    }
}

fn model_config(tie: bool) -> TransformerConfig {
    TransformerConfig {
        vocab_size: 41,
        d_model: 32,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        d_ff: 48,
        max_seq_len: 64,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        tie_embeddings: tie,
        qkv_bias: false,
    }
}

/// The model's token log-probs (blocked attention, chunked head, masked rows skipped) equal
/// the materialised computation (full logits, log-softmax, gather) in value and in every
/// parameter's gradient, with tied and untied heads.
#[test]
fn token_logprobs_match_the_materialised_pass() {
    let dev = Default::default();
    // Rows this short would take Burn's materialised attention; the blocked one is under test
    // (process-wide, and no other test of this file counts the model's nodes).
    set_blocked_always(true);
    for tie in [false, true] {
        let model = Transformer::<AD>::new(&model_config(tie), 3, &dev).unwrap();
        let (b, t) = (3, 21);
        let tokens: Vec<i64> = (0..(b * t) as i64).map(|i| (i * 13 + 5) % 41).collect();
        let tokens = Tensor::<AD, 2, Int>::from_data(TensorData::new(tokens, [b, t]), &dev);
        // A prompt of 4 tokens per row and ragged ends: half the positions are masked.
        let mask: Vec<f32> = (0..b * (t - 1))
            .map(|i| {
                let (row, pos) = (i / (t - 1), i % (t - 1));
                f32::from((3..t - 1 - 3 * row).contains(&pos))
            })
            .collect();
        let mask = Tensor::<AD, 2>::from_data(TensorData::new(mask, [b, t - 1]), &dev);
        let before = tracked_ops();
        let ours = token_logprobs(&model, tokens.clone(), Some(mask.clone()), true, 0.8);
        // Two blocks' attention and the head, each its own node.
        assert_eq!(tracked_ops(), before + 3);
        let logits = model.forward(tokens.clone()).narrow(1, 0, t - 1) / 0.8;
        let logp = log_softmax(logits, 2);
        let targets = tokens.narrow(1, 1, t - 1).reshape([b, t - 1, 1]);
        let reference = logp.clone().gather(2, targets).reshape([b, t - 1]) * mask.clone();
        let probs = softmax(logp.clone().detach(), 2);
        let entropy = -(probs * logp.detach()).sum_dim(2).reshape([b, t - 1]) * mask.clone();
        assert!(rel_err(ours.logprobs.clone().inner(), reference.clone().inner()) < 1e-5);
        assert!(rel_err(ours.entropy.unwrap().inner(), entropy.inner()) < 1e-5);
        let ours_grads = GradientsParams::from_grads(ours.logprobs.sum().backward(), &model);
        let ref_grads = GradientsParams::from_grads(reference.sum().backward(), &model);
        let (ours_grads, ref_grads) = (
            common::param_grads(&model, &ours_grads),
            common::param_grads(&model, &ref_grads),
        );
        assert_eq!(ours_grads.len(), 2 + 9 * 2 + usize::from(!tie));
        for (i, (a, b)) in ours_grads.into_iter().zip(ref_grads).enumerate() {
            let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
            let err = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
            assert!(
                scale > 0.0 && err < 1e-5,
                "tied {tie}: parameter {i} gradient off by {err:e}"
            );
        }
    }
}
