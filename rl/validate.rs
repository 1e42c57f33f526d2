//! Checks of a whole [`RunConfig`] before anything runs: every bad field is named, with why,
//! including the settings that would make RL silently off-policy.

use super::config::RunConfig;
use crate::data::Split;
use crate::error::{Error, Result};

impl RunConfig {
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        let task = self.task.build()?;
        match (self.task.is_text(), &self.pretrained) {
            (true, None) => {
                return Err(Error::config(
                    "pretrained",
                    "none",
                    format!(
                        "the `{}` task fine-tunes a pretrained model: pass --model DIR",
                        self.task.name()
                    ),
                ));
            }
            (false, Some(dir)) => {
                return Err(Error::config(
                    "pretrained",
                    dir.display(),
                    format!(
                        "the `{}` task trains its own model from scratch: only `math` starts from a pretrained one",
                        self.task.name()
                    ),
                ));
            }
            _ => {}
        }
        if self.rl.micro_batch > 0 && self.rl.kl_beta > 0.0 {
            return Err(Error::config(
                "rl.micro_batch",
                self.rl.micro_batch,
                "the KL penalty is a mean over the whole batch: use 0 (one pass) with rl.kl_beta > 0",
            ));
        }
        if self.task.is_text() && self.warm_start.steps > 0 {
            return Err(Error::config(
                "warm_start.steps",
                self.warm_start.steps,
                "a pretrained model has no scripted warm start: use 0",
            ));
        }
        if let Some(lora) = &self.rl.lora {
            lora.validate()?;
        }
        self.warm_start.optim.validate("warm_start.optim")?;
        self.rl.optim.validate("rl.optim")?;
        self.rl.rollout.sampler.validate()?;
        self.rl.prover.validate(task.as_ref())?;
        self.eval.prover.validate(task.as_ref())?;
        let positive = [
            ("warm_start.batch_size", self.warm_start.batch_size),
            ("rl.problems_per_step", self.rl.problems_per_step),
            ("rl.group_size", self.rl.group_size),
            ("rl.ppo_epochs", self.rl.ppo_epochs),
            ("rl.rollout.max_episodes", self.rl.rollout.max_episodes),
            ("rl.rollout.max_tokens", self.rl.rollout.max_tokens),
            ("rl.rollout.max_answer_tokens", self.rl.rollout.max_answer_tokens),
            ("eval.problems", self.eval.problems),
            ("eval.samples", self.eval.samples),
            ("eval.max_episodes", self.eval.max_episodes),
            ("eval.max_tokens", self.eval.max_tokens),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(Error::config(field, v, "must be positive"));
            }
        }
        if !(0.0..=1.0).contains(&self.rl.star_keep) {
            return Err(Error::config("rl.star_keep", self.rl.star_keep, "must be in [0, 1]"));
        }
        if !(self.rl.clip_eps > 0.0 && self.rl.clip_eps < 1.0) {
            return Err(Error::config("rl.clip_eps", self.rl.clip_eps, "must be in (0, 1)"));
        }
        if !(self.rl.kl_beta >= 0.0 && self.rl.alpha.is_finite() && self.rl.alpha >= 0.0) {
            return Err(Error::config("rl.kl_beta / rl.alpha", self.rl.alpha, "must be ≥ 0"));
        }
        if self.rl.algo.group_relative() && self.rl.group_size < 2 {
            return Err(Error::config(
                "rl.group_size",
                self.rl.group_size,
                format!(
                    "{} compares samples within a group: a group of one carries no learning signal (use ≥ 2)",
                    self.rl.algo.name()
                ),
            ));
        }
        // The loss scores sampled tokens under softmax(logits / T) over the whole vocabulary:
        // truncated or greedy sampling would make every rollout off-policy for it.
        let sampler = &self.rl.rollout.sampler;
        if sampler.temperature.is_nan() || sampler.temperature <= 0.0 {
            return Err(Error::config(
                "rl.rollout.sampler.temperature",
                sampler.temperature,
                "RL needs stochastic rollouts (> 0)",
            ));
        }
        // Budget forcing masks `</think>` out of the sampling softmax, which the loss does not.
        if self.rl.rollout.budget_forcing {
            return Err(Error::config(
                "rl.rollout.budget_forcing",
                true,
                "RL rollouts must sample from the softmax the loss scores; budget forcing (which bans the end of \
                    thinking) is for evaluation only",
            ));
        }
        // J (and `mrt`'s termination baseline) is a probability under the policy's sampling
        // distribution: read at another temperature it describes a different policy.
        if self.rl.algo.needs_prover() && self.rl.prover.temperature != sampler.temperature {
            return Err(Error::config(
                "rl.prover.temperature",
                self.rl.prover.temperature,
                format!(
                    "must equal the sampler's temperature rl.rollout.sampler.temperature = {} (J is read under \
                    the policy that samples)",
                    sampler.temperature
                ),
            ));
        }
        if sampler.top_k != 0 || sampler.top_p < 1.0 {
            return Err(Error::config(
                "rl.rollout.sampler",
                format!("top_k {} top_p {}", sampler.top_k, sampler.top_p),
                "RL trains on log-probs of the full softmax, so top-k / top-p sampling would be off-policy (use \
                    top_k 0, top_p 1)",
            ));
        }
        if self.eval.split == Split::Train {
            return Err(Error::config(
                "eval.split",
                "train",
                "evaluate on `held-out` or `validation` problems, never on training problems",
            ));
        }
        // 0 is greedy decoding (GSM8K's usual pass@1); the prover keeps its own temperature.
        if !(self.eval.temperature.is_finite() && self.eval.temperature >= 0.0) {
            return Err(Error::config(
                "eval.temperature",
                self.eval.temperature,
                "must be ≥ 0 (0: greedy)",
            ));
        }
        let vocab_needed = crate::data::vocab::SPECIAL_TOKENS.len() + task.words().len();
        if !self.task.is_text() && self.model.vocab_size < vocab_needed {
            return Err(Error::config(
                "model.vocab_size",
                self.model.vocab_size,
                format!("the task's tokenizer needs {vocab_needed} ids"),
            ));
        }
        Ok(())
    }
}
