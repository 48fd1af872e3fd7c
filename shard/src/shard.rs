//! One shard: its executor's main task, its mesh inbox, and the accept loop on shard 0.

use crate::conn;
use crate::error::ServeError;
use crate::mesh::{MeshEnds, MeshSenders};
use crate::metrics::{self, ShardMetrics};
use crate::route::ShardId;
use crate::server::Shared;
use glommio::net::{AcceptedUnixStream, TcpListener, UnixListener};
use kvloft_engine::protocol::ShardStats;
use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// What shards send each other.
pub(crate) enum MeshMsg {
    /// A client connection accepted by shard 0, for the receiving shard to serve.
    Connection(AcceptedUnixStream),
    /// Asks the receiving shard for its figures.
    Stats {
        /// Where to send them.
        reply: flume::Sender<ShardStats>,
    },
}

/// A shard's own state, owned by its executor thread.
pub(crate) struct ShardCtx {
    pub id: ShardId,
    pub shared: Arc<Shared>,
    pub mesh: MeshSenders<MeshMsg>,
    pub metrics: ShardMetrics,
    /// Set once shutdown starts: connections refuse new requests.
    pub stopping: Cell<bool>,
}

impl ShardCtx {
    /// This shard's figures, read on its own thread (so `allowed_cpus` is its real affinity).
    pub fn stats(&self) -> ShardStats {
        let spec = &self.shared.topology.shards[self.id];
        let allowed_cpus =
            core_affinity::get_core_ids().map(|ids| ids.into_iter().map(|c| c.id as u32).collect()).unwrap_or_default();
        ShardStats {
            id: self.id as u32,
            cpu: spec.cpu,
            numa_node: spec.node,
            gpu: spec.gpu,
            nic: spec.nic.clone(),
            ssd: spec.ssd.as_ref().map(|p| p.display().to_string()),
            pool_bytes: self.shared.topology.shard_pool_bytes(self.id),
            thread_id: current_thread_id(),
            allowed_cpus,
            connections: self.metrics.connections.get().max(0) as u64,
            requests: self.metrics.requests.get(),
            // No block store in this build yet: these figures are truly zero.
            slices: 0,
            used_bytes: 0,
            hits: 0,
            misses: 0,
            evictions: 0,
            saves: 0,
            loads: 0,
            leases: 0,
        }
    }

    fn handle(self: &Rc<Self>, msg: MeshMsg) {
        match msg {
            MeshMsg::Connection(accepted) => conn::spawn(self.clone(), accepted.bind_to_executor()),
            MeshMsg::Stats { reply } => {
                let _ = reply.try_send(self.stats());
            }
        }
    }
}

/// The executor's main task: join the mesh, start serving, report ready, wait for shutdown.
pub(crate) async fn run(
    id: ShardId,
    shared: Arc<Shared>,
    ends: MeshEnds<MeshMsg>,
    control: flume::Receiver<()>,
    ready: flume::Sender<(ShardId, Result<(), ServeError>)>,
) {
    // A shard that fails to start leaves its peers waiting in connect; shutdown still reaches them.
    let joined = futures_lite::future::or(async { Some(ends.connect().await) }, async {
        let _ = control.recv_async().await;
        None
    })
    .await;
    let Some((mesh, inbound)) = joined else { return };
    let metrics = shared.metrics.shards[id].clone();
    let ctx = Rc::new(ShardCtx { id, shared, mesh, metrics, stopping: Cell::new(false) });
    for (_, receiver) in inbound {
        let ctx = ctx.clone();
        glommio::spawn_local(async move {
            while let Some(msg) = receiver.recv().await {
                ctx.handle(msg);
            }
        })
        .detach();
    }
    if id == 0 {
        if let Err(e) = start_listeners(&ctx) {
            let _ = ready.send((id, Err(e)));
            return;
        }
    }
    let _ = ready.send((id, Ok(())));
    let _ = control.recv_async().await;
    ctx.stopping.set(true);
}

fn start_listeners(ctx: &Rc<ShardCtx>) -> Result<(), ServeError> {
    let server = &ctx.shared.topology.server;
    let listener = UnixListener::bind(&server.socket)
        .map_err(|e| ServeError::Socket { path: server.socket.clone(), cause: e.into() })?;
    glommio::spawn_local(accept_loop(ctx.clone(), listener)).detach();
    if let Some(addr) = server.metrics_addr {
        let http = TcpListener::bind(addr).map_err(|e| ServeError::Metrics { addr, message: e.to_string() })?;
        glommio::spawn_local(metrics::serve_http(http, ctx.shared.metrics.clone())).detach();
    }
    Ok(())
}

/// Accepts clients and hands them to shards in turn.
async fn accept_loop(ctx: Rc<ShardCtx>, listener: UnixListener) {
    let n = ctx.shared.topology.shards.len();
    let mut next = 0usize;
    loop {
        match listener.shared_accept().await {
            Ok(accepted) => {
                let target = next % n;
                next = next.wrapping_add(1);
                if target == ctx.id {
                    conn::spawn(ctx.clone(), accepted.bind_to_executor());
                } else if let Err(Some(MeshMsg::Connection(accepted))) =
                    ctx.mesh.send_to(target, MeshMsg::Connection(accepted)).await
                {
                    conn::spawn(ctx.clone(), accepted.bind_to_executor());
                }
            }
            Err(e) => {
                // Out of descriptors or a transient error: back off instead of spinning.
                eprintln!("kvloft: accept failed: {e}");
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn current_thread_id() -> i32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() }
}
