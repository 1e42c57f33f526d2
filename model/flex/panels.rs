//! A weight matrix packed into column panels, and the register-tiled kernels that multiply a
//! few rows by it (model/flex/packed.rs decides when and caches the packed copies).
//!
//! A panel is [`NR`] columns of the matrix, `[K, NR]` row-major and contiguous, so a kernel
//! streams it front to back; a tile is [`Kernel::rows`] rows of the input times one panel, kept
//! in registers for the whole k loop. Every output element is one fused multiply-add chain over
//! k in order, from zero, computed by one thread: results do not depend on the thread count,
//! and the AVX-512, AVX2 and scalar kernels agree bit for bit (tested).

use rayon::prelude::*;

/// Columns per panel: three AVX-512 vectors, six AVX2 vectors.
pub(super) const NR: usize = 48;

/// The most rows a kernel's tile has.
const MAX_TILE_ROWS: usize = 8;

/// Row tiles per task of [`Packed::product`]: 16 tiles (128 rows of the AVX-512 kernel, 96 of
/// the AVX2 one), so a decoding batch is one task per panel and a prefill is split by rows too.
const ROW_BLOCK_TILES: usize = 16;

/// A `[K, N]` matrix as column panels of [`NR`] columns, each `[K, NR]` row-major and
/// contiguous (the last one zero-padded), so a kernel streams a panel front to back.
pub(super) struct Packed {
    pub(super) k: usize,
    pub(super) n: usize,
    pub(super) panels: Vec<f32>,
}

impl Packed {
    /// Packs the matrix whose element (i, j) is `src[offset + i·sk + j·sn]`.
    pub(super) fn new(src: &[f32], offset: usize, [k, n]: [usize; 2], [sk, sn]: [usize; 2]) -> Self {
        let mut panels = vec![0f32; n.div_ceil(NR) * k * NR];
        panels.par_chunks_mut(k * NR).enumerate().for_each(|(p, panel)| {
            let cols = NR.min(n - p * NR);
            let first = offset + p * NR * sn;
            if sn == 1 {
                for (i, row) in panel.chunks_exact_mut(NR).enumerate() {
                    row[..cols].copy_from_slice(&src[first + i * sk..first + i * sk + cols]);
                }
            } else {
                // A transposed view (the tied output head): read down its contiguous columns.
                for j in 0..cols {
                    for i in 0..k {
                        panel[i * NR + j] = src[first + i * sk + j * sn];
                    }
                }
            }
        });
        Self { k, n, panels }
    }

    /// `x` (`[m, K]`, row-major) times this matrix: `[m, N]`, row-major.
    pub(super) fn product(&self, x: &[f32], m: usize, kernel: Kernel) -> Vec<f32> {
        let (k, n) = (self.k, self.n);
        if k == 0 || n == 0 {
            return vec![0f32; m * n];
        }
        let mr = kernel.rows();
        // Whole row tiles: the last one is padded with zero rows, whose results are dropped.
        let tiles = m.div_ceil(mr);
        let mut padded;
        let x = if tiles * mr == m {
            x
        } else {
            padded = vec![0f32; tiles * mr * k];
            padded[..m * k].copy_from_slice(x);
            &padded[..]
        };
        // Each task computes one panel's columns for a block of rows and writes them straight
        // into `y`: no zeroed buffer and no second copy of the output, which at 64 rows is 52 MB
        // per SmolLM2 step. Blocks of rows keep a prefill's thousands of rows from being one
        // task per panel (a `[576, 192]` weight has 4 panels), while a task's panel, re-read
        // once per tile, stays in the core's cache; tasks of a panel are neighbours, so one
        // thread usually takes all of them.
        let blocks = tiles.div_ceil(ROW_BLOCK_TILES);
        let panels = n.div_ceil(NR);
        let mut y: Vec<f32> = Vec::with_capacity(m * n);
        let out = Out(y.as_mut_ptr());
        (0..panels * blocks).into_par_iter().for_each(|task| {
            let (p, b) = (task / blocks, task % blocks);
            let panel = &self.panels[p * k * NR..(p + 1) * k * NR];
            let cols = NR.min(n - p * NR);
            let mut tile = [0f32; MAX_TILE_ROWS * NR];
            for t in b * ROW_BLOCK_TILES..tiles.min((b + 1) * ROW_BLOCK_TILES) {
                kernel.tile(k, &x[t * mr * k..(t + 1) * mr * k], panel, &mut tile[..mr * NR]);
                for r in 0..mr.min(m - t * mr) {
                    // SAFETY: row t·mr + r < m, columns p·NR .. p·NR + cols ≤ n: inside `y`'s
                    // capacity, and only this task (panel p, row block b) writes these.
                    unsafe { out.write((t * mr + r) * n + p * NR, &tile[r * NR..r * NR + cols]) };
                }
            }
        });
        // SAFETY: the panels cover columns 0..n and the tiles rows 0..m, so every element of
        // the m·n was written above.
        unsafe { y.set_len(m * n) };
        y
    }
}

/// Where the tasks of [`Packed::product`] write their disjoint parts of the output.
struct Out(*mut f32);

// SAFETY: the tasks sharing an `Out` write disjoint ranges (see `Packed::product`).
unsafe impl Sync for Out {}

impl Out {
    /// # Safety
    /// `at + values.len()` is within the buffer, and no other thread writes that range.
    unsafe fn write(&self, at: usize, values: &[f32]) {
        std::ptr::copy_nonoverlapping(values.as_ptr(), self.0.add(at), values.len());
    }
}

/// The microkernel this CPU runs: a tile of rows times one panel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kernel {
    /// 8 rows × 48 columns in 24 zmm accumulators.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// 6 rows × 48 columns, as three passes of 6 × 16 in 12 ymm accumulators (the shape of
    /// BLIS's Haswell kernel). The 4 × 24 tile it replaced needs all 16 ymm registers, and the
    /// compiler's schedule (two broadcasts in flight) spilled an accumulator to the stack on
    /// every k step, a store and a reload on its dependency chain: from 24 rows on, 6 × 16
    /// runs 1.3–1.7× as fast (both forced on an AVX-512 EPYC; BENCHMARKS.md, "Prefills on
    /// packed weights, an AVX2 kernel without a spill").
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// Scalar fused multiply-adds in the same order: the reference the tests hold the others to.
    #[cfg(test)]
    Scalar,
}

impl Kernel {
    /// The fastest kernel this CPU has, or `None` (no packing) without AVX2 and FMA.
    pub(super) fn detect() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Some(Self::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                return Some(Self::Avx2);
            }
        }
        None
    }

    /// Rows per tile.
    fn rows(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => 8,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => 6,
            #[cfg(test)]
            Self::Scalar => 4,
        }
    }

    /// `out` (`[rows, NR]`) = `x` (`[rows, k]`) · `panel` (`[k, NR]`).
    fn tile(self, k: usize, x: &[f32], panel: &[f32], out: &mut [f32]) {
        let rows = self.rows();
        assert!(x.len() == rows * k && panel.len() == k * NR && out.len() == rows * NR);
        match self {
            // SAFETY: `detect` chose these kernels only where the CPU has their features, and
            // the lengths asserted above bound every access they make.
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => unsafe { x86::tile_avx512(k, x, panel, out) },
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe {
                for col in [0, 16, 32] {
                    x86::tile_avx2(k, x, panel, col, out);
                }
            },
            #[cfg(test)]
            Self::Scalar => {
                for r in 0..rows {
                    for j in 0..NR {
                        let mut acc = 0f32;
                        for i in 0..k {
                            acc = x[r * k + i].mul_add(panel[i * NR + j], acc);
                        }
                        out[r * NR + j] = acc;
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::NR;

    /// 8 rows × 48 columns: per k, three vectors of the panel and one broadcast per row.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `x` holds 8·k values, `panel` k·48, `out` 8·48.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_avx512(k: usize, x: &[f32], panel: &[f32], out: &mut [f32]) {
        let (xp, wp) = (x.as_ptr(), panel.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); 3]; 8];
        for i in 0..k {
            let w = wp.add(i * NR);
            let (w0, w1, w2) = (
                _mm512_loadu_ps(w),
                _mm512_loadu_ps(w.add(16)),
                _mm512_loadu_ps(w.add(32)),
            );
            for (r, acc) in acc.iter_mut().enumerate() {
                let b = _mm512_set1_ps(*xp.add(r * k + i));
                acc[0] = _mm512_fmadd_ps(b, w0, acc[0]);
                acc[1] = _mm512_fmadd_ps(b, w1, acc[1]);
                acc[2] = _mm512_fmadd_ps(b, w2, acc[2]);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let o = out.as_mut_ptr().add(r * NR);
            _mm512_storeu_ps(o, acc[0]);
            _mm512_storeu_ps(o.add(16), acc[1]);
            _mm512_storeu_ps(o.add(32), acc[2]);
        }
    }

    /// 6 rows × the 16 columns of the panel from `col` (0, 16 or 32): 12 accumulators, two
    /// vectors of the panel and one broadcast per row, within AVX2's 16 registers.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `x` holds 6·k values, `panel` k·48, `out` 6·48; `col` ≤ 32.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_avx2(k: usize, x: &[f32], panel: &[f32], col: usize, out: &mut [f32]) {
        let (xp, wp) = (x.as_ptr(), panel.as_ptr().add(col));
        let mut acc = [[_mm256_setzero_ps(); 2]; 6];
        for i in 0..k {
            let w = wp.add(i * NR);
            let (w0, w1) = (_mm256_loadu_ps(w), _mm256_loadu_ps(w.add(8)));
            for (r, acc) in acc.iter_mut().enumerate() {
                let b = _mm256_set1_ps(*xp.add(r * k + i));
                acc[0] = _mm256_fmadd_ps(b, w0, acc[0]);
                acc[1] = _mm256_fmadd_ps(b, w1, acc[1]);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let o = out.as_mut_ptr().add(r * NR + col);
            _mm256_storeu_ps(o, acc[0]);
            _mm256_storeu_ps(o.add(8), acc[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    /// Every kernel this CPU has gives the scalar reference's bits, which are within f32
    /// rounding of an f64 product; rows and columns that fill no whole tile, rows over several
    /// tasks' blocks (301), weights read plainly, transposed and from an offset.
    #[test]
    fn kernels_agree_bit_for_bit_and_with_f64() {
        for (m, k, n) in [(1, 7, 5), (5, 64, 50), (16, 96, 96), (9, 130, 200), (301, 24, 100)] {
            let x = values(m * k, 1);
            let w = values(k * n, 2);
            let mut wt = vec![0f32; n * k];
            for i in 0..k {
                for j in 0..n {
                    wt[j * k + i] = w[i * n + j];
                }
            }
            let shifted: Vec<f32> = [0.5; 3].iter().chain(&w).copied().collect();
            let plain = Packed::new(&w, 0, [k, n], [n, 1]);
            assert_eq!(Packed::new(&wt, 0, [k, n], [1, k]).panels, plain.panels);
            assert_eq!(Packed::new(&shifted, 3, [k, n], [n, 1]).panels, plain.panels);
            let reference = plain.product(&x, m, Kernel::Scalar);
            for i in 0..m {
                for j in 0..n {
                    let terms = (0..k).map(|l| x[i * k + l] as f64 * w[l * n + j] as f64);
                    let (exact, size) = terms.fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs()));
                    let got = reference[i * n + j] as f64;
                    assert!(
                        (got - exact).abs() <= 1e-6 * size,
                        "[{m}, {k}, {n}] ({i}, {j}): {got} vs {exact}"
                    );
                }
            }
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    assert_eq!(
                        plain.product(&x, m, Kernel::Avx512),
                        reference,
                        "avx512 [{m}, {k}, {n}]"
                    );
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    assert_eq!(plain.product(&x, m, Kernel::Avx2), reference, "avx2 [{m}, {k}, {n}]");
                }
            }
        }
    }
}
