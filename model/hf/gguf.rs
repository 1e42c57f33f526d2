//! A GGUF file (llama.cpp's format) read as if it were a Hugging Face directory: its
//! `{arch}.*` metadata becomes an [`HfConfig`], its tensors answer to `transformers` names,
//! dequantised to f32, so that [`super::import`] builds the native model the same way from
//! either source.
//!
//! Two things llama.cpp's converter changes are undone here. Tensor names: `blk.N.attn_q`,
//! `ffn_gate`, `token_embd`, … Rotary layout: for the `llama` architecture the converter
//! permutes the rows of the query and key projections from rotate-half order (what HF Llama
//! and our model use) into interleaved pairs (ggml's "normal" rope); within each head, row
//! `2i + j` of the file is row `j · head_dim/2 + i` of the original. `qwen2` files are written
//! for ggml's NeoX rope and keep the original order.

use std::collections::BTreeMap;
use std::path::Path;

use super::config::{Family, HfConfig};
use crate::error::{Error, Result};
use crate::gguf::{GgufFile, Value};

/// The tensors of a GGUF model under their `transformers` names.
pub struct GgufWeights {
    file: GgufFile,
    /// `transformers` name → GGUF name.
    names: BTreeMap<String, String>,
    family: Family,
    n_heads: usize,
    n_kv_heads: usize,
}

/// `transformers`' name for a llama.cpp tensor name, `None` for a name with no counterpart.
fn hf_name(gguf: &str) -> Option<String> {
    let top = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = top {
        return Some(name.into());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, kind) = rest.rsplit_once('.')?;
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

impl GgufWeights {
    /// Opens `path` and reads its model config. Architectures other than `llama` and `qwen2`,
    /// scaled rotary embeddings and tensors without a `transformers` counterpart are refused,
    /// each with what was found.
    pub fn open(path: &Path) -> Result<(Self, HfConfig)> {
        let file = GgufFile::open(path)?;
        let bad = |reason: String| Error::pretrained(path, reason);
        let arch = file
            .require("general.architecture")?
            .as_str()
            .unwrap_or_default()
            .to_string();
        let (family, hf_arch) = match arch.as_str() {
            "llama" => (Family::Llama, "LlamaForCausalLM"),
            "qwen2" => (Family::Qwen2, "Qwen2ForCausalLM"),
            other => {
                return Err(bad(format!(
                    "architecture `{other}` is not supported (supported: llama, qwen2)"
                )))
            }
        };
        let key = |k: &str| format!("{arch}.{k}");
        let count = |k: &str| file.require_u64(&key(k)).map(|v| v as usize);
        let float = |k: &str| -> Result<Option<f64>> {
            match file.get(&key(k)) {
                None => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| bad(format!("metadata `{}` = {v:?} is not a number", key(k)))),
            }
        };
        let (hidden, heads) = (count("embedding_length")?, count("attention.head_count")?);
        let kv_heads = match file.get(&key("attention.head_count_kv")) {
            None => heads,
            Some(_) => count("attention.head_count_kv")?,
        };
        if let Some(kind) = file
            .get(&key("rope.scaling.type"))
            .and_then(Value::as_str)
            .filter(|t| *t != "none")
        {
            return Err(bad(format!(
                "`{}` = {kind:?}: scaled rotary embeddings are not implemented",
                key("rope.scaling.type")
            )));
        }
        if file.tensors.contains_key("rope_freqs.weight") {
            return Err(bad(
                "tensor `rope_freqs.weight`: scaled rotary embeddings (Llama 3.1's) are not implemented".into(),
            ));
        }
        let head_dim = hidden / heads.max(1);
        for k in ["rope.dimension_count", "attention.key_length", "attention.value_length"] {
            if let Some(v) = file.get(&key(k)) {
                let n = v.as_u64().unwrap_or(0) as usize;
                if n != head_dim {
                    return Err(bad(format!(
                        "`{}` = {n}: only a full-width head of {head_dim} is implemented",
                        key(k)
                    )));
                }
            }
        }
        let embed = file
            .tensors
            .get("token_embd.weight")
            .ok_or_else(|| bad("tensor `token_embd.weight` is missing".into()))?;
        let vocab = match file.get(&key("vocab_size")) {
            Some(_) => count("vocab_size")?,
            None => *embed.dims.get(1).unwrap_or(&0) as usize,
        };
        let mut names = BTreeMap::new();
        for name in file.tensors.keys() {
            let hf = hf_name(name).ok_or_else(|| bad(format!("tensor `{name}` has no place in a {hf_arch} model")))?;
            names.insert(hf, name.clone());
        }
        let config = HfConfig {
            architectures: vec![hf_arch.into()],
            model_type: Some(arch.clone()),
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: count("feed_forward_length")?,
            num_hidden_layers: count("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: Some(kv_heads),
            head_dim: None,
            max_position_embeddings: count("context_length")?,
            rms_norm_eps: float("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
            rope_theta: float("rope.freq_base")?,
            rope_scaling: None,
            rope_parameters: None,
            layer_types: None,
            tie_word_embeddings: !file.tensors.contains_key("output.weight"),
            hidden_act: "silu".into(),
            attention_bias: false,
            mlp_bias: false,
            use_sliding_window: false,
            bos_token_id: file
                .get("tokenizer.ggml.bos_token_id")
                .and_then(Value::as_u64)
                .map(Into::into),
            eos_token_id: file
                .get("tokenizer.ggml.eos_token_id")
                .and_then(Value::as_u64)
                .map(Into::into),
        };
        Ok((
            Self {
                file,
                names,
                family,
                n_heads: heads,
                n_kv_heads: kv_heads,
            },
            config,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.file.path
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    pub fn names(&self) -> Vec<&str> {
        self.names.keys().map(String::as_str).collect()
    }

    /// Tensor `name` (a `transformers` name) as f32, row-major, checked against `shape`, with
    /// llama's query/key row permutation undone.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let gguf = self
            .names
            .get(name)
            .ok_or_else(|| Error::pretrained(self.path(), format!("tensor `{name}` is missing")))?;
        let info = &self.file.tensors[gguf];
        if info.shape() != shape {
            return Err(Error::pretrained(
                self.path(),
                format!(
                    "tensor `{gguf}` has shape {:?} (GGUF dims {:?}), the config needs {shape:?}",
                    info.shape(),
                    info.dims
                ),
            ));
        }
        let values = self.file.dequantize(gguf)?;
        let heads = match () {
            _ if self.family != Family::Llama => None,
            _ if name.contains(".self_attn.q_proj.") => Some(self.n_heads),
            _ if name.contains(".self_attn.k_proj.") => Some(self.n_kv_heads),
            _ => None,
        };
        Ok(match heads {
            Some(h) => unpermute_rows(&values, h, shape[0] / h, values.len() / shape[0]),
            None => values,
        })
    }
}

/// Undoes llama.cpp's rotary row permutation of a `[heads · head_dim, cols]` matrix (or a
/// bias, `cols` = 1): within each head, file row `2i + j` goes back to row `j · head_dim/2 + i`.
pub fn unpermute_rows(values: &[f32], heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0f32; values.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let from = (h * head_dim + 2 * i + j) * cols;
                let to = (h * head_dim + j * half + i) * cols;
                out[to..to + cols].copy_from_slice(&values[from..from + cols]);
            }
        }
    }
    out
}
