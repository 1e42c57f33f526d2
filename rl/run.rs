//! A run directory and the training state inside it:
//!
//! ```text
//! runs/<name>/config.json      everything needed to reproduce (seed, git commit included)
//!             tokenizer.json   the tokenizer, in the `tokenizers` format
//!             metrics.jsonl    one JSON object per step
//!             checkpoints/     warm_start.ckpt, latest.ckpt (model + optimizer + step), final.ckpt
//!             eval.json, *.svg written by `eval`
//! ```
//! Randomness is derived from (seed, stage, step), never carried in an RNG state, so a resumed
//! run draws exactly what the uninterrupted run would have drawn.

use std::path::{Path, PathBuf};

use burn::tensor::backend::AutodiffBackend;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::config::RunConfig;
use super::optim::{load_optimizer, optimizer_section, Adam};
use super::protocol::Tokens;
use crate::data::split::fnv1a;
use crate::error::{Error, Result};
use crate::fsutil::{read_json, write_json};
use crate::model::checkpoint;
use crate::model::Transformer;

/// Which stage a checkpoint belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    WarmStart,
    Rl,
}

/// Position of a run: the next step to execute in a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub stage: Stage,
    /// Steps of the stage already done.
    pub step: usize,
}

/// `config.json`: the run config and where it came from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedConfig {
    pub git_commit: String,
    pub version: String,
    pub config: RunConfig,
}

pub struct RunDir {
    pub root: PathBuf,
}

impl RunDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn config_path(&self) -> PathBuf {
        self.root.join("config.json")
    }

    pub fn tokenizer_path(&self) -> PathBuf {
        self.root.join("tokenizer.json")
    }

    pub fn metrics_path(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }

    pub fn checkpoint(&self, name: &str) -> PathBuf {
        self.root.join("checkpoints").join(format!("{name}.ckpt"))
    }

    /// Writes `config.json` and the tokenizer for a new run (`tokenizer.json`; a pretrained
    /// model's tokenizer files are copied from `model_dir`).
    pub fn init(&self, config: &RunConfig, tokens: &Tokens, model_dir: Option<&Path>) -> Result<()> {
        std::fs::create_dir_all(self.root.join("checkpoints")).map_err(|e| Error::io(&self.root, e))?;
        let saved = SavedConfig {
            git_commit: git_commit(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            config: config.clone(),
        };
        tokens.save(&self.root, model_dir)?;
        write_json(&self.config_path(), &saved)
    }

    /// Reads `config.json` and the tokenizer of an existing run.
    pub fn open(&self) -> Result<(RunConfig, Tokens)> {
        if !self.config_path().exists() {
            return Err(Error::config(
                "run directory",
                self.root.display(),
                "has no config.json (not a run directory?)",
            ));
        }
        let saved: SavedConfig = read_json(&self.config_path())?;
        saved.config.validate()?;
        let tokens = Tokens::load(&self.root, saved.config.task.is_text())?;
        Ok((saved.config, tokens))
    }
}

/// The commit this binary's source tree is at, or "unknown", with " (plus uncommitted changes)"
/// when tracked files differ from it: a report must not name a commit that did not make it.
pub fn git_commit() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "HEAD"]) {
        None => "unknown".into(),
        Some(head) => match git(&["status", "--porcelain", "--untracked-files=no"]) {
            Some(changes) if !changes.is_empty() => format!("{head} (plus uncommitted changes)"),
            _ => head,
        },
    }
}

/// The RNG of one step of one stage: a pure function of (seed, stream, step).
pub fn step_rng(seed: u64, stream: &str, step: usize) -> StdRng {
    StdRng::seed_from_u64(fnv1a(format!("{seed}:{stream}:{step}").as_bytes()))
}

/// Saves model, optimizer and progress atomically.
pub fn save_state<B: AutodiffBackend>(
    path: &Path,
    model: &Transformer<B>,
    optim: &Adam<B>,
    progress: Progress,
) -> Result<()> {
    let meta = serde_json::to_value(progress).map_err(|e| Error::checkpoint(path, e.to_string()))?;
    checkpoint::save(
        path,
        model,
        vec![optimizer_section(optim)],
        serde_json::json!({ "progress": meta }),
    )
}

/// Loads a state saved by [`save_state`]: the model (trainable), the optimizer and progress.
pub fn load_state<B: AutodiffBackend>(
    path: &Path,
    config: &RunConfig,
    optim: Adam<B>,
    device: &B::Device,
) -> Result<(Transformer<B>, Adam<B>, Progress)> {
    let ck = checkpoint::load(path, Some(&config.model))?;
    let model = super::optim::require_grad(ck.model::<B>(device)?);
    let optim = load_optimizer(optim, path, ck.section("optimizer")?, device)?;
    let progress: Progress = serde_json::from_value(ck.meta["progress"].clone())
        .map_err(|e| Error::checkpoint(path, format!("no training progress in metadata: {e}")))?;
    Ok((model, optim, progress))
}
