//! LoRA adapters alone in PEFT's layout: `adapter_config.json` and `adapter_model.safetensors`,
//! what `peft.PeftModel.from_pretrained(base, dir)` loads onto the base model.
//!
//! PEFT names an adapter's two matrices as the `nn.Linear` layers they are:
//! `base_model.model.model.layers.{i}.{self_attn.q_proj|…}.lora_A.weight`, `[r, in]`, and
//! `….lora_B.weight`, `[out, r]`; the update is `(lora_alpha / r) · B A` on PyTorch's
//! `[out, in]` weight, the transpose of the native `(α / r) · A B` on `[in, out]`.

use std::fs;
use std::path::Path;

use burn::module::Param;
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::export::{write_safetensors, Tensors};
use super::import::transpose;
use super::weights::Safetensors;
use crate::error::{Error, Result};
use crate::fsutil::{read_json, write_json};
use crate::model::lora::{LoraConfig, Target};
use crate::model::Transformer;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// The fields of PEFT's `LoraConfig` that say what the adapters compute. Written in full;
/// read back only when they describe plain LoRA (no rsLoRA, DoRA, biases or per-layer ranks).
#[derive(Debug, Serialize, Deserialize)]
struct PeftConfig {
    peft_type: String,
    task_type: Option<String>,
    base_model_name_or_path: Option<String>,
    r: usize,
    /// A number (PEFT writes an integer; written as one here when α is whole).
    lora_alpha: serde_json::Number,
    lora_dropout: f64,
    target_modules: Vec<String>,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    inference_mode: bool,
    #[serde(default)]
    rank_pattern: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    alpha_pattern: serde_json::Map<String, serde_json::Value>,
}

fn whole_or_float(x: f64) -> serde_json::Number {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        serde_json::Number::from(x as i64)
    } else {
        serde_json::Number::from_f64(x).expect("a validated alpha is finite")
    }
}

fn prefix(layer: usize, t: Target) -> String {
    format!("base_model.model.model.layers.{layer}.{}", t.hf_path())
}

/// Writes `model`'s adapters into the new directory `dir` in PEFT's layout; `base_name` is
/// recorded as `base_model_name_or_path`.
pub fn save_peft<B: Backend>(model: &Transformer<B>, dir: &Path, base_name: &str) -> Result<()> {
    let config = model
        .lora_config()
        .ok_or_else(|| Error::pretrained(dir, "the model has no LoRA adapters to write"))?;
    if dir.exists() {
        return Err(Error::pretrained(dir, "already exists (export writes a new directory)"));
    }
    let mut out = Tensors(Vec::new());
    for (i, block) in model.blocks.iter().enumerate() {
        for t in &config.targets {
            let lora = t.of(block).lora.as_ref().expect("every block has the same adapters");
            out.linear(format!("{}.lora_A", prefix(i, *t)), &lora.a, None);
            out.linear(format!("{}.lora_B", prefix(i, *t)), &lora.b, None);
        }
    }
    let peft = PeftConfig {
        peft_type: "LORA".into(),
        task_type: Some("CAUSAL_LM".into()),
        base_model_name_or_path: Some(base_name.to_string()),
        r: config.rank,
        lora_alpha: whole_or_float(config.alpha()),
        lora_dropout: 0.0,
        target_modules: config.targets.iter().map(|t| t.hf_name().to_string()).collect(),
        bias: Some("none".into()),
        fan_in_fan_out: false,
        use_rslora: false,
        use_dora: false,
        inference_mode: true,
        rank_pattern: Default::default(),
        alpha_pattern: Default::default(),
    };
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let result = write_json(&dir.join(ADAPTER_CONFIG), &peft)
        .and_then(|()| write_safetensors(&dir.join(ADAPTER_WEIGHTS), &out.0));
    if result.is_err() {
        let _ = fs::remove_dir_all(dir);
    }
    result
}

/// `base` (a model without adapters) with the PEFT adapters in `dir`; the model's `lora_base`
/// is left for the caller to set.
pub fn load_peft<B: Backend>(base: Transformer<B>, dir: &Path) -> Result<Transformer<B>> {
    let config_path = dir.join(ADAPTER_CONFIG);
    let peft: PeftConfig = read_json(&config_path)?;
    let unsupported = |what: &str| Err(Error::pretrained(&config_path, format!("{what} is not supported")));
    if peft.peft_type != "LORA" {
        return unsupported(&format!("peft_type {}", peft.peft_type));
    }
    if peft.use_rslora || peft.use_dora || peft.fan_in_fan_out {
        return unsupported("rsLoRA, DoRA or fan_in_fan_out");
    }
    if !peft.rank_pattern.is_empty() || !peft.alpha_pattern.is_empty() {
        return unsupported("a per-module rank_pattern or alpha_pattern");
    }
    if peft.bias.as_deref().is_some_and(|b| b != "none") {
        return unsupported("training biases (bias other than \"none\")");
    }
    let targets = peft
        .target_modules
        .iter()
        .map(|m| Target::parse(m))
        .collect::<Result<Vec<_>>>()?;
    let config = LoraConfig {
        alpha: peft.lora_alpha.as_f64(),
        targets,
        ..LoraConfig::new(peft.r)
    };
    config.validate()?;
    let weights = Safetensors::open_files(vec![dir.join(ADAPTER_WEIGHTS)])?;
    let mut model = base.with_lora(&config, 0, None);
    let device = model.device();
    let r = config.rank;
    let mut used = 0;
    for (i, block) in model.blocks.iter_mut().enumerate() {
        for t in &config.targets {
            let p = prefix(i, *t);
            let proj = t.of_mut(block);
            let [d_in, d_out] = proj.dims();
            let lora = proj.lora.as_mut().expect("just attached");
            let a = weights.get(&format!("{p}.lora_A.weight"), &[r, d_in])?;
            let b = weights.get(&format!("{p}.lora_B.weight"), &[d_out, r])?;
            lora.a = Param::from_tensor(Tensor::from_data(
                TensorData::new(transpose(&a, r, d_in), [d_in, r]),
                &device,
            ));
            lora.b = Param::from_tensor(Tensor::from_data(
                TensorData::new(transpose(&b, d_out, r), [r, d_out]),
                &device,
            ));
            used += 2;
        }
    }
    let names = weights.names();
    if names.len() != used {
        let extra = names
            .iter()
            .find(|n| !n.contains(".lora_A.") && !n.contains(".lora_B."))
            .unwrap_or(&names[0]);
        return Err(Error::pretrained(
            dir.join(ADAPTER_WEIGHTS),
            format!(
                "holds {} tensors, the adapters {used} (`{extra}`: layers or targets other than the config's)",
                names.len()
            ),
        ));
    }
    Ok(model)
}
