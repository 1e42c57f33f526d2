//! Meta Reinforcement Fine-Tuning (Qu et al. 2025, `shared/MRT.md`) and outcome-reward RL.
//!
//! What is implemented, and where:
//! - episode-structured rollouts (`rollout`): G samples per problem from one prefilled prompt,
//!   environment replies appended as non-trainable tokens, rows forced to answer at the episode
//!   cap or token budget, budget forcing for evaluation;
//! - the value-free meta-prover μ (`prover`): J_j = P(forced answer after episode j is correct),
//!   by K sampled answers or exactly from the softmax, on a fork of the cached prefix;
//! - objectives (`advantage`, `loss`, `train`): `grpo`, `mrt` (the paper's terminate/continue
//!   recipe), `mrt-dense` (α · r_prg per episode), `star` and `mrt-star`.
//!
//! Departures from the paper, and choices where it is silent:
//! - The forced-termination suffix is three special tokens (`<timeup> </think> <answer>`), not
//!   a sentence, since the models here are trained from scratch on a small vocabulary.
//! - J* ≡ 1 for regret, as in the authors' code; for `search` the exact Bayes-optimal curve is
//!   also reported.
//! - `mrt`: A_i = (r_i − r̄) + α (r̄ − b): α = 1 is the paper's reward-minus-termination-baseline,
//!   α = 0 GRPO over the continuations. Terminated continuations form the baseline and are not
//!   trained. Prefixes that answer before reaching their drawn length are not continued.
//! - `mrt-dense`: the outcome part is GRPO's, with the all-equal test on the binary outcome; a
//!   group whose outcomes are all equal gets outcome advantage 0 but, with α > 0, still trains
//!   on its progress bonus (with α = 0 it is dropped, so α = 0 reproduces GRPO exactly).
//!   Tokens outside episodes get no bonus.
//! - `mrt-star`: correct streams ranked by mean progress per episode, (J_k − J_0) / k; the top
//!   `star_keep` fraction of each group's correct streams is kept.
//! - Advantages use token-mean aggregation and one optimizer pass per batch by default
//!   (ratio ≡ 1, so PPO clipping only acts with `ppo_epochs > 1`); no KL penalty by default.

pub mod advantage;
pub mod analysis;
pub mod batch;
pub mod compare;
pub mod config;
pub mod eval;
pub mod experiment;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod pipeline;
pub mod plots;
pub mod prover;
pub mod report;
pub mod rollout;
pub mod run;
pub mod sft;
pub mod stage;
pub mod train;
