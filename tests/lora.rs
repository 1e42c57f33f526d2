//! LoRA: adapters that start at zero change nothing, training moves only them, checkpoints
//! hold them and name their base, export merges them (or writes PEFT's layout, which reads
//! back), and an interrupted LoRA run resumes exactly.

mod common;

use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use common::{param_grads, qwen2, randomise_b, small_lora_config, AD, B};
use mrt::model::lora::{LoraConfig, Target};
use mrt::model::lowmem::hidden_gradients;
use mrt::model::{checkpoint, hf, logprobs_of_hidden, Transformer};
use mrt::rl::config::{Algo, RunConfig};
use mrt::rl::metrics::read_metrics;
use mrt::rl::optim::{adamw, require_grad, step_grads};
use mrt::rl::pipeline::{run_pipeline, PipelineOptions};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mrt-lora-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn ids<Bk: Backend>(rows: &[&[i64]]) -> Tensor<Bk, 2, Int> {
    let flat: Vec<i64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), rows[0].len()]), &Default::default())
}

fn values<Bk: Backend, const D: usize>(t: Tensor<Bk, D>) -> Vec<f32> {
    t.into_data().to_vec().unwrap()
}

/// Every float parameter's values, in module order.
fn all_params<Bk: Backend, M: Module<Bk>>(model: &M) -> Vec<Vec<f32>> {
    struct Collect(Vec<Vec<f32>>);
    impl<Bk: Backend> ModuleVisitor<Bk> for Collect {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<Bk, D>>) {
            self.0.push(p.val().into_data().to_vec().unwrap());
        }
    }
    let mut c = Collect(Vec::new());
    model.visit(&mut c);
    c.0
}

#[test]
fn zero_adapters_leave_the_base_bit_for_bit() {
    let base = qwen2::<B>();
    let adapted = base.clone().with_lora(&LoraConfig::new(4), 7, None);
    assert!(adapted.has_lora() && !base.has_lora());
    let tokens = ids::<B>(&[&[1, 5, 9, 2, 7, 3], &[4, 4, 8, 1, 0, 6]]);
    assert_eq!(
        values(base.forward(tokens.clone())),
        values(adapted.forward(tokens.clone()))
    );
    // The decoding path too (KV cache, one chunk then one token).
    let run = |m: &Transformer<B>| {
        let mut cache = m.new_cache(2, 16);
        let a = m.forward_cached(tokens.clone(), &mut cache, None).unwrap();
        let b = m.forward_cached(ids(&[&[3], &[5]]), &mut cache, None).unwrap();
        (values(a), values(b))
    };
    assert_eq!(run(&base), run(&adapted));
    // Rank r adapters on every projection of each block: 2 blocks × r × Σ(in + out).
    let c = &base.config;
    let kv = c.n_kv_heads * c.head_dim();
    let per_block = 4 * ((c.d_model + c.d_model) * 2 + (c.d_model + kv) * 2 + (c.d_model + c.d_ff) * 3);
    assert_eq!(adapted.num_params() - base.num_params(), c.n_layers * per_block);
}

#[test]
fn only_adapters_get_gradients_and_optimizer_state() {
    let model = require_grad(randomise_b(qwen2::<AD>().with_lora(&LoraConfig::new(2), 1, None), 3));
    let tokens = ids::<AD>(&[&[1, 5, 9, 2, 7, 3, 8, 8]]);
    let loss_of = |m: &Transformer<AD>| {
        let m = m.clone();
        let t = tokens.clone();
        move |h: Tensor<AD, 3>| logprobs_of_hidden(&m, h, t, None, false, 1.0).logprobs.sum().neg()
    };
    let plain = hidden_gradients(&model, tokens.clone(), false, loss_of(&model));
    let blocked = hidden_gradients(&model, tokens.clone(), true, loss_of(&model));
    let (gp, gb) = (param_grads(&model, &plain), param_grads(&model, &blocked));
    // 2 layers × 7 targets × (A, B), nothing else.
    assert_eq!((gp.len(), gb.len()), (28, 28));
    for (a, b) in gp.iter().zip(&gb) {
        let scale = a.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
        assert!(a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-6 * scale));
    }
    let config = common::adapter_optim();
    let mut optim = adamw::<AD>(&config);
    let (stepped, _) = step_grads(model.clone(), &mut optim, plain, config.lr, config.grad_clip);
    // The base is untouched, bit for bit; every adapter tensor moved.
    assert_eq!(
        all_params(&stepped.clone().without_lora()),
        all_params(&model.clone().without_lora())
    );
    let (before, after) = (all_params(&model.adapters()), all_params(&stepped.adapters()));
    assert_eq!(before.len(), 28);
    assert!(before.iter().zip(&after).all(|(a, b)| a != b));
    // AdamW holds moments for the adapters alone.
    let record = burn::optim::Optimizer::<Transformer<AD>, AD>::to_record(&optim);
    let mut keys: Vec<_> = record.keys().copied().collect();
    keys.sort();
    let mut expected = adapter_param_ids(&model);
    expected.sort();
    assert_eq!(keys, expected);
}

fn adapter_param_ids<Bk: Backend>(model: &Transformer<Bk>) -> Vec<burn::module::ParamId> {
    struct Ids(Vec<burn::module::ParamId>);
    impl<Bk: Backend> ModuleVisitor<Bk> for Ids {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<Bk, D>>) {
            self.0.push(p.id);
        }
    }
    let mut ids = Ids(Vec::new());
    model.adapters().visit(&mut ids);
    ids.0
}

#[test]
fn merged_export_computes_what_the_adapters_do() {
    let out = dir("merged");
    let adapted = randomise_b(qwen2::<B>().with_lora(&LoraConfig::new(3), 2, None), 5);
    hf::save(&adapted, &out, None, None, &[]).unwrap();
    let merged = hf::load::<B>(&out, &Default::default()).unwrap();
    assert!(!merged.has_lora());
    let tokens = ids::<B>(&[&[1, 5, 9, 2, 7, 3, 0, 11]]);
    let (a, m) = (values(adapted.forward(tokens.clone())), values(merged.forward(tokens)));
    let scale = a.iter().fold(0f32, |s, x| s.max(x.abs()));
    let diff = a.iter().zip(&m).fold(0f32, |d, (x, y)| d.max((x - y).abs()));
    assert!(
        diff <= 1e-5 * scale.max(1.0),
        "merged logits differ by {diff} (scale {scale})"
    );
    // And the adapters did change the model (else this test would prove nothing).
    let plain = values(qwen2::<B>().forward(ids::<B>(&[&[1, 5, 9, 2, 7, 3, 0, 11]])));
    assert!(plain.iter().zip(&a).any(|(x, y)| (x - y).abs() > 1e-3));
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn peft_layout_reads_back_bit_for_bit() {
    let out = dir("peft");
    let targets = vec![Target::Q, Target::V, Target::Down];
    let config = LoraConfig {
        alpha: Some(16.0),
        targets: targets.clone(),
        ..LoraConfig::new(4)
    };
    let adapted = randomise_b(qwen2::<B>().with_lora(&config, 9, None), 11);
    hf::save_peft(&adapted, &out, "tests/fixtures/hf/qwen2").unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(hf::ADAPTER_CONFIG)).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"], 16);
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "v_proj", "down_proj"])
    );
    // PEFT's names and PyTorch's `[out, in]` layout.
    let bytes = std::fs::read(out.join(hf::ADAPTER_WEIGHTS)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let c = &adapted.config;
    assert_eq!(st.len(), c.n_layers * 3 * 2);
    let a = st
        .tensor("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight")
        .unwrap();
    assert_eq!(a.shape(), [4, c.d_model]);
    let b = st
        .tensor("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight")
        .unwrap();
    assert_eq!(b.shape(), [c.d_model, 4]);

    let back = hf::load_peft(qwen2::<B>(), &out).unwrap();
    assert_eq!(back.lora_config(), Some(config));
    assert_eq!(all_params(&back), all_params(&adapted));

    // Configurations this reader does not implement are refused, not misread.
    let mut bad = cfg.clone();
    bad["use_rslora"] = true.into();
    std::fs::write(out.join(hf::ADAPTER_CONFIG), bad.to_string()).unwrap();
    let e = hf::load_peft(qwen2::<B>(), &out).unwrap_err().to_string();
    assert!(e.contains("rsLoRA"), "{e}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn checkpoints_hold_adapters_and_refuse_another_base() {
    let d = dir("ckpt");
    std::fs::create_dir_all(&d).unwrap();
    let base_path = d.join("base.ckpt");
    let base = qwen2::<B>();
    checkpoint::save(&base_path, &base, vec![], serde_json::json!({})).unwrap();
    let reference = mrt::model::lora::BaseRef {
        path: base_path.clone(),
        fingerprint: base.fingerprint(),
    };
    let adapted = randomise_b(base.clone().with_lora(&LoraConfig::new(2), 4, Some(reference)), 6);
    let path = d.join("adapters.ckpt");
    checkpoint::save(&path, &adapted, vec![], serde_json::json!({"step": 1})).unwrap();
    let ck = checkpoint::load(&path, Some(&base.config)).unwrap();
    let header = ck.lora.clone().unwrap();
    // The base lies beside the checkpoint: named by file name, so the directory can move.
    assert_eq!(header.base.as_ref().unwrap().path, PathBuf::from("base.ckpt"));
    assert!(ck.section(checkpoint::MODEL_SECTION).is_err());
    let small = std::fs::metadata(&path).unwrap().len();
    assert!(small * 4 < std::fs::metadata(&base_path).unwrap().len());
    let back = ck.model::<B>(&Default::default()).unwrap();
    assert_eq!(all_params(&back), all_params(&adapted));

    // A base with other weights (same shapes) is refused by its fingerprint.
    let mut other = qwen2::<B>();
    let w = other.blocks[0].attn.q.weight.val();
    other.blocks[0].attn.q.weight = Param::from_tensor(w.add_scalar(1e-3));
    checkpoint::save(&base_path, &other, vec![], serde_json::json!({})).unwrap();
    let e = checkpoint::load(&path, None)
        .unwrap()
        .model::<B>(&Default::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("fingerprint"), "{e}");
    std::fs::remove_file(&base_path).unwrap();
    let e = checkpoint::load(&path, None)
        .unwrap()
        .model::<B>(&Default::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("base.ckpt") && e.contains("not found"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}

/// With `final_eval`, the run ends by evaluating its start policy (the adapters' base, whose
/// tensors the policy shares) and its fine-tuned adapters.
fn options(config: RunConfig, run_dir: PathBuf, resume: bool, interrupt_after: Option<usize>) -> PipelineOptions {
    PipelineOptions {
        resume,
        quiet: true,
        interrupt_after,
        ..PipelineOptions::new(config, run_dir)
    }
}

#[test]
fn every_objective_trains_only_the_adapters_over_the_warm_start() {
    let device = Default::default();
    for algo in [Algo::Grpo, Algo::Mrt, Algo::MrtDense, Algo::Star, Algo::MrtStar] {
        let run = dir(&format!("algo-{algo:?}"));
        // Enough warm start and problems that some group's rewards differ (with equal rewards
        // GRPO's update is exactly zero, and this test would have nothing to look at).
        let mut config = RunConfig::default_for("search", "cpu-tiny", algo, 0, true).unwrap();
        config.warm_start.steps = 30;
        config.rl.steps = 1;
        config.rl.eval_every = 0;
        config.rl.lora = Some(LoraConfig::new(4));
        config.eval.problems = 4;
        let config_layers = config.model.n_layers;
        let out = run_pipeline::<AD>(&options(config, run.clone(), false, None), &device).unwrap();
        assert!(out.completed);
        let warm = checkpoint::load(&run.join("checkpoints/warm_start.ckpt"), None).unwrap();
        assert!(
            warm.lora.is_none(),
            "the warm start is a full model, the adapters' base"
        );
        let warm = warm.model::<B>(&device).unwrap();
        let fin = checkpoint::load(&run.join("checkpoints/final.ckpt"), None).unwrap();
        let base = fin
            .lora
            .as_ref()
            .and_then(|l| l.base.clone())
            .expect("adapters over a base");
        assert_eq!(base.path, PathBuf::from("warm_start.ckpt"));
        let fin = fin.model::<B>(&device).unwrap();
        assert_eq!(
            all_params(&fin.clone().without_lora()),
            all_params(&warm),
            "{algo:?}: base moved"
        );
        let moved = fin
            .adapters()
            .layers
            .iter()
            .flat_map(|l| [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down])
            .filter(|a| values(a.as_ref().unwrap().b.val()).iter().any(|x| *x != 0.0))
            .count();
        let m = read_metrics(&run.join("metrics.jsonl")).unwrap();
        assert_eq!(
            moved,
            config_layers * 7,
            "{algo:?}: every adapter's B moved off zero; {:?}",
            m.last()
        );
        let _ = std::fs::remove_dir_all(&run);
    }
}

#[test]
fn interrupted_lora_run_resumes_exactly() {
    let device = Default::default();
    let config = small_lora_config(Algo::MrtDense);
    let a = dir("uninterrupted");
    assert!(
        run_pipeline::<AD>(&options(config.clone(), a.clone(), false, None), &device)
            .unwrap()
            .completed
    );
    let b = dir("resumed");
    // Killed after warm-start step 5 (latest at 3), then RL step 3 (latest at 2).
    let mut resume = false;
    for call in 0.. {
        assert!(call < 6, "the run never completed");
        let out = run_pipeline::<AD>(&options(config.clone(), b.clone(), resume, Some(5)), &device).unwrap();
        resume = true;
        if out.completed {
            break;
        }
    }
    let logits = |run: &Path| {
        let m = checkpoint::load(&run.join("checkpoints/final.ckpt"), None)
            .unwrap()
            .model::<B>(&device)
            .unwrap();
        assert!(m.has_lora());
        values(m.forward(ids(&[&[1, 10, 11, 12, 4]])))
    };
    assert_eq!(logits(&a), logits(&b));
    let summary = |run: &Path| std::fs::read_to_string(run.join("summary.json")).unwrap();
    let (sa, sb) = (summary(&a), summary(&b));
    assert_eq!(sa.replace(a.to_str().unwrap(), ""), sb.replace(b.to_str().unwrap(), ""));
    assert!(sa.contains("\"fine_tuned\"") && sa.contains("\"pass1\""), "{sa}");
    let metrics = |run: &Path| {
        read_metrics(&run.join("metrics.jsonl"))
            .unwrap()
            .into_iter()
            .map(|mut r| {
                r.retain(|k, _| !k.starts_with("perf/") && k != "eval/seconds" && k != "eval/reused");
                r
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(metrics(&a), metrics(&b));
    let _ = (std::fs::remove_dir_all(&a), std::fs::remove_dir_all(&b));
}
