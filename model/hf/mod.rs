//! Hugging Face model directories: [`load`] reads `LlamaForCausalLM` and `Qwen2ForCausalLM`
//! checkpoints (`config.json` plus one or sharded safetensors files, f32 / f16 / bf16; or one
//! GGUF file, quantised or not) into the
//! native [`Transformer`](crate::model::Transformer); [`save`] writes a native model back in
//! the same form, so a fine-tuned model is served with the usual tools; [`save_peft`] and
//! [`load_peft`] write and read LoRA adapters alone in PEFT's layout.

mod config;
mod export;
mod gguf;
mod import;
mod peft;
mod weights;

pub use config::{Family, HfConfig, ARCHITECTURES};
pub use export::save;
pub use gguf::{unpermute_rows, GgufWeights};
pub use import::{load, load_with_context, native_config};
pub use peft::{load_peft, save_peft, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
pub use weights::{Safetensors, Weights, INDEX, SINGLE};
