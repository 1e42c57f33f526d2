//! The measures behind the paper's claims, as pure functions over rollouts and curves:
//! anytime accuracy against tokens, cumulative regret at each budget, maj@k against total
//! tokens, tokens needed to reach an accuracy, and where progress was (not) made.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::data::Role;
use crate::rl::advantage::progress;
use crate::rl::rollout::Rollout;

/// Normalised cumulative regret at every budget: `R(b) = (1/b) Σ_{i=1..b} (J*_i − A_i)` for
/// b = 1 … len − 1, where `acc[i]` is the anytime accuracy after i episodes (or tokens) and
/// `optimal` is J* (≡ 1 when `None`).
pub fn regret_curve(acc: &[f64], optimal: Option<&[f64]>) -> Vec<f64> {
    let mut out = Vec::with_capacity(acc.len().saturating_sub(1));
    let mut sum = 0.0;
    for i in 1..acc.len() {
        sum += optimal.map_or(1.0, |o| o[i]) - acc[i];
        out.push(sum / i as f64);
    }
    out
}

/// Policy tokens in `r.tokens[..end]`.
fn policy_tokens_before(r: &Rollout, end: usize) -> usize {
    r.roles[..end].iter().filter(|&&x| x == Role::Policy).count()
}

/// Anytime accuracy of one rollout after `c` policy tokens: its outcome once it has produced
/// all its tokens, else J at the last episode boundary reached within c tokens.
pub fn anytime_at_tokens(r: &Rollout, c: usize) -> f64 {
    if c >= r.policy_tokens() || r.j.is_empty() {
        return r.reward as f64;
    }
    let mut value = r.j[0] as f64;
    for (j, &b) in r.boundaries.iter().enumerate() {
        if policy_tokens_before(r, b) <= c && j < r.j.len() {
            value = r.j[j] as f64;
        }
    }
    value
}

/// Mean anytime accuracy over rollouts at token budgets 0 … `max_tokens`.
pub fn token_anytime<'a>(rollouts: impl IntoIterator<Item = &'a Rollout>, max_tokens: usize) -> Vec<f64> {
    let rollouts: Vec<&Rollout> = rollouts.into_iter().collect();
    (0..=max_tokens)
        .map(|c| rollouts.iter().map(|r| anytime_at_tokens(r, c)).sum::<f64>() / rollouts.len().max(1) as f64)
        .collect()
}

/// One sampled answer for majority voting.
#[derive(Debug, Clone, PartialEq)]
pub struct Vote {
    /// The answer text; `None` when the rollout gave no well-formed answer.
    pub answer: Option<String>,
    pub correct: bool,
    /// Policy tokens spent.
    pub tokens: usize,
}

/// The majority answer of a set of votes (ties: the answer seen first); `None` votes abstain.
fn majority(votes: &[&Vote]) -> Option<bool> {
    let mut counts: HashMap<&str, (usize, usize, bool)> = HashMap::new();
    for (i, v) in votes.iter().enumerate() {
        if let Some(a) = &v.answer {
            let e = counts.entry(a.as_str()).or_insert((0, i, v.correct));
            e.0 += 1;
        }
    }
    counts
        .values()
        .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
        .map(|e| e.2)
}

/// maj@k: probability that the majority of k of a problem's samples is correct, and the mean
/// total tokens of the k samples, both averaged exactly over every k-subset of each problem's
/// samples and then over problems. `samples[p]` holds problem p's votes (at most 16).
pub fn maj_at_k(samples: &[Vec<Vote>], k: usize) -> (f64, f64) {
    let (mut acc, mut tokens, mut n) = (0.0, 0.0, 0usize);
    for votes in samples {
        let m = votes.len();
        assert!(m <= 16, "maj@k enumerates subsets; at most 16 samples per problem");
        if k == 0 || k > m {
            continue;
        }
        let (mut hit, mut tok, mut subsets) = (0.0, 0.0, 0usize);
        for mask in 0u32..(1 << m) {
            if mask.count_ones() as usize != k {
                continue;
            }
            let chosen: Vec<&Vote> = (0..m).filter(|i| mask >> i & 1 == 1).map(|i| &votes[i]).collect();
            hit += majority(&chosen).unwrap_or(false) as u8 as f64;
            tok += chosen.iter().map(|v| v.tokens as f64).sum::<f64>();
            subsets += 1;
        }
        acc += hit / subsets as f64;
        tokens += tok / subsets as f64;
        n += 1;
    }
    (acc / n.max(1) as f64, tokens / n.max(1) as f64)
}

/// A point of an accuracy-against-cost curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CostPoint {
    #[serde(deserialize_with = "crate::fsutil::nan")]
    pub tokens: f64,
    #[serde(deserialize_with = "crate::fsutil::nan")]
    pub accuracy: f64,
}

/// Tokens at which a curve (points in increasing cost) first reaches `target`, interpolating
/// linearly between the two points that straddle it; `None` if it never does.
pub fn tokens_to_reach(curve: &[CostPoint], target: f64) -> Option<f64> {
    let first = curve.first()?;
    if first.accuracy >= target {
        return Some(first.tokens);
    }
    curve.windows(2).find(|w| w[1].accuracy >= target).map(|w| {
        let (a, b) = (w[0], w[1]);
        a.tokens + (target - a.accuracy) / (b.accuracy - a.accuracy) * (b.tokens - a.tokens)
    })
}

/// Token efficiency of `b` over `a` at `target` accuracy: tokens `a` needs / tokens `b` needs.
pub fn token_efficiency(a: &[CostPoint], b: &[CostPoint], target: f64) -> Option<f64> {
    Some(tokens_to_reach(a, target)? / tokens_to_reach(b, target)?)
}

/// Token efficiency at *matched* accuracy: the target is the lower of the two curves' peaks,
/// an accuracy both reach, so the ratio is defined whenever both curves have points (the
/// paper's "tokens to reach the same accuracy"). Returns (target, tokens `a` needs / tokens
/// `b` needs). Whether `b` also reaches `a`'s peak is a separate question (`tokens_to_reach`).
pub fn matched_token_efficiency(a: &[CostPoint], b: &[CostPoint]) -> Option<(f64, f64)> {
    let peak = |c: &[CostPoint]| c.iter().map(|p| p.accuracy).fold(f64::NAN, f64::max);
    let target = peak(a).min(peak(b));
    if !target.is_finite() {
        return None;
    }
    Some((target, token_efficiency(a, b, target)?))
}

/// Counts of episodes with negative, zero (|r_prg| < `tol`) and positive progress, by
/// episode index (entry e is episode e + 1).
pub fn progress_histogram(rollouts: &[Rollout], max_episodes: usize, tol: f32) -> Vec<[usize; 3]> {
    let mut hist = vec![[0usize; 3]; max_episodes];
    for r in rollouts {
        for (e, p) in progress(&r.j).into_iter().enumerate().take(max_episodes) {
            if !p.is_finite() {
                continue;
            }
            let bucket = if p <= -tol {
                0
            } else if p < tol {
                1
            } else {
                2
            };
            hist[e][bucket] += 1;
        }
    }
    hist
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_efficiency_is_measured_at_an_accuracy_both_curves_reach() {
        let pts = |v: &[(f64, f64)]| {
            v.iter()
                .map(|&(tokens, accuracy)| CostPoint { tokens, accuracy })
                .collect::<Vec<_>>()
        };
        let (grpo, mrt) = (pts(&[(40.0, 0.20), (80.0, 0.31)]), pts(&[(10.0, 0.30), (20.0, 0.305)]));
        // MRT never reaches GRPO's peak 0.31, but both reach 0.305: GRPO at
        // 40 + 0.105 / 0.11 · 40 = 78.18 tokens, MRT at 20.
        assert_eq!(token_efficiency(&grpo, &mrt, 0.31), None);
        let (target, ratio) = matched_token_efficiency(&grpo, &mrt).unwrap();
        assert_eq!(target, 0.305);
        assert!((ratio - (40.0 + 0.105 / 0.11 * 40.0) / 20.0).abs() < 1e-9, "{ratio}");
        assert!((ratio - 3.909).abs() < 1e-3);
        // Symmetric in which curve peaks lower.
        let (t2, r2) = matched_token_efficiency(&mrt, &grpo).unwrap();
        assert_eq!(t2, 0.305);
        assert!((r2 * ratio - 1.0).abs() < 1e-12);
        assert_eq!(matched_token_efficiency(&[], &mrt), None);
    }

    #[test]
    fn regret_is_the_area_between_the_curves() {
        // Anytime accuracy 0.1 before any episode, then 0.4, 0.7, 1.0.
        let acc = [0.1, 0.4, 0.7, 1.0];
        let r = regret_curve(&acc, None);
        // (0.6) / 1, (0.6 + 0.3) / 2, (0.6 + 0.3 + 0) / 3
        let expected = [0.6, 0.45, 0.3];
        for (a, e) in r.iter().zip(expected) {
            assert!((a - e).abs() < 1e-12, "{r:?}");
        }
        let opt = [0.2, 0.6, 1.0, 1.0];
        let r = regret_curve(&acc, Some(&opt));
        let expected = [0.2, 0.25, 0.5 / 3.0];
        for (a, e) in r.iter().zip(expected) {
            assert!((a - e).abs() < 1e-12, "{r:?}");
        }
    }

    fn vote(a: Option<&str>, correct: bool, tokens: usize) -> Vote {
        Vote {
            answer: a.map(String::from),
            correct,
            tokens,
        }
    }

    #[test]
    fn maj_at_k_by_hand() {
        // Answers A (right), B, A, none with 10, 20, 30, 40 tokens.
        let p = vec![
            vote(Some("A"), true, 10),
            vote(Some("B"), false, 20),
            vote(Some("A"), true, 30),
            vote(None, false, 40),
        ];
        // k = 1: 2 of 4 samples right; mean tokens 25.
        assert_eq!(maj_at_k(std::slice::from_ref(&p), 1), (0.5, 25.0));
        // k = 2: pairs {AB: tie → first seen A ✓, AA ✓, A- ✓, BA: tie → B ✗, B- ✗, A- ✓} = 4/6.
        let (acc, tok) = maj_at_k(std::slice::from_ref(&p), 2);
        assert!((acc - 4.0 / 6.0).abs() < 1e-12 && (tok - 50.0).abs() < 1e-12);
        // k = 3: {ABA ✓, AB- ✓ (tie, A first), AA- ✓, BA- ✗ (tie, B first)} = 3/4.
        assert_eq!(maj_at_k(std::slice::from_ref(&p), 3).0, 0.75);
        // k = 4: A wins 2–1.
        assert_eq!(maj_at_k(&[p], 4), (1.0, 100.0));
    }

    #[test]
    fn token_efficiency_interpolates_exactly() {
        let grpo = [
            CostPoint {
                tokens: 10.0,
                accuracy: 0.5,
            },
            CostPoint {
                tokens: 20.0,
                accuracy: 0.7,
            },
            CostPoint {
                tokens: 40.0,
                accuracy: 0.8,
            },
        ];
        let mrt = [
            CostPoint {
                tokens: 8.0,
                accuracy: 0.6,
            },
            CostPoint {
                tokens: 16.0,
                accuracy: 0.9,
            },
        ];
        // GRPO reaches 0.8 at 40 tokens; MRT at 8 + (0.2 / 0.3) · 8 = 13.333…
        assert_eq!(tokens_to_reach(&grpo, 0.8), Some(40.0));
        let t = tokens_to_reach(&mrt, 0.8).unwrap();
        assert!((t - (8.0 + 16.0 / 3.0)).abs() < 1e-12);
        assert!((token_efficiency(&grpo, &mrt, 0.8).unwrap() - 40.0 / t).abs() < 1e-12);
        assert_eq!(tokens_to_reach(&grpo, 0.95), None);
        assert_eq!(tokens_to_reach(&mrt, 0.5), Some(8.0));
    }
}
