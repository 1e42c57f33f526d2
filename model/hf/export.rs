//! Writing a native model as a Hugging Face model directory (`config.json`, f32
//! `model.safetensors`, and the tokenizer files the caller names), the inverse of
//! [`super::load`]: what `transformers` reads as `LlamaForCausalLM`, or `Qwen2ForCausalLM` for a
//! model with q/k/v biases.

use std::fs;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::prelude::*;
use safetensors::tensor::{Dtype, TensorView};

use super::config::HfConfig;
use super::import::transpose;
use crate::error::{Error, Result};
use crate::fsutil::{write_atomic, write_json};
use crate::model::lora::Target;
use crate::model::Transformer;

/// Writes `model` to the new directory `dir` (which must not exist yet), LoRA adapters merged
/// into the weights they adapt: `config.json` with
/// the given special token ids, `model.safetensors`, and a copy of each of `extra_files` (for
/// example `tokenizer.json`). Everything is written into a temporary sibling first and renamed
/// into place at the end, so a failure never leaves a half-written model under `dir`.
pub fn save<B: Backend>(
    model: &Transformer<B>,
    dir: &Path,
    bos: Option<u32>,
    eos: Option<u32>,
    extra_files: &[PathBuf],
) -> Result<()> {
    if dir.exists() {
        return Err(Error::pretrained(dir, "already exists (export writes a new directory)"));
    }
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::pretrained(dir, "has no usable directory name"))?;
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = write_all(model, &tmp, bos, eos, extra_files)
        .and_then(|()| fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e)));
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

fn write_all<B: Backend>(
    model: &Transformer<B>,
    dir: &Path,
    bos: Option<u32>,
    eos: Option<u32>,
    extra_files: &[PathBuf],
) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let merged;
    let model = if model.has_lora() {
        merged = model.clone().merged();
        &merged
    } else {
        model
    };
    let mut config = serde_json::to_value(HfConfig::from_native(&model.config, bos, eos)).expect("a config serialises");
    config["torch_dtype"] = "float32".into();
    write_json(&dir.join("config.json"), &config)?;
    write_safetensors(&dir.join(super::weights::SINGLE), &named_tensors(model).0)?;
    for file in extra_files {
        let name = file
            .file_name()
            .ok_or_else(|| Error::pretrained(file, "is not a file"))?;
        fs::copy(file, dir.join(name)).map_err(|e| Error::io(file, e))?;
    }
    Ok(())
}

/// Writes (name, shape, little-endian f32 bytes) tensors as one safetensors file.
pub(super) fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<u8>)]) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| TensorView::new(Dtype::F32, shape.clone(), bytes).map(|v| (name.clone(), v)))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::pretrained(path, format!("cannot lay out tensors: {e}")))?;
    let bytes = safetensors::serialize(views, None)
        .map_err(|e| Error::pretrained(path, format!("cannot serialise tensors: {e}")))?;
    write_atomic(path, &bytes)
}

/// Every parameter under its `transformers` name, as (name, shape, little-endian f32 bytes).
fn named_tensors<B: Backend>(model: &Transformer<B>) -> Tensors {
    let mut out = Tensors(Vec::new());
    out.push("model.embed_tokens.weight".into(), model.embed.weight.val());
    for (i, block) in model.blocks.iter().enumerate() {
        let p = format!("model.layers.{i}");
        out.push(format!("{p}.input_layernorm.weight"), block.attn_norm.gamma.val());
        out.push(
            format!("{p}.post_attention_layernorm.weight"),
            block.mlp_norm.gamma.val(),
        );
        for t in Target::ALL {
            let proj = t.of(block);
            out.linear(format!("{p}.{}", t.hf_path()), &proj.weight, proj.bias.as_ref());
        }
    }
    out.push("model.norm.weight".into(), model.norm.gamma.val());
    if let Some(head) = &model.head {
        out.linear("lm_head".into(), &head.weight, head.bias.as_ref());
    }
    out
}

/// Tensors to write: (name, shape, little-endian f32 bytes).
pub(super) struct Tensors(pub Vec<(String, Vec<usize>, Vec<u8>)>);

impl Tensors {
    pub fn push<B: Backend, const D: usize>(&mut self, name: String, t: Tensor<B, D>) {
        let dims = t.dims().to_vec();
        self.0.push((name, dims, le_bytes(&host(t))));
    }

    /// Burn's `[in, out]` weight back to PyTorch's `[out, in]`, and the bias if any.
    pub fn linear<B: Backend>(
        &mut self,
        prefix: String,
        weight: &Param<Tensor<B, 2>>,
        bias: Option<&Param<Tensor<B, 1>>>,
    ) {
        let [d_in, d_out] = weight.dims();
        let weight = transpose(&host(weight.val()), d_in, d_out);
        self.0
            .push((format!("{prefix}.weight"), vec![d_out, d_in], le_bytes(&weight)));
        if let Some(b) = bias {
            self.push(format!("{prefix}.bias"), b.val());
        }
    }
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().expect("converted to f32")
}

fn le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}
