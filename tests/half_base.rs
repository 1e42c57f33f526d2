//! A LoRA run's frozen base in half precision (model/precision.rs): the base's matrices are
//! stored in bf16 / f16 at half the bytes, everything trained stays f32, the model computes
//! what the f32 one does within half precision's rounding, gradients reach the adapters alone
//! and point where the f32 ones do, and a run with a half base checkpoints adapters that load
//! onto the f32 base (its fingerprint is taken before the cast). On the CPU backend (flex
//! computes in both half types) and, in the last test, on wgpu (lavapipe in CI).
//!
//! Tolerances: bf16 keeps 8 significant bits (relative step 2^-8 ≈ 4e-3), f16 11 (2^-11 ≈
//! 5e-4); a product rounds its inputs and its output once each, and a few layers compound
//! that. The bounds below are 2.5–7× the errors measured on these fixtures (each test prints
//! its own), far below what a wrong cast or a dropped term gives (order 1).

mod common;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, FloatDType};
use common::{param_grads, qwen2, randomise_b, small_lora_config, AD, B};
use mrt::model::lora::LoraConfig;
use mrt::model::lowmem::hidden_gradients;
use mrt::model::precision::BasePrecision;
use mrt::model::{checkpoint, logprobs_of_hidden, Transformer};
use mrt::rl::config::Algo;
use mrt::rl::optim::{adamw, require_grad, step_grads};
use mrt::rl::pipeline::{run_pipeline, PipelineOptions};

fn tokens<Bk: Backend>(device: &Bk::Device) -> Tensor<Bk, 2, Int> {
    let rows: [[i64; 8]; 2] = [[1, 5, 9, 2, 7, 3, 8, 8], [4, 4, 8, 1, 0, 6, 2, 9]];
    Tensor::from_data(TensorData::new(rows.concat(), [2, 8]), device)
}

fn host<Bk: Backend, const D: usize>(t: Tensor<Bk, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

/// max |a − b| / max |a|
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(1e-12f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max) / scale
}

/// cos ∠(a, b)
fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

/// (dtype, elements, rank) of every float parameter, in module order.
fn param_types<Bk: Backend, M: Module<Bk>>(model: &M) -> Vec<(DType, usize, usize)> {
    struct Types(Vec<(DType, usize, usize)>);
    impl<Bk: Backend> ModuleVisitor<Bk> for Types {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<Bk, D>>) {
            let t = p.val();
            self.0.push((t.dtype(), t.shape().num_elements(), D));
        }
    }
    let mut v = Types(Vec::new());
    model.visit(&mut v);
    v.0
}

fn bytes(types: &[(DType, usize, usize)]) -> usize {
    types.iter().map(|(t, n, _)| t.size() * n).sum()
}

/// The Qwen2 fixture (GQA, biases, tied head) with rank-4 adapters whose B is not zero.
fn adapted<Bk: Backend>() -> Transformer<Bk> {
    randomise_b(qwen2::<Bk>().with_lora(&LoraConfig::new(4), 7, None), 3)
}

#[test]
fn half_base_halves_the_matrices_and_keeps_the_logits() {
    let device = Default::default();
    let full = adapted::<B>();
    let want = host(full.forward(tokens::<B>(&device)));
    for (dtype, bound) in [(FloatDType::BF16, 2e-2), (FloatDType::F16, 4e-3)] {
        let half = full.clone().with_base_dtype(dtype);
        assert_eq!(half.base_dtype(), dtype);
        // Matrices (2-D, outside the adapters) halve; norms, biases and adapters stay f32.
        let (base_full, base_half) = (
            param_types(&full.clone().without_lora()),
            param_types(&half.clone().without_lora()),
        );
        for ((tf, n, rank), (th, _, _)) in base_full.iter().zip(&base_half) {
            assert_eq!(*tf, DType::F32);
            let want = if *rank == 2 { DType::from(dtype) } else { DType::F32 };
            assert_eq!(*th, want, "a rank-{rank} parameter of {n} elements");
        }
        assert!(param_types(&half.adapters()).iter().all(|(t, _, _)| *t == DType::F32));
        let matrices: usize = base_full.iter().filter(|(_, _, r)| *r == 2).map(|(_, n, _)| n).sum();
        assert_eq!(bytes(&base_full) - bytes(&base_half), 2 * matrices);

        let got = host(half.forward(tokens::<B>(&device)));
        let err = rel_diff(&want, &got);
        assert!(
            err > 0.0,
            "{dtype:?}: the half path gave the f32 logits exactly: not taken"
        );
        assert!(err < bound, "{dtype:?}: logits off by {err:.2e} of their scale");
        // Decoding (KV cache) computes what the full pass does, in the same precision: its
        // attention kernel sums in another order, and an f32 difference of one ulp can move
        // an input of the next half-precision product by one half-precision step.
        let mut cache = half.new_cache(2, 16);
        let cached = host(half.forward_cached(tokens::<B>(&device), &mut cache, None).unwrap());
        let drift = rel_diff(&got, &cached);
        assert!(drift < bound / 4.0, "{dtype:?}: cached pass off by {drift:.2e}");
        eprintln!("{dtype:?} base: logits within {err:.2e} of f32's scale; cached pass {drift:.2e}");
        // Back to f32 (what export merges into) gives the rounded weights in f32.
        let back = half.with_base_dtype(FloatDType::F32);
        assert!(param_types(&back).iter().all(|(t, _, _)| *t == DType::F32));
    }
}

/// Gradients of the negated summed log-probs, plain or block-checkpointed.
fn grads<A: AutodiffBackend>(model: &Transformer<A>, checkpoint: bool) -> GradientsParams {
    let t = tokens::<A>(&model.device());
    let (m, tt) = (model.clone(), t.clone());
    hidden_gradients(model, t, checkpoint, move |h| {
        logprobs_of_hidden(&m, h, tt, None, false, 1.0).logprobs.sum().neg()
    })
}

/// [`grads`] of each parameter that gets one.
fn adapter_grads<A: AutodiffBackend>(model: &Transformer<A>, checkpoint: bool) -> Vec<Vec<f32>> {
    param_grads(model, &grads(model, checkpoint))
}

#[test]
fn half_base_gradients_reach_only_the_adapters_and_agree_with_f32() {
    let full = require_grad(adapted::<AD>());
    let want = adapter_grads(&full, false);
    for dtype in [FloatDType::BF16, FloatDType::F16] {
        let half = full.clone().with_base_dtype(dtype);
        for checkpoint in [false, true] {
            let got = adapter_grads(&half, checkpoint);
            // 2 layers × 7 targets × (A, B): the adapters and nothing else.
            assert_eq!(got.len(), 28);
            let worst = want.iter().zip(&got).map(|(a, b)| cosine(a, b)).fold(1.0f64, f64::min);
            assert!(
                worst > 0.999,
                "{dtype:?} (checkpointed: {checkpoint}): an adapter gradient is at cos {worst:.5} from f32's"
            );
            eprintln!("{dtype:?} base (checkpointed: {checkpoint}): worst cos to f32 gradients {worst:.6}");
        }
        // One AdamW step moves every adapter and leaves the half base as it was.
        let config = common::adapter_optim();
        let mut optim = adamw::<AD>(&config);
        let (stepped, _) = step_grads(
            half.clone(),
            &mut optim,
            grads(&half, false),
            config.lr,
            config.grad_clip,
        );
        let base = |m: &Transformer<AD>| {
            let mut v = Vec::new();
            m.clone().without_lora().visit(&mut Values(&mut v));
            v
        };
        assert_eq!(base(&stepped), base(&half), "{dtype:?}: the frozen base moved");
        assert_eq!(stepped.base_dtype(), dtype);
        let moved = |m: &Transformer<AD>| {
            let mut v = Vec::new();
            m.adapters().visit(&mut Values(&mut v));
            v
        };
        let (before, after) = (moved(&half), moved(&stepped));
        assert!(
            before.iter().zip(&after).all(|(a, b)| a != b),
            "{dtype:?}: an adapter did not move"
        );
    }
}

struct Values<'a>(&'a mut Vec<Vec<f32>>);
impl<Bk: Backend> ModuleVisitor<Bk> for Values<'_> {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<Bk, D>>) {
        self.0.push(host(p.val()));
    }
}

#[test]
fn base_precision_resolves_per_backend() {
    let device = Default::default();
    // The CPU keeps f32 unless asked; a GPU-like backend that computes in bf16 gets it.
    assert_eq!(
        BasePrecision::Auto.resolve::<B>(&device, true).unwrap(),
        FloatDType::F32
    );
    assert_eq!(
        BasePrecision::Auto.resolve::<B>(&device, false).unwrap(),
        FloatDType::BF16
    );
    assert_eq!(BasePrecision::F16.resolve::<B>(&device, true).unwrap(), FloatDType::F16);
    assert_eq!(
        BasePrecision::F32.resolve::<B>(&device, false).unwrap(),
        FloatDType::F32
    );
    assert!(mrt::backend::is_cpu::<B>() && mrt::backend::is_cpu::<AD>());
    let parsed: mrt::rl::config::RunConfig = serde_json::from_value({
        let mut c = serde_json::to_value(small_lora_config(Algo::Grpo)).unwrap();
        c["rl"]["lora"]["base_precision"] = serde_json::json!("bf16");
        c
    })
    .unwrap();
    assert_eq!(parsed.rl.lora.unwrap().base_precision, BasePrecision::Bf16);
}

#[test]
fn a_run_with_a_bf16_base_checkpoints_adapters_that_load_onto_the_f32_base() {
    let device = Default::default();
    let run = std::env::temp_dir().join(format!("mrt-half-base-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&run);
    let mut config = small_lora_config(Algo::MrtDense);
    config.rl.lora.as_mut().unwrap().base_precision = BasePrecision::Bf16;
    let opts = PipelineOptions {
        quiet: true,
        ..PipelineOptions::new(config, run.clone())
    };
    let out = run_pipeline::<AD>(&opts, &device).unwrap();
    assert!(out.completed && out.fine_tuned.is_some());
    // The checkpoint names the f32 warm start by the fingerprint taken before the cast, so it
    // loads (a fingerprint of the bf16 weights would be refused as another base).
    let fin = checkpoint::load(&run.join("checkpoints/final.ckpt"), None).unwrap();
    assert!(fin.lora.is_some());
    let model = fin.model::<B>(&device).unwrap();
    assert_eq!(model.base_dtype(), FloatDType::F32);
    let moved = param_types(&model.adapters()).len();
    assert_eq!(moved, 28);
    let b_values: Vec<f32> = model
        .adapters()
        .layers
        .iter()
        .flat_map(|l| host(l.q.as_ref().unwrap().b.val()))
        .collect();
    assert!(b_values.iter().any(|x| *x != 0.0), "the adapters did not train");
    let _ = std::fs::remove_dir_all(&run);
}

#[cfg(feature = "wgpu")]
#[test]
fn half_base_on_wgpu_matches_the_cpu_in_f32() {
    use burn::backend::wgpu::Wgpu;
    use burn::backend::Autodiff;
    let Some(device) = common::gpu::gpu() else { return };
    // bf16 where the adapter has it, else f16 (lavapipe): a half type either way.
    let dtype = BasePrecision::Auto.resolve::<Wgpu>(&device, false).unwrap();
    assert_ne!(
        dtype,
        FloatDType::F32,
        "this wgpu adapter computes in neither bf16 nor f16"
    );
    let cpu = adapted::<B>();
    let gpu = adapted::<Wgpu>().with_base_dtype(dtype);
    let want = host(cpu.forward(tokens::<B>(&Default::default())));
    let got = host(gpu.forward(tokens::<Wgpu>(&device)));
    let err = rel_diff(&want, &got);
    let bound = if dtype == FloatDType::BF16 { 2e-2 } else { 4e-3 };
    assert!(
        err < bound,
        "wgpu {dtype:?} base: logits off by {err:.2e} of their scale"
    );
    let want = adapter_grads(&require_grad(adapted::<AD>()), true);
    let ad = require_grad(adapted::<Autodiff<Wgpu>>()).with_base_dtype(dtype);
    let got = adapter_grads(&ad, true);
    assert_eq!(got.len(), want.len());
    let worst = want.iter().zip(&got).map(|(a, b)| cosine(a, b)).fold(1.0f64, f64::min);
    assert!(
        worst > 0.999,
        "wgpu {dtype:?} base: an adapter gradient at cos {worst:.5}"
    );
    eprintln!("wgpu {dtype:?} base: logits within {err:.2e}, worst gradient cos {worst:.6}");
}
