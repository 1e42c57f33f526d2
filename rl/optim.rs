//! AdamW with warmup + cosine schedule and PyTorch-style *global*-norm gradient clipping
//! (Burn's own clipping is per tensor), plus (de)serialisation of its state for checkpoints.

use burn::module::{ModuleMapper, ModuleVisitor, Param};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::checkpoint::{decode_record, Section};
use crate::model::Transformer;

/// Optimiser settings shared by warm start and RL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warmup steps.
    pub warmup_steps: usize,
    /// The cosine decays to `lr · min_lr_ratio` at the last step.
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0 disables).
    pub grad_clip: f64,
}

impl OptimConfig {
    pub fn validate(&self, prefix: &str) -> Result<()> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::config(format!("{prefix}.lr"), self.lr, "must be > 0"));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(Error::config(
                format!("{prefix}.min_lr_ratio"),
                self.min_lr_ratio,
                "must be in [0, 1]",
            ));
        }
        if self.weight_decay < 0.0 || self.grad_clip < 0.0 {
            return Err(Error::config(
                format!("{prefix}.weight_decay/grad_clip"),
                self.weight_decay,
                "must be ≥ 0",
            ));
        }
        Ok(())
    }

    /// Learning rate at `step` (0-based) of `total`.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = total.saturating_sub(self.warmup_steps).max(1) as f64;
        let t = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let min = self.lr * self.min_lr_ratio;
        min + 0.5 * (self.lr - min) * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

pub type Adam<B> = OptimizerAdaptor<AdamW, Transformer<B>, B>;

pub fn adamw<B: AutodiffBackend>(config: &OptimConfig) -> Adam<B> {
    AdamWConfig::new()
        .with_beta_1(0.9)
        .with_beta_2(0.95)
        .with_epsilon(1e-8)
        .with_weight_decay(config.weight_decay as f32)
        .init()
}

/// The optimizer's state as a checkpoint section, serialised straight into the file.
pub fn optimizer_section<B: AutodiffBackend>(optim: &Adam<B>) -> Section<'_> {
    Section::record::<B, _>("optimizer", optim.to_record())
}

/// Restores optimizer state written by [`optimizer_section`].
pub fn load_optimizer<B: AutodiffBackend>(
    optim: Adam<B>,
    path: &std::path::Path,
    bytes: &[u8],
    device: &B::Device,
) -> Result<Adam<B>> {
    Ok(optim.load_record(decode_record::<B, _>(path, bytes, device)?))
}

struct SquaredNorm<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    total: Vec<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SquaredNorm<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            self.total.push(g.square().sum());
        }
    }
}

struct ScaleGrads<'a> {
    grads: &'a mut GradientsParams,
    factor: f64,
}

impl<B: AutodiffBackend> ModuleMapper<B> for ScaleGrads<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            self.grads.register::<B::InnerBackend, D>(param.id, g * self.factor);
        }
        param
    }
}

/// Global L2 norm of all gradients; rescales them to `max_norm` when larger (and `max_norm > 0`).
/// One host read-back per step.
pub fn clip_global_norm<B: AutodiffBackend>(model: &Transformer<B>, grads: &mut GradientsParams, max_norm: f64) -> f64 {
    let mut visitor = SquaredNorm::<B> {
        grads,
        total: Vec::new(),
    };
    model.visit(&mut visitor);
    if visitor.total.is_empty() {
        return 0.0;
    }
    let norm = (Tensor::cat(visitor.total, 0).sum().into_scalar().elem::<f64>()).sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let mut mapper = ScaleGrads {
            grads,
            factor: max_norm / (norm + 1e-6),
        };
        let _ = model.clone().map(&mut mapper);
    }
    norm
}

/// One optimizer step: clip, update. Returns the model and the pre-clip gradient norm.
pub fn step<B: AutodiffBackend>(
    model: Transformer<B>,
    optim: &mut Adam<B>,
    loss: Tensor<B, 1>,
    lr: f64,
    grad_clip: f64,
) -> (Transformer<B>, f64) {
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    step_grads(model, optim, grads, lr, grad_clip)
}

/// [`step`] with gradients already computed (accumulated over micro-batches).
pub fn step_grads<B: AutodiffBackend>(
    model: Transformer<B>,
    optim: &mut Adam<B>,
    mut grads: GradientsParams,
    lr: f64,
    grad_clip: f64,
) -> (Transformer<B>, f64) {
    let norm = clip_global_norm(&model, &mut grads, grad_clip);
    (optim.step(lr, model, grads), norm)
}

/// Marks the parameters to train as requiring gradients: all of them, or, for a model with
/// LoRA adapters, the adapters alone (the base is frozen: no gradient, no optimizer state).
/// Loading a record or moving a module across backends does not mark parameters, so every
/// model that is about to be trained goes through here.
pub fn require_grad<B: AutodiffBackend>(model: Transformer<B>) -> Transformer<B> {
    struct Mark(bool);
    impl<B: AutodiffBackend> ModuleMapper<B> for Mark {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            param.set_require_grad(self.0)
        }
    }
    if !model.has_lora() {
        return model.map(&mut Mark(true));
    }
    let adapters = model.adapters().map(&mut Mark(true));
    model.map(&mut Mark(false)).with_adapters(adapters)
}
