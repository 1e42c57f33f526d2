//! Throughput of one training step and of batched decoding, with the shapes and the JSON
//! fields of `shared/reference/torch_ref.py`, so the two can be compared on the same machine.
//!
//! ```text
//! cargo bench --bench throughput -- --preset tiny --device cpu [--iters 10] [--out r.json]
//! cargo bench --bench throughput --features cuda -- --preset small --device cuda
//! ```
//! `--device ndarray` (with `--features ndarray`) measures Burn's other CPU backend.
//!
//! train: AdamW step on a [batch, seq] batch of random tokens (forward, cross-entropy,
//! backward, update). decode: prefill a [batch, prompt] prompt, then sample `gen` tokens per
//! row with the KV cache (temperature 1, no stop tokens, nothing read back until the end).
//! Both are timed as the median of `iters` runs after warm-up, with a device sync per run.

use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use clap::Parser;
use mrt::backend::{dispatch, BackendTask, DeviceChoice};
use mrt::model::{generate, token_logprobs, GenerateConfig, SamplerConfig, Transformer, TransformerConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Training-step and decoding throughput, printed as one JSON line like torch_ref.py.
#[derive(Parser, Debug, Clone)]
struct Args {
    /// Model preset (shapes and batch sizes as torch_ref.py): cpu-tiny, tiny, small.
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// auto, cpu, wgpu, cuda (or ndarray with --features ndarray).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Timed training steps (decode runs max(3, iters / 3) times).
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Skip the training-step measurement.
    #[arg(long)]
    no_train: bool,
    /// Skip the decoding measurement.
    #[arg(long)]
    no_decode: bool,
    /// Never Burn's materialised attention in training (model/lowmem/attention.rs: backends
    /// without a fused kernel take it for short rows, such as `tiny`'s 256 tokens, by default;
    /// the CPU backend runs its fused blocked kernel at every length either way).
    #[arg(long)]
    blocked_attention: bool,
    /// Also write the JSON to this file.
    #[arg(long)]
    out: Option<String>,
    /// Also check run-to-run determinism: two 3-step training runs from the same seed must give
    /// bit-identical losses and logits.
    #[arg(long)]
    determinism: bool,
    /// A pretrained model (Hugging Face directory or GGUF file) instead of a preset's random
    /// one; decoding only, with --batch, --prompt and --gen (compare benches/hf_generate.py).
    #[arg(long)]
    model: Option<std::path::PathBuf>,
    /// Decode rows (with --model).
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Prompt tokens per row (with --model).
    #[arg(long, default_value_t = 128)]
    prompt: usize,
    /// New tokens per row (with --model).
    #[arg(long, default_value_t = 128)]
    gen: usize,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// (train_batch, train_seq, decode_batch, prompt_len, gen_len) as in torch_ref.py.
fn shapes(preset: &str) -> (usize, usize, usize, usize, usize) {
    match preset {
        "tiny" => (64, 256, 64, 32, 224),
        "small" => (16, 1024, 32, 64, 448),
        _ => (16, 128, 16, 16, 112),
    }
}

struct Bench(Args, TransformerConfig);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn random_tokens<B: Backend>(
    rng: &mut StdRng,
    rows: usize,
    cols: usize,
    vocab: usize,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let ids: Vec<i64> = (0..rows * cols).map(|_| rng.random_range(0..vocab as i64)).collect();
    Tensor::from_data(TensorData::new(ids, [rows, cols]), device)
}

impl BackendTask for Bench {
    type Output = serde_json::Value;

    fn run<B: AutodiffBackend>(self, device: B::Device, label: String) -> serde_json::Value {
        let Bench(args, cfg) = self;
        let (tb, ts, mut db, mut pl, mut gl) = shapes(&args.preset);
        let mut rng = StdRng::seed_from_u64(0);
        let (mut model, cfg, name) = match &args.model {
            Some(path) => {
                (db, pl, gl) = (args.batch, args.prompt, args.gen);
                let model = mrt::model::hf::load_with_context::<B>(path, Some(pl + gl), &device).unwrap_or_else(|e| {
                    eprintln!("error: {e}");
                    std::process::exit(1)
                });
                let cfg = model.config.clone();
                (
                    model,
                    cfg,
                    path.file_name()
                        .map(|n| n.to_string_lossy().to_string())
                        .unwrap_or_default(),
                )
            }
            None => (
                Transformer::<B>::new(&cfg, 0, &device).expect("valid preset"),
                cfg,
                args.preset.clone(),
            ),
        };
        let params = cfg.num_params();
        eprintln!("bench: {name} ({params} params) on {label}");
        let mut result = serde_json::json!({
            "engine": format!("burn-0.21.0 ({label})"),
            "device": label,
            "preset": name,
            "batch": db,
            "prompt": pl,
            "gen": gl,
            "dtype": "f32",
            "params": params,
        });

        if !args.no_train && args.model.is_none() {
            let mut optim = AdamWConfig::new().with_epsilon(1e-8).with_weight_decay(0.01).init();
            let x = random_tokens::<B>(&mut rng, tb, ts + 1, cfg.vocab_size, &device);
            let mut step = |model: Transformer<B>| {
                let lp = token_logprobs(&model, x.clone(), None, false, 1.0);
                let loss = -lp.logprobs.mean();
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                let model = optim.step(3e-4, model, grads);
                B::sync(&device).expect("device sync");
                model
            };
            for _ in 0..3 {
                model = step(model);
            }
            let mut times = Vec::new();
            for _ in 0..args.iters {
                let t0 = Instant::now();
                model = step(model);
                times.push(t0.elapsed().as_secs_f64());
            }
            let t = median(times);
            let flops_per_tok = 6.0 * params as f64 + 12.0 * (cfg.n_layers * cfg.d_model * ts) as f64;
            result["train_step_s"] = t.into();
            result["train_tok_s"] = ((tb * ts) as f64 / t).into();
            result["train_tflops"] = (flops_per_tok * (tb * ts) as f64 / t / 1e12).into();
        }

        if args.determinism && args.model.is_none() {
            let run = || {
                let mut rng = StdRng::seed_from_u64(42);
                let mut model = Transformer::<B>::new(&cfg, 7, &device).expect("valid preset");
                let mut optim = AdamWConfig::new().with_epsilon(1e-8).with_weight_decay(0.01).init();
                let mut losses = Vec::new();
                for _ in 0..3 {
                    let x = random_tokens::<B>(&mut rng, tb.min(16), ts.min(128) + 1, cfg.vocab_size, &device);
                    let loss = -token_logprobs(&model, x, None, false, 1.0).logprobs.mean();
                    losses.push(loss.clone().into_scalar().elem::<f32>().to_bits());
                    let grads = GradientsParams::from_grads(loss.backward(), &model);
                    model = optim.step(3e-4, model, grads);
                }
                let probe = random_tokens::<B>(&mut rng, 2, 16, cfg.vocab_size, &device);
                let logits: Vec<u32> = model
                    .forward(probe)
                    .into_data()
                    .iter::<f32>()
                    .map(f32::to_bits)
                    .collect();
                (losses, logits)
            };
            result["deterministic"] = (run() == run()).into();
        }

        if !args.no_decode {
            let inner = model.valid();
            let config = GenerateConfig {
                max_new_tokens: gl,
                sampler: SamplerConfig::default(),
                stop_tokens: vec![],
                check_every: gl,
            };
            let mut decode = || {
                let prompt = random_tokens::<B::InnerBackend>(&mut rng, db, pl, cfg.vocab_size, &device);
                let mut cache = inner.new_cache(db, pl + gl);
                let logits = inner.forward_cached_last(prompt, &mut cache, None).expect("fits");
                let out = generate(&inner, cache, logits, &config, &mut rng).expect("fits");
                assert_eq!(out[0].len(), gl);
            };
            decode();
            let runs = (args.iters / 3).max(3);
            let mut times = Vec::new();
            for _ in 0..runs {
                let t0 = Instant::now();
                decode();
                times.push(t0.elapsed().as_secs_f64());
            }
            let t = median(times);
            result["decode_s"] = t.into();
            result["decode_tok_s"] = ((db * gl) as f64 / t).into();
        }
        result
    }
}

fn main() {
    mrt::backend::tune_allocator();
    let args = Args::parse();
    mrt::model::lowmem::set_blocked_always(args.blocked_attention);
    let mut cfg = match TransformerConfig::preset(&args.preset) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let (_, ts, _, pl, gl) = shapes(&args.preset);
    cfg.max_seq_len = cfg.max_seq_len.max(ts).max(pl + gl);
    let out = args.out.clone();
    let task = Bench(args.clone(), cfg);
    let result = if args.device == "ndarray" {
        run_ndarray(task)
    } else {
        let choice: DeviceChoice = match args.device.parse() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(2);
            }
        };
        match dispatch(choice, task) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        }
    };
    println!("{result}");
    if let Some(path) = out {
        std::fs::write(&path, serde_json::to_string_pretty(&result).unwrap()).expect("write --out file");
    }
}

#[cfg(feature = "ndarray")]
fn run_ndarray(task: Bench) -> serde_json::Value {
    task.run::<burn::backend::Autodiff<burn::backend::NdArray>>(Default::default(), "cpu (ndarray)".into())
}

#[cfg(not(feature = "ndarray"))]
fn run_ndarray(_: Bench) -> serde_json::Value {
    eprintln!("error: --device ndarray needs `--features ndarray`");
    std::process::exit(2);
}
