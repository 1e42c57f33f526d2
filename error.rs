//! Typed errors of the library. Binaries wrap them with `anyhow` context; every variant names
//! the file, field or value that is wrong so a user can fix their input without a backtrace.

use std::path::PathBuf;

/// Everything the library can reject.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is out of range or inconsistent with another.
    #[error("invalid config: {field} = {value}: {reason}")]
    Config {
        field: String,
        value: String,
        reason: String,
    },
    /// A name (preset, task, algorithm, device) that is not known.
    #[error("unknown {kind} `{name}` (expected one of: {expected})")]
    Unknown {
        kind: &'static str,
        name: String,
        expected: String,
    },
    /// A file could not be read or written. The OS error is part of the message and not a
    /// separate cause, so that `error: {e:#}` does not print it twice.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    /// A checkpoint that is missing, truncated, corrupt, or made for another model.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    /// A pretrained model directory (Hugging Face layout) that cannot be read or written as asked.
    #[error("model {path}: {reason}")]
    Pretrained { path: PathBuf, reason: String },
    /// A JSON file (config, metrics, tokenizer) that does not parse.
    #[error("{path}: malformed JSON: {reason}")]
    Json { path: PathBuf, reason: String },
    /// A tokenizer that does not load or lacks a required token.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A sequence that does not fit the model's context or a token budget.
    #[error("budget: {0}")]
    Budget(String),
    /// The training signal became unusable (NaN / infinite loss).
    #[error("training diverged at step {step}: {what} is {value}")]
    Diverged { step: usize, what: String, value: f64 },
    /// A data-parallel peer failed (rl/parallel.rs), or lost the group.
    #[error("data-parallel peer {rank}: {reason}")]
    Peer { rank: usize, reason: String },
}

impl Error {
    pub fn config(field: impl Into<String>, value: impl ToString, reason: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error: source,
        }
    }

    pub fn pretrained(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Pretrained {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub fn checkpoint(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
