//! The transformer and everything that runs it: KV cache, sampling, decoding, log-probs,
//! checkpoints. Knows no task and no RL.

pub mod attention;
pub mod block;
pub mod cache;
pub mod checkpoint;
pub mod config;
mod flex;
pub mod generate;
pub mod hf;
pub mod init;
pub mod logprobs;
pub mod lora;
pub mod lowmem;
pub mod precision;
pub mod projection;
pub mod rope;
pub mod sampling;
pub mod transformer;

pub use cache::KvCache;
pub use config::TransformerConfig;
pub use generate::{generate, generate_rows, last_logits, read_ids, token_reads, GenerateConfig};
pub use logprobs::{logprobs_of_hidden, token_logprobs, TokenLogprobs};
pub use sampling::{sample, split_rngs, SamplerConfig};
pub use transformer::Transformer;
