//! A pretrained model directory evaluated as it is, before any training: what `eval --model`
//! reports (the same measurements as for a run's checkpoints, on a text task's held-out
//! problems), so a user sees where a downloaded model stands before fine-tuning it.

use std::path::Path;

use burn::tensor::backend::AutodiffBackend;

use super::report::{evaluate_report, EvalReport, ReportOptions};
use crate::data::TextTokenizer;
use crate::error::{Error, Result};
use crate::fsutil::write_json;
use crate::model::hf;
use crate::rl::config::RunConfig;
use crate::rl::protocol::Tokens;

/// Evaluates the model in `dir` on `config`'s text task (a config made by
/// `RunConfig::pretrained_with_patch`); writes `out/eval.json`.
pub fn evaluate_pretrained<B: AutodiffBackend>(
    dir: &Path,
    config: &RunConfig,
    opts: &ReportOptions,
    out: &Path,
    device: &B::Device,
) -> Result<EvalReport> {
    config.validate()?;
    let tokens = Tokens::Text(TextTokenizer::load(dir)?);
    let task = config.task.build()?;
    let protocol = tokens.protocol(task.as_ref(), &config.task)?;
    let model = hf::load_with_context::<B::InnerBackend>(dir, Some(config.model.max_seq_len), device)?;
    let report = evaluate_report(&model, task.as_ref(), protocol.as_ref(), config, opts)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    write_json(&out.join("eval.json"), &report)?;
    Ok(report)
}
