//! Data-parallel peers in separate processes (one per machine, `train --nodes`): the byte
//! exchange under `Peer` (rl/parallel.rs) across processes, on Burn's own transport,
//! `burn-communication`'s tensor data service over WebSocket.
//!
//! Every collective call is an all-gather: each node exposes its bytes under the call's
//! transfer id (ids count up the same way on every node, since every node makes the same
//! calls) and downloads every other node's. Sums are then taken on every node in rank order,
//! so all nodes hold bit-identical results whatever order the bytes arrive in. Ids are never
//! reused, so consecutive calls need no barrier between them.
//!
//! Why not `burn-collective`'s global all-reduce, which sits on the same data service: in
//! 0.21 its nodes' sync barrier completes once per session (it clears a copy of the list of
//! synced peers, not the list), so a session's second all-reduce never returns; a session per
//! call races the previous session's teardown, and in our trials gave a node its own tensor
//! as the "sum" (issue 24's notes).
//!
//! Failures: a node that exits closes its sockets, and the others' next download fails at
//! once, naming it; a node that stops answering is reported after `timeout`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn_communication::data_service::{TensorDataServer, TensorDataService};
use burn_communication::websocket::{WebSocket, WsClient, WsServer};
use burn_communication::{Address, ProtocolClient, ProtocolServer};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

use crate::backend::Cpu;
use crate::error::{Error, Result};
use crate::model::Transformer;

/// The largest piece one transfer carries: the WebSocket client refuses frames over 512 MiB.
const PIECE: usize = 64 << 20;
/// Name of the transport's threads (their panics, on a lost connection, are reported as
/// errors instead of printed).
const IO_THREAD: &str = "mrt-node-io";

/// This process's place in a group of nodes, and its connections to the others.
pub struct NodeGroup {
    pub rank: usize,
    /// `ws://host:port` of every node, in rank order.
    addresses: Vec<Address>,
    timeout: Duration,
    runtime: Runtime,
    service: Arc<TensorDataService<Cpu, WebSocket>>,
    cancel: CancellationToken,
    next_id: AtomicU64,
}

/// `host:port` (or `ws://host:port`) as the data service's address.
fn address(s: &str) -> Result<(Address, u16)> {
    let bare = s.strip_prefix("ws://").unwrap_or(s);
    let bad = |reason: &str| Error::config("nodes", s, reason.to_string());
    let (host, port) = bare.rsplit_once(':').ok_or_else(|| bad("expected HOST:PORT"))?;
    if host.is_empty() || host.contains('/') {
        return Err(bad("expected HOST:PORT"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| bad("the port is not a number from 1 to 65535"))?;
    if port == 0 {
        return Err(bad("the port is not a number from 1 to 65535"));
    }
    let addr = format!("ws://{bare}").parse().map_err(|e: String| bad(&e))?;
    Ok((addr, port))
}

impl NodeGroup {
    /// Parses `nodes` (`HOST:PORT` of every node, rank order) without connecting.
    pub fn addresses(nodes: &str) -> Result<Vec<(Address, u16)>> {
        let list: Vec<_> = nodes.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
        if list.len() < 2 {
            return Err(Error::config("nodes", nodes, "needs at least two HOST:PORT entries"));
        }
        let parsed = list.iter().map(|s| address(s)).collect::<Result<Vec<_>>>()?;
        for (i, (a, _)) in parsed.iter().enumerate() {
            if parsed[..i].iter().any(|(b, _)| a == b) {
                return Err(Error::config("nodes", nodes, format!("{a} is listed twice")));
            }
        }
        Ok(parsed)
    }

    /// Serves this node's data on its port (from its entry in `nodes`) and waits, up to
    /// `timeout`, until every other node answers.
    pub fn join(nodes: &str, rank: usize, timeout: Duration) -> Result<Self> {
        let parsed = Self::addresses(nodes)?;
        if rank >= parsed.len() {
            return Err(Error::config(
                "node-rank",
                rank,
                format!("--nodes lists {} nodes (ranks 0 to {})", parsed.len(), parsed.len() - 1),
            ));
        }
        quiet_transport();
        let port = parsed[rank].1;
        // Bind once here for a clear error (the server binds again, at once, on its thread).
        std::net::TcpListener::bind(("0.0.0.0", port))
            .map_err(|e| Error::config("nodes", &parsed[rank].0, format!("cannot listen on port {port}: {e}")))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(IO_THREAD)
            .enable_all()
            .build()
            .map_err(|e| Error::Peer {
                rank,
                reason: format!("cannot start its network threads: {e}"),
            })?;
        let cancel = CancellationToken::new();
        let service = Arc::new(TensorDataService::new(cancel.clone()));
        let server = WsServer::new(port)
            .route_tensor_data_service(service.clone())
            .serve(cancel.clone().cancelled_owned());
        runtime.spawn(server);
        let group = Self {
            rank,
            addresses: parsed.into_iter().map(|(a, _)| a).collect(),
            timeout,
            runtime,
            service,
            cancel,
            next_id: AtomicU64::new(0),
        };
        group.wait_for_others()?;
        Ok(group)
    }

    pub fn count(&self) -> usize {
        self.addresses.len()
    }

    fn wait_for_others(&self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        for (rank, addr) in self.addresses.iter().enumerate() {
            if rank == self.rank {
                continue;
            }
            self.runtime.block_on(async {
                loop {
                    if WsClient::connect(addr.clone(), "data").await.is_some() {
                        return Ok(());
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(Error::Peer {
                            rank,
                            reason: format!("not reachable at {addr} within {} s", self.timeout.as_secs()),
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })?;
        }
        Ok(())
    }

    /// Every node's `bytes`, in rank order. With `wait_long`, a node may take any time to
    /// come (the leader's warm start before the RL stage); a node that exits is still
    /// reported at once.
    pub fn gather(&self, bytes: &[u8], wait_long: bool) -> Result<Vec<Vec<u8>>> {
        // The first piece carries the length before it, so a payload of up to one piece
        // (64 MiB: the samples, sums, a small model's gradients) takes one round trip; more
        // pieces follow, as many as the longest payload needs.
        let first = &bytes[..bytes.len().min(PIECE)];
        let mut head = (bytes.len() as u64).to_le_bytes().to_vec();
        head.extend_from_slice(first);
        let mut out = self.gather_piece(&head, wait_long)?;
        let mut lens = Vec::with_capacity(out.len());
        for (rank, o) in out.iter_mut().enumerate() {
            let len = o.get(..8).ok_or_else(|| Error::Peer {
                rank,
                reason: format!("sent a piece of {} bytes without its length", o.len()),
            })?;
            lens.push(u64::from_le_bytes(len.try_into().expect("8 bytes")) as usize);
            o.drain(..8);
        }
        let longest = lens.iter().copied().max().unwrap_or(0);
        for start in (PIECE..longest).step_by(PIECE) {
            let mine = &bytes[start.min(bytes.len())..(start + PIECE).min(bytes.len())];
            for (o, piece) in out.iter_mut().zip(self.gather_piece(mine, false)?) {
                o.extend_from_slice(&piece);
            }
        }
        for (rank, (o, len)) in out.iter().zip(&lens).enumerate() {
            if o.len() != *len {
                return Err(Error::Peer {
                    rank,
                    reason: format!("sent {} bytes of the {len} it announced", o.len()),
                });
            }
        }
        Ok(out)
    }

    /// One transfer: this node's piece exposed to every other node, theirs downloaded.
    fn gather_piece(&self, piece: &[u8], wait_long: bool) -> Result<Vec<Vec<u8>>> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let others = self.count() - 1;
        let service = self.service.clone();
        let data = TensorData::new(piece.to_vec(), [piece.len()]);
        self.runtime.block_on(async {
            service.expose_data(data, others as u32, id.into()).await;
            let mut downloads = Vec::new();
            for (rank, addr) in self.addresses.iter().enumerate() {
                if rank != self.rank {
                    let (service, addr) = (service.clone(), addr.clone());
                    let task = tokio::spawn(async move { service.download_tensor(addr, id.into()).await });
                    downloads.push((rank, task));
                }
            }
            // The data service can miss a wake-up (a request that arrives just as its tensor
            // is exposed waits for the next exposure); a periodic nudge bounds that wait.
            let nudge = {
                let notify = service.new_tensor_notify.clone();
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        notify.notify_waiters();
                    }
                })
            };
            let limit = if wait_long { Duration::MAX } else { self.timeout };
            let deadline = tokio::time::Instant::now().checked_add(limit);
            let mut out = vec![Vec::new(); self.count()];
            out[self.rank] = piece.to_vec();
            let mut result = Ok(());
            for (rank, task) in downloads {
                let lost = |why: &str| Error::Peer {
                    rank,
                    reason: format!("lost ({why}; node at {})", self.addresses[rank]),
                };
                let got = match deadline {
                    Some(d) => tokio::time::timeout_at(d, task).await,
                    None => Ok(task.await),
                };
                match got {
                    Ok(Ok(Some(data))) => match data.into_vec::<u8>() {
                        Ok(v) => out[rank] = v,
                        Err(e) => {
                            result = Err(lost(&format!("sent data that is not bytes: {e:?}")));
                            break;
                        }
                    },
                    Ok(Ok(None)) | Ok(Err(_)) => {
                        result = Err(lost("its connection closed"));
                        break;
                    }
                    Err(_) => {
                        result = Err(lost(&format!("no answer within {} s", self.timeout.as_secs())));
                        break;
                    }
                }
            }
            nudge.abort();
            result.map(|()| out)
        })
    }

    /// Waits (up to the timeout) until every other node has downloaded what this one
    /// exposed, so that leaving does not cut a download short; then stops serving.
    pub fn finish(&self) {
        let service = self.service.clone();
        let limit = self.timeout;
        self.runtime.block_on(async {
            let _ = tokio::time::timeout(limit, async {
                while !service.exposed_tensors.lock().await.is_empty() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await;
        });
        self.cancel.cancel();
    }
}

impl std::fmt::Debug for NodeGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeGroup")
            .field("rank", &self.rank)
            .field("addresses", &self.addresses)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Drop for NodeGroup {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The gradients of `model`'s parameters summed over the nodes: each node sends, in the
/// model's parameter order (the same on every node), which parameters have a gradient and
/// their values; every node sums them in rank order, so all hold the same bits.
pub fn sum_grads<B: AutodiffBackend>(
    group: &NodeGroup,
    model: &Transformer<B>,
    mut grads: GradientsParams,
) -> Result<GradientsParams> {
    struct Flatten<'a> {
        grads: &'a GradientsParams,
        present: Vec<u8>,
        values: Vec<u8>,
        sizes: Vec<usize>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Flatten<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.sizes.push(param.shape().num_elements());
            match self.grads.get::<B::InnerBackend, D>(param.id) {
                Some(g) => {
                    self.present.push(1);
                    self.values.extend_from_slice(g.into_data().convert::<f32>().as_bytes());
                }
                None => self.present.push(0),
            }
        }
    }
    let mut flat = Flatten {
        grads: &grads,
        present: Vec::new(),
        values: Vec::new(),
        sizes: Vec::new(),
    };
    model.visit(&mut flat);
    let (sizes, mut bytes) = (flat.sizes, flat.present);
    bytes.extend_from_slice(&flat.values);
    drop(flat.values);

    let total: usize = sizes.iter().sum();
    let mut sum = vec![0.0f32; total];
    let mut any = vec![false; sizes.len()];
    for (rank, theirs) in group.gather(&bytes, false)?.into_iter().enumerate() {
        let bad = || Error::Peer {
            rank,
            reason: "sent gradients of another model".into(),
        };
        let (present, mut values) = theirs.split_at_checked(sizes.len()).ok_or_else(bad)?;
        let mut at = 0;
        for (i, (&p, &n)) in present.iter().zip(&sizes).enumerate() {
            if p == 1 {
                let (mine, rest) = values.split_at_checked(4 * n).ok_or_else(bad)?;
                for (s, v) in sum[at..at + n].iter_mut().zip(mine.chunks_exact(4)) {
                    *s += f32::from_le_bytes(v.try_into().expect("4 bytes"));
                }
                values = rest;
                any[i] = true;
            }
            at += n;
        }
        if !values.is_empty() {
            return Err(bad());
        }
    }

    struct Unflatten<'a> {
        grads: &'a mut GradientsParams,
        sum: &'a [f32],
        any: &'a [bool],
        at: usize,
        index: usize,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Unflatten<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let shape = param.shape();
            let n = shape.num_elements();
            if self.any[self.index] {
                let data = TensorData::new(self.sum[self.at..self.at + n].to_vec(), shape);
                let g = Tensor::<B::InnerBackend, D>::from_data(data, &param.device());
                self.grads.remove::<B::InnerBackend, D>(param.id);
                self.grads.register::<B::InnerBackend, D>(param.id, g);
            }
            self.at += n;
            self.index += 1;
        }
    }
    model.visit(&mut Unflatten {
        grads: &mut grads,
        sum: &sum,
        any: &any,
        at: 0,
        index: 0,
    });
    Ok(grads)
}

/// Keeps the transport's own reports off the terminal: its server installs a logger that
/// prints a line per download to stdout (unless a tracing subscriber is set already, as here),
/// and it panics on its own threads when a connection is lost, which is reported as an error
/// naming the lost node instead.
fn quiet_transport() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing::subscriber::set_global_default(tracing::subscriber::NoSubscriber::default());
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() != Some(IO_THREAD) {
                previous(info);
            }
        }));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(nodes: &str, rank: usize) -> String {
        match NodeGroup::join(nodes, rank, Duration::from_secs(1)) {
            Err(e @ Error::Config { .. }) => e.to_string(),
            other => panic!("{nodes} rank {rank}: expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn node_lists_are_parsed_and_bad_ones_refused() {
        let parsed = NodeGroup::addresses(" 10.0.0.1:29500, ws://host-b:7 ").unwrap();
        let shown: Vec<String> = parsed.iter().map(|(a, p)| format!("{a} {p}")).collect();
        assert_eq!(shown, ["ws://10.0.0.1:29500 29500", "ws://host-b:7 7"]);

        assert!(refused("127.0.0.1:1", 0).contains("needs at least two HOST:PORT entries"));
        assert!(refused("127.0.0.1,127.0.0.1:2", 0).contains("expected HOST:PORT"));
        assert!(refused(":1,127.0.0.1:2", 0).contains("expected HOST:PORT"));
        assert!(refused("a:0,b:1", 0).contains("the port is not a number from 1 to 65535"));
        assert!(refused("a:70000,b:1", 0).contains("the port is not a number from 1 to 65535"));
        assert!(refused("a:1,a:1", 0).contains("ws://a:1 is listed twice"));
        assert!(refused("a:1,b:2", 2).contains("--nodes lists 2 nodes (ranks 0 to 1)"));
    }

    #[test]
    fn a_port_in_use_is_refused_with_its_reason() {
        let taken = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let msg = refused(&format!("127.0.0.1:{port},127.0.0.1:1"), 0);
        assert!(msg.contains(&format!("cannot listen on port {port}")), "{msg}");
    }
}
