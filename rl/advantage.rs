//! How rewards become advantages: the one place where GRPO and the MRT variants differ.
//! Pure functions over host numbers, unit-tested with hand-computed values.
//!
//! - GRPO: `A_i = (r_i − mean_g r) / (std_g r + ε)` (std division switchable); a group whose
//!   0/1 outcomes are all equal gets no gradient and is counted.
//! - MRT dense (MRT.md): the GRPO advantage on every token, plus the bonus `α · r_prg(z_j)` on
//!   the tokens of episode j, `r_prg(z_j) = J_j − J_{j−1}`; tokens outside episodes (the
//!   answer) get the outcome term only. The all-equal filter applies to the *outcome* term,
//!   never the bonus, so α = 0 is GRPO exactly. The two terms are normalised separately in
//!   the loss (`rl/batch.rs`).
//! - MRT (the paper's recipe): m continuations of one prefix c with termination baseline
//!   b = J(c), the meta-prover's success probability if the stream stopped at c;
//!   `A_i = (r_i − r̄) + α · (r̄ − b)`, r̄ the continuations' mean reward. α = 1 is the paper's
//!   `r_i − b` (outcome plus the progress of continuing over stopping); α = 0 is GRPO's
//!   centring over the continuations. With std scaling, *one* scale for the whole step: the
//!   standard deviation of all its raw advantages, so that mixed and all-equal groups keep
//!   their relative weight.

use std::ops::Range;

/// Small constant in the std division.
pub const STD_EPS: f32 = 1e-4;

/// Mean and (population) standard deviation.
pub fn mean_std(x: &[f32]) -> (f32, f32) {
    let n = x.len().max(1) as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / n;
    (mean, var.sqrt())
}

/// GRPO advantages of `rewards` laid out as consecutive groups of `group`.
/// Returns (advantage per rollout, kept flag per rollout, number of all-equal groups).
pub fn grpo(rewards: &[f32], group: usize, scale_by_std: bool) -> (Vec<f32>, Vec<bool>, usize) {
    assert!(
        group > 0 && rewards.len().is_multiple_of(group),
        "rewards must come in whole groups"
    );
    let mut adv = Vec::with_capacity(rewards.len());
    let mut keep = Vec::with_capacity(rewards.len());
    let mut degenerate = 0;
    for g in rewards.chunks(group) {
        let all_equal = g.iter().all(|&r| r == g[0]);
        degenerate += all_equal as usize;
        let (mean, std) = mean_std(g);
        for &r in g {
            let a = if all_equal {
                0.0
            } else if scale_by_std {
                (r - mean) / (std + STD_EPS)
            } else {
                r - mean
            };
            adv.push(a);
            keep.push(!all_equal);
        }
    }
    (adv, keep, degenerate)
}

/// Progress of each episode: `r_prg(z_j) = J_j − J_{j−1}` for j = 1 … k, given J_0 … J_k.
pub fn progress(j: &[f32]) -> Vec<f32> {
    j.windows(2).map(|w| w[1] - w[0]).collect()
}

/// MRT dense's per-token bonus of one rollout: `alpha · progress[e]` on the tokens of episode
/// e (`episodes[e]` is its token range), 0 elsewhere. Non-finite progress counts as 0.
pub fn progress_bonus(len: usize, episodes: &[Range<usize>], progress: &[f32], alpha: f32) -> Vec<f32> {
    let mut bonus = vec![0.0; len];
    for (span, &p) in episodes.iter().zip(progress) {
        let p = if p.is_finite() { p } else { 0.0 };
        for b in &mut bonus[span.clone()] {
            *b = alpha * p;
        }
    }
    bonus
}

/// MRT advantages of one step, split into their two terms.
#[derive(Debug, Clone, PartialEq)]
pub struct MrtAdvantages {
    /// `A_i` per continuation (after scaling).
    pub advantage: Vec<f32>,
    /// Its outcome term `(r_i − r̄) / s`.
    pub outcome: Vec<f32>,
    /// Its progress term `α (r̄ − b) / s`.
    pub progress: Vec<f32>,
    /// The scale s (1 without std scaling).
    pub scale: f32,
}

/// Advantages of the paper's recipe for continuations laid out as consecutive groups of `m`
/// (one group per prefix), `baselines[g]` the termination baseline b of group g's prefix.
pub fn mrt(rewards: &[f32], baselines: &[f32], m: usize, alpha: f32, scale_by_std: bool) -> MrtAdvantages {
    assert!(
        m > 0 && rewards.len() == m * baselines.len(),
        "one baseline per group of m continuations"
    );
    let mut outcome = Vec::with_capacity(rewards.len());
    let mut prg = Vec::with_capacity(rewards.len());
    for (g, &b) in rewards.chunks(m).zip(baselines) {
        let (mean, _) = mean_std(g);
        for &r in g {
            outcome.push(r - mean);
            prg.push(alpha * (mean - b));
        }
    }
    let raw: Vec<f32> = outcome.iter().zip(&prg).map(|(o, p)| o + p).collect();
    let scale = if scale_by_std {
        let (_, std) = mean_std(&raw);
        if std > 0.0 {
            std + STD_EPS
        } else {
            1.0
        }
    } else {
        1.0
    };
    MrtAdvantages {
        advantage: raw.iter().map(|a| a / scale).collect(),
        outcome: outcome.iter().map(|a| a / scale).collect(),
        progress: prg.iter().map(|a| a / scale).collect(),
        scale,
    }
}

/// MRT-STaR selection score of a correct rollout: mean progress per episode,
/// `(J_k − J_0) / k` (0 for a rollout without episodes).
pub fn progress_per_episode(j: &[f32]) -> f32 {
    if j.len() < 2 {
        return 0.0;
    }
    (j[j.len() - 1] - j[0]) / (j.len() - 1) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpo_by_hand() {
        let (a, keep, deg) = grpo(&[1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0], 4, false);
        assert_eq!(a, vec![0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(keep, vec![true, true, true, true, false, false, false, false]);
        assert_eq!(deg, 1);
        // mean 0.25, std sqrt(0.1875) = 0.4330
        let (a, _, _) = grpo(&[1.0, 0.0, 0.0, 0.0], 4, true);
        assert!((a[0] - 0.75 / (0.4330127 + STD_EPS)).abs() < 1e-5);
        assert!((a[1] + 0.25 / (0.4330127 + STD_EPS)).abs() < 1e-5);
    }

    #[test]
    fn progress_telescopes_and_the_bonus_lands_on_episode_tokens() {
        let j = [0.1, 0.3, 0.25, 0.9];
        let p = progress(&j);
        assert_eq!(p.len(), 3);
        assert!((p.iter().sum::<f32>() - (0.9 - 0.1)).abs() < 1e-6);
        let bonus = progress_bonus(10, &[2..4, 5..7, 7..8], &p, 0.5);
        let expect = [0.0, 0.0, 0.1, 0.1, 0.0, -0.025, -0.025, 0.325, 0.0, 0.0];
        for (a, e) in bonus.iter().zip(expect) {
            assert!((a - e).abs() < 1e-6, "{bonus:?}");
        }
        assert_eq!(progress_bonus(4, &[0..2], &[f32::NAN], 1.0), vec![0.0; 4]);
    }

    #[test]
    fn mrt_advantages_by_hand() {
        // Two prefixes, m = 2. Group 0: rewards (1, 0), b = 0.25 → r̄ = 0.5; group 1: (1, 1),
        // b = 0.5 → r̄ = 1.
        let a = mrt(&[1.0, 0.0, 1.0, 1.0], &[0.25, 0.5], 2, 1.0, false);
        // α = 1: r_i − b.
        assert_eq!(a.advantage, vec![0.75, -0.25, 0.5, 0.5]);
        assert_eq!(a.outcome, vec![0.5, -0.5, 0.0, 0.0]);
        assert_eq!(a.progress, vec![0.25, 0.25, 0.5, 0.5]);
        // α = 0: centring over each group's continuations, as GRPO.
        assert_eq!(
            mrt(&[1.0, 0.0, 1.0, 1.0], &[0.25, 0.5], 2, 0.0, false).advantage,
            vec![0.5, -0.5, 0.0, 0.0]
        );
        // With std scaling, one scale for the whole step: the std of (0.75, −0.25, 0.5, 0.5).
        let s = mrt(&[1.0, 0.0, 1.0, 1.0], &[0.25, 0.5], 2, 1.0, true);
        let (_, std) = mean_std(&[0.75, -0.25, 0.5, 0.5]);
        assert!((s.scale - (std + STD_EPS)).abs() < 1e-7);
        // The all-correct group keeps the same ratio to the mixed group as without scaling.
        assert!((s.advantage[2] / s.advantage[0] - 0.5 / 0.75).abs() < 1e-6);
        assert!((progress_per_episode(&[0.2, 0.5, 1.0]) - 0.4).abs() < 1e-6);
    }
}
