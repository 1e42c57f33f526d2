//! The policy a run starts from: its checkpoint (built on a LoRA base already in memory where
//! it can be), fresh adapters over a pretrained base, and the frozen base's precision.

use std::path::Path;

use burn::prelude::Backend;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::FloatDType;

use super::config::RunConfig;
use super::optim::require_grad;
use crate::error::{Error, Result};
use crate::model::checkpoint::{self, LoraHeader};
use crate::model::lora::BaseRef;
use crate::model::Transformer;

/// Under LoRA, `model` with its frozen base's matrices in the type `rl.lora.base_precision`
/// resolves to on this backend (model/precision.rs); said on stderr when it is not f32. A model
/// without adapters (the warm start trains every weight) is returned as it is.
pub(super) fn frozen_base_precision<B: AutodiffBackend>(
    model: Transformer<B>,
    config: &RunConfig,
    device: &B::Device,
    quiet: bool,
) -> Result<Transformer<B>> {
    let Some(lora) = config.rl.lora.as_ref().filter(|_| model.has_lora()) else {
        return Ok(model);
    };
    let dtype = lora
        .base_precision
        .resolve::<B>(device, crate::backend::is_cpu::<B>())?;
    if dtype != FloatDType::F32 && !quiet {
        eprintln!("LoRA: frozen base stored in {dtype:?}; adapters and optimizer state in f32");
    }
    Ok(model.with_base_dtype(dtype))
}

/// With `rl.lora`, `model` (loaded from `base`) with fresh adapters over its weights, which
/// are then frozen; a model that has adapters already keeps them, if they are the configured
/// ones.
pub(super) fn with_adapters<B: AutodiffBackend>(
    model: Transformer<B>,
    config: &RunConfig,
    base: &Path,
) -> Result<Transformer<B>> {
    let Some(lora) = &config.rl.lora else {
        return Ok(model);
    };
    match model.lora_config() {
        None => {
            let fingerprint = model.fingerprint();
            let base = BaseRef {
                path: base.to_path_buf(),
                fingerprint,
            };
            Ok(require_grad(model.with_lora(lora, config.seed, Some(base))))
        }
        Some(found) if found.rank == lora.rank && found.alpha() == lora.alpha() && found.targets == lora.targets => {
            Ok(model)
        }
        Some(found) => Err(Error::config(
            "rl.lora",
            serde_json::to_string(lora).unwrap_or_default(),
            format!(
                "{} already has adapters {}",
                base.display(),
                serde_json::to_string(&found).unwrap_or_default()
            ),
        )),
    }
}

/// The run's start policy (its `warm_start.ckpt`). With `shared` (the base of a LoRA policy,
/// loaded from `shared.0`) a checkpoint of adapters over that base, or that base itself, is
/// built on the tensors already in memory.
pub(super) fn start_policy<B: Backend>(
    path: &Path,
    config: &RunConfig,
    shared: Option<(BaseRef, Transformer<B>)>,
    device: &B::Device,
) -> Result<Transformer<B>> {
    let ck = checkpoint::load(path, Some(&config.model))?;
    let same = |a: &Path, b: &Path| std::fs::canonicalize(a).ok() == std::fs::canonicalize(b).ok();
    match (&ck.lora, shared) {
        (Some(LoraHeader { base: Some(b), .. }), Some((policy_base, base)))
            if same(&ck.base_path(b), &policy_base.path) =>
        {
            ck.adapters_onto(base, &policy_base.path)
        }
        (None, Some((policy_base, base))) if same(path, &policy_base.path) => Ok(base),
        _ => ck.model::<B>(device),
    }
}
