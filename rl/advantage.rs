//! How rewards become advantages: the one place where GRPO and the MRT variants differ.
//! Pure functions over host numbers, unit-tested with hand-computed values.
//!
//! - GRPO: `A_i = (r_i − mean_g r) / (std_g r + ε)` (std division switchable); a group whose
//!   0/1 outcomes are all equal gets no gradient and is counted.
//! - MRT dense (MRT.md): `A_{i,t} = A_i + α · r_prg(episode(t))`, with
//!   `r_prg(z_j) = J_j − J_{j−1}`; tokens outside episodes (the answer) get the outcome term
//!   only. The all-equal filter applies to the *outcome*, never the shaped reward, so α = 0 is
//!   GRPO exactly.
//! - MRT (the paper's recipe): continuations of one prefix; `A_i = (r_i − r̄) + α · (r̄ − b)`
//!   with r̄ the continuations' mean reward and b the termination baseline of the prefix (mean
//!   reward of the continuations forced to answer at once, or the exact J). α = 1 is the
//!   paper's `r_i − b`; α = 0 is GRPO over the continuations.

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
    assert!(group > 0 && rewards.len() % group == 0, "rewards must come in whole groups");
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

/// Per-token advantages of one rollout for MRT dense: the outcome advantage on every token, plus
/// `alpha · progress[e]` on the tokens of episode e (`episodes[e]` is its token range).
pub fn dense_token_advantages(len: usize, outcome: f32, episodes: &[std::ops::Range<usize>], progress: &[f32], alpha: f32) -> Vec<f32> {
    let mut adv = vec![outcome; len];
    for (span, &p) in episodes.iter().zip(progress) {
        for a in &mut adv[span.clone()] {
            *a += alpha * p;
        }
    }
    adv
}

/// Advantages of the continuations of one prefix (the paper's MRT recipe).
/// `continued` are the rewards of the continuations that thought on, `baseline` the
/// termination reward of the prefix.
pub fn mrt_continuations(continued: &[f32], baseline: f32, alpha: f32, scale_by_std: bool) -> Vec<f32> {
    let (mean, std) = mean_std(continued);
    let scale = if scale_by_std && std > 0.0 { std + STD_EPS } else { 1.0 };
    continued.iter().map(|&r| ((r - mean) + alpha * (mean - baseline)) / scale).collect()
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
    fn progress_telescopes_and_dense_bonus_lands_on_episode_tokens() {
        let j = [0.1, 0.3, 0.25, 0.9];
        let p = progress(&j);
        assert_eq!(p.len(), 3);
        assert!((p.iter().sum::<f32>() - (0.9 - 0.1)).abs() < 1e-6);
        let adv = dense_token_advantages(10, 1.0, &[2..4, 5..7, 7..8], &p, 0.5);
        let expect = [1.0, 1.0, 1.1, 1.1, 1.0, 0.975, 0.975, 1.325, 1.0, 1.0];
        for (a, e) in adv.iter().zip(expect) {
            assert!((a - e).abs() < 1e-6, "{adv:?}");
        }
        assert_eq!(dense_token_advantages(4, -0.5, &[0..2], &[0.3], 0.0), vec![-0.5; 4]);
    }

    #[test]
    fn mrt_continuation_advantages_by_hand() {
        // α = 1: reward minus termination baseline.
        assert_eq!(mrt_continuations(&[1.0, 0.0, 1.0, 1.0], 0.5, 1.0, false), vec![0.5, -0.5, 0.5, 0.5]);
        // α = 0: GRPO over the continuations (mean 0.75).
        assert_eq!(mrt_continuations(&[1.0, 0.0, 1.0, 1.0], 0.5, 0.0, false), vec![0.25, -0.75, 0.25, 0.25]);
        // All continuations succeed where stopping would fail: still a positive signal.
        assert_eq!(mrt_continuations(&[1.0, 1.0], 0.0, 1.0, true), vec![1.0, 1.0]);
        assert!((progress_per_episode(&[0.2, 0.5, 1.0]) - 0.4).abs() < 1e-6);
    }
}
