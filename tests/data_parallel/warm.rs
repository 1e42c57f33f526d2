//! The warm start on two CPU peers: the parameters and metrics one device gives, and a
//! resume mid-stage that matches an uninterrupted run (a module of tests/data_parallel.rs,
//! whose helpers it uses).

use std::path::Path;

use burn::tensor::Device;
use mrt::rl::config::{Algo, RunConfig};
use mrt::rl::metrics::read_metrics;
use mrt::rl::pipeline::{run_pipeline, run_pipeline_on, PipelineOptions};

use super::params::{params, relative_difference};
use super::{close_metrics, config, dir, options, stage_metrics, Metrics, AD};

/// The metrics of the warm start.
fn warm_metrics(run: &Path) -> Metrics {
    stage_metrics(run, "warm-start")
}

/// A short warm start (20 steps of 32 traces, an evaluation and a checkpoint every 10) from a
/// fresh model, then one RL step.
fn warm_config() -> RunConfig {
    let mut c = config(Algo::Grpo);
    c.warm_start.steps = 20;
    c.warm_start.eval_every = 10;
    c.warm_start.checkpoint_every = 10;
    c.rl.steps = 1;
    c
}

/// Two peers warm-start from a fresh model to the parameters one device does, each training on
/// half of every step's traces with the whole step's token count, and the leader's warm-start
/// metrics (loss, gradient norm, the shared evaluations) are the one-device run's.
#[test]
fn two_peers_warm_start_what_one_device_warm_starts() {
    let device: Device<AD> = Default::default();
    let one = dir("warm-one");
    let two = dir("warm-two");
    run_pipeline::<AD>(&options(warm_config(), &one, None), &device).unwrap();
    run_pipeline_on::<AD>(&options(warm_config(), &two, None), &[device; 2]).unwrap();

    let (a, b) = (
        params(&one.join("checkpoints/warm_start.ckpt")),
        params(&two.join("checkpoints/warm_start.ckpt")),
    );
    let diff = relative_difference(&a, &b);
    let (ma, mb) = (warm_metrics(&one), warm_metrics(&two));
    let losses: Vec<f64> = ma.iter().filter_map(|r| r.get("train/loss")?.as_f64()).collect();
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    eprintln!("warm start: loss {first:.4} → {last:.4}; two peers vs one device {diff:.3e}");
    assert!(last < 0.8 * first, "the warm start did not learn ({first} → {last})");
    assert!(diff <= 1e-6, "two peers differ from one device by {diff:.3e}");

    // 20 steps and an evaluation after steps 10 and 20.
    assert_eq!(ma.len(), 22);
    assert_eq!(ma.iter().filter(|r| r.contains_key("eval/pass@1")).count(), 2);
    close_metrics(&ma, &mb, "warm start");
    let raw = read_metrics(&two.join("metrics.jsonl")).unwrap();
    let step = raw.iter().find(|r| r["phase"] == "warm-start").unwrap();
    assert!(step["perf/allreduce_s"].as_f64().unwrap() >= 0.0);
    assert_eq!(step["train/tokens"], ma[0]["train/tokens"]);
}

/// A two-peer warm start killed after 10 steps and resumed on two peers ends with the
/// parameters of an uninterrupted two-peer warm start.
#[test]
fn a_resumed_two_peer_warm_start_matches_an_uninterrupted_one() {
    let devices = vec![Device::<AD>::default(); 2];
    let whole = dir("warm-resume-whole");
    run_pipeline_on::<AD>(&options(warm_config(), &whole, None), &devices).unwrap();
    let cut = dir("warm-resume-cut");
    let killed = PipelineOptions {
        interrupt_after: Some(10),
        ..options(warm_config(), &cut, None)
    };
    assert!(!run_pipeline_on::<AD>(&killed, &devices).unwrap().completed);
    assert!(!cut.join("checkpoints/warm_start.ckpt").exists());
    let resumed = PipelineOptions {
        resume: true,
        ..options(warm_config(), &cut, None)
    };
    assert!(run_pipeline_on::<AD>(&resumed, &devices).unwrap().completed);
    assert_eq!(
        params(&whole.join("checkpoints/warm_start.ckpt")),
        params(&cut.join("checkpoints/warm_start.ckpt"))
    );
    assert_eq!(warm_metrics(&whole), warm_metrics(&cut));
}
