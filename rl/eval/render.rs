//! The experiment's reports as Markdown: one per regime (setup, verdicts, tables, what drove
//! the updates, cost, plots) and the overview of `--regime all`. Everything in them is read
//! from the evaluations and the runs' metrics; nothing is written by hand.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;

use super::compare::{by_algo, table, verdicts, RunEval};
use super::experiment::{ExperimentOptions, RegimeSummary};
use super::stats::Interval;
use super::summary::{eval_problems, scripted_pass1};
use crate::data::Split;
use crate::rl::metrics::read_metrics;
use crate::rl::run::{git_commit, RunDir};

/// Mean of a metric over the RL steps of every run of an algorithm.
fn metric_mean(out: &Path, evals: &[&RunEval], key: &str) -> f64 {
    let mut v = Vec::new();
    for e in evals {
        let records = read_metrics(&RunDir::new(out.join(&e.run)).metrics_path()).unwrap_or_default();
        v.extend(
            records
                .iter()
                .filter(|r| r.get("phase").and_then(Value::as_str) == Some("rl"))
                .filter_map(|r| r.get(key)?.as_f64()),
        );
    }
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

pub(super) fn render_report(
    opts: &ExperimentOptions,
    evals: &[RunEval],
    summary: &RegimeSummary,
    files: &[String],
) -> String {
    let regime = &opts.regime;
    let mut s = String::new();
    let _ = writeln!(s, "# MRT vs GRPO — regime `{}`\n\n{}\n", regime.name, regime.about);
    let _ = writeln!(
        s,
        "Produced by `{}` on {} (git commit {}).\n",
        opts.command,
        opts.device_label,
        git_commit()
    );
    let _ = writeln!(s, "## Setup\n");
    if let Ok(c) = regime.run_config(&regime.algos[0], 0) {
        let _ = writeln!(s, "- Task: `{}`", serde_json::to_string(&c.task).unwrap_or_default());
        let _ = writeln!(
            s,
            "- Model: preset `{}`, {} parameters (d_model {}, {} layers, {} heads, vocab {}).",
            c.preset,
            c.model.num_params(),
            c.model.d_model,
            c.model.n_layers,
            c.model.n_heads,
            c.model.vocab_size
        );
        let _ = writeln!(
            s,
            "- Warm starts: seeds {:?}, {} steps × {} scripted traces each.",
            regime.warm_start_seeds, c.warm_start.steps, c.warm_start.batch_size
        );
        let _ = writeln!(
            s,
            "- RL: seeds 0…{} (seed s from warm start s mod {}), {} steps × {} problems × {} samples, lr {}, \
                episode budget B = {}, token budget {}.",
            regime.rl_seeds - 1,
            regime.warm_start_seeds.len(),
            c.rl.steps,
            c.rl.problems_per_step,
            c.rl.group_size,
            c.rl.optim.lr,
            c.rl.rollout.max_episodes,
            c.rl.rollout.max_tokens
        );
        for spec in &regime.algos {
            if let Ok(a) = regime.run_config(spec, 0) {
                let alpha = if a.rl.algo.needs_prover() {
                    format!("α = {}, meta-prover `{:?}`", a.rl.alpha, a.rl.prover.mode)
                } else {
                    "outcome reward only".into()
                };
                let _ = writeln!(s, "  - `{}`: {alpha}.", spec.algo);
            }
        }
        let _ = writeln!(
            s,
            "- Evaluation: {} held-out problems (no prompt of them is trained on) × {} samples at the budget B, and \
                × {} at 2B (free to stop, and with budget forcing); the same problems and sampling seed for every \
                    checkpoint.",
            regime.report.problems, regime.report.samples, regime.report.extended_samples
        );
        if let Ok(task) = c.task.build() {
            let problems = eval_problems(task.as_ref(), regime.report.problems, Split::HeldOut).unwrap_or_default();
            let scripted: Vec<String> = task
                .strategies()
                .iter()
                .map(|st| {
                    format!(
                        "`{st}` {:.3}",
                        scripted_pass1(task.as_ref(), &problems, st, regime.report.samples, 7)
                    )
                })
                .collect();
            let _ = writeln!(
                s,
                "- Reference points, pass@1 within B on the same problems: scripted strategies of \
                the warm-start data {}.",
                scripted.join(", ")
            );
        }
        if let Some(opt) = evals.first().and_then(|e| e.fine_tuned.natural.optimal.as_ref()) {
            let _ = writeln!(
                s,
                "- The Bayes-optimal policy (bisection) solves {:.3} within B.",
                opt.last().copied().unwrap_or(f64::NAN)
            );
        }
    }
    let _ = writeln!(
        s,
        "\nIntervals are 95 % two-level bootstrap intervals: each resample draws the RL seeds (within their warm \
        starts) and, independently, the {} held-out problems, so an interval covers another seed *and* another \
        draw of problems from the task, not only these problems. Differences are paired by (warm start, seed) and \
        by problem (one draw of problems for both algorithms). Regrets are normalised cumulative regrets (J* = 1), \
        lower is better.\n",
        opts.regime.report.problems
    );
    let _ = writeln!(
        s,
        "## Verdicts (criteria fixed before running, computed from the numbers below)\n"
    );
    s.push_str(&verdicts(evals));
    let _ = writeln!(s, "\n## Results per algorithm\n");
    s.push_str(&table(evals));
    let _ = writeln!(s, "\n## Why: what drove the updates (means over RL steps and seeds)\n");
    let _ = writeln!(
        s,
        "| algorithm | outcome term \\|A\\| | progress term \\|A\\| | outcome term's share of the update | \
        all-equal groups | trained tokens / step | unproductive episodes (eval) |\n|---|---|---|---|---|---|---|"
    );
    let groups = by_algo(evals);
    for (algo, rs) in &groups {
        let unproductive = rs.iter().map(|r| r.fine_tuned.unproductive_episodes).sum::<f64>() / rs.len() as f64;
        let _ = writeln!(
            s,
            "| {algo} | {:.3} | {:.3} | {:.2} | {:.2} | {:.0} | {unproductive:.2} |",
            metric_mean(&opts.out, rs, "adv/outcome_abs"),
            metric_mean(&opts.out, rs, "adv/progress_abs"),
            metric_mean(&opts.out, rs, "update/outcome_share"),
            metric_mean(&opts.out, rs, "rollout/all_equal_frac"),
            metric_mean(&opts.out, rs, "train/trained_tokens")
        );
    }
    let _ = writeln!(
        s,
        "\n## Cost\n\n| algorithm | s per RL step | tokens sampled per step | × GRPO's step time |\n|---|---|---|---|"
    );
    let grpo_step = groups.get("grpo").map(|rs| metric_mean(&opts.out, rs, "perf/step_s"));
    for (algo, rs) in &groups {
        let step = metric_mean(&opts.out, rs, "perf/step_s");
        let ratio = grpo_step
            .map(|g| format!("{:.2}", step / g))
            .unwrap_or_else(|| "n/a".into());
        let _ = writeln!(
            s,
            "| {algo} | {step:.3} | {:.0} | {ratio} |",
            metric_mean(&opts.out, rs, "perf/sampled_tokens")
        );
    }
    let _ = writeln!(
        s,
        "\nThis invocation took {:.1} minutes.\n\n## Plots\n",
        summary.minutes
    );
    for f in files {
        let _ = writeln!(s, "![{f}]({f})\n");
    }
    s
}

/// One line per regime and algorithm: the headline table of `--regime all`.
pub fn render_overview(summaries: &[RegimeSummary], command: &str, device: &str, minutes: f64) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# MRT vs GRPO: all regimes\n\nProduced by `{command}` on {device} (git commit {}) in {minutes:.1} minutes.\n",
        git_commit()
    );
    let _ = writeln!(
        s,
        "| regime | algorithm | seeds | warm start pass@1 | fine-tuned pass@1 | gain | regret at B \
        | learns |\n|---|---|---|---|---|---|---|---|"
    );
    let show = |i: &Option<Interval>| i.map(|i| i.show(3)).unwrap_or_else(|| "n/a".into());
    for r in summaries {
        for a in &r.algos {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.3} | {} | {} | {} | {} |",
                r.regime,
                a.algo,
                a.seeds,
                a.base_pass1,
                show(&a.pass1),
                show(&a.gain),
                show(&a.regret),
                a.learns.word()
            );
        }
    }
    let _ = writeln!(
        s,
        "\n| regime | variant | lower regret at every budget (free / forced) | relative gain ≥ 2× | \
        token efficiency ≥ 1.5× |\n|---|---|---|---|---|"
    );
    for r in summaries {
        for v in &r.versus {
            let _ = writeln!(
                s,
                "| {} | {} | {} / {} | {} ({}) | {} ({}) |",
                r.regime,
                v.variant,
                v.verdict_regret.word(),
                v.verdict_forced_regret.word(),
                v.verdict_relative_gain.word(),
                v.relative_gain.map(|i| i.show(2)).unwrap_or_else(|| "n/a".into()),
                v.verdict_token_efficiency.word(),
                v.token_efficiency.map(|i| i.show(2)).unwrap_or_else(|| "n/a".into())
            );
        }
    }
    s
}
