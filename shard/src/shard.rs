//! One shard: its executor's main task, its state (index, pool arena, leases) and its mesh inbox.

use crate::acceptor::NewConnection;
use crate::conn;
use crate::error::ServeError;
use crate::mesh::{MeshEnds, MeshSenders};
use crate::metrics::{self, ShardMetrics};
use crate::route::{Router, ShardId};
use crate::server::Shared;
use crate::store::{InstanceOp, LeaseOp, OwnerOp};
use glommio::net::{TcpListener, UnixStream};
use kvloft_engine::index::ShardIndex;
use kvloft_engine::lease::LeaseTable;
use kvloft_engine::namespace::NamespaceId;
use kvloft_engine::protocol::ShardStats;
use kvloft_gpu::arena::Arena;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// How often leases and pins past their time are dropped.
const EXPIRY_PERIOD: Duration = Duration::from_secs(1);
/// Smallest slot the pool hands out; bounds the index at `pool bytes / this` entries.
const MIN_SLOT_BYTES: u64 = 4096;

/// What shards send each other.
#[derive(Debug)]
pub(crate) enum MeshMsg {
    /// Asks the receiving shard for its figures.
    Stats {
        /// Where to send them.
        reply: flume::Sender<ShardStats>,
    },
    /// A store operation for the receiving shard as owner of slices.
    Owner(OwnerOp),
    /// A lease operation for the receiving shard as home of the lease.
    Lease(LeaseOp),
    /// An instance registration for the receiving shard as home of the instance.
    Instance(InstanceOp),
    /// Slots an owner set aside for the receiving shard's GPU saves (decision 54).
    Stock(crate::gpu_path::StockGift),
}

/// Per-shard counters, read by `stats` (the Prometheus series mirror them).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub hits: Cell<u64>,
    pub misses: Cell<u64>,
    pub saves: Cell<u64>,
    pub loads: Cell<u64>,
}

/// A shard's own state, owned by its executor thread.
pub(crate) struct ShardCtx {
    pub id: ShardId,
    pub shared: Arc<Shared>,
    pub mesh: MeshSenders<MeshMsg>,
    pub metrics: ShardMetrics,
    pub router: Router,
    /// This shard's slice index over its arena.
    pub index: RefCell<ShardIndex>,
    /// The arena's GPU registrations and this shard's copiers. Declared before `arena`, so it
    /// is dropped (unregistered) first.
    pub gpu: crate::gpu_path::GpuState,
    /// This shard's slice of the pinned pool.
    pub arena: RefCell<Arena>,
    /// Instances whose home is this shard: name -> (namespace, live connections).
    pub instances: RefCell<HashMap<String, (NamespaceId, u32)>>,
    /// Leases created by connections on this shard.
    pub leases: RefCell<LeaseTable>,
    /// For each lease of `leases`, the shards that hold its pins (so a release tells only them).
    pub lease_owners: RefCell<HashMap<u64, Vec<ShardId>>>,
    pub counters: Counters,
    /// Set once shutdown starts: connections refuse new requests.
    pub stopping: Cell<bool>,
}

impl std::fmt::Debug for ShardCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ShardCtx {{ id: {} }}", self.id)
    }
}

impl ShardCtx {
    /// This shard's figures, read on its own thread (so `allowed_cpus` is its real affinity).
    pub fn stats(&self) -> ShardStats {
        let spec = &self.shared.topology.shards[self.id];
        let allowed_cpus =
            core_affinity::get_core_ids().map(|ids| ids.into_iter().map(|c| c.id as u32).collect()).unwrap_or_default();
        let index = self.index.borrow();
        ShardStats {
            id: self.id as u32,
            cpu: spec.cpu,
            numa_node: spec.node,
            gpu: spec.gpu,
            nic: spec.nic.clone(),
            ssd: spec.ssd.as_ref().map(|p| p.display().to_string()),
            pool_bytes: self.arena.borrow().len(),
            thread_id: current_thread_id(),
            allowed_cpus,
            connections: self.metrics.connections.get().max(0) as u64,
            requests: self.metrics.requests.get(),
            slices: index.slices() as u64,
            used_bytes: index.used_bytes(),
            hits: self.counters.hits.get(),
            misses: self.counters.misses.get(),
            evictions: index.evictions(),
            saves: self.counters.saves.get(),
            loads: self.counters.loads.get(),
            leases: self.leases.borrow().len() as u64,
        }
    }

    pub(crate) fn handle(self: &Rc<Self>, msg: MeshMsg) {
        match msg {
            MeshMsg::Stats { reply } => {
                let _ = reply.try_send(self.stats());
            }
            MeshMsg::Owner(op) => self.owner_op(op),
            MeshMsg::Lease(op) => self.lease_op(op),
            MeshMsg::Instance(op) => self.instance_op(op),
            MeshMsg::Stock(gift) => self.take_stock(gift),
        }
    }
}

/// Everything a shard's executor starts with.
pub(crate) struct ShardStart {
    pub id: ShardId,
    pub shared: Arc<Shared>,
    pub ends: MeshEnds<MeshMsg>,
    pub control: flume::Receiver<()>,
    pub connections: flume::Receiver<NewConnection>,
    pub ready: flume::Sender<(ShardId, Result<(), ServeError>)>,
}

/// The executor's main task: allocate the arena, join the mesh, serve, report ready, wait for
/// shutdown.
pub(crate) async fn run(start: ShardStart) {
    let ShardStart { id, shared, ends, control, connections, ready } = start;
    let spec = shared.topology.shards[id].clone();
    let pool_bytes = shared.topology.shard_pool_bytes(id);
    // Allocated on the shard's own thread, pinned to its core, so first touch is NUMA-local.
    let arena = match Arena::new(pool_bytes, Some(spec.node), shared.topology.memory.hugepages) {
        Ok(a) => a,
        Err(e) => {
            let _ = ready.send((id, Err(ServeError::Pool { shard: id, message: e.to_string() })));
            return;
        }
    };
    for note in arena.notes() {
        eprintln!("kvloft: shard {id}: {note}");
    }
    // A shard that fails to start leaves its peers waiting in connect; shutdown still reaches them.
    let joined = futures_lite::future::or(async { Some(ends.connect().await) }, async {
        let _ = control.recv_async().await;
        None
    })
    .await;
    let Some((mesh, inbound)) = joined else { return };
    let metrics = shared.metrics.shards[id].clone();
    let max_entries = (arena.len() / MIN_SLOT_BYTES).max(1) as usize;
    let index = ShardIndex::new(arena.len(), max_entries);
    let seed = seed_for(id);
    let ctx = Rc::new(ShardCtx {
        id,
        router: Router::new(&shared.topology.shards),
        shared,
        mesh,
        metrics,
        index: RefCell::new(index),
        gpu: Default::default(),
        arena: RefCell::new(arena),
        instances: RefCell::new(HashMap::new()),
        lease_owners: RefCell::new(HashMap::new()),
        leases: RefCell::new(LeaseTable::new(kvloft_engine::limits::MAX_LEASES_PER_SHARD, seed, id as u16)),
        counters: Counters::default(),
        stopping: Cell::new(false),
    });
    for (_, receiver) in inbound {
        let ctx = ctx.clone();
        glommio::spawn_local(async move {
            while let Some(msg) = receiver.recv().await {
                ctx.handle(msg);
            }
        })
        .detach();
    }
    let accepted = ctx.clone();
    glommio::spawn_local(async move {
        while let Ok(c) = connections.recv_async().await {
            let fd = c.fd.into_raw_fd();
            // SAFETY: the descriptor comes from an OwnedFd of a connected, non-blocking Unix socket
            // that nothing else owns; the glommio stream takes over closing it.
            let stream = unsafe { UnixStream::from_raw_fd(fd) };
            conn::spawn(accepted.clone(), stream, c.peer, fd);
        }
    })
    .detach();
    let ticking = ctx.clone();
    glommio::spawn_local(async move {
        loop {
            glommio::timer::sleep(EXPIRY_PERIOD).await;
            ticking.expire();
        }
    })
    .detach();
    if id == 0 {
        if let Some(addr) = ctx.shared.topology.server.metrics_addr {
            match TcpListener::bind(addr) {
                Ok(http) => {
                    glommio::spawn_local(metrics::serve_http(http, ctx.shared.metrics.clone())).detach();
                }
                Err(e) => {
                    let _ = ready.send((id, Err(ServeError::Metrics { addr, message: e.to_string() })));
                    return;
                }
            }
        }
    }
    let _ = ready.send((id, Ok(())));
    let _ = control.recv_async().await;
    ctx.stopping.set(true);
}

/// A per-shard, per-start seed for lease ids.
fn seed_for(id: ShardId) -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    t ^ (u64::from(std::process::id()) << 32) ^ (id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

fn current_thread_id() -> i32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() }
}
