//! A pretrained (tiny random) Hugging Face model fine-tuned on the sample JSONL end to end, in
//! full and with LoRA adapters.

use std::fs;
use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Flex};
use mrt::model::{checkpoint, hf, Transformer};
use mrt::rl::config::{Algo, RunConfig};
use mrt::rl::metrics::read_metrics;
use mrt::rl::pipeline::{run_pipeline, Outcome, PipelineOptions};

type B = Flex;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mrt-pretrained-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    d
}

/// `train --model <fixture> --task math --data <sample>` in miniature, with `rl` fields added
/// to the small run's: a couple of RL steps of a random Llama on the sample file.
fn fixture_run(algo: Algo, rl: serde_json::Value, name: &str) -> (PathBuf, Outcome) {
    let model_dir = root().join("tests/fixtures/hf/llama");
    let mut patch = serde_json::json!({
        "task": {"data": root().join("data/samples/math.jsonl"), "max_episodes": 2},
        "model": {"max_seq_len": 512},
        "rl": {"steps": 2, "problems_per_step": 2, "group_size": 2, "eval_every": 0, "checkpoint_every": 1,
               "rollout": {"max_tokens": 24, "max_answer_tokens": 6}, "prover": {"samples": 2, "max_answer_tokens": 6}},
        "eval": {"problems": 2, "samples": 1, "max_tokens": 24, "prover": {"samples": 2, "max_answer_tokens": 6}}
    });
    mrt::rl::config::merge_json(&mut patch, serde_json::json!({ "rl": rl }));
    let config = RunConfig::pretrained_with_patch("math", &model_dir, algo, 0, Some(patch)).unwrap();
    assert_eq!(config.warm_start.steps, 0);
    let run_dir = scratch(name);
    let opts = PipelineOptions {
        quiet: true,
        ..PipelineOptions::new(config, &run_dir)
    };
    let out = run_pipeline::<Autodiff<Flex>>(&opts, &Default::default()).unwrap();
    (run_dir, out)
}

/// The sample run writes the usual run directory.
#[test]
fn a_pretrained_model_fine_tunes_on_the_sample_file_end_to_end() {
    let model_dir = root().join("tests/fixtures/hf/llama");
    let (run_dir, out) = fixture_run(Algo::MrtDense, serde_json::json!({}), "run");
    assert!(out.completed && out.pretrained);
    for file in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "metrics.jsonl",
        "summary.json",
        "checkpoints/final.ckpt",
        "checkpoints/warm_start.ckpt",
    ] {
        assert!(run_dir.join(file).is_file(), "{file}");
    }
    let metrics = read_metrics(&run_dir.join("metrics.jsonl")).unwrap();
    let rl: Vec<_> = metrics.iter().filter(|r| r["phase"] == "rl").collect();
    assert_eq!(
        rl.iter()
            .filter(|r| r.get("train/loss").is_some() || r.get("rollout/reward").is_some())
            .count(),
        2
    );
    let (base, tuned) = (out.base.unwrap(), out.fine_tuned.unwrap());
    assert_eq!((base.problems, base.rollouts, tuned.rollouts), (2, 2, 2));
    assert!(base.pass1.is_finite() && tuned.pass1.is_finite());
    // Text runs refuse what only synthetic runs can do, by name.
    let mut bad = RunConfig::pretrained_with_patch("math", &model_dir, Algo::Grpo, 0, None).unwrap();
    bad.warm_start.steps = 10;
    assert!(bad.validate().unwrap_err().to_string().contains("warm_start.steps"));
    let err = RunConfig::with_patch("math", "cpu-tiny", Algo::Grpo, 0, true, None)
        .and_then(|c| c.validate())
        .unwrap_err()
        .to_string();
    assert!(err.contains("--model"), "{err}");
}

/// The same run with LoRA (`train --model DIR --lora-rank 2`): every checkpoint holds the
/// adapters alone and names the model directory as their base, which stays as it was.
#[test]
fn a_pretrained_model_fine_tunes_its_lora_adapters_end_to_end() {
    let model_dir = root().join("tests/fixtures/hf/llama");
    let lora = serde_json::json!({"lora": {"rank": 2, "targets": ["q", "v", "down"]}});
    let (run_dir, out) = fixture_run(Algo::Grpo, lora, "lora-run");
    assert!(out.completed && out.base.is_some() && out.fine_tuned.is_some());
    let base = hf::load_with_context::<B>(&model_dir, Some(512), &Default::default()).unwrap();
    let model_bytes = fs::metadata(model_dir.join("model.safetensors")).unwrap().len();
    for name in ["warm_start", "latest", "final"] {
        let path = run_dir.join(format!("checkpoints/{name}.ckpt"));
        let ck = checkpoint::load(&path, None).unwrap();
        let lora = ck.lora.clone().unwrap_or_else(|| panic!("{name}: no adapters"));
        assert_eq!(lora.base.unwrap().path, fs::canonicalize(&model_dir).unwrap(), "{name}");
        assert!(
            fs::metadata(&path).unwrap().len() * 4 < model_bytes,
            "{name}: the base was copied"
        );
        let model = ck.model::<B>(&Default::default()).unwrap();
        assert_eq!(model.lora_config().unwrap().targets.len(), 3);
        let w = |m: &Transformer<B>| m.blocks[1].mlp.down.weight.val().into_data().to_vec::<f32>().unwrap();
        assert_eq!(w(&model), w(&base), "{name}: the base moved");
    }
    let rl = read_metrics(&run_dir.join("metrics.jsonl")).unwrap();
    let steps = rl
        .iter()
        .filter(|r| r["phase"] == "rl" && r.get("rollout/reward").is_some())
        .count();
    assert_eq!(steps, 2);
}
