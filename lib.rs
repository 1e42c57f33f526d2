//! MRT: Meta Reinforcement Fine-Tuning (Qu et al. 2025) in pure Rust on Burn.
//!
//! - [`model`]: a Llama-style transformer with KV cache, batched sampling and log-probs.
//! - [`data`]: tokenizer, episode-structured tasks, verifiers, scripted solvers.
//! - [`rl`]: rollouts, the meta-prover, GRPO and MRT objectives, metrics, the RL loop.
//!
//! Library code is generic over `B: Backend`; only `bin/`, tests and benches name a backend.

pub mod backend;
pub mod data;
pub mod error;
pub mod fsutil;
pub mod gguf;
pub mod model;
pub mod rl;

pub use error::{Error, Result};
