//! `TransformerConfig`: the one serde struct that fixes a model's shapes. It is saved inside every
//! checkpoint, so a checkpoint always knows which model it belongs to.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Shapes and numerics of a Llama/Qwen2-style decoder.
///
/// Field names follow the usual HF `config.json` spelling where one exists
/// (`vocab_size`, `num_attention_heads`, …) through serde aliases, so such a file can be read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformerConfig {
    /// Number of token ids the embedding and output head cover.
    pub vocab_size: usize,
    /// Residual stream width (C).
    #[serde(alias = "hidden_size")]
    pub d_model: usize,
    /// Number of transformer blocks.
    #[serde(alias = "num_hidden_layers")]
    pub n_layers: usize,
    /// Query heads (H); head_dim = d_model / n_heads.
    #[serde(alias = "num_attention_heads")]
    pub n_heads: usize,
    /// Key/value heads (KVH ≤ H, H % KVH == 0): grouped-query attention when smaller than H.
    #[serde(alias = "num_key_value_heads")]
    pub n_kv_heads: usize,
    /// Hidden width of the SwiGLU MLP.
    #[serde(alias = "intermediate_size")]
    pub d_ff: usize,
    /// Longest sequence (prompt + generation) the model is used with; sizes KV caches.
    #[serde(alias = "max_position_embeddings")]
    pub max_seq_len: usize,
    /// Rotary base frequency θ.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    #[serde(default = "default_norm_eps", alias = "rms_norm_eps")]
    pub norm_eps: f64,
    /// Share the token embedding with the output head.
    #[serde(default, alias = "tie_word_embeddings")]
    pub tie_embeddings: bool,
    /// Biases on the query, key and value projections (Qwen2); written only when true, so the
    /// configs of models without them read as before.
    #[serde(default, skip_serializing_if = "is_false")]
    pub qkv_bias: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn default_rope_theta() -> f64 {
    10_000.0
}

fn default_norm_eps() -> f64 {
    1e-5
}

/// Names accepted by [`TransformerConfig::preset`].
pub const PRESETS: [&str; 3] = ["cpu-tiny", "tiny", "small"];

impl TransformerConfig {
    /// A named preset. `tiny` and `small` have exactly the shapes of
    /// `shared/reference/torch_ref.py` (vocab, widths, depth, heads, d_ff), so benchmark numbers
    /// compare like with like; training runs replace `vocab_size` by the tokenizer's size.
    pub fn preset(name: &str) -> Result<Self> {
        let base = |vocab, d, layers, heads, kv, ff, max_len| TransformerConfig {
            vocab_size: vocab,
            d_model: d,
            n_layers: layers,
            n_heads: heads,
            n_kv_heads: kv,
            d_ff: ff,
            max_seq_len: max_len,
            rope_theta: default_rope_theta(),
            norm_eps: default_norm_eps(),
            tie_embeddings: false,
            qkv_bias: false,
        };
        match name {
            // < 0.5 M parameters: tests and CPU training runs.
            "cpu-tiny" => Ok(base(64, 96, 3, 4, 4, 256, 256)),
            // torch_ref "tiny": (64, 256, 4, 8, 8, 768), max_len = max(256, 32 + 224).
            "tiny" => Ok(base(64, 256, 4, 8, 8, 768, 256)),
            // torch_ref "small": (32000, 768, 12, 12, 12, 2048), max_len = max(1024, 64 + 448).
            "small" => Ok(base(32000, 768, 12, 12, 12, 2048, 1024)),
            other => Err(Error::Unknown {
                kind: "model preset",
                name: other.to_string(),
                expected: PRESETS.join(", "),
            }),
        }
    }

    /// Per-head width (D).
    /// Bytes of KV cache one token of one row takes (f32 keys and values in every layer).
    pub fn kv_bytes_per_token(&self) -> usize {
        self.n_layers * 2 * self.n_kv_heads * self.head_dim() * 4
    }

    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    /// Checks every invariant the model code relies on.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("d_ff", self.d_ff),
            ("max_seq_len", self.max_seq_len),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(Error::config(field, value, "must be positive"));
            }
        }
        if !self.d_model.is_multiple_of(self.n_heads) {
            return Err(Error::config(
                "d_model",
                self.d_model,
                format!("must be divisible by n_heads = {}", self.n_heads),
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(Error::config(
                "d_model",
                self.d_model,
                "head_dim = d_model / n_heads must be even for rotary embeddings",
            ));
        }
        if self.n_kv_heads > self.n_heads || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(Error::config(
                "n_kv_heads",
                self.n_kv_heads,
                format!("must divide n_heads = {}", self.n_heads),
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(Error::config("rope_theta", self.rope_theta, "must be > 1"));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(Error::config("norm_eps", self.norm_eps, "must be > 0"));
        }
        Ok(())
    }

    /// Number of trainable parameters, counted from the shapes.
    pub fn num_params(&self) -> usize {
        let (d, kv) = (self.d_model, self.n_kv_heads * self.head_dim());
        let bias = if self.qkv_bias { d + 2 * kv } else { 0 };
        let attn = d * d * 2 + d * kv * 2 + bias;
        let mlp = 3 * d * self.d_ff;
        let block = attn + mlp + 2 * d;
        let head = if self.tie_embeddings { 0 } else { d * self.vocab_size };
        self.vocab_size * d + self.n_layers * block + d + head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_have_documented_sizes() {
        for name in PRESETS {
            TransformerConfig::preset(name).unwrap().validate().unwrap();
        }
        assert!(TransformerConfig::preset("cpu-tiny").unwrap().num_params() < 500_000);
        // Matches the parameter count torch_ref.py reports for tiny.
        assert_eq!(TransformerConfig::preset("tiny").unwrap().num_params(), 3_442_944);
        assert!(TransformerConfig::preset("huge").is_err());
    }

    #[test]
    fn validation_names_the_field() {
        let mut c = TransformerConfig::preset("cpu-tiny").unwrap();
        c.n_kv_heads = 3;
        let msg = c.validate().unwrap_err().to_string();
        assert!(msg.contains("n_kv_heads"), "{msg}");
    }
}
