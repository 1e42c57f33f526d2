//! Shared fixtures: a briefly warm-started `search` policy (trained once per test binary).

#![allow(dead_code)]

use std::sync::OnceLock;

use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use mrt::data::batch::collate;
use mrt::data::{sample_problem, warm_start_trace, Split, Task, TaskConfig, Tokenized, Vocab};
use mrt::model::{token_logprobs, Transformer, TransformerConfig};
use mrt::rl::loss::sft_loss;
use mrt::rl::optim::{adamw, step, OptimConfig};
use mrt::rl::run::step_rng;

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
    let task_config = TaskConfig::by_name("search").unwrap();
    let task = task_config.build().unwrap();
    let vocab = Vocab::build(&task.words()).unwrap();
    let mut cfg = TransformerConfig::preset("cpu-tiny").unwrap();
    cfg.vocab_size = vocab.size();
    cfg.d_model = 64;
    cfg.n_layers = 2;
    cfg.d_ff = 128;
    let device = Default::default();
    let mut model = Transformer::<AD>::new(&cfg, 1, &device).unwrap();
    let optim_cfg = OptimConfig { lr: 3e-3, warmup_steps: 20, min_lr_ratio: 0.1, weight_decay: 0.01, grad_clip: 1.0 };
    let mut optim = adamw::<AD>(&optim_cfg);
    let mix = task_config.warm_start().clone();
    for s in 0..steps {
        let mut rng = step_rng(7, "fixture", s);
        let traces: Vec<Tokenized> = (0..32)
            .map(|_| {
                let p = sample_problem(task.as_ref(), Split::Train, &mut rng);
                warm_start_trace(task.as_ref(), &p, &mix, &mut rng).tokenize(&vocab).unwrap()
            })
            .collect();
        let refs: Vec<&Tokenized> = traces.iter().collect();
        let batch = collate::<AD>(&refs, vocab.specials.pad, &device);
        let lp = token_logprobs(&model, batch.tokens, Some(batch.mask.clone()), false);
        let loss = sft_loss(lp.logprobs, &batch.mask);
        model = step(model, &mut optim, loss, optim_cfg.lr_at(s, steps), 1.0).0;
    }
    Fixture { task, task_config, vocab, model: model.valid() }
}

/// The shared fixture: 300 warm-start steps.
pub fn search_policy() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| train_search_policy(300))
}
