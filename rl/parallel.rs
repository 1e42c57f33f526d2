//! Data-parallel RL on `burn-collective`: P peers, each with its own copy of the policy on its
//! own device, run the same step loop. Every peer draws the step's problems from the step RNG,
//! samples its consecutive share of them (whole problems, so GRPO's groups stay on one peer;
//! every problem has its own generator, so its rollouts are those one device would sample),
//! and the peers exchange what needs the whole step: the samples (every peer then computes
//! the training signal, the loss's token counts and the metrics of the whole step), the
//! gradients (summed: each peer's loss already carries the whole
//! batch's normalisation) and the loss diagnostics. After the all-reduce every peer holds the
//! same gradients and takes the same optimizer step, so the copies stay equal and the update is
//! the one-device update on the whole batch, up to summation order. Evaluations during RL are
//! shared the same way; only the leader (rank 0) writes metrics, samples and checkpoints.
//!
//! Peers that are threads of one process (`--devices`) go through `burn::collective::all_reduce`;
//! host data (the samples, the diagnostics' sums) is gathered by an all-reduce of a buffer in
//! which each peer fills its own segment, two bytes per f32 (exact: one non-zero term per
//! element), so sums of host values are f64 and the same on every peer. Peers that are
//! processes (`--nodes`, one per machine) gather bytes directly over the network
//! (rl/nodes.rs), gradients included, and sum them in rank order.
//!
//! `burn-collective` has no timeouts: a peer that fails or panics would leave the others
//! blocked in their next all-reduce. [`run_peers`] catches each peer's failure and resets the
//! collective server, which releases the waiting peers with an error, and reports the failure
//! that came first.

use std::marker::PhantomData;
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use burn::collective::{self, CollectiveConfig, PeerId, ReduceOperation};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::TensorPrimitive;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::nodes::{sum_grads, NodeGroup};
use super::passes::PassStats;
use super::score::Sampled;
use crate::error::{Error, Result};
use crate::model::Transformer;

/// One peer of a data-parallel group, on backend `B` (its inner backend does the all-reduce).
pub struct Peer<B: AutodiffBackend> {
    pub rank: usize,
    pub count: usize,
    device: B::Device,
    transport: Transport,
    _backend: PhantomData<B>,
}

/// How a peer reaches the others.
enum Transport {
    /// Threads of this process, through `burn-collective`.
    Threads,
    /// Processes, one per node (rl/nodes.rs).
    Nodes(Arc<NodeGroup>),
}

/// One data-parallel group per backend type at a time: `burn-collective` keeps one server per
/// backend type in the process (tests that start groups side by side take turns here).
static GROUP: Mutex<()> = Mutex::new(());

fn collective_error(rank: usize, what: &str, e: collective::CollectiveError) -> Error {
    Error::Peer {
        rank,
        reason: format!("{what}: {e:?} (a peer failed or the group was stopped)"),
    }
}

impl<B: AutodiffBackend> Peer<B> {
    fn register(rank: usize, count: usize, device: B::Device) -> Result<Self> {
        let config = CollectiveConfig::default().with_num_devices(count);
        collective::register::<B::InnerBackend>(PeerId::from(rank), device.clone(), config)
            .map_err(|e| collective_error(rank, "register", e))?;
        Ok(Self {
            rank,
            count,
            device,
            transport: Transport::Threads,
            _backend: PhantomData,
        })
    }

    /// This process's peer in a group of nodes (one peer per process).
    pub fn node(group: Arc<NodeGroup>, device: B::Device) -> Self {
        Self {
            rank: group.rank,
            count: group.count(),
            device,
            transport: Transport::Nodes(group),
            _backend: PhantomData,
        }
    }

    /// The group of nodes this peer belongs to, if it is one of processes.
    pub fn nodes(&self) -> Option<&NodeGroup> {
        match &self.transport {
            Transport::Nodes(g) => Some(g),
            Transport::Threads => None,
        }
    }

    /// Whether this peer writes the run's files.
    pub fn leader(&self) -> bool {
        self.rank == 0
    }

    /// This peer's consecutive share of `n` items (sizes differ by at most one).
    pub fn shard(&self, n: usize) -> Range<usize> {
        self.rank * n / self.count..(self.rank + 1) * n / self.count
    }

    fn all_reduce(&self, values: Vec<f32>, what: &str) -> Result<Vec<f32>> {
        let n = values.len();
        let t = Tensor::<B::InnerBackend, 1>::from_data(TensorData::new(values, [n]), &self.device);
        let sum = collective::all_reduce::<B::InnerBackend>(
            PeerId::from(self.rank),
            t.into_primitive().tensor(),
            ReduceOperation::Sum,
        )
        .map_err(|e| collective_error(self.rank, what, e))?;
        let sum = Tensor::<B::InnerBackend, 1>::from_primitive(TensorPrimitive::Float(sum));
        Ok(sum.into_data().convert::<f32>().to_vec().expect("f32 data"))
    }

    /// Element-wise sums over the peers, in f64 and the same on every peer: the values are
    /// gathered exactly and summed in rank order.
    pub fn sum(&self, values: &[f64]) -> Result<Vec<f64>> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let all = match &self.transport {
            Transport::Threads => self.exchange(&bytes, &vec![bytes.len(); self.count])?,
            Transport::Nodes(g) => g.gather(&bytes, false)?,
        };
        let mut sum = vec![0.0; values.len()];
        for peer in all {
            for (s, v) in sum.iter_mut().zip(peer.chunks_exact(8)) {
                *s += f64::from_le_bytes(v.try_into().expect("8 bytes"));
            }
        }
        Ok(sum)
    }

    /// Every peer's bytes, in rank order.
    pub fn gather(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        if let Transport::Nodes(g) = &self.transport {
            return g.gather(bytes, false);
        }
        let len = (bytes.len() as u64).to_le_bytes();
        let lens: Vec<usize> = self
            .exchange(&len, &vec![8; self.count])?
            .iter()
            .map(|l| u64::from_le_bytes(l[..].try_into().expect("8 bytes")) as usize)
            .collect();
        self.exchange(bytes, &lens)
    }

    /// Every peer's bytes when peer r's are `lens[r]` long: one all-reduce of a buffer in
    /// which each peer fills its own segment, two bytes per f32 (exact: every element has one
    /// non-zero term, below 2¹⁶).
    fn exchange(&self, bytes: &[u8], lens: &[usize]) -> Result<Vec<Vec<u8>>> {
        assert_eq!(bytes.len(), lens[self.rank], "this peer's length");
        let words: Vec<usize> = lens.iter().map(|l| l.div_ceil(2)).collect();
        let start: usize = words[..self.rank].iter().sum();
        let mut buf = vec![0.0f32; words.iter().sum::<usize>().max(1)];
        for (i, pair) in bytes.chunks(2).enumerate() {
            let lo = pair.get(1).copied().unwrap_or(0);
            buf[start + i] = (pair[0] as u32 * 256 + lo as u32) as f32;
        }
        let buf = self.all_reduce(buf, "exchange")?;
        let mut out = Vec::with_capacity(self.count);
        let mut at = 0;
        for (len, w) in lens.iter().zip(&words) {
            let mut seg = Vec::with_capacity(2 * w);
            for &x in &buf[at..at + w] {
                let v = x as u32;
                seg.extend([(v / 256) as u8, (v % 256) as u8]);
            }
            seg.truncate(*len);
            out.push(seg);
            at += w;
        }
        Ok(out)
    }

    /// Checks that every peer holds the same `bytes` (a run's configuration and where it
    /// starts): peers that would train different things are refused before the first step.
    pub fn agree(&self, what: &str, bytes: &[u8]) -> Result<()> {
        let all = self.gather(bytes)?;
        match all.iter().position(|b| *b != all[0]) {
            None => Ok(()),
            Some(rank) => Err(Error::Peer {
                rank,
                reason: format!("started with a different {what} than peer 0"),
            }),
        }
    }

    /// Every peer's `value`, in rank order (serialised as MessagePack, which keeps NaN J).
    pub fn gather_values<T: Serialize + DeserializeOwned>(&self, value: &T, what: &str) -> Result<Vec<T>> {
        let bytes = rmp_serde::to_vec(value).map_err(|e| Error::Peer {
            rank: self.rank,
            reason: format!("encoding its {what}: {e}"),
        })?;
        let mut all = Vec::with_capacity(self.count);
        for (rank, b) in self.gather(&bytes)?.into_iter().enumerate() {
            all.push(rmp_serde::from_slice(&b).map_err(|e| Error::Peer {
                rank,
                reason: format!("decoding its {what}: {e}"),
            })?);
        }
        Ok(all)
    }

    /// The whole step's samples from every peer's share, and where this peer's rollouts are
    /// in them.
    pub fn sampled(&self, mine: Sampled) -> Result<(Sampled, Range<usize>)> {
        let parts = self.gather_values(&mine, "samples")?;
        let start: usize = parts[..self.rank].iter().map(|p| p.rollouts.len()).sum();
        let range = start..start + parts[self.rank].rollouts.len();
        Ok((Sampled::merge(parts), range))
    }

    /// The gradients of `model`'s parameters summed over the peers.
    pub fn grads(&self, model: &Transformer<B>, grads: GradientsParams) -> Result<GradientsParams> {
        match &self.transport {
            Transport::Threads => grads
                .all_reduce::<B::InnerBackend>(PeerId::from(self.rank), ReduceOperation::Sum)
                .map_err(|e| collective_error(self.rank, "gradient all-reduce", e)),
            Transport::Nodes(g) => sum_grads(g, model, grads),
        }
    }

    /// The loss diagnostics summed over the peers (each is already weighted by the peer's
    /// share of the whole batch's tokens).
    pub fn stats(&self, st: PassStats) -> Result<PassStats> {
        let s = self.sum(&[st.loss, st.entropy, st.approx_kl, st.clip_frac, st.ref_kl])?;
        Ok(PassStats {
            loss: s[0],
            entropy: s[1],
            approx_kl: s[2],
            clip_frac: s[3],
            ref_kl: s[4],
        })
    }
}

/// Runs a data-parallel group on `devices` (one peer per entry, rank = position): `leader`
/// on this thread as rank 0, `worker` on one thread per other rank. Returns the leader's
/// result once every peer has finished, or the first failure of any peer (the others are
/// released from their collective calls and stop).
pub fn run_peers<B, T>(
    devices: &[B::Device],
    leader: impl FnOnce(&Peer<B>) -> Result<T>,
    worker: impl Fn(&Peer<B>) -> Result<()> + Sync,
) -> Result<T>
where
    B: AutodiffBackend,
{
    let count = devices.len();
    assert!(count >= 1, "at least one device");
    let _turn = GROUP.lock().unwrap_or_else(|p| p.into_inner());
    collective::reset_collective::<B::InnerBackend>();
    let failure: Mutex<Option<(usize, Error)>> = Mutex::new(None);
    let leader_out = std::thread::scope(|s| {
        for (rank, device) in devices.iter().enumerate().skip(1) {
            let (failure, worker) = (&failure, &worker);
            s.spawn(move || {
                guard::<B, ()>(rank, failure, || {
                    let peer = Peer::<B>::register(rank, count, device.clone())?;
                    worker(&peer)?;
                    let _ = collective::finish_collective::<B::InnerBackend>(PeerId::from(rank));
                    Ok(())
                })
            });
        }
        guard::<B, T>(0, &failure, || {
            let peer = Peer::<B>::register(0, count, devices[0].clone())?;
            let out = leader(&peer)?;
            let _ = collective::finish_collective::<B::InnerBackend>(PeerId::from(0usize));
            Ok(out)
        })
    });
    match (leader_out, failure.into_inner().unwrap_or_else(|p| p.into_inner())) {
        (Some(out), None) => Ok(out),
        (_, Some((0, e))) => Err(e),
        (_, Some((_, e @ Error::Peer { .. }))) => Err(e),
        (_, Some((rank, e))) => Err(Error::Peer {
            rank,
            reason: e.to_string(),
        }),
        (None, None) => unreachable!("a peer that returns nothing has recorded its failure"),
    }
}

/// Runs one peer's `work` with panics turned into errors. The first failure of the group is
/// recorded in `failure` and resets the collective server, which releases the peers waiting
/// in a collective call (they fail too, after it).
fn guard<B: AutodiffBackend, R>(
    rank: usize,
    failure: &Mutex<Option<(usize, Error)>>,
    work: impl FnOnce() -> Result<R>,
) -> Option<R> {
    let out = catch_unwind(AssertUnwindSafe(work)).unwrap_or_else(|panic| {
        let reason = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        Err(Error::Peer {
            rank,
            reason: format!("panicked: {reason}"),
        })
    });
    match out {
        Ok(v) => Some(v),
        Err(e) => {
            let mut first = failure.lock().unwrap_or_else(|p| p.into_inner());
            if first.is_none() {
                *first = Some((rank, e));
                collective::reset_collective::<B::InnerBackend>();
            }
            None
        }
    }
}
