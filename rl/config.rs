//! Run configuration: one struct per stage, nested in [`RunConfig`], printed at start and saved
//! as `config.json`. Every field has a documented default; `validate` names any bad field.

use serde::{Deserialize, Serialize};

use super::optim::OptimConfig;
use super::prover::{ProverConfig, ProverMode};
use super::rollout::{AnswerLimit, RolloutConfig};
use crate::data::{Split, TaskConfig};
use crate::error::{Error, Result};
use crate::model::lora::LoraConfig;
use crate::model::lowmem::Checkpointing;
use crate::model::{SamplerConfig, TransformerConfig};

/// Which objective forms the advantages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Algo {
    /// Outcome reward, group-normalised (α = 0).
    Grpo,
    /// The paper's recipe: a prefix cut from a sampled stream, m continuations of it, the
    /// meta-prover's termination baseline.
    Mrt,
    /// Dense per-episode progress bonus α · r_prg on top of the GRPO advantage.
    MrtDense,
    /// Fine-tune on correct streams.
    Star,
    /// Fine-tune on correct streams with the most progress per episode.
    MrtStar,
}

pub const ALGOS: [&str; 5] = ["grpo", "mrt", "mrt-dense", "star", "mrt-star"];

impl Algo {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "grpo" => Ok(Self::Grpo),
            "mrt" => Ok(Self::Mrt),
            "mrt-dense" => Ok(Self::MrtDense),
            "star" => Ok(Self::Star),
            "mrt-star" => Ok(Self::MrtStar),
            other => Err(Error::Unknown {
                kind: "algorithm",
                name: other.into(),
                expected: ALGOS.join(", "),
            }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Grpo => "grpo",
            Self::Mrt => "mrt",
            Self::MrtDense => "mrt-dense",
            Self::Star => "star",
            Self::MrtStar => "mrt-star",
        }
    }

    /// Whether the objective needs J estimates during training.
    pub fn needs_prover(self) -> bool {
        matches!(self, Self::Mrt | Self::MrtDense | Self::MrtStar)
    }

    /// Whether the objective compares samples of one group (so a group needs ≥ 2).
    pub fn group_relative(self) -> bool {
        matches!(self, Self::Grpo | Self::Mrt | Self::MrtDense)
    }
}

/// Supervised warm start on scripted traces.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmStartConfig {
    pub steps: usize,
    /// Traces per step (drawn fresh from training problems every step).
    pub batch_size: usize,
    pub optim: OptimConfig,
    /// Held-out evaluation every this many steps (0: only at the end).
    pub eval_every: usize,
    /// Checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: usize,
}

/// RL fine-tuning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RlConfig {
    pub algo: Algo,
    pub steps: usize,
    /// Problems per step.
    pub problems_per_step: usize,
    /// Rollouts per problem (G); for `mrt`, continuations per prefix (m).
    pub group_size: usize,
    pub optim: OptimConfig,
    /// Optimizer passes over each batch (> 1 makes the clipped ratio matter).
    pub ppo_epochs: usize,
    /// PPO clip ε.
    pub clip_eps: f64,
    /// KL penalty β to the frozen start policy (0: off, no reference model kept).
    pub kl_beta: f64,
    /// Divide advantages by the group's reward std.
    pub scale_by_std: bool,
    /// Progress weight α (`mrt-dense`: bonus scale; `mrt`: weight of the progress of
    /// continuing over stopping, the termination-baseline term).
    pub alpha: f64,
    /// `mrt-star`: fraction of a group's correct streams kept (most progress per episode first).
    pub star_keep: f64,
    pub rollout: RolloutConfig,
    pub prover: ProverConfig,
    pub eval_every: usize,
    pub checkpoint_every: usize,
    /// Rollouts per forward/backward pass of the training step, gradients summed over the
    /// passes (0: all at once). Bounds the activations (a pretrained model's logits alone are
    /// vocabulary × 4 bytes per token); the update is the same.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub micro_batch: usize,
    /// Recompute each transformer block in the backward pass instead of keeping its
    /// activations: "auto" (rows of 1,024 tokens or more), "on" or "off". The gradient is the
    /// same (up to float summation order) for about one more forward pass of compute.
    #[serde(default, skip_serializing_if = "is_auto")]
    pub activation_checkpointing: Checkpointing,
    /// Completions of each step appended as text to the run's `samples.jsonl` (0: none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub samples_per_step: usize,
    /// Train LoRA adapters on a frozen base instead of every weight: `{"rank": 16, "alpha":
    /// 32, "targets": ["q", "k", "v", "o", "gate", "up", "down"]}` (alpha and targets
    /// optional). The base is the pretrained model, the `--init` checkpoint, or the run's own
    /// warm start; checkpoints then hold the adapters and name the base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraConfig>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn is_auto(c: &Checkpointing) -> bool {
    *c == Checkpointing::Auto
}

/// Evaluation during and after training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Which problems: `held-out` for reported numbers, `validation` when a run is used to
    /// choose hyper-parameters.
    #[serde(default = "held_out")]
    pub split: Split,
    /// Distinct problems of that split (a fixed set: same for every run of a task config).
    pub problems: usize,
    /// Samples per problem.
    pub samples: usize,
    /// Sampling temperature of the evaluated policy; 0 decodes greedily.
    pub temperature: f64,
    /// Episode budget of evaluation rollouts (≥ the training budget; past it via budget forcing).
    pub max_episodes: usize,
    pub max_tokens: usize,
    /// How long the policy's own answer may run (as in `rl.rollout.free_answer`).
    #[serde(default, skip_serializing_if = "AnswerLimit::is_forced")]
    pub free_answer: AnswerLimit,
    pub prover: ProverConfig,
}

fn held_out() -> Split {
    Split::HeldOut
}

/// Context length of a pretrained model's run unless configured (`model.max_seq_len`):
/// prompt, 1024 thinking tokens, forced suffix and answer fit with room to spare.
pub const PRETRAINED_CONTEXT: usize = 4096;

/// How much larger RL's default learning rate is when only LoRA adapters are trained.
pub const LORA_LR_FACTOR: f64 = 10.0;

/// Everything that defines a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub seed: u64,
    pub task: TaskConfig,
    /// The Hugging Face model directory a text task's run starts from (its weights, shapes and
    /// tokenizer); absent for the synthetic tasks, whose models start from scratch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pretrained: Option<std::path::PathBuf>,
    /// Model preset name (informational; `model` holds the shapes).
    pub preset: String,
    pub model: TransformerConfig,
    pub warm_start: WarmStartConfig,
    pub rl: RlConfig,
    pub eval: EvalConfig,
}

impl RunConfig {
    /// The default pipeline for a task, preset and algorithm. `small_cpu` picks step counts
    /// that finish the whole default run in minutes on a 2-core CPU.
    pub fn default_for(task: &str, preset: &str, algo: Algo, seed: u64, small_cpu: bool) -> Result<Self> {
        Self::defaults(TaskConfig::by_name(task)?, preset, algo, seed, small_cpu)
    }

    /// The defaults, with a JSON patch (any subset of a run config) applied. A patched `task`
    /// is applied first, so the defaults derived from it (episode and token budgets, the
    /// vocabulary) follow it; then the rest of the patch overrides anything.
    pub fn with_patch(
        task: &str,
        preset: &str,
        algo: Algo,
        seed: u64,
        small_cpu: bool,
        patch: Option<serde_json::Value>,
    ) -> Result<Self> {
        Self::patched(task, patch, |t| Self::defaults(t, preset, algo, seed, small_cpu))
    }

    /// [`Self::with_patch`] for a run that fine-tunes the pretrained model in `dir`.
    pub fn pretrained_with_patch(
        task: &str,
        dir: &std::path::Path,
        algo: Algo,
        seed: u64,
        patch: Option<serde_json::Value>,
    ) -> Result<Self> {
        Self::patched(task, patch, |t| Self::pretrained_defaults(t, dir, algo, seed))
    }

    fn patched(
        task: &str,
        patch: Option<serde_json::Value>,
        defaults: impl FnOnce(TaskConfig) -> Result<Self>,
    ) -> Result<Self> {
        let bad = |e: serde_json::Error| Error::config("--config", "patch", e.to_string());
        let mut task_cfg = TaskConfig::by_name(task)?;
        if let Some(task_patch) = patch.as_ref().and_then(|p| p.get("task")) {
            if let Some(name) = task_patch.get("name").and_then(|n| n.as_str()) {
                task_cfg = TaskConfig::by_name(name)?;
            }
            let mut value = serde_json::to_value(&task_cfg).map_err(bad)?;
            merge_json(&mut value, task_patch.clone());
            task_cfg = serde_json::from_value(value).map_err(bad)?;
        }
        let mut config = defaults(task_cfg)?;
        if let Some(patch) = patch {
            // Adapters learn best at about ten times a full fine-tune's rate (Schulman et al.
            // 2025, "LoRA Without Regret"): the default rate follows unless one is given.
            let lora_rate = patch.pointer("/rl/lora").is_some() && patch.pointer("/rl/optim/lr").is_none();
            let mut value = serde_json::to_value(&config).map_err(bad)?;
            merge_json(&mut value, patch);
            config = serde_json::from_value(value).map_err(bad)?;
            if lora_rate {
                config.rl.optim.lr *= LORA_LR_FACTOR;
            }
            // The run's config.json records the α it trains with, not "default".
            if let Some(lora) = &mut config.rl.lora {
                lora.alpha = Some(lora.alpha());
            }
        }
        Ok(config)
    }

    /// Reads a `--config` patch: a JSON object of run-config fields, or a run's `config.json`.
    pub fn read_patch(path: &std::path::Path) -> Result<serde_json::Value> {
        let value: serde_json::Value = crate::fsutil::read_json(path)?;
        Ok(match value.get("config") {
            Some(inner) if value.get("git_commit").is_some() => inner.clone(),
            _ => value,
        })
    }

    /// The defaults of a pretrained model fine-tuned on a text task: no warm start, the model's
    /// own shapes, a token budget for free text, a sampled meta-prover, and a learning rate for
    /// fine-tuning rather than training from scratch.
    pub fn pretrained_defaults(task: TaskConfig, dir: &std::path::Path, algo: Algo, seed: u64) -> Result<Self> {
        let mut model = crate::model::hf::native_config(dir)?;
        // Rotary tables for the context a run uses, not the model's maximum (often 128K).
        model.max_seq_len = model.max_seq_len.min(PRETRAINED_CONTEXT);
        let t = task.build()?;
        let mut c = Self::assemble(
            task,
            "pretrained",
            model,
            algo,
            seed,
            1,
            t.max_episodes(),
            1024,
            32,
            t.enumerable_answers(),
        );
        c.pretrained = Some(dir.to_path_buf());
        c.warm_start.steps = 0;
        c.rl.steps = 100;
        c.rl.problems_per_step = 4;
        c.rl.optim.lr = 1e-6;
        c.rl.micro_batch = 1;
        c.rl.samples_per_step = 2;
        c.rl.eval_every = 25;
        c.rl.checkpoint_every = 25;
        c.eval.problems = 32;
        // A sentence before the `\boxed{}` is normal free text: only the budget bounds it.
        c.rl.rollout.free_answer = AnswerLimit::Budget;
        c.eval.free_answer = AnswerLimit::Budget;
        Ok(c)
    }

    /// The defaults of a task configuration, preset and algorithm.
    pub fn defaults(task: TaskConfig, preset: &str, algo: Algo, seed: u64, small_cpu: bool) -> Result<Self> {
        let mut model = TransformerConfig::preset(preset)?;
        let countdown = matches!(task, TaskConfig::Countdown(_));
        let t = task.build()?;
        let max_episodes = t.max_episodes();
        let (max_tokens, answer_tokens) = if countdown {
            (16 * max_episodes + 24, 24)
        } else {
            (4 * max_episodes + 8, 4)
        };
        // The tokenizer fixes the vocabulary; the preset fixes every other shape.
        model.vocab_size = crate::data::vocab::SPECIAL_TOKENS.len() + t.words().len();
        let scale = if small_cpu { 1 } else { 4 };
        Ok(Self::assemble(
            task,
            preset,
            model,
            algo,
            seed,
            scale,
            max_episodes,
            max_tokens,
            answer_tokens,
            t.enumerable_answers(),
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        task: TaskConfig,
        preset: &str,
        model: TransformerConfig,
        algo: Algo,
        seed: u64,
        scale: usize,
        max_episodes: usize,
        max_tokens: usize,
        answer_tokens: usize,
        enumerable: bool,
    ) -> Self {
        let prover = ProverConfig {
            mode: if enumerable {
                ProverMode::Exact
            } else {
                ProverMode::Sample
            },
            samples: 8,
            temperature: 1.0,
            max_answer_tokens: answer_tokens,
        };
        Self {
            seed,
            pretrained: None,
            preset: preset.to_string(),
            model,
            warm_start: WarmStartConfig {
                steps: 3000 * scale,
                batch_size: 32,
                optim: OptimConfig {
                    lr: 3e-3,
                    warmup_steps: 30,
                    min_lr_ratio: 0.1,
                    weight_decay: 0.01,
                    grad_clip: 1.0,
                },
                eval_every: 500 * scale,
                checkpoint_every: 500 * scale,
            },
            rl: RlConfig {
                algo,
                steps: 300 * scale,
                problems_per_step: 8,
                group_size: 8,
                optim: OptimConfig {
                    lr: 3e-4,
                    warmup_steps: 5,
                    min_lr_ratio: 1.0,
                    weight_decay: 0.0,
                    grad_clip: 1.0,
                },
                ppo_epochs: 1,
                clip_eps: 0.2,
                kl_beta: 0.0,
                scale_by_std: true,
                alpha: 1.0,
                star_keep: 0.5,
                rollout: RolloutConfig {
                    max_episodes,
                    max_tokens,
                    max_answer_tokens: answer_tokens,
                    free_answer: AnswerLimit::Forced,
                    sampler: SamplerConfig::default(),
                    budget_forcing: false,
                },
                prover: prover.clone(),
                eval_every: 50 * scale,
                checkpoint_every: 50 * scale,
                micro_batch: 0,
                activation_checkpointing: Checkpointing::Auto,
                lora: None,
                samples_per_step: 0,
            },
            eval: EvalConfig {
                split: Split::HeldOut,
                problems: 96,
                samples: 2,
                temperature: 1.0,
                max_episodes,
                max_tokens,
                free_answer: AnswerLimit::Forced,
                prover,
            },
            task,
        }
    }
}

/// Overlays the fields of `patch` onto `base` (objects merge key by key, other values replace):
/// how a partial `--config` file overrides the defaults.
pub fn merge_json(base: &mut serde_json::Value, patch: serde_json::Value) {
    match (base, patch) {
        (serde_json::Value::Object(b), serde_json::Value::Object(p)) => {
            for (k, v) in p {
                match b.get_mut(&k) {
                    Some(slot) => merge_json(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}
