//! Decoding products against weights packed once, for models too large for the CPU's caches.
//!
//! A decoding step multiplies a few rows (one token per sequence) by every weight matrix of the
//! model, so it streams all the weights from memory once per token. `gemm` (what burn-flex
//! calls) repacks the weight into column panels on every call before its microkernel runs:
//! for small row counts that doubles the memory traffic and the packing dominates. Measured
//! on SmolLM2-135M's shapes (BENCHMARKS.md, "A real model on the CPU"), the products of a
//! whole decoding step took 76 ms at 16 rows through `gemm` against 45 ms on weights packed
//! beforehand. Weights do not change while sequences decode, so each is packed once, on
//! first use, and the copy is kept while any KV cache exists ([`PackedScope`]); the next
//! decoding after a training step packs the new weights.
//!
//! Packing is chosen per model, not per product: only models whose matrices exceed
//! [`PACK_FROM_BYTES`] (larger than any CPU cache, so decoding is bound by streaming them) use
//! it, during cached forwards ([`packing`]), for products of at most [`MAX_ROWS`] rows, on
//! x86-64 CPUs with AVX2 and FMA. Everything else (the synthetic tasks' small models,
//! full-sequence passes, training, other backends and CPUs) keeps `gemm`, unchanged.
//!
//! Every output element is one fused multiply-add chain over k in order, from zero, computed
//! by one thread: results do not depend on the thread count, and the AVX-512 and AVX2 kernels
//! agree bit for bit (tested). They differ from `gemm`'s in the last bits (another summation
//! order), as two BLAS libraries do.

use std::cell::Cell;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use burn::prelude::*;
use burn::tensor::Bytes;
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::attention::flex_f32;

/// Bytes of f32 matrices from which a model decodes on packed weights (64 MiB: beyond the
/// last-level cache of common CPUs). `tiny` (13.8 MB) stays below, SmolLM2-135M (538 MB) above.
pub(crate) const PACK_FROM_BYTES: usize = 64 << 20;

/// The most rows a product may have to use packed weights: decoding steps, prover forks and
/// forced answers. Prefills and training products (thousands of rows) amortise `gemm`'s
/// packing and are left to it.
pub(crate) const MAX_ROWS: usize = 128;

/// Columns per panel: three AVX-512 vectors, six AVX2 vectors.
const NR: usize = 48;

/// The most rows a kernel's tile has.
const MAX_TILE_ROWS: usize = 8;

thread_local! {
    /// Set for the duration of a cached forward of a model that decodes on packed weights.
    static ENABLED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with products against packed weights enabled on this thread when `on`.
pub(crate) fn packing<R>(on: bool, f: impl FnOnce() -> R) -> R {
    /// Puts the flag back however `f` ends (a panic caught further up included).
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ENABLED.set(self.0);
        }
    }
    let _restore = Restore(ENABLED.replace(on));
    f()
}

/// Packed weights, shared by every thread that decodes with them.
static CACHE: Mutex<Cache> = Mutex::new(Cache {
    scopes: 0,
    entries: Vec::new(),
});

struct Cache {
    /// Live [`PackedScope`]s (one per KV cache): when the last one goes, so do the entries.
    scopes: usize,
    entries: Vec<Entry>,
}

/// Where a matrix lies in its buffer: (start offset, shape, strides), in elements.
type View = (usize, [usize; 2], [isize; 2]);

struct Entry {
    /// The weight's buffer. A weak reference both identifies it (its allocation stays while
    /// we hold it, so no other buffer can take its address) and says whether it is still
    /// alive. It also keeps the buffer immutable: burn-flex writes in place only through
    /// `Arc::make_mut`/`Arc::get_mut`, which move the data to a fresh allocation (or refuse)
    /// while a weak reference exists, so a weight updated in place is a new buffer here.
    data: Weak<Bytes>,
    view: View,
    packed: Arc<Packed>,
}

/// A live user of packed weights; one lives in every KV cache. Dropping the last one frees
/// every packed copy, so they take memory only while sequences decode.
#[derive(Debug)]
pub struct PackedScope(());

impl PackedScope {
    pub(crate) fn enter() -> Self {
        lock().scopes += 1;
        Self(())
    }
}

impl Clone for PackedScope {
    fn clone(&self) -> Self {
        Self::enter()
    }
}

impl Drop for PackedScope {
    fn drop(&mut self) {
        lock().leave();
    }
}

fn lock() -> MutexGuard<'static, Cache> {
    locked(&CACHE)
}

fn locked(cache: &Mutex<Cache>) -> MutexGuard<'_, Cache> {
    // A panic while the cache was held leaves it consistent (entries are pushed whole).
    cache.lock().unwrap_or_else(|e| e.into_inner())
}

/// `x w` on packed weights, or `None` where packing does not apply (see the module doc).
///
/// # Shapes
/// `x`: `[M, K]`, `w`: `[K, N]` → `[M, N]`
pub(crate) fn packed_matmul<B: Backend>(x: &Tensor<B, 2>, w: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
    if !ENABLED.get() || x.dims()[0] > MAX_ROWS {
        return None;
    }
    let kernel = Kernel::detect()?;
    let (xf, wf) = (flex_f32(x)?, flex_f32(w)?);
    let [m, k] = x.dims();
    let n = w.dims()[1];
    let packed = packed_weight(&wf)?;
    debug_assert_eq!((packed.k, packed.n), (k, n));
    let xf = xf.to_contiguous();
    let start = xf.layout().start_offset();
    let y = packed.product(&xf.storage::<f32>()[start..start + m * k], m, kernel);
    Some(Tensor::from_data(TensorData::new(y, [m, n]), &x.device()))
}

/// The packed copy of `w`, packed now if it is not cached yet. The packing runs outside the
/// lock (on the thread pool): a pool thread that waited for the lock while the holder waited
/// for the pool would deadlock, and other threads' lookups need not wait for it either.
fn packed_weight(w: &FlexTensor) -> Option<Arc<Packed>> {
    packed_in(&CACHE, w)
}

fn packed_in(cache: &Mutex<Cache>, w: &FlexTensor) -> Option<Arc<Packed>> {
    let view = view(w)?;
    if let Some(found) = locked(cache).find(w, view) {
        return Some(found);
    }
    let (offset, shape, [sk, sn]) = view;
    let packed = Arc::new(Packed::new(
        w.storage::<f32>(),
        offset,
        shape,
        [sk as usize, sn as usize],
    ));
    Some(locked(cache).insert(w, view, packed))
}

/// Where a 2-D matrix lies in its buffer, or `None` for negative strides.
fn view(w: &FlexTensor) -> Option<View> {
    let layout = w.layout();
    let (rows, cols, sk, sn) = layout.as_2d_strides()?;
    (sk >= 0 && sn >= 0).then_some((layout.start_offset(), [rows, cols], [sk, sn]))
}

impl Cache {
    fn find(&self, w: &FlexTensor, view: View) -> Option<Arc<Packed>> {
        let data = w.data_arc();
        self.entries
            .iter()
            .find(|e| e.view == view && std::ptr::eq(e.data.as_ptr(), Arc::as_ptr(&data)))
            .map(|e| e.packed.clone())
    }

    /// Keeps `packed` for `w`, or returns the copy another thread put there meanwhile.
    fn insert(&mut self, w: &FlexTensor, view: View, packed: Arc<Packed>) -> Arc<Packed> {
        if let Some(found) = self.find(w, view) {
            return found;
        }
        // Weights that no longer exist (the policy before a training step) give their room back.
        self.entries.retain(|e| e.data.strong_count() > 0);
        self.entries.push(Entry {
            data: Arc::downgrade(&w.data_arc()),
            view,
            packed: packed.clone(),
        });
        packed
    }

    fn leave(&mut self) {
        self.scopes -= 1;
        if self.scopes == 0 {
            self.entries.clear();
        }
    }
}

/// A `[K, N]` matrix as column panels of [`NR`] columns, each `[K, NR]` row-major and
/// contiguous (the last one zero-padded), so a kernel streams a panel front to back.
pub(crate) struct Packed {
    k: usize,
    n: usize,
    panels: Vec<f32>,
}

impl Packed {
    /// Packs the matrix whose element (i, j) is `src[offset + i·sk + j·sn]`.
    fn new(src: &[f32], offset: usize, [k, n]: [usize; 2], [sk, sn]: [usize; 2]) -> Self {
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
    fn product(&self, x: &[f32], m: usize, kernel: Kernel) -> Vec<f32> {
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
        // Each task computes one panel's columns for every row and writes them straight into
        // `y`: no zeroed buffer and no second copy of the output, which at 64 rows is 52 MB
        // per SmolLM2 step.
        let mut y: Vec<f32> = Vec::with_capacity(m * n);
        let out = Out(y.as_mut_ptr());
        self.panels.par_chunks(k * NR).enumerate().for_each(|(p, panel)| {
            let cols = NR.min(n - p * NR);
            let mut tile = [0f32; MAX_TILE_ROWS * NR];
            for t in 0..tiles {
                kernel.tile(k, &x[t * mr * k..(t + 1) * mr * k], panel, &mut tile[..mr * NR]);
                for r in 0..mr.min(m - t * mr) {
                    // SAFETY: row t·mr + r < m, columns p·NR .. p·NR + cols ≤ n: inside `y`'s
                    // capacity, and only this task (panel p) writes these columns.
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
enum Kernel {
    /// 8 rows × 48 columns in 24 zmm accumulators.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// 4 rows × 48 columns, as two halves of 4 × 24 in 12 ymm accumulators.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// Scalar fused multiply-adds in the same order: the reference the tests hold the others to.
    #[cfg(test)]
    Scalar,
}

impl Kernel {
    /// The fastest kernel this CPU has, or `None` (no packing) without AVX2 and FMA.
    fn detect() -> Option<Self> {
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
            Self::Avx2 => 4,
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
                x86::tile_avx2(k, x, panel, 0, out);
                x86::tile_avx2(k, x, panel, 24, out);
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

    /// 4 rows × the 24 columns of the panel from `col` (0 or 24).
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `x` holds 4·k values, `panel` k·48, `out` 4·48.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_avx2(k: usize, x: &[f32], panel: &[f32], col: usize, out: &mut [f32]) {
        let (xp, wp) = (x.as_ptr(), panel.as_ptr().add(col));
        let mut acc = [[_mm256_setzero_ps(); 3]; 4];
        for i in 0..k {
            let w = wp.add(i * NR);
            let (w0, w1, w2) = (
                _mm256_loadu_ps(w),
                _mm256_loadu_ps(w.add(8)),
                _mm256_loadu_ps(w.add(16)),
            );
            for (r, acc) in acc.iter_mut().enumerate() {
                let b = _mm256_set1_ps(*xp.add(r * k + i));
                acc[0] = _mm256_fmadd_ps(b, w0, acc[0]);
                acc[1] = _mm256_fmadd_ps(b, w1, acc[1]);
                acc[2] = _mm256_fmadd_ps(b, w2, acc[2]);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let o = out.as_mut_ptr().add(r * NR + col);
            _mm256_storeu_ps(o, acc[0]);
            _mm256_storeu_ps(o.add(8), acc[1]);
            _mm256_storeu_ps(o.add(16), acc[2]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::Distribution;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use crate::model::{Transformer, TransformerConfig};

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    fn flex(t: Tensor<Flex, 2>) -> FlexTensor {
        t.into_primitive().tensor()
    }

    /// Every kernel this CPU has gives the scalar reference's bits, which are within f32
    /// rounding of an f64 product; rows and columns that fill no whole tile, weights read
    /// plainly, transposed and from an offset.
    #[test]
    fn kernels_agree_bit_for_bit_and_with_f64() {
        for (m, k, n) in [(1, 7, 5), (5, 64, 50), (16, 96, 96), (9, 130, 200)] {
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

    /// Through tensors: only inside [`packing`] and up to [`MAX_ROWS`] rows, and then Burn's
    /// product within f32 rounding, for a weight and a transposed view (the tied head).
    #[test]
    fn tensor_products_match_burn_and_run_only_when_enabled() {
        let dev = Default::default();
        let normal = Distribution::Normal(0.0, 1.0);
        let x = Tensor::<Flex, 2>::random([6, 40], normal, &dev);
        let w = Tensor::<Flex, 2>::random([40, 100], normal, &dev);
        let embed = Tensor::<Flex, 2>::random([100, 40], normal, &dev);
        let _scope = PackedScope::enter();
        assert!(packed_matmul(&x, &w).is_none(), "off outside `packing`");
        let tall = Tensor::<Flex, 2>::random([MAX_ROWS + 1, 40], normal, &dev);
        assert!(packing(true, || packed_matmul(&tall, &w)).is_none(), "too many rows");
        let Some(ours) = packing(true, || packed_matmul(&x, &w)) else {
            assert!(Kernel::detect().is_none(), "a CPU with AVX2 and FMA packs");
            return;
        };
        let diff: f32 = (ours - x.clone().matmul(w)).abs().max().into_scalar();
        assert!(diff < 1e-5, "plain weight differs by {diff}");
        let head = embed.transpose();
        let ours = packing(true, || packed_matmul(&x, &head)).expect("packs");
        let diff: f32 = (ours - x.matmul(head)).abs().max().into_scalar();
        assert!(diff < 1e-5, "transposed weight differs by {diff}");
    }

    /// A weight is packed once while it lives; another view of its buffer is another matrix;
    /// a weight changed in place is a new buffer to the cache (never its stale packing); dead
    /// weights and, after the last scope, all entries are dropped.
    #[test]
    fn the_cache_reuses_live_weights_and_never_a_changed_one() {
        let cache = Mutex::new(Cache {
            scopes: 1,
            entries: Vec::new(),
        });
        let get = |t: Tensor<Flex, 2>| packed_in(&cache, &flex(t)).unwrap();
        let dev = Default::default();
        let w = Tensor::<Flex, 2>::from_data(TensorData::new(values(12 * 50, 3), [12, 50]), &dev);
        let a = get(w.clone());
        assert!(Arc::ptr_eq(&a, &get(w.clone())), "packed once");
        let t = get(w.clone().transpose());
        assert!(!Arc::ptr_eq(&a, &t) && locked(&cache).entries.len() == 2);
        let before = w.to_data().to_vec::<f32>().unwrap();
        // The only strong reference: burn-flex may add in place here.
        let w = w.add_scalar(1.0);
        let b = get(w.clone());
        assert!(!Arc::ptr_eq(&a, &b), "a changed weight is packed anew");
        assert_eq!(
            b.panels[..NR],
            before[..NR].iter().map(|v| v + 1.0).collect::<Vec<_>>()[..]
        );
        assert_eq!(
            locked(&cache).entries.len(),
            1,
            "the old buffer's two entries were dropped"
        );
        locked(&cache).leave();
        assert!(locked(&cache).entries.is_empty());
    }

    /// A model above [`PACK_FROM_BYTES`] prefills and decodes through the packed products
    /// (its head among the cached weights while the KV cache lives) and gives the logits of
    /// its full-sequence forward, which runs on `gemm`.
    #[test]
    fn a_large_model_decodes_on_packed_weights_like_its_full_forward() {
        if Kernel::detect().is_none() {
            return;
        }
        let mut config = TransformerConfig::preset("small").unwrap();
        (config.vocab_size, config.n_layers) = (8192, 2);
        let dev = Default::default();
        let model = Transformer::<Flex>::new(&config, 5, &dev).unwrap();
        assert!(model.decodes_packed(), "{} parameters", config.num_params());
        let ids: Vec<i64> = (0..30).map(|i| (i * 977 % 8192) as i64).collect();
        let tokens = Tensor::<Flex, 2, Int>::from_data(TensorData::new(ids, [3, 10]), &dev);
        let full = model.forward(tokens.clone());
        let mut cache = model.new_cache(3, 16);
        let mut parts = vec![model
            .forward_cached(tokens.clone().narrow(1, 0, 6), &mut cache, None)
            .unwrap()];
        for t in 6..10 {
            parts.push(
                model
                    .forward_cached(tokens.clone().narrow(1, t, 1), &mut cache, None)
                    .unwrap(),
            );
        }
        let head = flex(model.head_weight()).data_arc();
        let packed = lock()
            .entries
            .iter()
            .any(|e| std::ptr::eq(e.data.as_ptr(), Arc::as_ptr(&head)));
        assert!(packed, "the head was packed");
        let cached = Tensor::cat(parts, 1);
        let scale: f32 = full.clone().abs().max().into_scalar();
        let diff: f32 = (cached - full).abs().max().into_scalar();
        assert!(diff <= 1e-4 * scale, "cached logits differ by {diff} (largest {scale})");
    }
}
