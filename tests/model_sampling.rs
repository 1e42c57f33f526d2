//! Sampling: seeded reproducibility, greedy = argmax, top-k / top-p supports, frequencies, stops.

use burn::backend::Flex;
use burn::prelude::*;
use mrt::model::sampling::uniforms;
use mrt::model::{
    generate, last_logits, read_ids, sample, GenerateConfig, SamplerConfig, Transformer, TransformerConfig,
};
use rand::rngs::StdRng;
use rand::SeedableRng;

type B = Flex;

fn model() -> Transformer<B> {
    let cfg = TransformerConfig::preset("cpu-tiny").unwrap();
    Transformer::new(&cfg, 5, &Default::default()).unwrap()
}

fn run(model: &Transformer<B>, seed: u64, sampler: SamplerConfig, stop: Vec<u32>) -> Vec<Vec<u32>> {
    let dev = Default::default();
    let prompts = Tensor::<B, 2, Int>::from_data([[1i64, 2, 3], [4, 5, 0], [6, 0, 0]], &dev);
    let counts = [3, 2, 1];
    let mut cache = model.new_cache(3, 64);
    let logits = model.forward_cached(prompts, &mut cache, Some(&counts)).unwrap();
    let cfg = GenerateConfig {
        max_new_tokens: 24,
        sampler,
        stop_tokens: stop,
        check_every: 4,
    };
    generate(
        model,
        cache,
        last_logits(logits, &counts),
        &cfg,
        &mut StdRng::seed_from_u64(seed),
    )
    .unwrap()
}

#[test]
fn same_seed_same_samples_different_seed_different_samples() {
    let m = model();
    let a = run(&m, 1, SamplerConfig::default(), vec![]);
    let b = run(&m, 1, SamplerConfig::default(), vec![]);
    let c = run(&m, 2, SamplerConfig::default(), vec![]);
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert!(a.iter().all(|r| r.len() == 24));
}

#[test]
fn temperature_zero_is_argmax_of_the_full_forward() {
    let m = model();
    let dev = Default::default();
    let out = run(&m, 9, SamplerConfig::greedy(), vec![]);
    let prompts: [Vec<u32>; 3] = [vec![1, 2, 3], vec![4, 5], vec![6]];
    for (p, gen) in prompts.iter().zip(&out) {
        let mut seq = p.clone();
        for &t in gen {
            let ids: Vec<i64> = seq.iter().map(|&x| x as i64).collect();
            let n = ids.len();
            let logits = m.forward(Tensor::from_data(TensorData::new(ids, [1, n]), &dev));
            let best = read_ids(logits.narrow(1, n - 1, 1).reshape([1, 64]).argmax(1))[0];
            assert_eq!(t, best);
            seq.push(t);
        }
    }
}

fn random_logits(rows: usize, vocab: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..rows * vocab)
        .map(|_| 3.0 * (mrt::model::sampling::open_uniform(&mut rng) - 0.5))
        .collect()
}

#[test]
fn top_k_never_samples_outside_the_top_k() {
    let dev = Default::default();
    let (rows, vocab, k) = (16, 37, 5);
    let values = random_logits(rows, vocab, 3);
    let logits = Tensor::<B, 2>::from_data(TensorData::new(values.clone(), [rows, vocab]), &dev);
    let sampler = SamplerConfig {
        temperature: 1.5,
        top_k: k,
        top_p: 1.0,
    };
    let mut rng = StdRng::seed_from_u64(4);
    let u = uniforms::<B>(200, rows, &mut rng, &dev);
    let mut seen_ranks = vec![0usize; k];
    for s in 0..200 {
        let tok = read_ids(sample(
            logits.clone(),
            u.clone().narrow(0, s, 1).reshape([rows]),
            &sampler,
        ));
        for (r, &t) in tok.iter().enumerate() {
            let row = &values[r * vocab..(r + 1) * vocab];
            let rank = row.iter().filter(|&&x| x > row[t as usize]).count();
            assert!(rank < k, "row {r} sampled token of rank {rank}");
            seen_ranks[rank] += 1;
        }
    }
    assert!(
        seen_ranks.iter().all(|&c| c > 0),
        "every one of the top k is reachable: {seen_ranks:?}"
    );
}

/// Empirical frequencies over `n` draws from one row of logits.
fn frequencies(logits: &[f32], sampler: SamplerConfig, n: usize) -> Vec<f64> {
    let dev = Default::default();
    let v = logits.len();
    let batch = Tensor::<B, 2>::from_data(TensorData::new(logits.repeat(n), [n, v]), &dev);
    let u = uniforms::<B>(1, n, &mut StdRng::seed_from_u64(17), &dev).reshape([n]);
    let mut counts = vec![0.0; v];
    for t in read_ids(sample(batch, u, &sampler)) {
        counts[t as usize] += 1.0 / n as f64;
    }
    counts
}

#[test]
fn temperature_sampling_follows_the_softmax_and_top_p_cuts_the_tail() {
    let probs = [0.5f32, 0.3, 0.15, 0.05];
    let logits: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
    let n = 20_000;
    let f = frequencies(&logits, SamplerConfig::default(), n);
    for (p, q) in probs.iter().zip(&f) {
        // 4.5 standard errors of a binomial proportion.
        let se = (*p as f64 * (1.0 - *p as f64) / n as f64).sqrt();
        assert!((*p as f64 - q).abs() < 4.5 * se, "expected {p}, got {q}");
    }
    // Mass before token i: 0, 0.5, 0.8, 0.95 → top-p 0.7 keeps tokens 0 and 1, renormalised.
    let f = frequencies(
        &logits,
        SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.7,
        },
        n,
    );
    assert_eq!(f[2] + f[3], 0.0);
    assert!((f[0] - 0.625).abs() < 0.02, "{f:?}");
    // Temperature 0.5 squares the odds: p ∝ p².
    let f = frequencies(
        &logits,
        SamplerConfig {
            temperature: 0.5,
            top_k: 0,
            top_p: 1.0,
        },
        n,
    );
    let z: f64 = probs.iter().map(|p| (*p as f64).powi(2)).sum();
    assert!((f[0] - 0.25 / z).abs() < 0.02, "{f:?}");
}

#[test]
fn rows_stop_at_their_own_stop_token() {
    let m = model();
    let free = run(&m, 3, SamplerConfig::default(), vec![]);
    // Stop at the token row 0 sampled fourth: row 0 must end exactly there.
    let stop = free[0][3];
    let stopped = run(&m, 3, SamplerConfig::default(), vec![stop]);
    for (f, s) in free.iter().zip(&stopped) {
        let cut = f.iter().position(|&t| t == stop).map(|i| i + 1).unwrap_or(f.len());
        assert_eq!(s.as_slice(), &f[..cut]);
    }
    assert!(stopped[0].len() <= 4 && *stopped[0].last().unwrap() == stop);
}

#[test]
fn generate_reads_tokens_back_once_per_check_for_the_whole_batch() {
    let m = model();
    // No stop tokens: nothing to check, one read at the end for all 3 rows × 24 tokens.
    let before = mrt::model::token_reads();
    let free = run(&m, 1, SamplerConfig::default(), vec![]);
    assert_eq!(mrt::model::token_reads() - before, 1);
    // A stop token no row samples: a read every `check_every` = 4 steps, 24 / 4 in all.
    let never = (0..64u32)
        .find(|t| free.iter().all(|r| !r.contains(t)))
        .expect("some token unsampled");
    let before = mrt::model::token_reads();
    let out = run(&m, 1, SamplerConfig::default(), vec![never]);
    assert_eq!(out, free);
    assert_eq!(mrt::model::token_reads() - before, 6);
}
