//! Sampling straight from a large vocabulary's logits on the CPU backend: the softmax and the
//! inverse CDF fused into two passes per row, rows spread over the pool.
//!
//! The portable path (model/sampling.rs) divides by the temperature, takes burn-flex's softmax
//! (a max pass, a pass of scalar libm `expf`, a normalising pass, in tasks of 64 rows: one
//! thread for a whole decoding batch) and then the inverse CDF of cdf.rs, whose running sum is
//! one dependent chain of 49,152 additions per row at SmolLM2's vocabulary. Here a row takes
//! its max, then one pass writes the masses exp(x/T − max/T) (the vectorising exponential of
//! swiglu.rs) into a scratch row and sums them in blocks; the threshold u·total is found among
//! the blocks' running sums, then inside the one block that reaches it. The masses are never
//! normalised: the CDF does not need it.
//!
//! Not bit for bit the portable path: the exponential differs by a few ulp and the sums run in
//! another order. The two-level sum is also closer to the exact (f64) inverse CDF than the
//! portable path's single running sum over the whole vocabulary, whose rounding drifts by a few
//! tokens on SmolLM2-sized rows (tested). It is used only from [`FUSED_FROM_COLUMNS`] columns
//! (real vocabularies): the synthetic tasks' models, whose tests pin sampled numbers, sample
//! exactly as before.

use burn::prelude::*;
use rayon::prelude::*;

use super::attention::flex_f32;
use super::swiglu::exp;

/// Vocabularies from this size on are sampled here.
pub(crate) const FUSED_FROM_COLUMNS: usize = 4096;

/// Columns per block of the two-level running sum: the last level is a dependent chain of at
/// most this many additions.
const BLOCK: usize = 256;

/// Below this the masses are zero (e^−87 ≈ 1.6e−38: libm's `expf` gives a few subnormals
/// more), so a token the softmax gives (almost) nothing is never drawn.
const MIN_EXPONENT: f32 = -87.0;

/// For each row, the index of the first token whose cumulative softmax mass (at
/// `temperature`) reaches `uniform · total`, or `None` when the vocabulary is small or the
/// tensors are not flex f32 (the caller then takes the portable path).
///
/// # Shapes
/// `logits`: `[B, N]`, `uniform`: `[B]` with values in (0, 1) → `[B, 1]`
pub(crate) fn sample_softmax<B: Backend>(
    logits: &Tensor<B, 2>,
    uniform: &Tensor<B, 1>,
    temperature: f32,
) -> Option<Tensor<B, 2, Int>> {
    let [b, n] = logits.dims();
    if n < FUSED_FROM_COLUMNS {
        return None;
    }
    let (x, u) = (flex_f32(logits)?.to_contiguous(), flex_f32(uniform)?.to_contiguous());
    let (xs, us) = (x.layout().start_offset(), u.layout().start_offset());
    let (x, u): (&[f32], &[f32]) = (&x.storage()[xs..xs + b * n], &u.storage()[us..us + b]);
    let mut index = vec![0i64; b];
    index.par_iter_mut().enumerate().for_each_init(
        || vec![0f32; n + n.div_ceil(BLOCK)],
        |scratch, (r, out)| *out = draw(&x[r * n..(r + 1) * n], u[r], temperature, scratch) as i64,
    );
    Some(Tensor::from_data(TensorData::new(index, [b, 1]), &logits.device()))
}

/// One row's draw; `scratch` holds N masses and one sum per block.
fn draw(logits: &[f32], u: f32, temperature: f32, scratch: &mut [f32]) -> usize {
    let n = logits.len();
    let (masses, blocks) = scratch.split_at_mut(n);
    let blocks = &mut blocks[..n.div_ceil(BLOCK)];
    // max(x)/T is max(x/T) exactly: the division is monotonic and correctly rounded.
    masses_by_block(logits, temperature, row_max(logits) / temperature, masses, blocks);
    let total = blocks.iter().fold(0f32, |acc, &s| acc + s);
    // NaN or infinite logits: column 0, as the portable path's NaN masses give.
    if !(total.is_finite() && total > 0.0) {
        return 0;
    }
    // u < 1, so the threshold is at most the total, which the running sum below reaches at the
    // last block (the same additions in the same order); it is above 0 (the max's mass is 1).
    let threshold = u * total;
    let mut before = 0f32;
    for (i, &sum) in blocks.iter().enumerate() {
        if before + sum >= threshold {
            // The first block to reach the threshold: `before` is below it, so `sum` > 0.
            let start = i * BLOCK;
            let block = &masses[start..(start + BLOCK).min(n)];
            let mut acc = before;
            let mut last_positive = 0;
            for (j, &m) in block.iter().enumerate() {
                acc += m;
                if m > 0.0 {
                    if acc >= threshold {
                        return start + j;
                    }
                    last_positive = j;
                }
            }
            // The block's own sum ran in another order and reached the threshold where this
            // chain falls a rounding short: its last token with mass.
            return start + last_positive;
        }
        before += sum;
    }
    unreachable!("the running sum of the blocks ends at the total, which reaches the threshold")
}

wide_fn! {
    /// The row's largest logit (NaNs are skipped; they make the total NaN later).
    fn row_max(x: &[f32]) -> f32 {
        let mut lanes = [f32::NEG_INFINITY; 16];
        let chunks = x.chunks_exact(16);
        let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
        for c in chunks {
            for i in 0..16 {
                lanes[i] = if c[i] > lanes[i] { c[i] } else { lanes[i] };
            }
        }
        lanes.iter().fold(tail, |m, &v| if v > m { v } else { m })
    }
}

wide_fn! {
    /// masses[i] = exp(x[i]/T − max), and each block's sum in `blocks`.
    fn masses_by_block(x: &[f32], temperature: f32, max: f32, masses: &mut [f32], blocks: &mut [f32]) {
        for ((x, m), sum) in x.chunks(BLOCK).zip(masses.chunks_mut(BLOCK)).zip(blocks.iter_mut()) {
            for (o, &v) in m.iter_mut().zip(x) {
                let z = v / temperature - max;
                *o = if z < MIN_EXPONENT { 0.0 } else { exp(z) };
            }
            let mut lanes = [0f32; 16];
            let chunks = m.chunks_exact(16);
            let tail: f32 = chunks.remainder().iter().sum();
            for c in chunks {
                for i in 0..16 {
                    lanes[i] += c[i];
                }
            }
            *sum = lanes.iter().sum::<f32>() + tail;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::activation::softmax;
    use burn::tensor::Distribution;

    /// The portable computation: softmax of logits / T, then the first running sum that is not
    /// below u · total (model/sampling.rs).
    fn portable(logits: Tensor<Flex, 2>, uniform: Tensor<Flex, 1>, temperature: f32) -> Vec<i64> {
        let [b, n] = logits.dims();
        let cdf = softmax(logits / temperature, 1).cumsum(1);
        let total = cdf.clone().narrow(1, n - 1, 1);
        let threshold = uniform.reshape([b, 1]) * total;
        let index = cdf.lower(threshold.expand([b, n])).int().sum_dim(1);
        index.into_data().iter::<i64>().collect()
    }

    fn ours(logits: &Tensor<Flex, 2>, u: &[f32], temperature: f32) -> Vec<i64> {
        let uniform = Tensor::<Flex, 1>::from_data(TensorData::new(u.to_vec(), [u.len()]), &logits.device());
        let index = sample_softmax(logits, &uniform, temperature).expect("a large flex vocabulary");
        index.into_data().iter::<i64>().collect()
    }

    /// Row r's exact cumulative masses (f64) of exp(x/T − max/T), and its threshold u · total.
    fn exact(logits: &[f32], u: f32, temperature: f32) -> (Vec<f64>, f64) {
        let t = temperature as f64;
        let max = logits.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64 / t));
        let mut acc = 0f64;
        let cdf: Vec<f64> = logits
            .iter()
            .map(|&x| {
                acc += (x as f64 / t - max).exp();
                acc
            })
            .collect();
        let total = acc;
        (cdf, u as f64 * total)
    }

    /// SmolLM2-sized and odd-sized rows at two temperatures, uniforms spread over (0, 1) and at
    /// both ends: the draws are the exact (f64) inverse CDF's, up to a boundary within 1e-6 of
    /// the total mass of the threshold, and off it no more often than the portable path's f32
    /// draws (whose one running sum of 49,152 terms drifts by more).
    #[test]
    fn draws_are_the_exact_inverse_cdf() {
        let dev = Default::default();
        <Flex as Backend>::seed(&dev, 11);
        let (mut ours_off, mut theirs_off) = (0, 0);
        for [b, n] in [[64, 49_152], [5, 4_099]] {
            let logits = Tensor::<Flex, 2>::random([b, n], Distribution::Normal(0.0, 3.0), &dev);
            let host: Vec<f32> = logits.to_data().to_vec().unwrap();
            let mut u: Vec<f32> = (0..b).map(|r| (r as f32 + 0.5) / b as f32).collect();
            (u[0], u[b - 1]) = (1.0 / (1u32 << 24) as f32, 1.0 - 1.0 / (1u32 << 24) as f32);
            for t in [1.0, 0.7] {
                let uniform = Tensor::<Flex, 1>::from_data(TensorData::new(u.clone(), [b]), &dev);
                let (drawn, theirs) = (ours(&logits, &u, t), portable(logits.clone(), uniform, t));
                for r in 0..b {
                    let (cdf, threshold) = exact(&host[r * n..(r + 1) * n], u[r], t);
                    let want = cdf.iter().position(|&c| c >= threshold).unwrap() as i64;
                    // The largest gap, relative to the total, between the threshold and a
                    // boundary that lies between `want` and a draw (0 when they agree).
                    let off = |i: i64| {
                        let (lo, hi) = (want.min(i) as usize, want.max(i) as usize);
                        (lo..hi).map(|j| (cdf[j] - threshold).abs()).fold(0f64, f64::max) / cdf[n - 1]
                    };
                    let o = off(drawn[r]);
                    assert!(
                        o <= 1e-6,
                        "{b} × {n} at T = {t}, row {r}: {} for {want}, {o:e} of the mass away",
                        drawn[r]
                    );
                    ours_off += usize::from(drawn[r] != want);
                    theirs_off += usize::from(theirs[r] != want);
                }
            }
        }
        eprintln!("draws off the exact one: ours {ours_off}, the portable path's {theirs_off}");
        assert!(ours_off <= theirs_off, "ours {ours_off} > portable {theirs_off}");
    }

    /// Uniforms on a fine grid pick each token as often as its probability says (to one draw),
    /// tokens at −∞ never, and a row with a NaN logit gives column 0 like the portable path.
    #[test]
    fn draws_follow_the_softmax_and_skip_impossible_tokens() {
        let dev = Default::default();
        let n = FUSED_FROM_COLUMNS + 3;
        let mut row = vec![f32::NEG_INFINITY; n];
        let picks = [(7, 2.0f32), (300, 0.0), (301, 1.0), (n - 1, -1.0)];
        for &(i, x) in &picks {
            row[i] = x;
        }
        let grid = 10_000;
        let logits = Tensor::<Flex, 2>::from_data(TensorData::new(row.repeat(grid), [grid, n]), &dev);
        let u: Vec<f32> = (0..grid).map(|i| (i as f32 + 0.5) / grid as f32).collect();
        let drawn = ours(&logits, &u, 1.0);
        let z: f32 = picks.iter().map(|&(_, x)| x.exp()).sum();
        for &(i, x) in &picks {
            let count = drawn.iter().filter(|&&d| d == i as i64).count() as f32;
            let expected = grid as f32 * x.exp() / z;
            assert!(
                (count - expected).abs() <= 1.0,
                "token {i}: {count} draws, expected {expected}"
            );
        }
        assert_eq!(
            drawn
                .iter()
                .filter(|&&d| picks.iter().all(|&(i, _)| d != i as i64))
                .count(),
            0
        );

        row[100] = f32::NAN;
        let logits = Tensor::<Flex, 2>::from_data(TensorData::new(row, [1, n]), &dev);
        assert_eq!(ours(&logits, &[0.5], 1.0), vec![0]);
        let small = Tensor::<Flex, 2>::zeros([2, FUSED_FROM_COLUMNS - 1], &dev);
        let uniform = Tensor::<Flex, 1>::from_data([0.5f32, 0.5], &dev);
        assert!(
            sample_softmax(&small, &uniform, 1.0).is_none(),
            "small vocabularies take the portable path"
        );
    }
}
