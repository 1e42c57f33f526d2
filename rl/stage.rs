//! What the training stages share: the run context, progress bars, the fixed step line, and
//! held-out evaluation written to the metrics.

use std::time::Instant;

use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use indicatif::{ProgressBar, ProgressStyle};

use super::config::RunConfig;
use super::eval::summary::eval_rollouts;
use super::eval::{evaluate, summarize, EvalSummary};
use super::metrics::{MetricsWriter, Record};
use super::parallel::Peer;
use super::protocol::Protocol;
use super::rollout::Rollout;
use super::run::RunDir;
use crate::data::{Problem, Task, Vocab};
use crate::error::Result;
use crate::model::Transformer;

/// Everything a stage needs besides the model.
pub struct Ctx<'a> {
    pub config: &'a RunConfig,
    pub task: &'a dyn Task,
    /// The rules of the task's token stream.
    pub protocol: &'a dyn Protocol,
    /// The word vocabulary of a synthetic task (its warm start tokenizes scripted traces);
    /// `None` for a pretrained model's text.
    pub vocab: Option<&'a Vocab>,
    pub run: &'a RunDir,
    pub metrics: MetricsWriter,
    /// The fixed held-out evaluation set.
    pub eval_problems: Vec<Problem>,
    /// No progress bars or step lines (tests).
    pub quiet: bool,
    /// Stop after this many steps of a stage in this call (simulates a kill, for resume tests).
    pub interrupt_after: Option<usize>,
    /// The latest evaluation of each stage in this process: (stage, step, summary, seconds).
    pub latest_evals: Vec<(String, usize, EvalSummary, f64)>,
}

impl Ctx<'_> {
    pub fn progress_bar(&self, stage: &str, total: usize, start: usize) -> ProgressBar {
        if self.quiet {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(total as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>10} [{bar:28.cyan/blue}] {pos}/{len} {per_sec:>10} eta {eta:>4} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(stage.to_string());
        bar.set_position(start as u64);
        bar
    }

    /// Prints a line above the progress bar (nothing when quiet). When stderr is not a
    /// terminal the bar is hidden and would swallow the line, so it goes to stderr directly.
    pub fn say(&self, bar: &ProgressBar, line: String) {
        if self.quiet {
            return;
        }
        if bar.is_hidden() {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
    }

    /// The held-out evaluation's seed: the run's alone, so every evaluation of a model gives
    /// the same numbers.
    fn eval_seed(&self) -> u64 {
        self.config.seed ^ 0x5eed_e7a1
    }

    /// Evaluates on the held-out set, writes `eval/…` metrics and returns the summary.
    pub fn evaluate<B: Backend>(&mut self, model: &Transformer<B>, stage: &str, step: usize) -> Result<EvalSummary> {
        let t0 = Instant::now();
        let (summary, _) = evaluate(
            model,
            self.task,
            self.protocol,
            &self.eval_problems,
            &self.config.eval,
            false,
            self.eval_seed(),
        )?;
        self.record_eval(stage, step, summary, t0)
    }

    /// [`Ctx::evaluate`] over a data-parallel group: every peer samples its share of the
    /// held-out problems (the rollouts one device samples: each problem has its own
    /// generator), the leader gathers them, writes the `eval/…` metrics and returns the
    /// summary; the other peers return `None`.
    pub fn evaluate_shared<B: AutodiffBackend>(
        &mut self,
        model: &Transformer<B::InnerBackend>,
        stage: &str,
        step: usize,
        peer: Option<&Peer<B>>,
    ) -> Result<Option<EvalSummary>> {
        let Some(p) = peer else {
            return self.evaluate(model, stage, step).map(Some);
        };
        let t0 = Instant::now();
        let problems = &self.eval_problems;
        let share = p.shard(problems.len());
        let mine = if share.is_empty() {
            Vec::new()
        } else {
            let (config, seed) = (&self.config.eval, self.eval_seed());
            eval_rollouts(
                model,
                self.protocol,
                problems,
                share,
                config,
                false,
                seed,
                &ProgressBar::hidden(),
            )?
        };
        let all: Vec<Rollout> = p.gather_values(&mine, "evaluation rollouts")?.concat();
        if !p.leader() {
            return Ok(None);
        }
        let summary = summarize(self.task, problems, &all, self.config.eval.max_episodes);
        self.record_eval(stage, step, summary, t0).map(Some)
    }

    /// Writes an evaluation's metrics and keeps it as the stage's latest.
    fn record_eval(&mut self, stage: &str, step: usize, summary: EvalSummary, t0: Instant) -> Result<EvalSummary> {
        let seconds = t0.elapsed().as_secs_f64();
        self.log_eval(stage, step, &summary, seconds, false)?;
        self.latest_evals.retain(|e| e.0 != stage);
        self.latest_evals
            .push((stage.to_string(), step, summary.clone(), seconds));
        Ok(summary)
    }

    /// This process's evaluation of the model stage `from.0` ended with (at its last step,
    /// `from.1`), if it made one: its summary and seconds. The evaluation's seed and problems
    /// depend on the run alone, so evaluating that model again would give the same numbers, at
    /// the cost of a whole evaluation (minutes on a pretrained model).
    pub fn reusable(&self, from: (&str, usize)) -> Option<(EvalSummary, f64)> {
        self.latest_evals
            .iter()
            .find(|e| e.0 == from.0 && e.1 == from.1)
            .map(|e| (e.2.clone(), e.3))
    }

    /// Writes a reused evaluation's record under `stage`, with `eval/reused` = 1.
    pub fn log_reused(&mut self, stage: &str, step: usize, summary: &EvalSummary, seconds: f64) -> Result<()> {
        self.log_eval(stage, step, summary, seconds, true)
    }

    fn log_eval(&mut self, stage: &str, step: usize, summary: &EvalSummary, seconds: f64, reused: bool) -> Result<()> {
        let mut rec = Record::new(stage, step);
        rec.set("eval/pass@1", summary.pass1)
            .set("eval/answered", summary.answered)
            .set("eval/mean_episodes", summary.mean_episodes)
            .set("eval/mean_tokens", summary.mean_tokens)
            .set("eval/tokens_to_solve", summary.tokens_to_solve)
            .set("eval/episodes_to_solve", summary.episodes_to_solve)
            .set("eval/regret", summary.regret)
            .set("eval/forced_well_formed", summary.forced_well_formed)
            .set("eval/seconds", seconds);
        if reused {
            rec.set("eval/reused", 1.0);
        }
        if let Some(r) = summary.regret_vs_optimal {
            rec.set("eval/regret_vs_optimal", r);
        }
        for (j, a) in summary.anytime.iter().enumerate() {
            rec.set(&format!("eval/anytime@{j}"), *a);
        }
        self.metrics.write(&rec)
    }
}

/// One fixed-format line for an evaluation.
pub fn eval_line(stage: &str, step: usize, s: &EvalSummary) -> String {
    format!(
        "{stage:>10} {step:>5} | eval pass@1 {:.3} | answered {:.2} | episodes {:.2} | tokens {:.1} (solved {:.1}) \
            | regret {:.3} | forced well-formed {:.3}",
        s.pass1, s.answered, s.mean_episodes, s.mean_tokens, s.tokens_to_solve, s.regret, s.forced_well_formed
    )
}

/// Whether a periodic action with period `every` is due after `done` steps of `total`.
pub fn due(every: usize, done: usize, total: usize) -> bool {
    done == total || (every > 0 && done.is_multiple_of(every))
}
