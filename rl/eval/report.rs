//! Evaluation of one checkpoint, the way the paper measures test-time compute:
//! - at the training budget (the policy as trained): pass@1, anytime accuracy after each
//!   episode and against tokens, cumulative regret at each budget (J* ≡ 1 and Bayes-optimal),
//!   maj@k against total tokens, and where episodes made no or negative progress;
//! - past it, up to twice the training budget: once letting the policy stop when it wants, and
//!   once with budget forcing (`</think>` suppressed until the extended budget is spent):
//!   anytime accuracy and regret at every extended budget.

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::analysis::{maj_at_k, progress_histogram, regret_curve, token_anytime, CostPoint, Vote};
use super::by_problem::ByProblem;
use super::summary::{eval_problems, evaluate_shown, EvalSummary};
use crate::data::Task;
use crate::error::Result;
use crate::model::Transformer;
use crate::rl::config::{EvalConfig, RunConfig};
use crate::rl::protocol::Protocol;
use crate::rl::rollout::Rollout;
use indicatif::{ProgressBar, ProgressStyle};

/// Everything measured on one checkpoint (`eval.json` holds one per checkpoint of a run).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    /// Episode budget of training (the natural evaluation's budget).
    pub train_budget: usize,
    pub natural: EvalSummary,
    /// Regret R(b) for b = 1 … train_budget, against J* ≡ 1.
    #[serde(deserialize_with = "crate::fsutil::nan")]
    pub regret: Vec<f64>,
    /// Regret R(b) against the Bayes-optimal policy, when computable.
    #[serde(deserialize_with = "crate::fsutil::nan")]
    pub regret_vs_optimal: Option<Vec<f64>>,
    /// Policy-token budget C₀ of the token curves.
    pub token_budget: usize,
    /// Anytime accuracy after c = 0 … C₀ policy tokens.
    #[serde(deserialize_with = "crate::fsutil::nan")]
    pub token_anytime: Vec<f64>,
    /// Normalised token regret: (1/C₀) Σ_c (1 − acc(c)).
    #[serde(deserialize_with = "crate::fsutil::nan")]
    pub token_regret: f64,
    /// maj@k for k = 1 … samples: accuracy against mean total tokens of the k samples.
    pub maj: Vec<CostPoint>,
    /// Per episode index: episodes with negative, zero (|r_prg| < 0.01) and positive progress.
    pub progress_hist: Vec<[usize; 3]>,
    /// Fraction of all episodes whose progress was zero or negative.
    #[serde(deserialize_with = "crate::fsutil::nan")]
    pub unproductive_episodes: f64,
    /// Extended budget: 2 × the training budget.
    pub extended_budget: usize,
    /// Anytime accuracy after b = 0 … extended_budget episodes, the policy free to stop.
    #[serde(deserialize_with = "crate::fsutil::nan")]
    pub extended_anytime: Vec<f64>,
    #[serde(deserialize_with = "crate::fsutil::nan")]
    pub extended_regret: Vec<f64>,
    #[serde(deserialize_with = "crate::fsutil::nan")]
    pub extended_optimal: Option<Vec<f64>>,
    /// The same under budget forcing (`</think>` suppressed until the extended budget).
    #[serde(deserialize_with = "crate::fsutil::nan")]
    pub forced_anytime: Vec<f64>,
    #[serde(deserialize_with = "crate::fsutil::nan")]
    pub forced_regret: Vec<f64>,
    /// The measures above broken down by held-out problem, for intervals over the problems.
    pub by_problem: ByProblem,
}

/// Options of an evaluation.
#[derive(Debug, Clone)]
pub struct ReportOptions {
    pub problems: usize,
    /// Samples per problem of the natural evaluation (maj@k goes up to this; ≤ 16).
    pub samples: usize,
    /// Samples per problem of the two extended-budget evaluations.
    pub extended_samples: usize,
    pub seed: u64,
    /// Where to write the natural evaluation's completions as text (`samples.jsonl`), if anywhere.
    pub samples_file: Option<std::path::PathBuf>,
    /// Show a progress bar per evaluation on a terminal (`eval`; not the experiment's
    /// parallel jobs).
    pub progress: bool,
}

/// A bar over `n` problems labelled `what`, or a hidden one.
fn bar(show: bool, what: &str, n: usize) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(n as u64);
    let style =
        ProgressStyle::with_template("{prefix:>10} [{bar:28.cyan/blue}] {pos}/{len} problems  {elapsed} eta {eta}")
            .expect("valid template")
            .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(what.to_string());
    bar
}

/// Evaluates `model` on the held-out set of `config`'s task.
pub fn evaluate_report<B: Backend>(
    model: &Transformer<B>,
    task: &dyn Task,
    protocol: &dyn Protocol,
    config: &RunConfig,
    opts: &ReportOptions,
) -> Result<EvalReport> {
    let problems = eval_problems(task, opts.problems, config.eval.split)?;
    let budget = config.rl.rollout.max_episodes;
    let natural_cfg = EvalConfig {
        problems: problems.len(),
        samples: opts.samples,
        max_episodes: budget,
        max_tokens: config.rl.rollout.max_tokens,
        ..config.eval.clone()
    };
    let shown = |what: &str| bar(opts.progress, what, problems.len());
    let (natural, rollouts) = evaluate_shown(
        model,
        task,
        protocol,
        &problems,
        &natural_cfg,
        false,
        opts.seed,
        &shown("natural"),
    )?;
    if let Some(path) = &opts.samples_file {
        let _ = std::fs::remove_file(path);
        super::samples::append(path, &super::samples::samples(protocol, &rollouts, None)?)?;
    }
    let extended_cfg = EvalConfig {
        samples: opts.extended_samples,
        max_episodes: 2 * budget,
        max_tokens: 2 * config.rl.rollout.max_tokens,
        ..natural_cfg.clone()
    };
    // No samples past the budget: the measures at the budget only (`eval --model`'s quick
    // check); the curves past it are left empty.
    let past = |forcing: bool, seed: u64, what: &str| -> Result<Option<(EvalSummary, Vec<Rollout>)>> {
        if opts.extended_samples == 0 {
            return Ok(None);
        }
        Ok(Some(evaluate_shown(
            model,
            task,
            protocol,
            &problems,
            &extended_cfg,
            forcing,
            opts.seed ^ seed,
            &shown(what),
        )?))
    };
    let (extended, forced) = (past(false, 0xe7e4d, "2x budget")?, past(true, 0xb0d6e7, "forced 2x")?);

    let token_budget = config.rl.rollout.max_tokens;
    let token_curve = token_anytime(rollouts.iter(), token_budget);
    let token_regret = regret_curve(&token_curve, None).last().copied().unwrap_or(f64::NAN);
    let votes: Vec<Vec<Vote>> = rollouts
        .chunks(opts.samples)
        .map(|group| {
            group
                .iter()
                .map(|r| Vote {
                    answer: r.answer.as_ref().filter(|a| task.well_formed(a)).map(|a| a.join(" ")),
                    correct: r.reward > 0.0,
                    tokens: r.policy_tokens(),
                })
                .collect()
        })
        .collect();
    let by_problem = ByProblem::new(
        problems.len(),
        &rollouts,
        &votes,
        budget,
        token_budget,
        extended
            .as_ref()
            .zip(forced.as_ref())
            .map(|(e, f)| (&e.1[..], &f.1[..])),
    );
    let (extended, forced) = (extended.map(|e| e.0), forced.map(|f| f.0));
    let maj = (1..=opts.samples.min(16))
        .map(|k| {
            let (accuracy, tokens) = maj_at_k(&votes, k);
            CostPoint { tokens, accuracy }
        })
        .collect();
    let progress_hist = progress_histogram(&rollouts, budget, 0.01);
    let total: usize = progress_hist.iter().map(|h| h.iter().sum::<usize>()).sum();
    let unproductive: usize = progress_hist.iter().map(|h| h[0] + h[1]).sum();
    Ok(EvalReport {
        train_budget: budget,
        regret: regret_curve(&natural.anytime, None),
        regret_vs_optimal: natural
            .optimal
            .as_ref()
            .map(|o| regret_curve(&natural.anytime, Some(o))),
        token_budget,
        token_anytime: token_curve,
        token_regret,
        maj,
        progress_hist,
        unproductive_episodes: unproductive as f64 / total.max(1) as f64,
        extended_budget: 2 * budget,
        extended_regret: extended
            .as_ref()
            .map_or_else(Vec::new, |e| regret_curve(&e.anytime, None)),
        extended_optimal: extended.as_ref().and_then(|e| e.optimal.clone()),
        extended_anytime: extended.map_or_else(Vec::new, |e| e.anytime),
        forced_regret: forced
            .as_ref()
            .map_or_else(Vec::new, |f| regret_curve(&f.anytime, None)),
        forced_anytime: forced.map_or_else(Vec::new, |f| f.anytime),
        natural,
        by_problem,
    })
}
