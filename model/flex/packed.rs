//! Decoding products against weights packed once, for models too large for the CPU's caches.
//!
//! A decoding step multiplies a few rows (one token per sequence) by every weight matrix of the
//! model, so it streams all the weights from memory once per token. `gemm` (what burn-flex
//! calls) repacks the weight into column panels on every call before its microkernel runs:
//! for small row counts that doubles the memory traffic and the packing dominates. Measured
//! on SmolLM2-135M's shapes (BENCHMARKS.md, "Decoding on packed weights"), the products of a
//! whole decoding step took 76 ms at 16 rows through `gemm` against 45 ms on weights packed
//! beforehand. Weights do not change while sequences decode, so each is packed once, on
//! first use, and the copy is kept while any KV cache exists ([`PackedScope`]); the next
//! decoding after a training step packs the new weights.
//!
//! Packing is chosen per model, not per product: only models whose matrices exceed
//! [`PACK_FROM_BYTES`] (larger than any CPU cache, so decoding is bound by streaming them) use
//! it, during cached forwards ([`packing`]), on x86-64 CPUs with AVX2 and FMA. Everything else
//! (the synthetic tasks' small models, full-sequence passes, training, other backends and
//! CPUs) keeps `gemm`, unchanged. A cached forward's prefill (thousands of rows) takes the
//! packed weights too: they are packed for the decoding that follows anyway, and the
//! register-tiled kernel beat `gemm` on SmolLM2's shapes at 512 and 2,048 rows as well
//! (≈ 200 against ≈ 165 GFLOP/s on a 2-core AVX-512 EPYC; BENCHMARKS.md).
//!
//! The panels and their kernels are in model/flex/panels.rs. Every output element is one fused
//! multiply-add chain over k in order, computed by one thread, so results do not depend on the
//! thread count; they differ from `gemm`'s in the last bits (another summation order), as two
//! BLAS libraries do.

use std::cell::Cell;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use burn::prelude::*;
use burn::tensor::Bytes;
use burn_flex::FlexTensor;

use super::attention::flex_f32;
#[cfg(test)]
use super::panels::NR;
use super::panels::{Kernel, Packed};

/// Bytes of f32 matrices from which a model decodes on packed weights (64 MiB: beyond the
/// last-level cache of common CPUs). `tiny` (13.8 MB) stays below, SmolLM2-135M (538 MB) above.
pub(crate) const PACK_FROM_BYTES: usize = 64 << 20;

/// Whether packing may be used at all: `MRT_PACKED_DECODING=0` (or `off`, `false`, `no`) in the
/// environment turns it off, saving the packed copy's memory (one more copy of the f32
/// weights while sequences decode) at gemm's decoding speed. Read once per process.
pub(crate) fn packing_allowed() -> bool {
    static ALLOWED: OnceLock<bool> = OnceLock::new();
    *ALLOWED.get_or_init(|| {
        let value = std::env::var("MRT_PACKED_DECODING").ok();
        let allowed = allowed_by(value.as_deref());
        if allowed.is_none() {
            eprintln!(
                "warning: MRT_PACKED_DECODING={:?} is not one of 0/off/false/no or 1/on/true/yes; \
                 decoding on packed weights stays on",
                value.unwrap_or_default()
            );
        }
        allowed.unwrap_or(true)
    })
}

/// What an `MRT_PACKED_DECODING` value says (unset: allowed), or `None` for a value that is
/// not a yes or a no.
fn allowed_by(value: Option<&str>) -> Option<bool> {
    match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        None | Some("" | "1" | "on" | "true" | "yes") => Some(true),
        Some("0" | "off" | "false" | "no") => Some(false),
        Some(_) => None,
    }
}

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
    if !ENABLED.get() {
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

    #[test]
    fn the_environment_switch_reads_yes_no_and_nothing_else() {
        assert_eq!(allowed_by(None), Some(true));
        for yes in ["1", "on", "TRUE", " yes ", ""] {
            assert_eq!(allowed_by(Some(yes)), Some(true), "{yes:?}");
        }
        for no in ["0", "off", "False", "no"] {
            assert_eq!(allowed_by(Some(no)), Some(false), "{no:?}");
        }
        assert_eq!(allowed_by(Some("2")), None);
        assert_eq!(allowed_by(Some("maybe")), None);
    }

    /// Through tensors: only inside [`packing`], and then Burn's product within f32 rounding,
    /// for a weight and a transposed view (the tied head), a few rows and a prefill's many.
    #[test]
    fn tensor_products_match_burn_and_run_only_when_enabled() {
        let dev = Default::default();
        let normal = Distribution::Normal(0.0, 1.0);
        let x = Tensor::<Flex, 2>::random([6, 40], normal, &dev);
        let w = Tensor::<Flex, 2>::random([40, 100], normal, &dev);
        let embed = Tensor::<Flex, 2>::random([100, 40], normal, &dev);
        let _scope = PackedScope::enter();
        assert!(packed_matmul(&x, &w).is_none(), "off outside `packing`");
        let Some(ours) = packing(true, || packed_matmul(&x, &w)) else {
            assert!(Kernel::detect().is_none(), "a CPU with AVX2 and FMA packs");
            return;
        };
        let diff: f32 = (ours - x.clone().matmul(w)).abs().max().into_scalar();
        assert!(diff < 1e-5, "plain weight differs by {diff}");
        let head = embed.transpose();
        let ours = packing(true, || packed_matmul(&x, &head)).expect("packs");
        let diff: f32 = (ours - x.matmul(head.clone())).abs().max().into_scalar();
        assert!(diff < 1e-5, "transposed weight differs by {diff}");
        let tall = Tensor::<Flex, 2>::random([1000, 40], normal, &dev);
        let ours = packing(true, || packed_matmul(&tall, &head)).expect("packs");
        let burn = tall.matmul(head);
        let scale: f32 = burn.clone().abs().max().into_scalar();
        let diff: f32 = (ours - burn).abs().max().into_scalar();
        assert!(diff < 1e-5 * scale, "1,000 rows differ by {diff} (largest {scale})");
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
        if Kernel::detect().is_none() || !packing_allowed() {
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
