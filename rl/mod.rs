//! Meta Reinforcement Fine-Tuning (Qu et al. 2025, `shared/MRT.md`) and outcome-reward RL.
//!
//! What is implemented, and where:
//! - the token-level rules of a task's stream (`protocol`): word tasks with an episode token,
//!   free text with episodes at the paper's markers;
//! - episode-structured rollouts (`rollout`): G samples per problem from one prefilled prompt,
//!   environment replies appended as non-trainable tokens, rows forced to answer at the episode
//!   cap or token budget, budget forcing for evaluation;
//! - the value-free meta-prover μ (`prover`): J_j = P(forced answer after episode j is correct),
//!   by K sampled answers, or exactly where the task can list its correct answers (`search`:
//!   one word; `countdown`: every line reaching the target) as Σ_a P(a ++ `</answer>`) scored
//!   teacher-forced on copies of the cached prefix;
//! - objectives (`score`, `advantage`, `batch`, `loss`): `grpo`, `mrt` (the paper's
//!   prefix / continue recipe with the termination baseline), `mrt-dense` (α · r_prg per
//!   episode), `star` and `mrt-star`; the loop (`train`) is shared;
//! - evaluation, comparison and reports (`eval/`).
//!
//! Departures from the paper, and choices where it is silent:
//! - The forced-termination suffix is three special tokens (`<timeup> </think> <answer>`), not
//!   a sentence, since the models here are trained from scratch on a small vocabulary.
//! - J* ≡ 1 for regret, as in the authors' code; for `search` the exact Bayes-optimal curve is
//!   also reported.
//! - `mrt`: the prefix is one stream sampled from the prompt, cut at a boundary k drawn
//!   uniformly from its episode boundaries before the last episode (k = 0 when it has none);
//!   m = G continuations of it are all trained (the same trained samples per problem as
//!   GRPO); the termination baseline is the meta-prover's J at the cut, i.e. what the
//!   paper's continuations terminated at once estimate. `A_i = (r_i − r̄) + α (r̄ − b)`: α = 1
//!   is the paper's reward-minus-termination-baseline; std scaling uses one scale for the
//!   whole step. Prefix tokens are context, never trained (c ∼ π_old in MRT.md). The two
//!   terms are normalised apart, as `mrt-dense`'s are: (r_i − r̄) over the tokens of groups
//!   with mixed outcomes (GRPO's), α (r̄ − b) over the tokens of every group where it is
//!   non-zero, all-equal groups included; so α → 0 is GRPO's centring, continuously.
//! - `mrt-dense`: the outcome term is GRPO's, with the all-equal test on the binary outcome,
//!   token-mean normalised over exactly the tokens GRPO would train; the progress term
//!   α · r_prg on each episode's tokens covers every rollout (all-equal groups included) and
//!   is token-mean normalised over its own tokens (`batch.rs`). Tokens outside episodes get
//!   no bonus. α = 0 reproduces GRPO bit for bit.
//! - `mrt-star`: correct streams ranked by mean progress per episode, (J_k − J_0) / k; the top
//!   `star_keep` fraction of each group's correct streams is kept.
//! - Rollouts sample from softmax(logits / T) over the whole vocabulary, and the loss scores
//!   them at the same T (top-k / top-p are refused for RL); the exact prover reads J at the
//!   prover's temperature.
//! - One optimizer pass per batch by default (ratio ≡ 1, so PPO clipping only acts with
//!   `ppo_epochs > 1`); no KL penalty by default.

pub mod advantage;
pub mod batch;
mod closing;
pub mod config;
mod data_parallel;
pub mod eval;
pub mod loss;
pub mod metrics;
pub mod nodes;
pub mod optim;
pub mod parallel;
pub mod passes;
pub mod pipeline;
mod policy;
pub mod protocol;
pub mod prover;
pub mod rollout;
pub mod run;
pub mod score;
pub mod sft;
pub mod stage;
pub mod train;
pub mod validate;
