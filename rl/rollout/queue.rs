//! The rollout engine's queue of boundary snapshots: forks of rows' KV caches at episode
//! boundaries, each with the generator of its forced answers, scored by the meta-prover in one
//! batch.

use burn::prelude::*;
use rand::rngs::StdRng;

use crate::data::Problem;
use crate::error::Result;
use crate::model::{KvCache, Transformer};
use crate::rl::protocol::Protocol;
use crate::rl::prover::{estimate_rows, Estimate, ProverConfig};

/// Boundary snapshots waiting for the prover, flushed in one batch.
pub struct ProverQueue<B: Backend> {
    caches: Vec<KvCache<B>>,
    /// (rollout row, episode index j, problem index) per queued cache row.
    pub tags: Vec<(usize, usize, usize)>,
    /// The generator of each queued row's forced answers.
    rngs: Vec<StdRng>,
}

impl<B: Backend> Default for ProverQueue<B> {
    fn default() -> Self {
        Self {
            caches: Vec::new(),
            tags: Vec::new(),
            rngs: Vec::new(),
        }
    }
}

/// One queued snapshot: its tag (rollout row, episode index j, problem index) and the
/// generator of its forced answers.
pub type Queued = ((usize, usize, usize), StdRng);

impl<B: Backend> ProverQueue<B> {
    /// Queues a fork of `rows` of `cache` (each at an episode boundary).
    pub fn push(&mut self, cache: &KvCache<B>, rows: &[usize], queued: impl IntoIterator<Item = Queued>) {
        if rows.is_empty() {
            return;
        }
        self.caches.push(cache.select_rows(rows));
        self.extend(queued);
    }

    /// Queues a cache that is already a fork (one entry per row).
    pub fn push_owned(&mut self, cache: KvCache<B>, queued: impl IntoIterator<Item = Queued>) {
        self.caches.push(cache);
        self.extend(queued);
    }

    fn extend(&mut self, queued: impl IntoIterator<Item = Queued>) {
        for (tag, rng) in queued {
            self.tags.push(tag);
            self.rngs.push(rng);
        }
    }

    /// Cache slots held by the queued forks (rows × slots): what the queue costs in memory.
    pub fn held_slots(&self) -> usize {
        self.caches.iter().map(|c| c.rows() * c.slots()).sum()
    }

    /// Runs the prover on everything queued; returns `(tag, estimate)` pairs.
    pub fn flush(
        &mut self,
        model: &Transformer<B>,
        problems: &[Problem],
        protocol: &dyn Protocol,
        config: &ProverConfig,
    ) -> Result<Vec<((usize, usize, usize), Estimate)>> {
        if self.tags.is_empty() {
            return Ok(Vec::new());
        }
        let cache = KvCache::cat(std::mem::take(&mut self.caches));
        let tags = std::mem::take(&mut self.tags);
        let rngs = std::mem::take(&mut self.rngs);
        let probs: Vec<&Problem> = tags.iter().map(|t| &problems[t.2]).collect();
        let est = estimate_rows(model, cache, &probs, protocol, config, rngs)?;
        Ok(tags.into_iter().zip(est).collect())
    }
}
