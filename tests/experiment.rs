//! The experiment end to end in smoke mode: warm starts, paired runs, evaluations, report and
//! verdicts; a re-run reuses every finished run; one seed per algorithm gives no verdict; the
//! α sweep on the validation split.

use std::path::PathBuf;

use burn::backend::{Autodiff, Flex};
use mrt::model::checkpoint;
use mrt::rl::eval::compare::{self, problem_count, RunEval};
use mrt::rl::eval::experiment::{run_regimes, ExperimentOptions, RegimeSummary};
use mrt::rl::eval::regime::Regime;
use mrt::rl::eval::stats::Verdict;
use mrt::rl::eval::sweep::run_sweeps;

type AD = Autodiff<Flex>;

fn run(out: PathBuf, seeds: u64, workers: usize) -> RegimeSummary {
    let mut regime = Regime::named("search-tight").unwrap().quick();
    regime.rl_seeds = seeds;
    let opts = ExperimentOptions {
        regime,
        out,
        quiet: true,
        device_label: "cpu".into(),
        command: "test".into(),
    };
    run_regimes::<AD>(&[opts], workers, &Default::default())
        .unwrap()
        .remove(0)
}

#[test]
fn quick_regime_runs_pairs_reports_and_resumes() {
    let out = std::env::temp_dir().join(format!("mrt-experiment-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let summary = run(out.clone(), 2, 2);
    // Two warm starts, every algorithm × 2 seeds, each from its warm start.
    for dir in [
        "warm-start-0",
        "warm-start-1",
        "grpo-s0",
        "grpo-s1",
        "mrt-dense-s0",
        "mrt-dense-s1",
        "mrt-s0",
        "mrt-s1",
    ] {
        assert!(out.join(dir).join("checkpoints").is_dir(), "{dir}");
    }
    assert_eq!(
        summary.algos.iter().map(|a| a.algo.as_str()).collect::<Vec<_>>(),
        ["grpo", "mrt-dense", "mrt"]
    );
    assert!(summary.algos.iter().all(|a| a.seeds == 2 && a.pass1.is_some()));
    assert_eq!(summary.versus.len(), 2);
    for v in &summary.versus {
        assert_eq!(v.n, 2);
        // Regret differences at every budget 1 … 2B, B = 8.
        assert_eq!(v.regret_by_budget.len(), 16);
        assert!(!matches!(v.verdict_regret, Verdict::NoVerdict(_)));
    }
    let report = std::fs::read_to_string(out.join("REPORT.md")).unwrap();
    for needle in [
        "## Verdicts",
        "Verdict 1",
        "Verdict 2",
        "Verdict 3",
        "Verdict 4",
        "## Why",
        "## Cost",
        "training_pass1_tokens.svg",
    ] {
        assert!(report.contains(needle), "REPORT.md lacks {needle}");
    }
    // What each fine-tuned model wrote: one line per held-out problem × sample.
    let lines = std::fs::read_to_string(out.join("grpo-s0/eval_samples.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 6 * 2);
    let first: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    assert!(first.get("reward").is_some() && first.get("text").is_some(), "{first}");

    // The per-problem breakdown gives back every aggregate on the full set of problems, so the
    // two-level intervals are about the numbers the tables print.
    let evals: Vec<RunEval> = serde_json::from_str(&std::fs::read_to_string(out.join("evals.json")).unwrap()).unwrap();
    assert_eq!(evals.len(), 6);
    let refs: Vec<&RunEval> = evals.iter().collect();
    assert_eq!(problem_count(&refs), 6);
    let all: Vec<usize> = (0..6).collect();
    let close =
        |a: f64, b: f64, what: &str| assert!((a - b).abs() < 1e-9 || (a.is_nan() && b.is_nan()), "{what}: {a} vs {b}");
    for r in &evals {
        let f = &r.fine_tuned;
        close(compare::pass1(r, &all), f.natural.pass1, "pass@1");
        close(compare::gain(r, &all), f.natural.pass1 - r.base.natural.pass1, "gain");
        close(
            compare::regret_at_budget(r, &all),
            *f.regret.last().unwrap(),
            "regret at B",
        );
        close(
            compare::regret_extended(r, &all),
            *f.extended_regret.last().unwrap(),
            "regret at 2B",
        );
        close(
            compare::regret_forced(r, &all),
            *f.forced_regret.last().unwrap(),
            "forced regret",
        );
        close(
            compare::tokens_to_solve(r, &all),
            f.natural.tokens_to_solve,
            "tokens to solve",
        );
        close(compare::token_regret(r, &all), f.token_regret, "token regret");
        for (a, b) in f.by_problem.maj(&all).iter().zip(&f.maj) {
            close(a.accuracy, b.accuracy, "maj@k accuracy");
            close(a.tokens, b.tokens, "maj@k tokens");
        }
        assert_eq!(f.by_problem.maj(&all).len(), f.maj.len());
    }

    // Seed s starts from warm start s mod 2, for every algorithm (its problems per step are a
    // function of the seed and step alone).
    let start = |d: &str| {
        checkpoint::load(&out.join(d).join("checkpoints/warm_start.ckpt"), None)
            .unwrap()
            .section("model")
            .unwrap()
            .to_vec()
    };
    assert!(start("grpo-s1") == start("warm-start-1"));
    assert!(start("mrt-s1") == start("warm-start-1"));
    assert!(start("mrt-dense-s0") == start("warm-start-0"));
    assert!(start("warm-start-0") != start("warm-start-1"));

    // A re-run finds everything done: same numbers, nothing retrained.
    let mtime = |d: &str| {
        std::fs::metadata(out.join(d).join("checkpoints/final.ckpt"))
            .unwrap()
            .modified()
            .unwrap()
    };
    let before = mtime("mrt-s0");
    let again = run(out.clone(), 2, 1);
    assert_eq!(mtime("mrt-s0"), before);
    assert_eq!(
        serde_json::to_string(&again.versus).unwrap(),
        serde_json::to_string(&summary.versus).unwrap()
    );

    // With one seed per algorithm there is no interval, so no verdict.
    let one = run(out.clone(), 1, 2);
    assert!(one
        .algos
        .iter()
        .all(|a| a.pass1.is_none() && matches!(a.learns, Verdict::NoVerdict(_))));
    for v in &one.versus {
        for verdict in [
            &v.verdict_regret,
            &v.verdict_forced_regret,
            &v.verdict_relative_gain,
            &v.verdict_token_efficiency,
        ] {
            assert!(matches!(verdict, Verdict::NoVerdict(_)), "{verdict:?}");
        }
    }
    let report = std::fs::read_to_string(out.join("REPORT.md")).unwrap();
    assert!(
        report.contains("n = 1, no interval") && !report.contains("— worse"),
        "{report}"
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn sweep_chooses_alpha_on_validation_for_every_regime_and_keeps_warm_starts() {
    let out = std::env::temp_dir().join(format!("mrt-sweep-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let list: Vec<ExperimentOptions> = ["search-tight", "search"]
        .iter()
        .map(|name| {
            let regime = Regime::named(name).unwrap().quick();
            ExperimentOptions {
                out: out.join(name),
                regime,
                quiet: true,
                device_label: "cpu".into(),
                command: "test".into(),
            }
        })
        .collect();
    let reports = run_sweeps::<AD>(&list, 2, &Default::default()).unwrap();
    assert_eq!(reports.len(), 2);
    for (opts, report) in list.iter().zip(&reports) {
        let sweep = opts.out.join("sweep");
        // Quick mode sweeps two α values with one seed: GRPO once, each MRT objective twice.
        let alphas = &opts.regime.sweep.alphas;
        assert_eq!(alphas.len(), 2);
        for a in alphas {
            for algo in ["mrt", "mrt-dense"] {
                let dir = sweep.join(format!("{algo}-a{a}-s0"));
                let saved: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
                assert_eq!(saved["config"]["rl"]["alpha"].as_f64(), Some(*a), "{}", dir.display());
                assert_eq!(saved["config"]["eval"]["split"], "validation");
            }
        }
        assert!(sweep.join("grpo-s0/eval.json").exists());
        // The choice is one of the swept values, per MRT objective.
        let choice: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(sweep.join("choice.json")).unwrap()).unwrap();
        for algo in ["mrt", "mrt-dense"] {
            assert!(alphas.contains(&choice[algo].as_f64().unwrap()), "{choice}");
        }
        let text = std::fs::read_to_string(report).unwrap();
        assert!(
            text.contains("validation split") && text.contains("Chosen for `mrt`"),
            "{text}"
        );
    }

    // A run made by an older version of the regime is refused rather than mixed with new ones.
    let mut rl_changed = list[0].clone();
    mrt::rl::config::merge_json(
        &mut rl_changed.regime.config,
        serde_json::json!({"rl": {"clip_eps": 0.3}}),
    );
    let err = run_sweeps::<AD>(std::slice::from_ref(&rl_changed), 1, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("different configuration") && err.contains("sweep"),
        "{err}"
    );
    // The warm start depends on the task, model and warm-start settings only: with the old
    // runs removed, the changed RL settings reuse it; a changed task is refused.
    std::fs::remove_dir_all(list[0].out.join("sweep")).unwrap();
    let ws = list[0].out.join("warm-start-0/checkpoints/warm_start.ckpt");
    let mtime = std::fs::metadata(&ws).unwrap().modified().unwrap();
    rl_changed.regime.sweep.alphas = vec![0.5];
    run_sweeps::<AD>(std::slice::from_ref(&rl_changed), 1, &Default::default()).unwrap();
    assert_eq!(std::fs::metadata(&ws).unwrap().modified().unwrap(), mtime);
    let mut task_changed = list[0].clone();
    mrt::rl::config::merge_json(
        &mut task_changed.regime.config,
        serde_json::json!({"task": {"hint_noise": 32}}),
    );
    let err = run_sweeps::<AD>(std::slice::from_ref(&task_changed), 1, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("different configuration"), "{err}");
    let _ = std::fs::remove_dir_all(&out);
}
