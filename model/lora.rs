//! LoRA on a frozen base: which projections get adapters, attaching them, taking them out as a
//! module of their own (what a LoRA checkpoint stores), merging them, and the base's
//! fingerprint that a checkpoint of adapters names its base by.
//!
//! Only the adapters are trained: [`crate::rl::optim::require_grad`] marks them alone as
//! requiring gradients, so the backward pass computes no gradient for a base weight and AdamW
//! keeps moments for the adapters only. Rollouts, the meta-prover and evaluation run the
//! adapted model as it is (each projection adds its low-rank term); nothing is merged per step.

use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::block::Block;
use super::checkpoint;
use super::config::TransformerConfig;
use super::precision::BasePrecision;
use super::projection::{Lora, Projection};
use super::transformer::Transformer;
use crate::error::{Error, Result};

/// A projection of a block that can carry an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Target {
    #[serde(rename = "q", alias = "q_proj")]
    Q,
    #[serde(rename = "k", alias = "k_proj")]
    K,
    #[serde(rename = "v", alias = "v_proj")]
    V,
    #[serde(rename = "o", alias = "o_proj")]
    O,
    #[serde(rename = "gate", alias = "gate_proj")]
    Gate,
    #[serde(rename = "up", alias = "up_proj")]
    Up,
    #[serde(rename = "down", alias = "down_proj")]
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// The module's name in a Hugging Face model (`model.layers.{i}.{hf_path}`).
    pub fn hf_path(self) -> &'static str {
        match self {
            Target::Q => "self_attn.q_proj",
            Target::K => "self_attn.k_proj",
            Target::V => "self_attn.v_proj",
            Target::O => "self_attn.o_proj",
            Target::Gate => "mlp.gate_proj",
            Target::Up => "mlp.up_proj",
            Target::Down => "mlp.down_proj",
        }
    }

    /// PEFT's `target_modules` entry.
    pub fn hf_name(self) -> &'static str {
        self.hf_path().rsplit('.').next().expect("a dotted path")
    }

    /// Parses `q`, `q_proj`, … (the command line's spelling).
    pub fn parse(name: &str) -> Result<Self> {
        serde_json::from_value(serde_json::json!(name)).map_err(|_| Error::Unknown {
            kind: "LoRA target",
            name: name.to_string(),
            expected: "q, k, v, o, gate, up, down (or q_proj, …, down_proj)".into(),
        })
    }

    pub fn of<B: Backend>(self, block: &Block<B>) -> &Projection<B> {
        match self {
            Target::Q => &block.attn.q,
            Target::K => &block.attn.k,
            Target::V => &block.attn.v,
            Target::O => &block.attn.o,
            Target::Gate => &block.mlp.gate,
            Target::Up => &block.mlp.up,
            Target::Down => &block.mlp.down,
        }
    }

    pub fn of_mut<B: Backend>(self, block: &mut Block<B>) -> &mut Projection<B> {
        match self {
            Target::Q => &mut block.attn.q,
            Target::K => &mut block.attn.k,
            Target::V => &mut block.attn.v,
            Target::O => &mut block.attn.o,
            Target::Gate => &mut block.mlp.gate,
            Target::Up => &mut block.mlp.up,
            Target::Down => &mut block.mlp.down,
        }
    }
}

fn all_targets() -> Vec<Target> {
    Target::ALL.to_vec()
}

/// Adapters to train: rank r, scaling α (the update is scaled by α / r, as PEFT does without
/// rsLoRA), and the projections that get one. Dropout on the adapters' input is always 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    pub rank: usize,
    /// Default 2 r (scale 2), a common choice for RL fine-tuning with small ranks.
    #[serde(default)]
    pub alpha: Option<f64>,
    #[serde(default = "all_targets")]
    pub targets: Vec<Target>,
    /// What the frozen base's matrices are stored in during training (model/precision.rs):
    /// a setting of the run, not a property of the adapters (they load onto an f32 base
    /// whatever a checkpoint's header says here, and PEFT's files do not carry it).
    #[serde(default)]
    pub base_precision: BasePrecision,
}

impl LoraConfig {
    pub fn new(rank: usize) -> Self {
        Self {
            rank,
            alpha: None,
            targets: all_targets(),
            base_precision: BasePrecision::Auto,
        }
    }

    pub fn alpha(&self) -> f64 {
        self.alpha.unwrap_or(2.0 * self.rank as f64)
    }

    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::config("lora.rank", self.rank, "must be positive"));
        }
        if !(self.alpha().is_finite() && self.alpha() > 0.0) {
            return Err(Error::config("lora.alpha", self.alpha(), "must be > 0"));
        }
        if self.targets.is_empty() {
            return Err(Error::config("lora.targets", "[]", "name at least one projection"));
        }
        Ok(())
    }
}

/// Where the frozen base of a model's adapters comes from: a Hugging Face directory, a GGUF
/// file or a checkpoint of this project, and a fingerprint of its weights
/// ([`Transformer::fingerprint`]) so that adapters are never put on another model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseRef {
    pub path: PathBuf,
    pub fingerprint: String,
}

/// The adapters of a model, block by block, as a module of their own: what a LoRA checkpoint
/// stores, and what the optimizer's state belongs to.
#[derive(Module, Debug)]
pub struct Adapters<B: Backend> {
    pub layers: Vec<LayerAdapters<B>>,
}

#[derive(Module, Debug)]
pub struct LayerAdapters<B: Backend> {
    pub q: Option<Lora<B>>,
    pub k: Option<Lora<B>>,
    pub v: Option<Lora<B>>,
    pub o: Option<Lora<B>>,
    pub gate: Option<Lora<B>>,
    pub up: Option<Lora<B>>,
    pub down: Option<Lora<B>>,
}

impl<B: Backend> LayerAdapters<B> {
    fn slot(&mut self, t: Target) -> &mut Option<Lora<B>> {
        match t {
            Target::Q => &mut self.q,
            Target::K => &mut self.k,
            Target::V => &mut self.v,
            Target::O => &mut self.o,
            Target::Gate => &mut self.gate,
            Target::Up => &mut self.up,
            Target::Down => &mut self.down,
        }
    }
}

impl<B: Backend> Transformer<B> {
    /// This model with fresh adapters on `config.targets` of every block: A drawn
    /// U(−1/√in, 1/√in) from `seed` on the host (PEFT's Kaiming-uniform default), B = 0, so the
    /// adapted model computes exactly what the base does. Existing adapters are replaced.
    pub fn with_lora(mut self, config: &LoraConfig, seed: u64, base: Option<BaseRef>) -> Self {
        let device = self.device();
        let mut rng = StdRng::seed_from_u64(seed ^ 0x10_4a);
        for block in &mut self.blocks {
            for t in Target::ALL {
                let p = t.of_mut(block);
                p.lora = config.targets.contains(&t).then(|| {
                    let [d_in, d_out] = p.dims();
                    let bound = 1.0 / (d_in as f32).sqrt();
                    let a: Vec<f32> = (0..d_in * config.rank)
                        .map(|_| rng.random_range(-bound..bound))
                        .collect();
                    Lora {
                        a: Param::from_tensor(Tensor::from_data(TensorData::new(a, [d_in, config.rank]), &device)),
                        b: Param::from_tensor(Tensor::zeros([config.rank, d_out], &device)),
                        alpha: config.alpha(),
                    }
                });
            }
        }
        self.lora_base = base;
        self
    }

    pub fn has_lora(&self) -> bool {
        self.blocks
            .iter()
            .any(|b| Target::ALL.iter().any(|t| t.of(b).lora.is_some()))
    }

    /// The adapters' config, read off the first block (every block has the same adapters).
    pub fn lora_config(&self) -> Option<LoraConfig> {
        let block = self.blocks.first()?;
        let targets: Vec<Target> = Target::ALL.into_iter().filter(|t| t.of(block).lora.is_some()).collect();
        let first = targets.first().and_then(|t| t.of(block).lora.as_ref())?;
        Some(LoraConfig {
            rank: first.rank(),
            alpha: Some(first.alpha),
            targets,
            base_precision: BasePrecision::Auto,
        })
    }

    /// The adapters (sharing this model's tensors).
    pub fn adapters(&self) -> Adapters<B> {
        let layers = self
            .blocks
            .iter()
            .map(|b| {
                let get = |t: Target| t.of(b).lora.clone();
                LayerAdapters {
                    q: get(Target::Q),
                    k: get(Target::K),
                    v: get(Target::V),
                    o: get(Target::O),
                    gate: get(Target::Gate),
                    up: get(Target::Up),
                    down: get(Target::Down),
                }
            })
            .collect();
        Adapters { layers }
    }

    /// This model with `adapters` in place of its own (same targets and shapes).
    pub fn with_adapters(mut self, mut adapters: Adapters<B>) -> Self {
        for (block, layer) in self.blocks.iter_mut().zip(adapters.layers.iter_mut()) {
            for t in Target::ALL {
                t.of_mut(block).lora = layer.slot(t).take();
            }
        }
        self
    }

    /// The base alone: adapters dropped (the tensors are shared, nothing is copied).
    pub fn without_lora(mut self) -> Self {
        for block in &mut self.blocks {
            for t in Target::ALL {
                t.of_mut(block).lora = None;
            }
        }
        self.lora_base = None;
        self
    }

    /// A plain model whose projections hold `W + (α / r) A B`: what the adapted model computes,
    /// as one weight per projection (for export).
    pub fn merged(mut self) -> Self {
        for block in &mut self.blocks {
            for t in Target::ALL {
                t.of_mut(block).merge();
            }
        }
        self.lora_base = None;
        self
    }

    /// A fingerprint of the base weights (adapters excluded): CRC-32 over every parameter's
    /// shape and first 64 values, in module order. Cheap (a few hundred small reads) and
    /// enough to tell two models of the same shapes apart.
    pub fn fingerprint(&self) -> String {
        struct Crc<'a>(&'a mut crc32fast::Hasher);
        impl<B: Backend> ModuleVisitor<B> for Crc<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
                let t = param.val();
                let dims = t.dims();
                let n: usize = dims.iter().product();
                for d in dims {
                    self.0.update(&(d as u64).to_le_bytes());
                }
                let head = t.reshape([n]).slice([0..n.min(64)]).into_data().convert::<f32>();
                for v in head.to_vec::<f32>().expect("converted to f32") {
                    self.0.update(&v.to_le_bytes());
                }
            }
        }
        let mut hasher = crc32fast::Hasher::new();
        self.clone().without_lora().visit(&mut Crc(&mut hasher));
        format!("{:08x}", hasher.finalize())
    }
}

/// Number of adapter parameters `config` adds to a model of `model`'s shapes.
pub fn lora_params(model: &TransformerConfig, config: &LoraConfig) -> usize {
    let (d, kv, f) = (model.d_model, model.n_kv_heads * model.head_dim(), model.d_ff);
    let per_layer: usize = config
        .targets
        .iter()
        .map(|t| match t {
            Target::Q | Target::O => d + d,
            Target::K | Target::V => d + kv,
            Target::Gate | Target::Up | Target::Down => d + f,
        })
        .sum();
    per_layer * config.rank * model.n_layers
}

/// A model without adapters to put adapters on: a checkpoint of this project or a pretrained
/// model (directory or GGUF), which must have `config`'s shapes (the context length is
/// `config`'s).
pub fn load_base<B: Backend>(path: &Path, config: &TransformerConfig, device: &B::Device) -> Result<Transformer<B>> {
    if !path.exists() {
        return Err(Error::checkpoint(
            path,
            "not found: the base model of LoRA adapters must stay where it was when they were trained",
        ));
    }
    let model = if checkpoint::is_checkpoint(path) {
        let ck = checkpoint::load(path, Some(config))?;
        if ck.lora.is_some() {
            return Err(Error::checkpoint(
                path,
                "has adapters itself; a LoRA base must be a plain model (export merges adapters)",
            ));
        }
        ck.model::<B>(device)?
    } else {
        super::hf::load_with_context::<B>(path, Some(config.max_seq_len), device)?
    };
    let diff = checkpoint::config_diff(config, &model.config);
    if !diff.is_empty() {
        return Err(Error::checkpoint(
            path,
            format!("is not the expected base model ({diff})"),
        ));
    }
    Ok(model)
}
