//! Starting, stopping and joining the shards.

use crate::acceptor::{self, PENDING_CONNECTIONS_PER_SHARD};
use crate::error::ServeError;
use crate::mesh;
use crate::metrics::Metrics;
use crate::shard::{self, MeshMsg, ShardStart};
use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};
use kvloft_topology::Topology;
use std::io::ErrorKind;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a shard may take to start, join the mesh and (shard 0) bind its sockets.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Read-only state every shard shares: the topology and the metric handles.
#[derive(Debug)]
pub(crate) struct Shared {
    pub topology: Topology,
    pub started: Instant,
    pub metrics: Arc<Metrics>,
}

/// Asks every shard to stop. Cloneable and `Send`, for signal handlers and tests.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    shards: Vec<flume::Sender<()>>,
    acceptor_stop: Arc<AtomicBool>,
    socket: PathBuf,
}

impl ShutdownHandle {
    /// Stops accepting connections, then asks every shard to stop; returns at once. Calling it
    /// again does nothing more.
    pub fn shutdown(&self) {
        if !self.acceptor_stop.swap(true, Ordering::AcqRel) {
            // Wake the accept thread, blocked in accept(), so that it sees the flag.
            let _ = std::os::unix::net::UnixStream::connect(&self.socket);
        }
        for s in &self.shards {
            let _ = s.try_send(());
        }
    }
}

/// The running shards.
#[derive(Debug)]
pub struct Server {
    executors: Vec<(usize, ExecutorJoinHandle<()>)>,
    shutdown: ShutdownHandle,
    socket: PathBuf,
    acceptor: Option<JoinHandle<()>>,
}

impl Server {
    /// Starts one pinned executor per shard of `topology` and returns once every shard is ready
    /// and the socket accepts connections.
    pub fn start(topology: Topology) -> Result<Self, ServeError> {
        let socket = topology.server.socket.clone();
        prepare_socket(&socket)?;
        let n = topology.shards.len();
        let started = Instant::now();
        let placement: Vec<(u32, u32)> = topology.shards.iter().map(|s| (s.cpu, s.node)).collect();
        let metrics = Arc::new(Metrics::new(&placement, env!("CARGO_PKG_VERSION"), started));
        let shared = Arc::new(Shared { topology, started, metrics });

        let listener = std::os::unix::net::UnixListener::bind(&socket)
            .map_err(|cause| ServeError::Socket { path: socket.clone(), cause })?;
        let (ready_tx, ready_rx) = flume::bounded(n);
        let mut conn_senders = Vec::with_capacity(n);
        let mut controls = Vec::with_capacity(n);
        let mut executors = Vec::with_capacity(n);
        let mut failure = None;
        for (id, ends) in mesh::build::<MeshMsg>(n).into_iter().enumerate() {
            let (ctl_tx, control) = flume::bounded(1);
            controls.push(ctl_tx);
            let (conn_tx, connections) = flume::bounded(PENDING_CONNECTIONS_PER_SHARD);
            conn_senders.push(conn_tx);
            let cpu = shared.topology.shards[id].cpu;
            let start = ShardStart { id, shared: shared.clone(), ends, control, connections, ready: ready_tx.clone() };
            let mut builder = LocalExecutorBuilder::new(Placement::Fixed(cpu as usize)).name(&format!("kvloft-s{id}"));
            // Polling before sleeping: see `ServerSpec::spin_us`.
            if shared.topology.server.spin_us > 0 {
                builder = builder.spin_before_park(Duration::from_micros(shared.topology.server.spin_us));
            }
            let spawned = builder.spawn(move || shard::run(start));
            match spawned {
                Ok(handle) => executors.push((id, handle)),
                Err(e) => {
                    failure = Some(ServeError::Executor { shard: id, cpu, message: e.to_string() });
                    break;
                }
            }
        }
        let acceptor_stop = Arc::new(AtomicBool::new(false));
        let shutdown =
            ShutdownHandle { shards: controls, acceptor_stop: acceptor_stop.clone(), socket: socket.clone() };
        let mut server = Self { executors, shutdown, socket, acceptor: None };
        if failure.is_none() {
            let deadline = Instant::now() + START_TIMEOUT;
            for _ in 0..n {
                match ready_rx.recv_deadline(deadline) {
                    Ok((_, Ok(()))) => {}
                    Ok((_, Err(e))) => {
                        failure = Some(e);
                        break;
                    }
                    Err(_) => {
                        failure = Some(ServeError::StartTimeout(n, START_TIMEOUT));
                        break;
                    }
                }
            }
        }
        if let Some(e) = failure {
            server.shutdown.shutdown();
            let _ = server.join();
            return Err(e);
        }
        let spawned = std::thread::Builder::new()
            .name("kvloft-accept".into())
            .spawn(move || acceptor::run(listener, conn_senders, acceptor_stop));
        match spawned {
            Ok(handle) => server.acceptor = Some(handle),
            Err(e) => {
                server.shutdown.shutdown();
                let _ = server.join();
                return Err(ServeError::Signals(e));
            }
        }
        Ok(server)
    }

    /// A handle that stops the server from any thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// The socket path clients connect to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Waits until every shard has stopped (after [`ShutdownHandle::shutdown`]), then removes the
    /// socket file.
    pub fn wait(mut self) -> Result<(), ServeError> {
        self.join()
    }

    fn join(&mut self) -> Result<(), ServeError> {
        let mut result = Ok(());
        for (shard, handle) in self.executors.drain(..) {
            if let Err(e) = handle.join() {
                result = Err(ServeError::ShardPanicked { shard, message: e.to_string() });
            }
        }
        // Shards are gone; make sure the accept thread is too (it was stopped by shutdown()).
        self.shutdown.shutdown();
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let _ = std::fs::remove_file(&self.socket);
        result
    }
}

/// Makes the socket path usable: creates its directory, refuses a live server, removes a stale
/// socket left by a server that died.
fn prepare_socket(path: &Path) -> Result<(), ServeError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|cause| ServeError::Socket { path: path.into(), cause })?;
    }
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(cause) => Err(ServeError::Socket { path: path.into(), cause }),
        Ok(m) if !m.file_type().is_socket() => Err(ServeError::NotASocket(path.into())),
        Ok(_) => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ServeError::AlreadyServing(path.into()));
            }
            std::fs::remove_file(path).map_err(|cause| ServeError::Socket { path: path.into(), cause })
        }
    }
}
