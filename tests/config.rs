//! Run configurations: defaults validate, and bad values are errors that name the field.

use mrt::rl::config::{Algo, RunConfig};
use serde_json::json;

fn patched(algo: Algo, task: &str, patch: serde_json::Value) -> Result<RunConfig, String> {
    let c = RunConfig::with_patch(task, "cpu-tiny", algo, 0, true, Some(patch)).map_err(|e| e.to_string())?;
    c.validate().map_err(|e| e.to_string())?;
    Ok(c)
}

#[test]
fn defaults_validate_for_every_task_and_algorithm() {
    for task in ["search", "countdown"] {
        for algo in ["grpo", "mrt", "mrt-dense", "star", "mrt-star"] {
            RunConfig::default_for(task, "cpu-tiny", Algo::parse(algo).unwrap(), 0, true)
                .unwrap()
                .validate()
                .unwrap();
        }
    }
}

#[test]
fn vocabulary_sizes_that_cannot_fit_are_refused_up_front() {
    let err = patched(Algo::Grpo, "search", json!({"task": {"n": 100_000_000}})).unwrap_err();
    assert!(err.contains("task.n") && err.contains("10000"), "{err}");
    let err = patched(Algo::Grpo, "countdown", json!({"task": {"max_value": 1_000_000}})).unwrap_err();
    assert!(err.contains("task.max_value"), "{err}");
    assert!(patched(Algo::Grpo, "search", json!({"task": {"n": 256, "hint_noise": 64}})).is_ok());
}

#[test]
fn a_group_of_one_is_refused_where_samples_are_compared_within_groups() {
    for algo in [Algo::Grpo, Algo::Mrt, Algo::MrtDense] {
        let err = patched(algo, "search", json!({"rl": {"group_size": 1}})).unwrap_err();
        assert!(err.contains("rl.group_size") && err.contains(algo.name()), "{err}");
    }
    // STaR keeps correct streams: one per problem is a valid (if small) setting.
    assert!(patched(Algo::Star, "search", json!({"rl": {"group_size": 1}})).is_ok());
}

#[test]
fn rollout_sampling_the_loss_cannot_score_is_refused() {
    for sampler in [
        json!({"temperature": 1.0, "top_k": 5}),
        json!({"temperature": 1.0, "top_p": 0.9}),
        json!({"temperature": 0.0}),
    ] {
        let err = patched(Algo::Grpo, "search", json!({"rl": {"rollout": {"sampler": sampler}}})).unwrap_err();
        assert!(err.contains("rl.rollout.sampler"), "{err}");
    }
    // A temperature other than 1 is fine: the loss scores tokens at the same temperature.
    assert!(patched(
        Algo::Grpo,
        "search",
        json!({"rl": {"rollout": {"sampler": {"temperature": 0.7}}}})
    )
    .is_ok());
    let err = patched(
        Algo::MrtDense,
        "search",
        json!({"rl": {"prover": {"temperature": 0.0}}}),
    )
    .unwrap_err();
    assert!(err.contains("prover.temperature"), "{err}");
}

#[test]
fn off_policy_rollouts_and_a_prover_at_another_temperature_are_refused() {
    // Budget forcing bans `</think>` from the sampling softmax, which the loss does not.
    for algo in [Algo::Grpo, Algo::MrtDense] {
        let err = patched(algo, "search", json!({"rl": {"rollout": {"budget_forcing": true}}})).unwrap_err();
        assert!(err.contains("rl.rollout.budget_forcing"), "{err}");
    }
    // J is read under the sampling policy: the prover's temperature must be the sampler's.
    let t07 = json!({"rl": {"rollout": {"sampler": {"temperature": 0.7}}}});
    for algo in [Algo::Mrt, Algo::MrtDense, Algo::MrtStar] {
        let err = patched(algo, "search", t07.clone()).unwrap_err();
        assert!(err.contains("rl.prover.temperature") && err.contains("0.7"), "{err}");
        let both = json!({"rl": {"rollout": {"sampler": {"temperature": 0.7}}, "prover": {"temperature": 0.7}}});
        assert!(patched(algo, "search", both).is_ok());
    }
    // GRPO has no prover: its (unused) temperature is not checked.
    assert!(patched(Algo::Grpo, "search", t07).is_ok());
    // Evaluation may decode greedily (GSM8K's pass@1); its prover keeps a positive temperature.
    assert!(patched(Algo::Grpo, "search", json!({"eval": {"temperature": 0.0}})).is_ok());
    let err = patched(Algo::Grpo, "search", json!({"eval": {"temperature": -1.0}})).unwrap_err();
    assert!(err.contains("eval.temperature"), "{err}");
}

#[test]
fn split_fractions_must_leave_training_problems() {
    let err = patched(
        Algo::Grpo,
        "search",
        json!({"task": {"held_out_fraction": 0.6, "validation_fraction": 0.5}}),
    )
    .unwrap_err();
    assert!(err.contains("validation_fraction"), "{err}");
    let err = patched(Algo::Grpo, "search", json!({"eval": {"split": "train"}})).unwrap_err();
    assert!(err.contains("eval.split"), "{err}");
    assert!(patched(Algo::Grpo, "search", json!({"eval": {"split": "validation"}})).is_ok());
}

#[test]
fn lora_is_configured_validated_and_trains_at_ten_times_the_rate() {
    let full = patched(Algo::Grpo, "search", serde_json::json!({})).unwrap();
    assert!(full.rl.lora.is_none());
    let lora = patched(Algo::Grpo, "search", serde_json::json!({"rl": {"lora": {"rank": 8}}})).unwrap();
    let adapters = lora.rl.lora.clone().unwrap();
    assert_eq!((adapters.rank, adapters.alpha(), adapters.targets.len()), (8, 16.0, 7));
    assert_eq!(lora.rl.optim.lr, full.rl.optim.lr * 10.0);
    // A rate that is given is kept; targets take PEFT's names too.
    let given = patched(
        Algo::Grpo,
        "search",
        serde_json::json!({"rl": {"optim": {"lr": 1e-4}, "lora": {"rank": 4, "alpha": 4, "targets": ["q_proj", "v"]}}}),
    )
    .unwrap();
    assert_eq!(given.rl.optim.lr, 1e-4);
    let adapters = given.rl.lora.unwrap();
    assert_eq!(
        (adapters.alpha(), adapters.targets),
        (4.0, vec![mrt::model::lora::Target::Q, mrt::model::lora::Target::V])
    );
    for (bad, field) in [
        (serde_json::json!({"rank": 0}), "lora.rank"),
        (serde_json::json!({"rank": 4, "targets": []}), "lora.targets"),
        (serde_json::json!({"rank": 4, "targets": ["qkv"]}), "qkv"),
    ] {
        let e = patched(Algo::Grpo, "search", serde_json::json!({"rl": {"lora": bad}})).unwrap_err();
        assert!(e.contains(field), "{e}");
    }
}
