//! The GPU path against the CPU backend: the same weights on flex and on wgpu give the same
//! logits (full forward on a ragged batch, cached decoding), the same log-prob gradients,
//! valid seeded samples, finite warm-start and RL losses, and checkpoints that move between
//! the two. Runs on any wgpu adapter, including Mesa's lavapipe (Vulkan on the CPU), which is
//! how CI runs it; shader compilation dominates there, so shapes stay small.
//!
//! Without an adapter the tests skip with a printed reason, unless `MRT_REQUIRE_WGPU` is set
//! (CI sets it), in which case they fail.
//!
//! Tolerances: f32 has a 2^-24 ≈ 6e-8 relative rounding step; a GPU sums in another order than
//! flex (tiled matmuls, tree reductions), so each dot product over C ≤ 256 terms and each
//! reduction over B·T ≈ 500 positions may differ by ~1e-6 relative, compounding over a few
//! layers. Logits (|x| ≲ 20) are held to 1e-4 absolute, gradients to 1e-3 of each tensor's
//! largest entry: measured agreement is 10–100× tighter (see the assertions' messages), and the
//! fusion bug this file guards against was off by 0.45–0.65 of the largest entry.

#![cfg(feature = "wgpu")]

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use burn::backend::wgpu::{Wgpu, WgpuDevice};
use burn::backend::{Autodiff, Flex};
use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use common::gpu::gpu;
use mrt::model::checkpoint::{self, decode_record, encode_record};
use mrt::model::{
    generate, last_logits, token_logprobs, GenerateConfig, SamplerConfig, Transformer, TransformerConfig,
};
use mrt::rl::config::{Algo, RunConfig};
use mrt::rl::metrics::read_metrics;
use mrt::rl::pipeline::{run_pipeline, PipelineOptions};
use rand::rngs::StdRng;
use rand::SeedableRng;

type Cpu = Flex;
type Gpu = Wgpu;

/// The same weights on another backend, through the checkpoint record format.
fn moved<A: Backend, C: Backend>(model: &Transformer<A>, device: &C::Device) -> Transformer<C> {
    let bytes = encode_record::<A, _>(model.clone().into_record()).unwrap();
    let record = decode_record::<C, _>(&PathBuf::from("<memory>"), &bytes, device).unwrap();
    Transformer::<C>::new(&model.config, 0, device)
        .unwrap()
        .load_record(record)
}

/// A briefly trained `search` policy (attention far from uniform, so key gradients matter).
fn trained() -> &'static Transformer<Cpu> {
    static MODEL: OnceLock<Transformer<Cpu>> = OnceLock::new();
    MODEL.get_or_init(|| common::warm_started("search", 200, 1, 7, "wgpu").model)
}

/// A random model with grouped-query attention (2 key/value heads for 4 query heads) and a tied
/// output head: the paths `trained()` does not take.
fn gqa_tied() -> Transformer<Cpu> {
    let cfg = TransformerConfig {
        vocab_size: 37,
        d_model: 32,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        d_ff: 48,
        max_seq_len: 64,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        tie_embeddings: true,
        qkv_bias: false,
    };
    Transformer::new(&cfg, 3, &Default::default()).unwrap()
}

/// Ragged rows of valid ids (taken from the vocabulary's ordinary words), right-padded with `pad`.
fn ragged(vocab: usize, lens: &[usize], seed: u64) -> (Vec<Vec<u32>>, usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let rows: Vec<Vec<u32>> = lens
        .iter()
        .map(|&n| {
            (0..n)
                .map(|_| rand::Rng::random_range(&mut rng, 4..vocab as u32))
                .collect()
        })
        .collect();
    (rows, *lens.iter().max().unwrap())
}

/// Runs `check` on the trained model and on the GQA + tied-head one (skipped without an adapter).
fn on_both_models(check: fn(&Transformer<Cpu>, &WgpuDevice)) {
    let Some(device) = gpu() else { return };
    check(trained(), &device);
    check(&gqa_tied(), &device);
}

fn ids<B: Backend>(rows: &[Vec<u32>], width: usize, pad: u32, device: &B::Device) -> Tensor<B, 2, Int> {
    let tok: Vec<i64> = rows
        .iter()
        .flat_map(|r| (0..width).map(move |i| *r.get(i).unwrap_or(&pad) as i64))
        .collect();
    Tensor::from_data(TensorData::new(tok, [rows.len(), width]), device)
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Logits at each row's real positions only (the padding's are meaningless on both backends).
fn real_positions(logits: Vec<f32>, rows: &[Vec<u32>], width: usize, vocab: usize) -> Vec<f32> {
    let mut out = Vec::new();
    for (r, row) in rows.iter().enumerate() {
        out.extend_from_slice(&logits[r * width * vocab..(r * width + row.len()) * vocab]);
    }
    out
}

fn check_full_forward(model: &Transformer<Cpu>, device: &WgpuDevice) {
    let v = model.config.vocab_size;
    let (rows, width) = ragged(v, &[13, 5, 9, 1], 11);
    let on_gpu = moved::<Cpu, Gpu>(model, device);
    let cpu = real_positions(
        host(model.forward(ids::<Cpu>(&rows, width, 0, &Default::default()))),
        &rows,
        width,
        v,
    );
    let gpu = real_positions(
        host(on_gpu.forward(ids::<Gpu>(&rows, width, 0, device))),
        &rows,
        width,
        v,
    );
    let d = max_abs_diff(&cpu, &gpu);
    let scale = cpu.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    assert!(d < 1e-4, "full-forward logits differ by {d} (largest |logit| {scale})");
    eprintln!("full forward: max |Δ logit| {d:.2e} (largest |logit| {scale:.2})");
}

#[test]
fn full_forward_logits_match_the_cpu_on_a_ragged_padded_batch() {
    on_both_models(check_full_forward);
}

/// Ragged prefill, a ragged chunk with a hole, then single tokens: every call's logits at the
/// rows' real positions match the CPU's cached decoding.
fn check_cached(model: &Transformer<Cpu>, device: &WgpuDevice) {
    let v = model.config.vocab_size;
    let on_gpu = moved::<Cpu, Gpu>(model, device);
    let mut cpu_cache = model.new_cache(3, 32);
    let mut gpu_cache = on_gpu.new_cache(3, 32);
    let chunks: Vec<Vec<usize>> = vec![vec![6, 2, 4], vec![2, 0, 1], vec![1, 1, 1], vec![1, 1, 1]];
    let mut worst = 0.0f32;
    for (i, lens) in chunks.iter().enumerate() {
        let (rows, width) = ragged(v, lens, 20 + i as u64);
        let counts: Vec<usize> = lens.clone();
        let cpu = model
            .forward_cached(
                ids::<Cpu>(&rows, width, 0, &Default::default()),
                &mut cpu_cache,
                Some(&counts),
            )
            .unwrap();
        let gpu = on_gpu
            .forward_cached(ids::<Gpu>(&rows, width, 0, device), &mut gpu_cache, Some(&counts))
            .unwrap();
        let cpu = real_positions(host(cpu), &rows, width, v);
        let gpu = real_positions(host(gpu), &rows, width, v);
        let d = max_abs_diff(&cpu, &gpu);
        assert!(d < 1e-4, "cached decoding call {i} differs by {d}");
        worst = worst.max(d);
    }
    assert_eq!(cpu_cache.lengths(), gpu_cache.lengths());
    eprintln!("cached decoding: max |Δ logit| {worst:.2e}");
}

#[test]
fn cached_decoding_logits_match_the_cpu() {
    on_both_models(check_cached);
}

/// Every parameter's gradient, by module path, in visiting order.
struct Grads<'a, B: AutodiffBackend> {
    grads: &'a B::Gradients,
    path: Vec<String>,
    out: Vec<(String, Vec<f32>)>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Grads<'_, B> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let g = param.val().grad(self.grads).map(host).unwrap_or_default();
        self.out.push((self.path.join("."), g));
    }
}

/// Gradients of the summed masked token log-probs of a ragged batch (the quantity every
/// policy-gradient and SFT loss is built from).
fn logprob_grads<B: AutodiffBackend>(
    model: &Transformer<B>,
    rows: &[Vec<u32>],
    width: usize,
    device: &B::Device,
) -> Vec<(String, Vec<f32>)> {
    let mask: Vec<f32> = rows
        .iter()
        .flat_map(|r| (1..width).map(move |t| if t < r.len() { 1.0 } else { 0.0 }))
        .collect();
    let mask = Tensor::<B, 2>::from_data(TensorData::new(mask, [rows.len(), width - 1]), device);
    let lp = token_logprobs(model, ids::<B>(rows, width, 0, device), Some(mask), false, 1.0);
    let grads = lp.logprobs.sum().backward();
    let mut v = Grads::<B> {
        grads: &grads,
        path: Vec::new(),
        out: Vec::new(),
    };
    model.visit(&mut v);
    v.out
}

fn check_gradients(model: &Transformer<Cpu>, device: &WgpuDevice) {
    let (rows, width) = ragged(model.config.vocab_size, &[24, 17, 9, 24, 3, 12], 5);
    let cpu = logprob_grads::<Autodiff<Cpu>>(
        &moved::<Cpu, Autodiff<Cpu>>(model, &Default::default()),
        &rows,
        width,
        &Default::default(),
    );
    let gpu = logprob_grads::<Autodiff<Gpu>>(&moved::<Cpu, Autodiff<Gpu>>(model, device), &rows, width, device);
    assert_eq!(cpu.len(), gpu.len());
    let mut report = Vec::new();
    let mut worst = 0.0f32;
    for ((name, c), (_, g)) in cpu.iter().zip(&gpu) {
        assert!(
            !c.is_empty() && c.len() == g.len(),
            "{name}: no gradient on one backend"
        );
        let scale = c.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-12);
        let rel = max_abs_diff(c, g) / scale;
        worst = worst.max(rel);
        if rel > 1e-3 {
            report.push(format!("{name}: max |Δ| = {rel:.3} of its largest entry {scale:.3e}"));
        }
    }
    assert!(
        report.is_empty(),
        "wgpu gradients differ from flex:\n{}",
        report.join("\n")
    );
    eprintln!(
        "gradients: worst max |Δ| / max |g| over {} tensors {worst:.2e}",
        cpu.len()
    );
}

/// The guard for the fused-kernel bug of issue 10: with Burn's default fusion and autotuning,
/// the key-projection gradients were off by half their scale.
#[test]
fn logprob_gradients_match_the_cpu() {
    on_both_models(check_gradients);
}

#[test]
fn seeded_sampling_gives_valid_tokens_and_honours_stop_tokens() {
    let Some(device) = gpu() else { return };
    let model = moved::<Cpu, Gpu>(trained(), &device);
    let v = model.config.vocab_size as u32;
    let (rows, width) = ragged(v as usize, &[5, 3, 7, 2, 6, 4], 8);
    let counts: Vec<usize> = rows.iter().map(|r| r.len()).collect();
    let stop = vec![5u32, 9, 13];
    let run = |seed: u64| {
        let mut cache = model.new_cache(rows.len(), 64);
        let logits = model
            .forward_cached(ids::<Gpu>(&rows, width, 0, &device), &mut cache, Some(&counts))
            .unwrap();
        let config = GenerateConfig {
            max_new_tokens: 24,
            sampler: SamplerConfig::default(),
            stop_tokens: stop.clone(),
            check_every: 4,
        };
        generate(
            &model,
            cache,
            last_logits(logits, &counts),
            &config,
            &mut StdRng::seed_from_u64(seed),
        )
        .unwrap()
    };
    let out = run(3);
    assert_eq!(out, run(3), "same seed, different samples");
    assert_eq!(out.len(), rows.len());
    let mut stopped = 0;
    for row in &out {
        assert!(row.iter().all(|&t| t < v), "token out of the vocabulary: {row:?}");
        let first_stop = row.iter().position(|t| stop.contains(t));
        match first_stop {
            Some(p) => {
                assert_eq!(p + 1, row.len(), "row continues after its stop token: {row:?}");
                stopped += 1;
            }
            None => assert_eq!(row.len(), 24, "row ended early without a stop token: {row:?}"),
        }
    }
    eprintln!("sampling: {stopped} of {} rows stopped at a stop token", out.len());
}

/// The fixture's model shape, one warm-start step, `rl_steps` RL steps of 4 problems × 4 samples.
fn tiny_run(algo: Algo, rl_steps: usize) -> RunConfig {
    let mut c = RunConfig::default_for("search", "cpu-tiny", algo, 1, true).unwrap();
    c.model = trained().config.clone();
    c.warm_start.steps = 1;
    c.warm_start.batch_size = 4;
    c.warm_start.eval_every = 0;
    c.rl.steps = rl_steps;
    c.rl.problems_per_step = 4;
    c.rl.group_size = 4;
    c.rl.eval_every = 0;
    c.eval.problems = 2;
    c.eval.samples = 1;
    c
}

fn run_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mrt-wgpu-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Runs the pipeline on wgpu and returns the one `train/loss` it logged in `phase`.
fn pipeline_loss(
    config: RunConfig,
    dir: &std::path::Path,
    init: Option<PathBuf>,
    phase: &str,
    device: &WgpuDevice,
) -> f64 {
    let opts = PipelineOptions {
        init,
        quiet: true,
        final_eval: false,
        ..PipelineOptions::new(config, dir)
    };
    assert!(run_pipeline::<Autodiff<Gpu>>(&opts, device).unwrap().completed);
    let losses: Vec<f64> = read_metrics(&dir.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .filter(|r| r.get("phase").and_then(|p| p.as_str()) == Some(phase))
        .filter_map(|r| r.get("train/loss").and_then(|l| l.as_f64()))
        .collect();
    assert_eq!(losses.len(), 1, "{phase}: {} losses logged", losses.len());
    losses[0]
}

/// A checkpoint written on wgpu gives the same logits read on the CPU and on wgpu.
fn check_checkpoint_on_cpu(path: &std::path::Path, device: &WgpuDevice) {
    let ck = checkpoint::load(path, None).unwrap();
    let on_cpu = ck.model::<Cpu>(&Default::default()).unwrap();
    let on_gpu = ck.model::<Gpu>(device).unwrap();
    let (rows, width) = ragged(on_cpu.config.vocab_size, &[6, 4], 2);
    let d = max_abs_diff(
        &host(on_cpu.forward(ids::<Cpu>(&rows, width, 0, &Default::default()))),
        &host(on_gpu.forward(ids::<Gpu>(&rows, width, 0, device))),
    );
    assert!(
        d < 1e-4,
        "{}: the wgpu checkpoint's logits differ on the CPU by {d}",
        path.display()
    );
}

/// One warm-start step from scratch, then one RL step of `grpo` and of `mrt-dense` from the
/// briefly trained fixture (an untrained model solves nothing, so its groups would carry no
/// signal and the step no loss): finite losses, and checkpoints written on wgpu that read
/// back on the CPU with the same logits.
#[test]
fn one_warm_start_and_one_rl_step_give_finite_losses() {
    let Some(device) = gpu() else { return };
    let dir = run_dir("warm-start");
    let loss = pipeline_loss(tiny_run(Algo::Grpo, 0), &dir, None, "warm-start", &device);
    assert!(loss.is_finite(), "warm-start loss {loss}");
    check_checkpoint_on_cpu(&dir.join("checkpoints/warm_start.ckpt"), &device);
    let init = dir.join("fixture.ckpt");
    checkpoint::save(&init, trained(), vec![], serde_json::json!({})).unwrap();
    for (algo, name) in [(Algo::Grpo, "grpo"), (Algo::MrtDense, "mrt-dense")] {
        let run = run_dir(name);
        let loss = pipeline_loss(tiny_run(algo, 1), &run, Some(init.clone()), "rl", &device);
        assert!(loss.is_finite(), "{name}: RL loss {loss}");
        check_checkpoint_on_cpu(&run.join("checkpoints/final.ckpt"), &device);
        let _ = std::fs::remove_dir_all(&run);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The reverse direction: a checkpoint written on the CPU loads on wgpu with the same logits.
#[test]
fn a_cpu_checkpoint_loads_on_wgpu_with_the_same_logits() {
    let Some(device) = gpu() else { return };
    let dir = run_dir("ckpt");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("cpu.ckpt");
    let model = gqa_tied();
    checkpoint::save(&path, &model, vec![], serde_json::json!({})).unwrap();
    let back = checkpoint::load(&path, Some(&model.config))
        .unwrap()
        .model::<Gpu>(&device)
        .unwrap();
    let (rows, width) = ragged(model.config.vocab_size, &[7, 3, 5], 4);
    let d = max_abs_diff(
        &host(model.forward(ids::<Cpu>(&rows, width, 0, &Default::default()))),
        &host(back.forward(ids::<Gpu>(&rows, width, 0, &device))),
    );
    assert!(d < 1e-4, "a CPU checkpoint's logits differ on wgpu by {d}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Blocked causal attention (model/lowmem: its own backward pass, run through `Autodiff<Wgpu>`)
/// against Burn's materialised attention on the same device: output and q/k/v gradients with
/// grouped heads, an odd length and blocks that do not divide it.
#[test]
fn blocked_attention_matches_the_materialised_one_on_wgpu() {
    use mrt::model::lowmem::causal_attention;
    use rand::Rng;
    type G = Autodiff<Gpu>;
    let Some(device) = gpu() else { return };
    let ([b, h, kvh, t, d], rows) = ([2, 4, 2, 37, 8], 5);
    let mut rng = StdRng::seed_from_u64(3);
    let mut random = |heads: usize| -> Tensor<G, 4> {
        let values: Vec<f32> = (0..b * heads * t * d).map(|_| rng.random_range(-2.0..2.0)).collect();
        Tensor::from_data(TensorData::new(values, [b, heads, t, d]), &device)
    };
    let (q0, k0, v0, w) = (random(h), random(kvh), random(kvh), random(h));
    let run = |blocked: bool| -> Vec<Vec<f32>> {
        let (q, k, v) = (
            q0.clone().require_grad(),
            k0.clone().require_grad(),
            v0.clone().require_grad(),
        );
        let y = if blocked {
            causal_attention(q.clone(), k.clone(), v.clone(), Some(rows))
        } else {
            mrt::model::lowmem::materialised_attention(q.clone(), k.clone(), v.clone())
        };
        let grads = (y.clone() * w.clone()).sum().backward();
        vec![
            host(y),
            host(q.grad(&grads).unwrap()),
            host(k.grad(&grads).unwrap()),
            host(v.grad(&grads).unwrap()),
        ]
    };
    let (ours, reference) = (run(true), run(false));
    for (name, (a, r)) in ["output", "dq", "dk", "dv"].iter().zip(ours.iter().zip(&reference)) {
        let scale = r.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let rel = max_abs_diff(a, r) / scale;
        assert!(
            scale > 0.0 && rel < 1e-5,
            "{name}: max |Δ| = {rel:.2e} of its largest entry"
        );
        eprintln!("blocked attention on wgpu, {name}: max |Δ| / max = {rel:.2e}");
    }
}
