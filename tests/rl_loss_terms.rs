//! The loss coefficients a batch gets from its signals, on fake continuations (no model): how
//! the `mrt` objective's outcome and termination terms are normalised and weighted.

mod common;

use common::B;
use mrt::data::Role;
use mrt::rl::batch::{rollout_batch, RolloutBatch, Signal};
use mrt::rl::rollout::Rollout;
use mrt::rl::score::mrt_signals;

/// A batch of fake continuations with these signals (`len` tokens each, the first `ctx` of
/// them context).
fn fake_batch(signals: &[Signal], len: usize, ctx: usize) -> RolloutBatch<B> {
    let r = Rollout {
        problem: 0,
        tokens: (0..len as u32).map(|t| 5 + t % 7).collect(),
        roles: vec![Role::Policy; len],
        context_len: ctx,
        episodes: Vec::new(),
        boundaries: vec![ctx],
        answer: None,
        reward: 0.0,
        finish: mrt::rl::rollout::Finish::Answered,
        j: Vec::new(),
        j_well_formed: Vec::new(),
    };
    let rs: Vec<&Rollout> = signals.iter().map(|_| &r).collect();
    rollout_batch::<B>(&rs, signals, 0, &Default::default())
}

/// Coefficients c_t of [`fake_batch`], one row per continuation.
fn coefficients(signals: &[Signal], len: usize, ctx: usize) -> Vec<Vec<f32>> {
    let t = len - 1;
    let c: Vec<f32> = fake_batch(signals, len, ctx).coef.into_data().to_vec().unwrap();
    c.chunks(t).map(<[f32]>::to_vec).collect()
}

#[test]
fn mrt_outcome_term_is_not_diluted_by_all_equal_groups() {
    // A mixed group (b = r̄ = 0.5) and an all-correct one (b = 0.9), 4 continuations each.
    let rewards = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0];
    let baselines = [0.5, 0.9];
    let lens = [12; 8];
    let at = |alpha: f32| mrt_signals(&rewards, &baselines, &lens, 4, alpha, true);
    let (zero, tiny, one) = (at(0.0), at(1e-6), at(1.0));
    // α = 0: GRPO's centring, the all-correct group out of the loss.
    assert!(zero.signals[4..].iter().all(|s| !s.in_outcome && s.bonus.is_none()));
    assert_eq!(zero.degenerate, 1);
    let (cz, ct) = (coefficients(&zero.signals, 12, 4), coefficients(&tiny.signals, 12, 4));
    for (a, b) in cz[..4].iter().flatten().zip(ct[..4].iter().flatten()) {
        assert!((a - b).abs() < 1e-4 * a.abs().max(1e-3), "{a} vs {b}");
    }
    // Trained tokens are positions 4..12 (targets 3..11): 8 per row, the mixed group's 32 in
    // the outcome term whatever α; the all-correct group's 32 in the termination term.
    let c1 = coefficients(&one.signals, 12, 4);
    let scale = mrt::rl::advantage::mrt(&rewards, &baselines, 4, 1.0, true).scale;
    assert!((c1[0][5] - (0.5 / scale) / 32.0).abs() < 1e-6, "{}", c1[0][5]);
    assert!((c1[4][5] - ((1.0 - 0.9) / scale) / 32.0).abs() < 1e-6, "{}", c1[4][5]);
    assert_eq!(c1[0][2], 0.0, "context tokens are never trained");
    assert!(one.signals[4..].iter().all(|s| !s.in_outcome && s.bonus.is_some()));
    // Each term's share of the update: Σ |c_t| is 0.5 / scale for the outcome term (32 tokens
    // of |0.5| / scale / 32) and 0.1 / scale for the termination term, so 5/6 and 1/6.
    let (b0, b1) = (fake_batch(&zero.signals, 12, 4), fake_batch(&one.signals, 12, 4));
    assert_eq!(b0.outcome_share(), 1.0);
    assert!((b1.outcome_share() - 5.0 / 6.0).abs() < 1e-5, "{}", b1.outcome_share());
    assert!(
        (b1.outcome_mass - 0.5 / scale as f64).abs() < 1e-5,
        "{}",
        b1.outcome_mass
    );
}
