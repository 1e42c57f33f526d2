//! The whole pipeline on the CPU: a run killed and resumed several times ends exactly where an
//! uninterrupted run ends; bad run directories are errors.

use std::path::PathBuf;

use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use mrt::model::checkpoint;
use mrt::rl::config::{Algo, RunConfig};
use mrt::rl::metrics::read_metrics;
use mrt::rl::pipeline::{run_pipeline, PipelineOptions};

type AD = Autodiff<Flex>;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mrt-pipeline-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn small_config() -> RunConfig {
    let mut c = RunConfig::default_for("search", "cpu-tiny", Algo::Mrt, 3, true).unwrap();
    c.model.d_model = 32;
    c.model.n_layers = 1;
    c.model.d_ff = 64;
    c.warm_start.steps = 12;
    c.warm_start.batch_size = 8;
    c.warm_start.checkpoint_every = 3;
    c.warm_start.eval_every = 6;
    c.rl.steps = 8;
    c.rl.problems_per_step = 3;
    c.rl.group_size = 4;
    c.rl.checkpoint_every = 3;
    c.rl.eval_every = 4;
    c.eval.problems = 6;
    c.eval.samples = 1;
    c
}

fn options(run_dir: PathBuf, resume: bool, interrupt_after: Option<usize>) -> PipelineOptions {
    PipelineOptions {
        resume,
        quiet: true,
        interrupt_after,
        ..PipelineOptions::new(small_config(), run_dir)
    }
}

/// Metrics without wall-clock measurements.
fn metrics_without_timing(run: &std::path::Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    read_metrics(&run.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .map(|mut r| {
            r.retain(|k, _| !k.starts_with("perf/") && k != "eval/seconds" && k != "eval/reused");
            r
        })
        .collect()
}

fn final_logits(run: &std::path::Path) -> Vec<f32> {
    let ck = checkpoint::load(&run.join("checkpoints/final.ckpt"), None).unwrap();
    let m = ck.model::<Flex>(&Default::default()).unwrap();
    let tok = Tensor::<Flex, 2, Int>::from_data([[1i64, 10, 11, 12, 4]], &Default::default());
    m.forward(tok).into_data().to_vec().unwrap()
}

#[test]
fn killed_and_resumed_run_matches_uninterrupted_run() {
    let device = Default::default();
    let a = dir("uninterrupted");
    let out_a = run_pipeline::<AD>(&options(a.clone(), false, None), &device).unwrap();
    assert!(out_a.completed);

    let b = dir("resumed");
    // Killed 5 steps into each call: warm start stops at 5, 8, 11 (resuming from checkpoints
    // 3, 6, 9), then the RL stage at step 5 (checkpoint 3); the last call finishes.
    let mut resume = false;
    let mut kills = Vec::new();
    loop {
        let out = run_pipeline::<AD>(&options(b.clone(), resume, Some(5)), &device).unwrap();
        assert!(!out.completed);
        resume = true;
        let progress = checkpoint::load(&b.join("checkpoints/latest.ckpt"), None).unwrap().meta["progress"].clone();
        kills.push(format!("{}@{}", progress["stage"].as_str().unwrap(), progress["step"]));
        if progress["stage"] == "rl" {
            break;
        }
    }
    assert_eq!(kills, ["warm-start@3", "warm-start@6", "warm-start@9", "rl@3"]);
    let out_b = run_pipeline::<AD>(&options(b.clone(), true, None), &device).unwrap();
    assert!(out_b.completed);

    assert_eq!(final_logits(&a), final_logits(&b));
    let (fa, fb) = (out_a.fine_tuned.unwrap(), out_b.fine_tuned.unwrap());
    assert_eq!(fa.pass1, fb.pass1);
    assert_eq!(fa.anytime, fb.anytime);
    // One pass@1 per held-out problem, averaging to the whole evaluation's.
    assert_eq!(
        (fa.pass1_by_problem.len(), &fa.pass1_by_problem),
        (fa.problems, &fb.pass1_by_problem)
    );
    assert!((fa.pass1_by_problem.iter().sum::<f64>() / fa.problems as f64 - fa.pass1).abs() < 1e-12);
    assert_eq!(metrics_without_timing(&a), metrics_without_timing(&b));
    // 12 warm-start steps, 8 RL steps, evaluations at warm-start 6, 12 and RL 4, 8, base, final.
    assert_eq!(metrics_without_timing(&a).len(), 12 + 8 + 6);
    // In one uninterrupted process, "base" and "final" are the warm start's and RL's last
    // evaluations of the same models, reused rather than run again; the resumed run, whose
    // warm start ran in an earlier process, evaluated its base afresh and got the same numbers
    // (the metrics above are equal).
    let raw = |run: &std::path::Path| read_metrics(&run.join("metrics.jsonl")).unwrap();
    let reused = |run: &std::path::Path, phase: &str| {
        raw(run)
            .iter()
            .any(|r| r["phase"] == phase && r.get("eval/reused").is_some())
    };
    assert!(reused(&a, "base") && reused(&a, "final"));
    assert!(!reused(&b, "base") && reused(&b, "final"));
    let evals = metrics_without_timing(&a);
    let find = |phase: &str, step: u64| {
        let mut r = evals
            .iter()
            .find(|r| r["phase"] == phase && r["step"] == step && r.contains_key("eval/pass@1"))
            .unwrap()
            .clone();
        r.retain(|k, _| k.starts_with("eval/"));
        r
    };
    assert_eq!(find("final", 8), find("rl", 8));
    assert_eq!(find("base", 0), find("warm-start", 12));
}

#[test]
fn resume_of_a_directory_that_is_not_a_run_is_an_error() {
    let d = dir("not-a-run");
    std::fs::create_dir_all(&d).unwrap();
    let err = run_pipeline::<AD>(&options(d.clone(), true, None), &Default::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("config.json"), "{err}");
    // A corrupt checkpoint is reported, not a panic.
    let run = dir("corrupt");
    assert!(
        !run_pipeline::<AD>(&options(run.clone(), false, Some(4)), &Default::default())
            .unwrap()
            .completed
    );
    let ck = run.join("checkpoints/latest.ckpt");
    let bytes = std::fs::read(&ck).unwrap();
    std::fs::write(&ck, &bytes[..bytes.len() / 2]).unwrap();
    let err = run_pipeline::<AD>(&options(run, true, None), &Default::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("truncated"), "{err}");
}
