//! A Hugging Face `config.json` for `LlamaForCausalLM` or `Qwen2ForCausalLM`, translated into
//! our [`TransformerConfig`]. Everything the native model cannot reproduce exactly (another
//! activation, rotary scaling, sliding-window attention, MLP biases, a head width other than
//! hidden / heads) is an error that names the field, never a silently different model.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fsutil::read_json;
use crate::model::TransformerConfig;

/// Architectures this importer reads, as `config.json` names them.
pub const ARCHITECTURES: [&str; 2] = ["LlamaForCausalLM", "Qwen2ForCausalLM"];

/// The fields of a Llama / Qwen2 `config.json` that shape the model (others are ignored).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct HfConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Defaults to `num_attention_heads` (no grouping), as in `transformers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// `transformers` 4.x spelling of the rotary base (5.x moved it into `rope_parameters`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// `transformers` 4.x: null or absent for plain rotary embeddings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    /// `transformers` 5.x: `{"rope_type": "default", "rope_theta": θ}` for plain rotary embeddings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<serde_json::Value>,
    /// Qwen2 in `transformers` 5.x: `full_attention` or `sliding_attention` per layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Llama's q/k/v/o bias switch (Qwen2 always has q/k/v biases and no o bias).
    #[serde(default, skip_serializing_if = "is_false")]
    pub attention_bias: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub mlp_bias: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub use_sliding_window: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<serde_json::Value>,
}

fn default_eps() -> f64 {
    1e-6
}
/// `transformers`' rotary base when a config names none.
const DEFAULT_THETA: f64 = 10_000.0;
fn is_false(b: &bool) -> bool {
    !*b
}

fn default_act() -> String {
    "silu".into()
}

/// Which of the supported families a config describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Qwen2,
}

impl HfConfig {
    /// Reads `path` (a model directory's `config.json`).
    pub fn read(path: &Path) -> Result<Self> {
        read_json(path)
    }

    /// The family, from `architectures` (or `model_type` when that list is empty).
    pub fn family(&self, path: &Path) -> Result<Family> {
        let named = |a: &str| match a {
            "LlamaForCausalLM" | "llama" => Some(Family::Llama),
            "Qwen2ForCausalLM" | "qwen2" => Some(Family::Qwen2),
            _ => None,
        };
        let found = match self.architectures.as_slice() {
            [] => self.model_type.as_deref().and_then(named),
            [one] => named(one),
            _ => None,
        };
        found.ok_or_else(|| {
            let what = if self.architectures.is_empty() {
                format!("model_type {:?}", self.model_type)
            } else {
                format!("architectures {:?}", self.architectures)
            };
            Error::pretrained(
                path,
                format!("unsupported {what} (supported: {})", ARCHITECTURES.join(", ")),
            )
        })
    }

    /// The native config of the same model, or an error naming the first field it cannot honour.
    pub fn to_native(&self, path: &Path) -> Result<TransformerConfig> {
        let family = self.family(path)?;
        let bad =
            |field: &str, value: String, why: &str| Error::pretrained(path, format!("`{field}` = {value}: {why}"));
        if self.hidden_act != "silu" {
            return Err(bad(
                "hidden_act",
                format!("{:?}", self.hidden_act),
                "only SwiGLU with silu is implemented",
            ));
        }
        let rope_theta = self.rotary_base(path)?;
        if self.mlp_bias {
            return Err(bad("mlp_bias", "true".into(), "MLP biases are not implemented"));
        }
        let sliding = self.layer_types.iter().flatten().any(|t| t != "full_attention");
        if self.use_sliding_window || sliding {
            let (field, value) = if sliding {
                (
                    "layer_types",
                    format!("{:?}", self.layer_types.as_deref().unwrap_or_default()),
                )
            } else {
                ("use_sliding_window", "true".into())
            };
            return Err(bad(field, value, "sliding-window attention is not implemented"));
        }
        if family == Family::Llama && self.attention_bias {
            // Llama's switch also puts a bias on the output projection, which the native
            // attention does not have.
            return Err(bad(
                "attention_bias",
                "true".into(),
                "an output-projection bias is not implemented",
            ));
        }
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(bad(
                "num_attention_heads",
                self.num_attention_heads.to_string(),
                "must divide hidden_size",
            ));
        }
        if let Some(d) = self
            .head_dim
            .filter(|&d| d != self.hidden_size / self.num_attention_heads)
        {
            return Err(bad(
                "head_dim",
                d.to_string(),
                "must equal hidden_size / num_attention_heads",
            ));
        }
        let config = TransformerConfig {
            vocab_size: self.vocab_size,
            d_model: self.hidden_size,
            n_layers: self.num_hidden_layers,
            n_heads: self.num_attention_heads,
            n_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            d_ff: self.intermediate_size,
            max_seq_len: self.max_position_embeddings,
            rope_theta,
            norm_eps: self.rms_norm_eps,
            tie_embeddings: self.tie_word_embeddings,
            qkv_bias: family == Family::Qwen2,
        };
        config.validate().map_err(|e| Error::pretrained(path, e.to_string()))?;
        Ok(config)
    }

    /// The rotary base θ, from `rope_parameters` (5.x) or `rope_theta` (4.x); an error for any
    /// rotary scheme other than the plain one.
    fn rotary_base(&self, path: &Path) -> Result<f64> {
        let plain = |v: &serde_json::Value| {
            let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str());
            v.is_null() || kind.is_none_or(|k| k == "default")
        };
        for (field, value) in [
            ("rope_scaling", &self.rope_scaling),
            ("rope_parameters", &self.rope_parameters),
        ] {
            if let Some(v) = value.as_ref().filter(|v| !plain(v)) {
                return Err(Error::pretrained(
                    path,
                    format!("`{field}` = {v}: scaled rotary embeddings are not implemented"),
                ));
            }
        }
        let nested = self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_theta"))
            .and_then(|t| t.as_f64());
        Ok(nested.or(self.rope_theta).unwrap_or(DEFAULT_THETA))
    }

    /// The `config.json` that describes a native model: Qwen2 when it has q/k/v biases, Llama
    /// otherwise. Token ids that the tokenizer defines are passed through. Switches that are
    /// off are left out, so each family's file holds only fields that family knows.
    pub fn from_native(config: &TransformerConfig, bos: Option<u32>, eos: Option<u32>) -> Self {
        let (arch, model_type) = if config.qkv_bias {
            ("Qwen2ForCausalLM", "qwen2")
        } else {
            ("LlamaForCausalLM", "llama")
        };
        Self {
            architectures: vec![arch.into()],
            model_type: Some(model_type.into()),
            vocab_size: config.vocab_size,
            hidden_size: config.d_model,
            intermediate_size: config.d_ff,
            num_hidden_layers: config.n_layers,
            num_attention_heads: config.n_heads,
            num_key_value_heads: Some(config.n_kv_heads),
            // Derived from hidden_size / heads by both families (and not a Qwen2 field).
            head_dim: None,
            max_position_embeddings: config.max_seq_len,
            rms_norm_eps: config.norm_eps,
            rope_theta: Some(config.rope_theta),
            rope_scaling: None,
            rope_parameters: None,
            layer_types: None,
            tie_word_embeddings: config.tie_embeddings,
            hidden_act: "silu".into(),
            attention_bias: false,
            mlp_bias: false,
            use_sliding_window: false,
            bos_token_id: bos.map(Into::into),
            eos_token_id: eos.map(Into::into),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: serde_json::Value) -> HfConfig {
        serde_json::from_value(json).unwrap()
    }

    /// The `transformers` 4.x layout of a real Qwen2.5 / R1-Distill config: the rotary base at
    /// the top level, `rope_scaling: null`, a sliding window that is switched off.
    #[test]
    fn reads_transformers_4_configs() {
        let c = parse(serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936,
            "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
            "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": null, "sliding_window": 4096,
            "use_sliding_window": false, "max_window_layers": 21, "tie_word_embeddings": false,
            "hidden_act": "silu", "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151643
        }));
        let n = c.to_native(Path::new("config.json")).unwrap();
        assert_eq!(
            (n.d_model, n.n_heads, n.n_kv_heads, n.head_dim(), n.d_ff),
            (1536, 12, 2, 128, 8960)
        );
        assert_eq!(
            (n.rope_theta, n.norm_eps, n.qkv_bias, n.tie_embeddings),
            (10_000.0, 1e-6, true, false)
        );
        // DeepSeek-R1-Distill-Qwen-1.5B's shapes: the 1.78 B parameters its model card states,
        // q/k/v biases included.
        assert_eq!(n.num_params(), 1_777_088_000);
        // Qwen2.5-0.5B: tied embeddings, 494 032 768 parameters.
        let small = parse(serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936, "hidden_size": 896,
            "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
            "num_key_value_heads": 2, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
            "tie_word_embeddings": true
        }));
        assert_eq!(
            small.to_native(Path::new("config.json")).unwrap().num_params(),
            494_032_768
        );

        // Llama without `num_key_value_heads`: one key/value head per query head.
        let llama = parse(serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 256,
            "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 8,
            "max_position_embeddings": 512, "rope_theta": 500000.0
        }));
        let n = llama.to_native(Path::new("config.json")).unwrap();
        assert_eq!((n.n_kv_heads, n.rope_theta, n.qkv_bias), (8, 500_000.0, false));
    }

    #[test]
    fn what_the_model_cannot_reproduce_is_named() {
        let base = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
            "max_position_embeddings": 64
        });
        let cases = [
            (
                "rope_scaling",
                serde_json::json!({"rope_type": "llama3", "factor": 8.0}),
                "`rope_scaling`",
            ),
            ("attention_bias", serde_json::json!(true), "`attention_bias`"),
            ("mlp_bias", serde_json::json!(true), "`mlp_bias`"),
            ("head_dim", serde_json::json!(16), "`head_dim` = 16"),
            ("num_key_value_heads", serde_json::json!(3), "n_kv_heads"),
            ("layer_types", serde_json::json!(["sliding_attention"]), "`layer_types`"),
        ];
        for (field, value, expected) in cases {
            let mut json = base.clone();
            json[field] = value;
            let err = parse(json)
                .to_native(Path::new("m/config.json"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(expected) && err.contains("m/config.json"),
                "{field}: {err}"
            );
        }
        // A default rope_type is plain rotary embeddings, not scaling.
        let mut json = base.clone();
        json["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 1234.0});
        assert_eq!(
            parse(json).to_native(Path::new("config.json")).unwrap().rope_theta,
            1234.0
        );
    }

    /// What export writes reads back as the same native config.
    #[test]
    fn native_configs_round_trip() {
        let mut native = TransformerConfig::preset("cpu-tiny").unwrap();
        for bias in [false, true] {
            native.qkv_bias = bias;
            native.n_kv_heads = 2;
            let json = serde_json::to_value(HfConfig::from_native(&native, Some(1), None)).unwrap();
            assert!(json.get("eos_token_id").is_none() && json["bos_token_id"] == 1);
            assert_eq!(parse(json).to_native(Path::new("config.json")).unwrap(), native);
        }
    }
}
