//! Peak memory and time of training steps on long rows, for real models' shapes with random
//! weights (BENCHMARKS.md, "Training memory on long rows").
//!
//! ```text
//! cargo bench --bench memory -- --shape qwen2.5-0.5b --tokens 2048 [--layers 4] [--steps 2]
//! cargo bench --bench memory -- --shape r1-distill-qwen-1.5b --tokens 8192 --lora-rank 16 --layers 4
//! cargo bench --bench memory -- --shape r1-distill-qwen-1.5b --tokens 1024 --lora-rank 16 --base-precision f16
//! ```
//! One step is what the RL loop does per pass: the full-sequence forward, the token
//! log-probs of every position but the first through the output head, a policy-gradient loss
//! with random per-token coefficients, the backward pass (blocks recomputed when
//! `--checkpointing` says so) and an AdamW update; with `--lora-rank`, of rank-r adapters on
//! every projection of a frozen base. The optimizer's moments exist from the
//! first update on, so the peak of a run of two or more steps is the steady state. Peak
//! resident memory is the process's high-water mark (`VmHWM`), with the allocator set as the
//! binaries set it (`backend::tune_allocator`). CPU backend (flex) only.

use std::time::Instant;

use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use burn::tensor::FloatDType;
use clap::Parser;
use mrt::model::lora::LoraConfig;
use mrt::model::lowmem::{hidden_gradients, Checkpointing};
use mrt::model::{logprobs_of_hidden, Transformer, TransformerConfig};
use mrt::rl::optim::{adamw, require_grad, step_grads, OptimConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

type AD = Autodiff<Flex>;

/// Peak memory of training steps on long rows.
#[derive(Parser, Debug)]
struct Args {
    /// Model shapes: qwen2.5-0.5b, r1-distill-qwen-1.5b, or cpu-tiny / tiny / small.
    #[arg(long, default_value = "qwen2.5-0.5b")]
    shape: String,
    /// Tokens per row.
    #[arg(long, default_value_t = 1024)]
    tokens: usize,
    /// Rows per step.
    #[arg(long, default_value_t = 1)]
    rows: usize,
    /// Transformer blocks (default: the shape's); fewer to extrapolate a step that would take
    /// too long at full depth.
    #[arg(long)]
    layers: Option<usize>,
    /// Training steps (the first allocates AdamW's moments).
    #[arg(long, default_value_t = 2)]
    steps: usize,
    /// auto, on or off.
    #[arg(long, default_value = "auto")]
    checkpointing: String,
    /// Blocked attention however short the rows (by default, on backends without a fused
    /// kernel, rows up to 16·C / H tokens take Burn's materialised attention; the CPU backend
    /// runs its fused blocked kernel at every length: model/lowmem/attention.rs).
    #[arg(long)]
    blocked_attention: bool,
    /// Leave glibc's allocator as it is (large buffers mapped and unmapped per allocation, so
    /// the peak is the live memory) instead of the binaries' tuning, which keeps freed memory
    /// (and any fragmentation of it) in the process.
    #[arg(long)]
    untuned_allocator: bool,
    /// Train rank-r LoRA adapters (α = 2r, all seven projections) on a frozen base.
    #[arg(long)]
    lora_rank: Option<usize>,
    /// With --lora-rank: the frozen base's matrices in f32, bf16 or f16 (model/precision.rs).
    #[arg(long, default_value = "f32", requires = "lora_rank")]
    base_precision: String,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Shapes of published models (their config.json files) and of the presets.
fn shape(name: &str) -> Option<TransformerConfig> {
    let qwen = |d_model, n_layers, n_heads, d_ff, tie, theta| TransformerConfig {
        vocab_size: 151_936,
        d_model,
        n_layers,
        n_heads,
        n_kv_heads: 2,
        d_ff,
        max_seq_len: 32_768,
        rope_theta: theta,
        norm_eps: 1e-6,
        tie_embeddings: tie,
        qkv_bias: true,
    };
    match name {
        "qwen2.5-0.5b" => Some(qwen(896, 24, 14, 4864, true, 1e6)),
        "r1-distill-qwen-1.5b" => Some(qwen(1536, 28, 12, 8960, false, 1e4)),
        preset => TransformerConfig::preset(preset).ok(),
    }
}

/// The process's peak resident memory so far, in bytes (Linux `VmHWM`).
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn gib(bytes: Option<u64>) -> f64 {
    bytes.map_or(f64::NAN, |b| b as f64 / (1u64 << 30) as f64)
}

fn main() {
    let args = Args::parse();
    if !args.untuned_allocator {
        mrt::backend::tune_allocator();
    }
    mrt::model::lowmem::set_blocked_always(args.blocked_attention);
    let Some(mut cfg) = shape(&args.shape) else {
        eprintln!("error: unknown --shape {}", args.shape);
        std::process::exit(2);
    };
    let checkpointing: Checkpointing = match serde_json::from_value(serde_json::json!(args.checkpointing)) {
        Ok(c) => c,
        Err(_) => {
            eprintln!(
                "error: --checkpointing takes auto, on or off, not {}",
                args.checkpointing
            );
            std::process::exit(2);
        }
    };
    if let Some(layers) = args.layers {
        cfg.n_layers = layers;
    }
    cfg.max_seq_len = cfg.max_seq_len.max(args.tokens);
    let (rows, t) = (args.rows, args.tokens);
    let device = Default::default();
    let t0 = Instant::now();
    let mut model = Transformer::<AD>::new(&cfg, 0, &device).expect("a valid shape");
    if let Some(rank) = args.lora_rank {
        model = require_grad(model.with_lora(&LoraConfig::new(rank), 0, None));
        let dtype = match args.base_precision.as_str() {
            "f32" => FloatDType::F32,
            "bf16" => FloatDType::BF16,
            "f16" => FloatDType::F16,
            other => {
                eprintln!("error: --base-precision takes f32, bf16 or f16, not {other}");
                std::process::exit(2);
            }
        };
        model = model.with_base_dtype(dtype);
    }
    let trainable = model.num_params() - if args.lora_rank.is_some() { cfg.num_params() } else { 0 };
    let init_s = t0.elapsed().as_secs_f64();
    let after_init = peak_rss();
    let optim_config = OptimConfig {
        lr: 1e-5,
        warmup_steps: 0,
        min_lr_ratio: 1.0,
        weight_decay: 0.0,
        grad_clip: 1.0,
    };
    let mut optim = adamw::<AD>(&optim_config);
    let mut rng = StdRng::seed_from_u64(0);
    let ids: Vec<i64> = (0..rows * t)
        .map(|_| rng.random_range(0..cfg.vocab_size as i64))
        .collect();
    let coef: Vec<f32> = (0..rows * (t - 1)).map(|_| rng.random_range(-1.0..1.0)).collect();
    let tokens = Tensor::<AD, 2, Int>::from_data(TensorData::new(ids, [rows, t]), &device);
    let coef = Tensor::<AD, 2>::from_data(TensorData::new(coef, [rows, t - 1]), &device);
    let mask = Tensor::<AD, 2>::ones([rows, t - 1], &device);
    let checkpoint = checkpointing.applies(t);
    let mut times = Vec::new();
    for _ in 0..args.steps {
        let start = Instant::now();
        let grads = hidden_gradients(&model, tokens.clone(), checkpoint, |hidden| {
            let lp = logprobs_of_hidden(&model, hidden, tokens.clone(), Some(mask.clone()), false, 1.0);
            -(lp.logprobs * coef.clone()).sum() / (rows * (t - 1)) as f64
        });
        model = step_grads(model, &mut optim, grads, 1e-5, 1.0).0;
        times.push(start.elapsed().as_secs_f64());
    }
    let result = serde_json::json!({
        "shape": args.shape,
        "layers": cfg.n_layers,
        "params": cfg.num_params(),
        "lora_rank": args.lora_rank,
        "base_precision": args.lora_rank.map(|_| args.base_precision.clone()),
        "untuned_allocator": args.untuned_allocator,
        "blocked_attention": args.blocked_attention,
        "trainable_params": trainable,
        "rows": rows,
        "tokens": t,
        "checkpointing": checkpoint,
        "steps": args.steps,
        "step_s": times,
        "init_s": init_s,
        "rss_after_init_gib": gib(after_init),
        "peak_rss_gib": gib(peak_rss()),
    });
    println!("{result}");
}
