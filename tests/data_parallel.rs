//! Data-parallel RL (rl/parallel.rs) on two CPU peers (threads of one process, both on the one
//! CPU device): a step's problems scored in shares equal the whole step scored at once, two
//! peers train the parameters one device trains, a resumed two-peer run equals an uninterrupted
//! one, and a failing peer stops the group with an error naming it instead of a hang. The
//! warm start is shared the same way: two peers warm-start the parameters one device does,
//! and resume mid-stage.

mod common;
#[path = "common/params.rs"]
mod params;
#[path = "data_parallel/warm.rs"]
mod warm;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use burn::backend::{Autodiff, Flex};
use burn::tensor::Device;
use common::warm_started;
use mrt::error::Error;
use mrt::model::split_rngs;
use mrt::rl::batch::{rollout_batch, shard_batch};
use mrt::rl::config::{Algo, RunConfig};
use mrt::rl::metrics::read_metrics;
use mrt::rl::parallel::run_peers;
use mrt::rl::pipeline::{run_pipeline, run_pipeline_on, PipelineOptions};
use mrt::rl::protocol::{Protocol, WordProtocol};
use mrt::rl::prover::ProverMode;
use mrt::rl::rollout::{Engine, Rollout};
use mrt::rl::score::{sample, signal, Sampled};
use params::{params, relative_difference};
use rand::rngs::StdRng;
use rand::SeedableRng;

type AD = Autodiff<Flex>;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mrt-dp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn config(algo: Algo) -> RunConfig {
    let mut c = RunConfig::default_for("search", "cpu-tiny", algo, 5, true).unwrap();
    c.model.d_model = 64;
    c.model.n_layers = 2;
    c.model.d_ff = 128;
    c.warm_start.steps = 300;
    c.warm_start.batch_size = 32;
    c.rl.steps = 2;
    c.rl.problems_per_step = 5;
    c.rl.group_size = 4;
    c.rl.checkpoint_every = 1;
    c.eval.problems = 4;
    c.eval.samples = 1;
    c
}

fn options(config: RunConfig, run: &Path, init: Option<&Path>) -> PipelineOptions {
    PipelineOptions {
        init: init.map(Path::to_path_buf),
        quiet: true,
        final_eval: false,
        ..PipelineOptions::new(config, run)
    }
}

/// A warm start that solves some problems (GRPO has mixed groups to learn from), made once
/// on one device: every RL run here starts from it.
fn warm_start() -> &'static Path {
    static WARM: OnceLock<PathBuf> = OnceLock::new();
    WARM.get_or_init(|| {
        let run = dir("warm");
        let mut c = config(Algo::Grpo);
        c.rl.steps = 1;
        run_pipeline::<AD>(&options(c, &run, None), &Default::default()).unwrap();
        run.join("checkpoints/warm_start.ckpt")
    })
}

type Metrics = Vec<serde_json::Map<String, serde_json::Value>>;

/// The metrics of a stage (its steps and evaluations), without wall-clock measurements.
fn stage_metrics(run: &Path, phase: &str) -> Metrics {
    read_metrics(&run.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|r| r["phase"] == phase)
        .map(|mut r| {
            r.retain(|k, _| !k.starts_with("perf/") && k != "eval/seconds");
            r
        })
        .collect()
}

/// The metrics of the RL stage.
fn rl_metrics(run: &Path) -> Metrics {
    stage_metrics(run, "rl")
}

/// Two runs' metrics agree: the same records, numbers within 1e-5 relative.
fn close_metrics(a: &Metrics, b: &Metrics, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (x, y) in a.iter().zip(b) {
        for (k, v) in x {
            match (v.as_f64(), y[k].as_f64()) {
                (Some(p), Some(q)) => assert!((p - q).abs() <= 1e-5 * p.abs().max(1.0), "{what} {k}: {p} vs {q}"),
                _ => assert_eq!(v, &y[k], "{what} {k}"),
            }
        }
    }
}

fn same_samples(a: &Sampled, b: &Sampled) {
    assert_eq!(a.problems, b.problems);
    assert_eq!(a.rollouts.len(), b.rollouts.len());
    assert_eq!(a.prefix_streams.len(), b.prefix_streams.len());
    for (x, y) in a
        .rollouts
        .iter()
        .zip(&b.rollouts)
        .chain(a.prefix_streams.iter().zip(&b.prefix_streams))
    {
        assert_eq!(x.problem, y.problem);
        assert_eq!(x.tokens, y.tokens);
        assert_eq!(x.roles, y.roles);
        assert_eq!(x.episodes, y.episodes);
        assert_eq!(x.reward, y.reward);
        assert_eq!(format!("{:?}", x.j), format!("{:?}", y.j));
    }
    assert_eq!(format!("{:?}", a.baselines), format!("{:?}", b.baselines));
}

/// A problem's rollouts and J do not depend on which other problems are sampled with it: the
/// step's problems sampled in two shares and merged are the whole step's samples (and give its
/// training signal), for each recipe, with the prover sampling its forced answers.
#[test]
fn a_step_scored_in_shares_equals_the_whole_step() {
    let f = warm_started("search", 300, 1, 7, "dp-shares");
    let protocol = WordProtocol::new(f.task.as_ref(), &f.vocab);
    let problems = common::problems(6, 11);
    for algo in [Algo::Grpo, Algo::MrtDense, Algo::Mrt] {
        let mut cfg = RunConfig::default_for("search", "cpu-tiny", algo, 0, true).unwrap().rl;
        cfg.group_size = 3;
        cfg.prover.mode = ProverMode::Sample;
        cfg.prover.samples = 4;
        let engine = Engine {
            model: &f.model,
            protocol: &protocol,
            config: &cfg.rollout,
            prover: algo.needs_prover().then_some(&cfg.prover),
        };
        let rngs = || split_rngs(&mut StdRng::seed_from_u64(21), problems.len());
        let whole = sample(&engine, &problems, &cfg, &mut rngs()).unwrap();
        let mut r = rngs();
        let (left, right) = r.split_at_mut(2);
        let parts = vec![
            sample(&engine, &problems[..2], &cfg, left).unwrap(),
            sample(&engine, &problems[2..], &cfg, right).unwrap(),
        ];
        let merged = Sampled::merge(parts);
        same_samples(&whole, &merged);
        let whole = signal(whole, &cfg);
        assert_eq!(whole.signals, signal(merged, &cfg).signals);
        // Each peer's batch of its rows carries the whole step's counts and composition.
        let refs: Vec<&Rollout> = whole.rollouts.iter().collect();
        let dev = Default::default();
        let full = rollout_batch::<Flex>(&refs, &whole.signals, protocol.pad(), &dev);
        let n = refs.len();
        for rows in [0..n / 3, n / 3..n] {
            let share = shard_batch::<Flex>(&refs, &whole.signals, rows.clone(), protocol.pad(), &dev);
            assert!(share.sharded && share.tokens.dims()[0] == rows.len(), "{algo:?}");
            assert_eq!(share.trained_tokens, full.trained_tokens, "{algo:?}");
            assert_eq!(
                share.outcome_share().to_bits(),
                full.outcome_share().to_bits(),
                "{algo:?}"
            );
        }
        // Not a vacuous comparison: the samples differ between problems and carry a signal.
        let rewards: Vec<f32> = whole.rollouts.iter().map(|r| r.reward).collect();
        assert!(rewards.iter().any(|&x| x > 0.0), "{algo:?}: {rewards:?}");
        assert!(
            whole.signals.iter().any(|s| s.outcome != 0.0 || s.bonus.is_some()),
            "{algo:?}"
        );
        if algo.needs_prover() {
            assert!(whole.streams().iter().any(|r| !r.j.is_empty()), "{algo:?}: no J");
        }
    }
}

/// Two peers (`cpu,cpu`) train, over two RL steps of `grpo` and of `mrt-dense`, the
/// parameters one device trains on the same problems, up to the summation order of the
/// gradient all-reduce, and the leader's metrics, the shared evaluation's included, are the
/// one-device run's.
#[test]
fn two_peers_train_what_one_device_trains() {
    let device: Device<AD> = Default::default();
    for algo in [Algo::Grpo, Algo::MrtDense] {
        let name = algo.name();
        let init = warm_start();

        let one = dir(&format!("one-{name}"));
        let two = dir(&format!("two-{name}"));
        assert!(
            run_pipeline::<AD>(&options(config(algo), &one, Some(init)), &device)
                .unwrap()
                .completed
        );
        let devices = vec![device; 2];
        assert!(
            run_pipeline_on::<AD>(&options(config(algo), &two, Some(init)), &devices)
                .unwrap()
                .completed
        );

        let (a, b) = (
            params(&one.join("checkpoints/final.ckpt")),
            params(&two.join("checkpoints/final.ckpt")),
        );
        let start = params(init);
        let moved = relative_difference(&start, &a);
        let diff = relative_difference(&a, &b);
        eprintln!("{name}: parameters moved {moved:.3e} (relative); two peers vs one device {diff:.3e}");
        assert!(moved > 3e-5, "{name}: RL did not move the parameters ({moved:.3e})");
        assert!(diff <= 1e-6, "{name}: two peers differ from one device by {diff:.3e}");
        assert!(
            diff <= 1e-3 * moved,
            "{name}: {diff:.3e} is not small against the update {moved:.3e}"
        );

        // Two steps and the evaluation after the last, whose held-out problems the peers shared.
        let (ma, mb) = (rl_metrics(&one), rl_metrics(&two));
        assert_eq!(ma.len(), 3);
        assert!(ma[2].contains_key("eval/pass@1"));
        close_metrics(&ma, &mb, name);
        // Every RL step logged each peer's rollout time and the all-reduce time.
        let raw = read_metrics(&two.join("metrics.jsonl")).unwrap();
        let last = raw.iter().rev().find(|r| r.contains_key("train/lr")).unwrap();
        for key in ["perf/rollout_s/peer0", "perf/rollout_s/peer1", "perf/allreduce_s"] {
            assert!(last[key].as_f64().unwrap() >= 0.0, "{key}");
        }
    }
}

/// A two-peer run killed after its first RL step and resumed (on two peers) ends with the
/// parameters of an uninterrupted two-peer run.
#[test]
fn a_resumed_two_peer_run_matches_an_uninterrupted_one() {
    let devices = vec![Device::<AD>::default(); 2];
    let init = warm_start();

    let whole = dir("resume-whole");
    run_pipeline_on::<AD>(&options(config(Algo::Grpo), &whole, Some(init)), &devices).unwrap();
    let cut = dir("resume-cut");
    let killed = PipelineOptions {
        interrupt_after: Some(1),
        ..options(config(Algo::Grpo), &cut, Some(init))
    };
    assert!(!run_pipeline_on::<AD>(&killed, &devices).unwrap().completed);
    let resumed = PipelineOptions {
        resume: true,
        ..options(config(Algo::Grpo), &cut, None)
    };
    assert!(run_pipeline_on::<AD>(&resumed, &devices).unwrap().completed);
    assert_eq!(
        params(&whole.join("checkpoints/final.ckpt")),
        params(&cut.join("checkpoints/final.ckpt"))
    );
    assert_eq!(rl_metrics(&whole), rl_metrics(&cut));
}

/// A peer that fails (an error or a panic) while the other waits in an all-reduce stops the
/// group: the call returns an error naming the failed peer, and a new group works afterwards;
/// peers started with different configurations are refused.
#[test]
fn a_failing_peer_stops_the_group_with_its_error() {
    let devices = vec![Device::<AD>::default(); 2];
    let err = run_peers::<AD, ()>(
        &devices,
        |p| {
            p.sum(&[1.0])?;
            p.sum(&[2.0])?; // the worker never joins this one
            Ok(())
        },
        |p| {
            p.sum(&[1.0])?;
            Err(Error::Budget("injected failure".into()))
        },
    )
    .unwrap_err();
    assert!(matches!(err, Error::Peer { rank: 1, .. }), "{err}");
    assert!(err.to_string().contains("injected failure"), "{err}");

    let err = run_peers::<AD, ()>(&devices, |p| p.sum(&[1.0]).map(|_| ()), |_| panic!("worker exploded")).unwrap_err();
    assert!(
        err.to_string().contains("peer 1") && err.to_string().contains("worker exploded"),
        "{err}"
    );

    // Peers that would train different things are refused before they start.
    let err = run_peers::<AD, ()>(
        &devices,
        |p| p.agree("config", b"seed 1"),
        |p| p.agree("config", b"seed 2"),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Peer { rank: 1, .. }), "{err}");
    assert!(err.to_string().contains("different config than peer 0"), "{err}");

    // The group's collectives after failures: sums, and a gather of uneven, odd-length bytes.
    let out = run_peers::<AD, _>(
        &devices,
        |p| {
            let s = p.sum(&[1.5, 1e9 + 0.25])?;
            let g = p.gather(&[1, 2, 255])?;
            Ok((s, g, p.shard(5)))
        },
        |p| {
            assert_eq!(p.shard(5), 2..5);
            p.sum(&[2.0, 1.0])?;
            p.gather(&[7, 0, 9, 200, 4])?;
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(out.0, vec![3.5, 1e9 + 1.25]);
    assert_eq!(out.1, vec![vec![1, 2, 255], vec![7, 0, 9, 200, 4]]);
    assert_eq!(out.2, 0..2);
}

/// The closing evaluations of a run resumed after its last RL step (so neither the base nor
/// the fine-tuned model was evaluated in this process, and neither is reused) shared by two
/// peers give one device's numbers.
#[test]
fn two_peers_share_the_closing_evaluations() {
    let device: Device<AD> = Default::default();
    let mut summaries = Vec::new();
    for peers in [1, 2] {
        let run = dir(&format!("closing-{peers}"));
        run_pipeline::<AD>(&options(config(Algo::Grpo), &run, Some(warm_start())), &device).unwrap();
        let resumed = PipelineOptions {
            resume: true,
            final_eval: true,
            ..options(config(Algo::Grpo), &run, None)
        };
        let out = run_pipeline_on::<AD>(&resumed, &vec![device; peers]).unwrap();
        let records = read_metrics(&run.join("metrics.jsonl")).unwrap();
        for stage in ["base", "final"] {
            let r = records.iter().find(|r| r["phase"] == stage).unwrap();
            assert!(!r.contains_key("eval/reused"), "{peers} peers: {stage} was reused");
        }
        summaries.push(serde_json::to_value((out.base.unwrap(), out.fine_tuned.unwrap())).unwrap());
    }
    // Not vacuous: the problems were attempted.
    assert!(
        summaries[0][0]["mean_tokens"].as_f64().unwrap() > 0.0,
        "{}",
        summaries[0]
    );
    assert_eq!(summaries[0], summaries[1]);
}

/// Each peer samples whole problems: fewer problems per step than devices is a config error,
/// given before the warm start does any work.
#[test]
fn fewer_problems_per_step_than_devices_is_refused_at_once() {
    let mut c = config(Algo::Grpo);
    c.rl.problems_per_step = 1;
    let run = dir("too-few");
    let err = run_pipeline_on::<AD>(&options(c, &run, None), &[Device::<AD>::default(); 2]).unwrap_err();
    assert!(
        matches!(&err, Error::Config { field, .. } if field == "rl.problems_per_step"),
        "{err}"
    );
    assert!(!run.join("checkpoints/warm_start.ckpt").exists());
    assert!(!run.join("checkpoints/latest.ckpt").exists());

    // And each peer trains on whole warm-start traces.
    let mut c = config(Algo::Grpo);
    c.warm_start.batch_size = 1;
    let run = dir("too-few-traces");
    let err = run_pipeline_on::<AD>(&options(c, &run, None), &[Device::<AD>::default(); 2]).unwrap_err();
    assert!(
        matches!(&err, Error::Config { field, .. } if field == "warm_start.batch_size"),
        "{err}"
    );
}
