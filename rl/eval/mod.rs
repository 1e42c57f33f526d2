//! Evaluation, comparison and reports, kept apart from the training algorithms:
//! - `summary`: held-out (or validation) rollouts → pass@1, anytime accuracy, regret;
//! - `analysis`: the paper's measures as pure functions (regret curves, maj@k, token curves);
//! - `report`: everything measured on one checkpoint, at the training budget and past it;
//! - `pretrained`: the same for a Hugging Face model directory as it is (`eval --model`);
//! - `samples`: completions as text (`samples.jsonl`), to see what a model wrote;
//! - `by_problem`: those measures per held-out problem, for intervals over the problems;
//! - `stats`: paired bootstrap intervals over seeds and problems, and the verdicts built on them;
//! - `compare`, `verdicts`, `figures`, `plots`: runs side by side, in tables, verdicts against
//!   GRPO and SVG plots;
//! - `render`: the experiment's reports as Markdown;
//! - `regime`, `experiment`, `warm`, `sweep`, `jobs`: the named experiment regimes, the
//!   MRT-vs-GRPO experiment, its shared warm starts, its α sweep on validation, runs side by
//!   side on one-thread pools.

pub mod analysis;
pub mod by_problem;
pub mod compare;
pub mod experiment;
pub mod figures;
pub mod jobs;
pub mod plots;
pub mod pretrained;
pub mod regime;
pub mod render;
pub mod report;
pub mod samples;
pub mod stats;
pub mod summary;
pub mod sweep;
pub mod verdicts;
pub mod warm;

pub use summary::{anytime, eval_problems, evaluate, scripted_pass1, summarize, EvalSummary};
