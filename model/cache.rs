//! The KV cache: buffers grown in steps and written in place, a shared slot counter, per-row
//! positions.
//!
//! Every row writes its next chunk at the same *slot* range, so a write is one in-place copy
//! for the whole batch. A row that has fewer real tokens than the chunk width leaves *holes*:
//! slots marked invalid and never attended. A slot is therefore not a position: each row keeps
//! its own position counter (the number of real tokens it holds), which is what rotary
//! embeddings see. This is how a ragged batch of prompts is prefilled in one call, how
//! environment replies of different lengths are appended, and how rows are forked or
//! replicated (`select_rows`) without recomputing their prefix.

use burn::prelude::*;

use super::config::TransformerConfig;
use super::flex::{write_slots, PackedScope};
use crate::error::{Error, Result};

/// Keys and values of one layer, each `[B, KVH, S, D]`.
///
/// The tensors sit in an `Option` so that a write can take them out and hold the only
/// reference to the buffer: the write then updates it in place (see `flex::write`) instead of
/// copying the whole cache every token.
#[derive(Debug, Clone)]
pub struct LayerKv<B: Backend> {
    k: Option<Tensor<B, 4>>,
    v: Option<Tensor<B, 4>>,
}

impl<B: Backend> LayerKv<B> {
    fn new(k: Tensor<B, 4>, v: Tensor<B, 4>) -> Self {
        Self { k: Some(k), v: Some(v) }
    }

    fn k(&self) -> &Tensor<B, 4> {
        self.k.as_ref().expect("cache tensors are only taken inside write")
    }

    fn v(&self) -> &Tensor<B, 4> {
        self.v.as_ref().expect("cache tensors are only taken inside write")
    }

    /// Stores `k`, `v` (`[B, KVH, W, D]`) at `slot..slot + W` and returns the whole cache
    /// (`[B, KVH, S, D]`, S the allocated slots). Attention reads all S slots under a mask
    /// rather than a slice of the filled ones: a slice along S is a strided view that the attention kernel would copy
    /// to contiguous memory at every step, which costs more than attending to empty slots.
    pub fn write(&mut self, slot: usize, k: Tensor<B, 4>, v: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let k_all = write_slots(self.k.take().expect("present"), slot, k);
        let v_all = write_slots(self.v.take().expect("present"), slot, v);
        self.k = Some(k_all.clone());
        self.v = Some(v_all.clone());
        (k_all, v_all)
    }
}

/// Cache for a batch of rows.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    pub(crate) layers: Vec<LayerKv<B>>,
    /// `[B, S]`: true where a slot holds a real token.
    pub(crate) valid: Tensor<B, 2, Bool>,
    /// `[B]`: position of each row's next token (device copy of `lengths`).
    pub(crate) positions: Tensor<B, 1, Int>,
    /// Real tokens held by each row (host copy).
    lengths: Vec<usize>,
    /// Slots used, equal for all rows.
    slots: usize,
    /// Slots that may be used (the logical limit; `ensure_capacity` raises it).
    capacity: usize,
    /// Slots backed by memory (the S dimension of the tensors), ≤ `capacity`. Grows in steps
    /// as slots fill up: attention reads every allocated slot, so a cache sized for the worst
    /// case would make every decoding step pay for the slots it never uses.
    allocated: usize,
    /// Keeps a large model's packed weights while this cache (or one made from it) exists, so
    /// they are packed once per decoding, not per step, and freed after it
    /// (model/flex/packed.rs).
    _packed: PackedScope,
}

/// Allocation granularity in slots.
const GRANULE: usize = 16;

impl<B: Backend> KvCache<B> {
    /// An empty cache for `rows` sequences of up to `capacity` slots.
    pub fn new(config: &TransformerConfig, rows: usize, capacity: usize, device: &B::Device) -> Self {
        let (kvh, d) = (config.n_kv_heads, config.head_dim());
        let allocated = capacity.min(GRANULE);
        Self {
            layers: (0..config.n_layers)
                .map(|_| {
                    LayerKv::new(
                        Tensor::zeros([rows, kvh, allocated, d], device),
                        Tensor::zeros([rows, kvh, allocated, d], device),
                    )
                })
                .collect(),
            valid: Tensor::<B, 2, Int>::zeros([rows, allocated], device).bool(),
            positions: Tensor::zeros([rows], device),
            lengths: vec![0; rows],
            slots: 0,
            capacity,
            allocated,
            _packed: PackedScope::enter(),
        }
    }

    pub fn rows(&self) -> usize {
        self.lengths.len()
    }

    /// Real tokens held by each row.
    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }

    /// Slots used so far (the same for every row).
    pub fn slots(&self) -> usize {
        self.slots
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Slots still free.
    pub fn remaining(&self) -> usize {
        self.capacity - self.slots
    }

    /// Reserves `width` slots in which row `b` holds `counts[b]` real tokens (all of them when
    /// `counts` is `None`). Returns the first slot, the positions `[B, W]` of the new tokens and
    /// the attention mask `[B, 1, W, S]` (true = query w must not attend slot s): slots that
    /// hold no real token, and slots after the query's own within the chunk.
    pub(crate) fn advance(
        &mut self,
        width: usize,
        counts: Option<&[usize]>,
    ) -> Result<(usize, Tensor<B, 2, Int>, Tensor<B, 4, Bool>)> {
        let (slot, positions) = self.reserve(width, counts)?;
        let (rows, cap, device) = (self.rows(), self.allocated, self.valid.device());
        let empty = self
            .valid
            .clone()
            .bool_not()
            .reshape([rows, 1, 1, cap])
            .expand([rows, 1, width, cap]);
        let slot_ids = Tensor::<B, 1, Int>::arange(0..cap as i64, &device)
            .reshape([1, cap])
            .expand([width, cap]);
        let query_slots = Tensor::<B, 1, Int>::arange(slot as i64..(slot + width) as i64, &device)
            .reshape([width, 1])
            .expand([width, cap]);
        let future = slot_ids
            .greater(query_slots)
            .reshape([1, 1, width, cap])
            .expand([rows, 1, width, cap]);
        Ok((slot, positions, empty.bool_or(future)))
    }

    /// The bookkeeping half of [`Self::advance`]: grows the buffers if needed, marks the new
    /// slots valid where they hold real tokens, moves the position counters; returns the
    /// first slot and the positions `[B, W]` of a sequence chunk.
    fn reserve(&mut self, width: usize, counts: Option<&[usize]>) -> Result<(usize, Tensor<B, 2, Int>)> {
        let rows = self.rows();
        if self.slots + width > self.capacity {
            return Err(Error::Budget(format!(
                "KV cache full: {} slots used + {} new > capacity {}",
                self.slots, width, self.capacity
            )));
        }
        if self.slots + width > self.allocated {
            // Grow by a quarter at least, so that growth (a copy) stays rare.
            let want = (self.slots + width).max(self.allocated + self.allocated / 4);
            self.allocate(want.div_ceil(GRANULE) * GRANULE);
        }
        let device = self.valid.device();
        let slot = self.slots;
        let offsets = Tensor::<B, 1, Int>::arange(0..width as i64, &device).reshape([1, width]);
        let positions = self.positions.clone().reshape([rows, 1]) + offsets;
        let chunk_valid = match counts {
            None => {
                self.positions = self.positions.clone() + width as i32;
                self.lengths.iter_mut().for_each(|l| *l += width);
                Tensor::<B, 2, Int>::ones([rows, width], &device).bool()
            }
            Some(counts) => {
                if counts.len() != rows || counts.iter().any(|&c| c > width) {
                    return Err(Error::Budget(format!(
                        "chunk of width {width} for {rows} rows given counts {counts:?}"
                    )));
                }
                let flags: Vec<bool> = counts.iter().flat_map(|&c| (0..width).map(move |i| i < c)).collect();
                for (l, c) in self.lengths.iter_mut().zip(counts) {
                    *l += c;
                }
                self.positions = int_tensor(&self.lengths, &device);
                Tensor::from_data(TensorData::new(flags, [rows, width]), &device)
            }
        };
        let valid = std::mem::replace(&mut self.valid, chunk_valid.clone());
        self.valid = valid.slice_assign([0..rows, slot..slot + width], chunk_valid);
        self.slots += width;
        Ok((slot, positions))
    }

    /// Reserves a chunk that holds a *tree* of tokens per row instead of a sequence: row b's
    /// token i continues `parents[b][i]` (an earlier token of the chunk) or, when `None`, the
    /// row's prefix directly. Each token sits at the position after its parent and attends to
    /// the prefix, its ancestors and itself only, so siblings are scored side by side as if
    /// each had the prefix to itself — several continuations of one prefix in one pass,
    /// without copying the prefix per continuation. Returns what [`Self::advance`] returns.
    ///
    /// Afterwards the row's position counter counts every tree token, so the cache is only
    /// good for reading these tokens' logits, not for decoding further.
    pub(crate) fn advance_tree(
        &mut self,
        parents: &[Vec<Option<usize>>],
    ) -> Result<(usize, Tensor<B, 2, Int>, Tensor<B, 4, Bool>)> {
        let rows = self.rows();
        if parents.len() != rows {
            return Err(Error::Budget(format!(
                "token trees for {} rows given a cache of {rows} rows",
                parents.len()
            )));
        }
        for (b, tree) in parents.iter().enumerate() {
            for (i, parent) in tree.iter().enumerate() {
                if parent.is_some_and(|p| p >= i) {
                    return Err(Error::Budget(format!(
                        "row {b}: tree token {i} names a parent that does not come before it"
                    )));
                }
            }
        }
        let counts: Vec<usize> = parents.iter().map(Vec::len).collect();
        let width = counts.iter().copied().max().unwrap_or(0);
        let before = self.lengths.clone();
        let (slot, _) = self.reserve(width, Some(&counts))?;
        let cap = self.allocated;
        // Built on the host in one go (the sequence mask's broadcasts are strided copies on
        // the CPU backend, and a tree chunk is wide): token i of row b sees the row's valid
        // slots before the chunk, and in the chunk itself its ancestors and itself.
        // Read as integers: backends store booleans differently (a byte on flex, u32 on wgpu).
        let valid: Vec<bool> = self
            .valid
            .clone()
            .int()
            .into_data()
            .iter::<i64>()
            .map(|v| v != 0)
            .collect();
        let mut positions = Vec::with_capacity(rows * width);
        let mut mask = vec![true; rows * width * cap];
        for (b, tree) in parents.iter().enumerate() {
            let seen = &valid[b * cap..b * cap + slot];
            // Holes (past the row's tree) see the prefix too, so that no query is left with
            // nothing to attend (a NaN on backends whose softmax does not guard it).
            for query in mask[b * width * cap..(b + 1) * width * cap].chunks_mut(cap) {
                query[..slot].iter_mut().zip(seen).for_each(|(m, &v)| *m = !v);
            }
            let mut depth = vec![0usize; tree.len()];
            for (i, parent) in tree.iter().enumerate() {
                depth[i] = parent.map_or(0, |p| depth[p] + 1);
                let query = &mut mask[(b * width + i) * cap..(b * width + i + 1) * cap];
                let mut node = Some(i);
                while let Some(n) = node {
                    query[slot + n] = false;
                    node = tree[n];
                }
            }
            positions.extend((0..width).map(|i| (before[b] + depth.get(i).copied().unwrap_or(0)) as i64));
        }
        let device = self.valid.device();
        let positions = Tensor::<B, 2, Int>::from_data(TensorData::new(positions, [rows, width]), &device);
        Ok((
            slot,
            positions,
            Tensor::from_data(TensorData::new(mask, [rows, 1, width, cap]), &device),
        ))
    }

    /// A new cache holding copies of the given rows, in that order (a row may repeat). This is
    /// the fork / snapshot operation: continuations branch from a shared prefix without
    /// recomputing it.
    pub fn select_rows(&self, rows: &[usize]) -> Self {
        let device = self.valid.device();
        let idx = int_tensor(rows, &device);
        Self {
            layers: self
                .layers
                .iter()
                .map(|l| {
                    LayerKv::new(
                        l.k().clone().select(0, idx.clone()),
                        l.v().clone().select(0, idx.clone()),
                    )
                })
                .collect(),
            valid: self.valid.clone().int().select(0, idx.clone()).bool(),
            positions: self.positions.clone().select(0, idx),
            lengths: rows.iter().map(|&r| self.lengths[r]).collect(),
            slots: self.slots,
            capacity: self.capacity,
            allocated: self.allocated,
            _packed: PackedScope::enter(),
        }
    }

    /// Forgets, in each listed `(row, keep)`, every token after the row's first `keep`: their
    /// slots become holes and the row's position counter moves back, so the row continues as
    /// if they had never been fed (the next token sits at position `keep`).
    ///
    /// Free-text episodes end *before* the word that begins the next one ("Wait", …), which
    /// is known only once it has been decoded: a fork of the row is rewound to the boundary
    /// for the meta-prover, and a row at its episode cap is rewound there before its forced
    /// answer. One host read of the validity mask per call.
    pub fn rewind(&mut self, rows: &[(usize, usize)]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let (n, cap, device) = (self.rows(), self.allocated, self.valid.device());
        let mut mask: Vec<bool> = self
            .valid
            .clone()
            .into_data()
            .convert::<bool>()
            .to_vec()
            .map_err(|e| Error::Budget(format!("reading the cache mask: {e:?}")))?;
        for &(row, keep) in rows {
            if row >= n || keep > self.lengths[row] {
                return Err(Error::Budget(format!(
                    "rewind row {row} to {keep} tokens: the cache has {n} rows and that row {} tokens",
                    self.lengths.get(row).copied().unwrap_or(0)
                )));
            }
            let mut seen = 0;
            for v in &mut mask[row * cap..(row + 1) * cap] {
                if *v {
                    *v = seen < keep;
                    seen += 1;
                }
            }
            self.lengths[row] = keep;
        }
        self.valid = Tensor::from_data(TensorData::new(mask, [n, cap]), &device);
        self.positions = int_tensor(&self.lengths, &device);
        Ok(())
    }

    /// Makes room for at least `extra` more slots, reallocating (doubling) when needed.
    pub fn ensure_capacity(&mut self, extra: usize) {
        if self.remaining() >= extra {
            return;
        }
        self.capacity = (self.capacity * 2).max(self.slots + extra);
    }

    /// Backs `slots` slots with memory (copying what is held into a larger buffer), within
    /// the capacity.
    fn allocate(&mut self, slots: usize) {
        let slots = slots.min(self.capacity);
        if slots <= self.allocated {
            return;
        }
        let rows = self.rows();
        let device = self.valid.device();
        for layer in &mut self.layers {
            let [_, kvh, _, d] = layer.k().dims();
            let widen = |t: Tensor<B, 4>| write_slots(Tensor::zeros([rows, kvh, slots, d], &device), 0, t);
            *layer = LayerKv::new(
                widen(layer.k.take().expect("present")),
                widen(layer.v.take().expect("present")),
            );
        }
        let old = self.allocated;
        let valid = Tensor::<B, 2, Int>::zeros([rows, slots], &device)
            .slice_assign([0..rows, 0..old], self.valid.clone().int());
        self.valid = valid.bool();
        self.allocated = slots;
    }

    /// Stacks caches row-wise (e.g. snapshots taken at different steps). Slots a cache never
    /// used are invalid in it, so the result simply uses the largest slot count.
    pub fn cat(mut caches: Vec<Self>) -> Self {
        let capacity = caches.iter().map(|c| c.capacity).max().expect("at least one cache");
        let allocated = caches.iter().map(|c| c.allocated).max().expect("at least one cache");
        for c in &mut caches {
            c.capacity = capacity;
            c.allocate(allocated);
        }
        let n_layers = caches[0].layers.len();
        let layers = (0..n_layers)
            .map(|l| {
                let k = caches.iter().map(|c| c.layers[l].k().clone()).collect();
                let v = caches.iter().map(|c| c.layers[l].v().clone()).collect();
                LayerKv::new(Tensor::cat(k, 0), Tensor::cat(v, 0))
            })
            .collect();
        Self {
            layers,
            valid: Tensor::cat(caches.iter().map(|c| c.valid.clone()).collect(), 0),
            positions: Tensor::cat(caches.iter().map(|c| c.positions.clone()).collect(), 0),
            lengths: caches.iter().flat_map(|c| c.lengths.iter().copied()).collect(),
            slots: caches.iter().map(|c| c.slots).max().unwrap_or(0),
            capacity,
            allocated,
            _packed: PackedScope::enter(),
        }
    }

    /// Every row repeated `g` times in place (row r becomes rows r·g … r·g + g − 1): a GRPO
    /// group prefills its prompt once and replicates it.
    pub fn replicate(&self, g: usize) -> Self {
        let rows: Vec<usize> = (0..self.rows()).flat_map(|r| std::iter::repeat_n(r, g)).collect();
        self.select_rows(&rows)
    }
}

/// An `[n]` int tensor from host indices.
pub(crate) fn int_tensor<B: Backend>(values: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    let data: Vec<i64> = values.iter().map(|&v| v as i64).collect();
    Tensor::from_data(TensorData::new(data, [values.len()]), device)
}
