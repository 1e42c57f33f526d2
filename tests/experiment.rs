//! The experiment end to end in smoke mode: warm starts, paired runs, evaluations, report and
//! verdicts; a re-run reuses every finished run; one seed per algorithm gives no verdict.

use std::path::PathBuf;

use burn::backend::{Autodiff, Flex};
use mrt::model::checkpoint;
use mrt::rl::eval::experiment::{run_regime, ExperimentOptions};
use mrt::rl::eval::regime::Regime;
use mrt::rl::eval::stats::Verdict;

type AD = Autodiff<Flex>;

fn options(out: PathBuf, seeds: u64) -> ExperimentOptions {
    let mut regime = Regime::named("search-tight").unwrap().quick();
    regime.rl_seeds = seeds;
    ExperimentOptions { regime, out, quiet: true, device_label: "cpu".into(), command: "test".into() }
}

#[test]
fn quick_regime_runs_pairs_reports_and_resumes() {
    let out = std::env::temp_dir().join(format!("mrt-experiment-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let device = Default::default();
    let summary = run_regime::<AD>(&options(out.clone(), 2), &device).unwrap();
    // Two warm starts, every algorithm × 2 seeds, each from its warm start.
    for dir in ["warm-start-0", "warm-start-1", "grpo-s0", "grpo-s1", "mrt-dense-s0", "mrt-dense-s1", "mrt-s0", "mrt-s1"] {
        assert!(out.join(dir).join("checkpoints").is_dir(), "{dir}");
    }
    assert_eq!(summary.algos.iter().map(|a| a.algo.as_str()).collect::<Vec<_>>(), ["grpo", "mrt-dense", "mrt"]);
    assert!(summary.algos.iter().all(|a| a.seeds == 2 && a.pass1.is_some()));
    assert_eq!(summary.versus.len(), 2);
    for v in &summary.versus {
        assert_eq!(v.n, 2);
        // Regret differences at every budget 1 … 2B, B = 8.
        assert_eq!(v.regret_by_budget.len(), 16);
        assert!(!matches!(v.verdict_regret, Verdict::NoVerdict(_)));
    }
    let report = std::fs::read_to_string(out.join("REPORT.md")).unwrap();
    for needle in ["## Verdicts", "Verdict 1", "Verdict 2", "Verdict 3", "Verdict 4", "## Why", "## Cost", "training_pass1_tokens.svg"] {
        assert!(report.contains(needle), "REPORT.md lacks {needle}");
    }
    // Seed s starts from warm start s mod 2, for every algorithm (its problems per step are a
    // function of the seed and step alone).
    let start = |d: &str| checkpoint::load(&out.join(d).join("checkpoints/warm_start.ckpt"), None).unwrap().section("model").unwrap().to_vec();
    assert!(start("grpo-s1") == start("warm-start-1"));
    assert!(start("mrt-s1") == start("warm-start-1"));
    assert!(start("mrt-dense-s0") == start("warm-start-0"));
    assert!(start("warm-start-0") != start("warm-start-1"));

    // A re-run finds everything done: same numbers, nothing retrained.
    let mtime = |d: &str| std::fs::metadata(out.join(d).join("checkpoints/final.ckpt")).unwrap().modified().unwrap();
    let before = mtime("mrt-s0");
    let again = run_regime::<AD>(&options(out.clone(), 2), &device).unwrap();
    assert_eq!(mtime("mrt-s0"), before);
    assert_eq!(serde_json::to_string(&again.versus).unwrap(), serde_json::to_string(&summary.versus).unwrap());

    // With one seed per algorithm there is no interval, so no verdict.
    let one = run_regime::<AD>(&options(out.clone(), 1), &device).unwrap();
    assert!(one.algos.iter().all(|a| a.pass1.is_none() && matches!(a.learns, Verdict::NoVerdict(_))));
    for v in &one.versus {
        for verdict in [&v.verdict_regret, &v.verdict_forced_regret, &v.verdict_relative_gain, &v.verdict_token_efficiency] {
            assert!(matches!(verdict, Verdict::NoVerdict(_)), "{verdict:?}");
        }
    }
    let report = std::fs::read_to_string(out.join("REPORT.md")).unwrap();
    assert!(report.contains("n = 1, no interval") && !report.contains("— worse"), "{report}");
    let _ = std::fs::remove_dir_all(&out);
}
