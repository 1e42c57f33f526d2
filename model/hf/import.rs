//! Building the native [`Transformer`] from a Hugging Face Llama / Qwen2 directory or a GGUF
//! file of either architecture ([`super::gguf`] gives it the directory's names and config).
//!
//! The native model has the same parameters under other names, with one difference of layout:
//! PyTorch's `nn.Linear` stores `[out, in]`, Burn's `Linear` `[in, out]`, so every projection
//! is transposed on the way in (and back on export). Every tensor of the checkpoint must be
//! used: a tensor the native model has no place for (an output-projection bias, say) means a
//! different model, and is an error rather than something to drop.

use std::collections::BTreeSet;
use std::path::Path;

use burn::module::Param;
use burn::nn::{Embedding, Linear, RmsNorm};
use burn::prelude::*;

use super::config::HfConfig;
use super::gguf::GgufWeights;
use super::weights::{Safetensors, Weights};
use crate::error::{Error, Result};
use crate::gguf::is_gguf;
use crate::model::attention::Attention;
use crate::model::block::{Block, Mlp};
use crate::model::{Transformer, TransformerConfig};

/// Tensors that `transformers` may store but that carry no parameters of the model.
fn ignorable(name: &str) -> bool {
    name.ends_with(".rotary_emb.inv_freq")
}

/// Loads `dir` (`config.json` plus safetensors, or a `.gguf` file) as a native model on `device`.
pub fn load<B: Backend>(dir: &Path, device: &B::Device) -> Result<Transformer<B>> {
    load_with_context(dir, None, device)
}

/// [`load`], with the context length (`max_seq_len`, the rotary tables' size) set to
/// `context` instead of the directory's `max_position_embeddings`: a run that never decodes
/// that far need not hold tables for it, and a tiny test model can be given room.
pub fn load_with_context<B: Backend>(dir: &Path, context: Option<usize>, device: &B::Device) -> Result<Transformer<B>> {
    let (weights, hf_config, config_path) = if dir.is_dir() {
        let config_path = dir.join("config.json");
        let config = HfConfig::read(&config_path)?;
        (Weights::Safetensors(Safetensors::open(dir)?), config, config_path)
    } else if is_gguf(dir) {
        let (weights, config) = GgufWeights::open(dir)?;
        (Weights::Gguf(weights), config, dir.to_path_buf())
    } else {
        return Err(Error::pretrained(dir, "is neither a model directory nor a GGUF file"));
    };
    let mut config = hf_config.to_native(&config_path)?;
    if let Some(n) = context {
        config.max_seq_len = n;
    }
    let mut reader = Reader {
        weights: &weights,
        used: BTreeSet::new(),
        device,
    };
    let model = reader.model(&config)?;
    let tied_head = config.tie_embeddings && weights.contains("lm_head.weight");
    let unused: Vec<&str> = weights
        .names()
        .into_iter()
        .filter(|n| !(reader.used.contains(*n) || ignorable(n) || tied_head && *n == "lm_head.weight"))
        .collect();
    if let Some(first) = unused.first() {
        return Err(Error::pretrained(
            dir,
            format!(
                "tensor `{first}` (and {} more) has no place in a {} model",
                unused.len() - 1,
                family_name(&config)
            ),
        ));
    }
    Ok(model)
}

/// The native config of a pretrained model (a directory's `config.json`, or a GGUF file's
/// metadata), without reading its weights.
pub fn native_config(path: &Path) -> Result<TransformerConfig> {
    if is_gguf(path) {
        let (weights, config) = GgufWeights::open(path)?;
        return config.to_native(weights.path());
    }
    let config_path = path.join("config.json");
    HfConfig::read(&config_path)?.to_native(&config_path)
}

fn family_name(config: &TransformerConfig) -> &'static str {
    if config.qkv_bias {
        "Qwen2"
    } else {
        "Llama"
    }
}

/// Reads named tensors onto the device, remembering which were used.
struct Reader<'a, B: Backend> {
    weights: &'a Weights,
    used: BTreeSet<String>,
    device: &'a B::Device,
}

impl<B: Backend> Reader<'_, B> {
    fn host(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.weights.get(name, shape)?;
        self.used.insert(name.to_string());
        Ok(t)
    }

    fn tensor<const D: usize>(&mut self, name: &str, shape: [usize; D]) -> Result<Tensor<B, D>> {
        let values = self.host(name, &shape)?;
        Ok(Tensor::from_data(TensorData::new(values, shape), self.device))
    }

    /// An `nn.Linear` stored `[out, in]`, as Burn's `[in, out]`; with its bias when `bias`.
    fn linear(&mut self, prefix: &str, d_in: usize, d_out: usize, bias: bool) -> Result<Linear<B>> {
        let values = self.host(&format!("{prefix}.weight"), &[d_out, d_in])?;
        let weight = Tensor::from_data(
            TensorData::new(transpose(&values, d_out, d_in), [d_in, d_out]),
            self.device,
        );
        let bias = if bias {
            Some(Param::from_tensor(self.tensor(&format!("{prefix}.bias"), [d_out])?))
        } else {
            None
        };
        Ok(Linear {
            weight: Param::from_tensor(weight),
            bias,
        })
    }

    fn norm(&mut self, name: &str, d: usize, eps: f64) -> Result<RmsNorm<B>> {
        Ok(RmsNorm {
            gamma: Param::from_tensor(self.tensor(name, [d])?),
            epsilon: eps,
        })
    }

    fn model(&mut self, c: &TransformerConfig) -> Result<Transformer<B>> {
        let (d, hd, kvd) = (c.d_model, c.n_heads * c.head_dim(), c.n_kv_heads * c.head_dim());
        let embed = Embedding {
            weight: Param::from_tensor(self.tensor("model.embed_tokens.weight", [c.vocab_size, d])?),
        };
        let mut blocks = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let p = format!("model.layers.{i}");
            blocks.push(Block {
                attn_norm: self.norm(&format!("{p}.input_layernorm.weight"), d, c.norm_eps)?,
                attn: Attention {
                    q: self.linear(&format!("{p}.self_attn.q_proj"), d, hd, c.qkv_bias)?.into(),
                    k: self
                        .linear(&format!("{p}.self_attn.k_proj"), d, kvd, c.qkv_bias)?
                        .into(),
                    v: self
                        .linear(&format!("{p}.self_attn.v_proj"), d, kvd, c.qkv_bias)?
                        .into(),
                    o: self.linear(&format!("{p}.self_attn.o_proj"), hd, d, false)?.into(),
                    n_heads: c.n_heads,
                    n_kv_heads: c.n_kv_heads,
                    head_dim: c.head_dim(),
                },
                mlp_norm: self.norm(&format!("{p}.post_attention_layernorm.weight"), d, c.norm_eps)?,
                mlp: Mlp {
                    gate: self.linear(&format!("{p}.mlp.gate_proj"), d, c.d_ff, false)?.into(),
                    up: self.linear(&format!("{p}.mlp.up_proj"), d, c.d_ff, false)?.into(),
                    down: self.linear(&format!("{p}.mlp.down_proj"), c.d_ff, d, false)?.into(),
                },
            });
        }
        let norm = self.norm("model.norm.weight", d, c.norm_eps)?;
        let head = if c.tie_embeddings {
            None
        } else {
            Some(self.linear("lm_head", d, c.vocab_size, false)?)
        };
        Ok(Transformer {
            embed,
            blocks,
            norm,
            head,
            config: c.clone(),
            lora_base: None,
        })
    }
}

/// `[rows, cols]` row-major → `[cols, rows]` row-major.
pub(super) fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; values.len()];
    for (r, row) in values.chunks_exact(cols).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            out[c * rows + r] = v;
        }
    }
    out
}
