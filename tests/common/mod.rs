//! Shared fixtures: briefly warm-started policies (the `search` one trained once per test binary).

#![allow(dead_code)]

#[cfg(feature = "wgpu")]
pub mod gpu;
pub mod text;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use burn::backend::{Autodiff, Flex};
use burn::module::{AutodiffModule, Param};
use burn::prelude::*;
use mrt::data::batch::collate;
use mrt::data::{sample_problem, warm_start_trace, Problem, Split, Task, TaskConfig, Tokenized, Vocab};
use mrt::model::lora::LoraConfig;
use mrt::model::{hf, token_logprobs, SamplerConfig, Transformer, TransformerConfig};
use mrt::rl::config::{Algo, RunConfig};
use mrt::rl::loss::sft_loss;
use mrt::rl::optim::{adamw, step, OptimConfig};
use mrt::rl::protocol::WordProtocol;
use mrt::rl::prover::{ProverConfig, ProverMode};
use mrt::rl::rollout::{Engine, Rollout, RolloutConfig};
use mrt::rl::run::step_rng;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub type B = Flex;
pub type AD = Autodiff<Flex>;

pub struct Fixture {
    pub task: Box<dyn Task>,
    pub task_config: TaskConfig,
    pub vocab: Vocab,
    pub model: Transformer<B>,
}

/// A small model trained for `steps` warm-start steps on `search` (deterministic).
pub fn train_search_policy(steps: usize) -> Fixture {
    warm_started("search", steps, 1, 7, "fixture")
}

/// A small model (d 64, 2 layers) trained from init seed `init` for `steps` warm-start steps on
/// the task's default mix; batches drawn from `step_rng(seed, label, step)` (deterministic).
pub fn warm_started(task_name: &str, steps: usize, init: u64, seed: u64, label: &str) -> Fixture {
    let task_config = TaskConfig::by_name(task_name).unwrap();
    let task = task_config.build().unwrap();
    let vocab = Vocab::build(&task.words()).unwrap();
    let mut cfg = TransformerConfig::preset("cpu-tiny").unwrap();
    cfg.vocab_size = vocab.size();
    cfg.d_model = 64;
    cfg.n_layers = 2;
    cfg.d_ff = 128;
    let device = Default::default();
    let mut model = Transformer::<AD>::new(&cfg, init, &device).unwrap();
    let optim_cfg = OptimConfig {
        lr: 3e-3,
        warmup_steps: 20,
        min_lr_ratio: 0.1,
        weight_decay: 0.01,
        grad_clip: 1.0,
    };
    let mut optim = adamw::<AD>(&optim_cfg);
    let mix = task_config.warm_start().expect("a word task").clone();
    for s in 0..steps {
        let mut rng = step_rng(seed, label, s);
        let traces: Vec<Tokenized> = (0..32)
            .map(|_| {
                let p = sample_problem(task.as_ref(), Split::Train, &mut rng).unwrap();
                warm_start_trace(task.as_ref(), &p, &mix, &mut rng)
                    .tokenize(&vocab)
                    .unwrap()
            })
            .collect();
        let refs: Vec<&Tokenized> = traces.iter().collect();
        let batch = collate::<AD>(&refs, vocab.specials.pad, &device);
        let lp = token_logprobs(&model, batch.tokens, Some(batch.mask.clone()), false, 1.0);
        let loss = sft_loss(lp.logprobs, &batch.mask);
        model = step(model, &mut optim, loss, optim_cfg.lr_at(s, steps), 1.0).0;
    }
    Fixture {
        task,
        task_config,
        vocab,
        model: model.valid(),
    }
}

/// The shared fixture: 1500 warm-start steps (~1 min). Fewer leave the meta-prover unsure at
/// boundaries after a confirmed solution (mean J there 0.46 after 300 steps, 0.87 after 600,
/// 0.95 after 1000, 0.97 after 1500), which a test pins.
pub fn search_policy() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| train_search_policy(1500))
}

/// `n` training problems of the fixture's task.
pub fn problems(n: usize, seed: u64) -> Vec<Problem> {
    let f = search_policy();
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| sample_problem(f.task.as_ref(), Split::Train, &mut rng).unwrap())
        .collect()
}

pub fn rollout_config() -> RolloutConfig {
    RolloutConfig {
        max_episodes: 6,
        max_tokens: 32,
        max_answer_tokens: 4,
        free_answer: Default::default(),
        sampler: SamplerConfig::default(),
        budget_forcing: false,
    }
}

pub fn exact_at(temperature: f64) -> ProverConfig {
    ProverConfig {
        mode: ProverMode::Exact,
        samples: 8,
        temperature,
        max_answer_tokens: 4,
    }
}

pub fn exact() -> ProverConfig {
    exact_at(1.0)
}

/// `group` rollouts of each of `n` problems with exact J at every boundary.
pub fn rollouts_with_j(n: usize, group: usize, seed: u64) -> (Vec<Problem>, Vec<Rollout>) {
    let f = search_policy();
    let ps = problems(n, seed);
    let rc = rollout_config();
    let prover = exact();
    let protocol = WordProtocol::new(f.task.as_ref(), &f.vocab);
    let engine = Engine {
        model: &f.model,
        protocol: &protocol,
        config: &rc,
        prover: Some(&prover),
    };
    let rs = engine.rollouts(&ps, group, &mut StdRng::seed_from_u64(seed)).unwrap();
    (ps, rs)
}

/// Full-forward logits after the last of `tokens`, `[V]`.
pub fn full_forward_last_logits(model: &Transformer<B>, tokens: &[u32]) -> Vec<f32> {
    let n = tokens.len();
    let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
    let logits = model.forward(Tensor::from_data(TensorData::new(ids, [1, n]), &model.device()));
    let v = model.config.vocab_size;
    logits.slice([0..1, n - 1..n, 0..v]).into_data().to_vec().unwrap()
}

/// Every float parameter's gradient in `grads`, in the model's visiting order.
pub fn param_grads<A: burn::tensor::backend::AutodiffBackend>(
    model: &Transformer<A>,
    grads: &burn::optim::GradientsParams,
) -> Vec<Vec<f32>> {
    struct Collect<'a>(&'a burn::optim::GradientsParams, Vec<Vec<f32>>);
    impl<A: burn::tensor::backend::AutodiffBackend> burn::module::ModuleVisitor<A> for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, p: &burn::module::Param<Tensor<A, D>>) {
            if let Some(g) = self.0.get::<A::InnerBackend, D>(p.id) {
                self.1.push(g.into_data().to_vec().unwrap());
            }
        }
    }
    let mut c = Collect(grads, Vec::new());
    burn::module::Module::visit(model, &mut c);
    c.1
}

/// A small `search` run (d 32, 2 layers) with rank-4 adapters over a 6-step warm start: 4 RL
/// steps, checkpoints every 2 (every 3 in the warm start), no evaluation during training.
pub fn small_lora_config(algo: Algo) -> RunConfig {
    let mut c = RunConfig::default_for("search", "cpu-tiny", algo, 5, true).unwrap();
    c.model.d_model = 32;
    c.model.n_layers = 2;
    c.model.d_ff = 64;
    c.warm_start.steps = 6;
    c.warm_start.batch_size = 8;
    c.warm_start.checkpoint_every = 3;
    c.warm_start.eval_every = 0;
    c.rl.steps = 4;
    c.rl.problems_per_step = 3;
    c.rl.group_size = 4;
    c.rl.checkpoint_every = 2;
    c.rl.eval_every = 0;
    c.rl.optim.lr = 1e-2;
    c.rl.lora = Some(LoraConfig::new(4));
    c.eval.problems = 4;
    c.eval.samples = 1;
    c
}

/// The tiny Qwen2 fixture (GQA, q/k/v biases, tied head) saved by `transformers`.
pub fn qwen2_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/qwen2")
}

pub fn qwen2<Bk: Backend>() -> Transformer<Bk> {
    hf::load::<Bk>(&qwen2_dir(), &Default::default()).unwrap()
}

/// Every adapter's B replaced by small values drawn from `seed` (fresh adapters have B = 0,
/// which would make every comparison below trivially true).
pub fn randomise_b<Bk: Backend>(model: Transformer<Bk>, seed: u64) -> Transformer<Bk> {
    let mut rng = StdRng::seed_from_u64(seed);
    let device = model.device();
    let mut adapters = model.adapters();
    for l in &mut adapters.layers {
        for lora in [
            &mut l.q,
            &mut l.k,
            &mut l.v,
            &mut l.o,
            &mut l.gate,
            &mut l.up,
            &mut l.down,
        ]
        .into_iter()
        .flatten()
        {
            let [r, out] = lora.b.dims();
            let v: Vec<f32> = (0..r * out).map(|_| rng.random_range(-0.1..0.1)).collect();
            lora.b = Param::from_tensor(Tensor::from_data(TensorData::new(v, [r, out]), &device));
        }
    }
    model.with_adapters(adapters)
}

/// AdamW at a constant 1e-2 (weight decay 0.01, clip 1): one step visibly moves every adapter.
pub fn adapter_optim() -> OptimConfig {
    OptimConfig {
        lr: 1e-2,
        warmup_steps: 0,
        min_lr_ratio: 1.0,
        weight_decay: 0.01,
        grad_clip: 1.0,
    }
}
