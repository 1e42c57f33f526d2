//! Inverse-CDF sampling of one index per row for the CPU backend, in one pass per row.
//!
//! The portable path (model/sampling.rs) builds the whole `[B, N]` running sum, compares every
//! element with the row's threshold into a boolean tensor, converts it to integers and sums
//! them: five passes over a batch of vocabulary-wide rows, which at SmolLM2's 49,152 columns
//! and 64 rows is a few milliseconds of every decoding step. The count of running sums below
//! the threshold is the index of the first one that is not (the sums never decrease: the
//! masses are not negative, and a NaN stays NaN), so each row stops there. The running sum is
//! burn-flex's own (f32, in column order, from zero) and the threshold the same product, so the
//! index is bit for bit the portable one (tested).

use std::cmp::Ordering;

use burn::prelude::*;
use rayon::prelude::*;

use super::attention::flex_f32;

/// Rows × columns below which one thread does the whole call.
const PARALLEL_WORK: usize = 1 << 16;

/// For each row, how many of its running sums are below `uniform · total`, or `None` when the
/// tensors are not flex f32 (the caller then takes the portable path).
///
/// # Shapes
/// `probs`: `[B, N]` (unnormalised is fine), `uniform`: `[B]` → `[B, 1]`
pub(crate) fn inverse_cdf<B: Backend>(probs: &Tensor<B, 2>, uniform: &Tensor<B, 1>) -> Option<Tensor<B, 2, Int>> {
    let (p, u) = (flex_f32(probs)?.to_contiguous(), flex_f32(uniform)?.to_contiguous());
    let [b, n] = probs.dims();
    let (ps, us) = (p.layout().start_offset(), u.layout().start_offset());
    let (p, u): (&[f32], &[f32]) = (&p.storage()[ps..ps + b * n], &u.storage()[us..us + b]);
    let row = |(r, out): (usize, &mut i64)| {
        let masses = &p[r * n..(r + 1) * n];
        let total = masses.iter().fold(0f32, |acc, &x| acc + x);
        let threshold = u[r] * total;
        let mut acc = 0f32;
        *out = masses
            .iter()
            .position(|&x| {
                acc += x;
                // Not below the threshold (NaN included, as `lower` counts it).
                acc.partial_cmp(&threshold) != Some(Ordering::Less)
            })
            .unwrap_or(n) as i64;
    };
    let mut index = vec![0i64; b];
    if b * n < PARALLEL_WORK {
        index.iter_mut().enumerate().for_each(|(r, out)| row((r, out)));
    } else {
        index.par_iter_mut().enumerate().for_each(row);
    }
    Some(Tensor::from_data(TensorData::new(index, [b, 1]), &probs.device()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::Distribution;

    /// The portable computation, as model/sampling.rs writes it.
    fn portable(probs: Tensor<Flex, 2>, uniform: Tensor<Flex, 1>) -> Tensor<Flex, 2, Int> {
        let [b, n] = probs.dims();
        let cdf = probs.cumsum(1);
        let total = cdf.clone().narrow(1, n - 1, 1);
        let threshold = uniform.reshape([b, 1]) * total;
        cdf.lower(threshold.expand([b, n])).int().sum_dim(1)
    }

    /// Bit for bit the portable indices, on one thread and on the pool, with zero masses
    /// (never chosen), unnormalised rows and uniforms near both ends.
    #[test]
    fn indices_equal_the_portable_path() {
        let dev = Default::default();
        <Flex as Backend>::seed(&dev, 3);
        for [b, n] in [[5, 7], [64, 4099]] {
            let raw = Tensor::<Flex, 2>::random([b, n], Distribution::Uniform(-1.0, 3.0), &dev);
            // Negative draws become zero masses.
            let probs = raw.clamp_min(0.0);
            let mut u: Vec<f32> = (0..b).map(|r| (r as f32 + 0.5) / b as f32).collect();
            (u[0], u[b - 1]) = (1.0 / (1u32 << 24) as f32, 1.0 - 1.0 / (1u32 << 24) as f32);
            let uniform = Tensor::<Flex, 1>::from_data(TensorData::new(u, [b]), &dev);
            let ours = inverse_cdf(&probs, &uniform).expect("flex tensors");
            let theirs = portable(probs.clone(), uniform);
            let picked: Vec<i64> = ours.into_data().iter::<i64>().collect();
            assert_eq!(picked, theirs.into_data().iter::<i64>().collect::<Vec<_>>());
            // Never a zero-mass column.
            let masses: Vec<f32> = probs.to_data().to_vec().unwrap();
            for (r, &i) in picked.iter().enumerate() {
                assert!(masses[r * n + i as usize] > 0.0, "row {r} picked column {i} of mass 0");
            }
        }
    }
}
