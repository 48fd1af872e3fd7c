//! The server a data-path suite measures through: a running one (`--socket`), a `kvloft serve`
//! child the bench starts with a pool sized for the case, or one started inside this process
//! (tests, where no `kvloft` binary is at hand).

use kvloft_shard::client::Client;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a started server may take to accept its first client.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the bench's server could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// An I/O step failed (temporary directory, topology file, spawn).
    #[error("{what}: {source}")]
    Io {
        /// The step.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The server did not come up.
    #[error("the bench's server did not start: {0}")]
    Start(String),
}

/// Where the server path of a suite finds its server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerMode {
    /// A running server at this socket; its pool size, shards and hugepages are its own.
    Socket(PathBuf),
    /// `EXE serve` started per case with a pool sized for it (`EXE` is normally the `kvloft`
    /// binary), with `--config FILE` when given.
    Spawn {
        /// The `kvloft` binary.
        exe: PathBuf,
        /// Topology file for the server.
        config: Option<PathBuf>,
    },
    /// A server started inside this process per case, with the discovered machine's default
    /// shards (tests).
    InProcess,
    /// No server: the suite measures only the in-process copy and the ceilings.
    Off,
}

/// A server the suite talks to; a server the bench started stops when this is dropped.
#[derive(Debug)]
pub enum BenchServer {
    /// Someone else's server.
    External(PathBuf),
    /// A `kvloft serve` child.
    Child(OwnServer),
    /// Shards running in this process.
    InProcess(InProcessServer),
}

impl BenchServer {
    /// Starts (or names) the server of `mode` with a pool of `pool_bytes` and, when starting one
    /// without a topology file, `hugepages`. `None` for [`ServerMode::Off`].
    pub fn start(mode: &ServerMode, pool_bytes: u64, hugepages: bool) -> Result<Option<Self>, ServerError> {
        Ok(Some(match mode {
            ServerMode::Off => return Ok(None),
            ServerMode::Socket(p) => BenchServer::External(p.clone()),
            ServerMode::Spawn { exe, config } => {
                BenchServer::Child(OwnServer::start(exe, config.as_deref(), pool_bytes, hugepages)?)
            }
            ServerMode::InProcess => BenchServer::InProcess(InProcessServer::start(pool_bytes, hugepages)?),
        }))
    }

    /// The socket to connect to.
    pub fn socket(&self) -> &Path {
        match self {
            BenchServer::External(p) => p,
            BenchServer::Child(s) => &s.socket,
            BenchServer::InProcess(s) => &s.socket,
        }
    }

    /// What a server the bench started said besides its routine lines (hugepage and NUMA notes).
    pub fn remarks(&self) -> Vec<String> {
        match self {
            BenchServer::Child(s) => s.remarks(),
            _ => Vec::new(),
        }
    }

    /// `external`, `child` or `in-process`, for the result's parameters.
    pub fn kind(&self) -> &'static str {
        match self {
            BenchServer::External(_) => "external",
            BenchServer::Child(_) => "child",
            BenchServer::InProcess(_) => "in-process",
        }
    }
}

/// A `kvloft serve` child on a private socket, stopped with SIGTERM when dropped. Its stderr
/// goes to a file ([`OwnServer::log`]), so that it does not interleave with the bench's output.
#[derive(Debug)]
pub struct OwnServer {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl OwnServer {
    /// Starts `EXE serve --socket <tmp>/kvloft.sock --metrics-addr off --pool-size <pool_bytes>`,
    /// plus `--config FILE` when given, else a generated topology file with `hugepages = true`
    /// when `hugepages` is set, and waits until a client can say hello.
    pub fn start(exe: &Path, config: Option<&Path>, pool_bytes: u64, hugepages: bool) -> Result<Self, ServerError> {
        let io = |what: &str| {
            let what = what.to_string();
            move |source| ServerError::Io { what, source }
        };
        let dir =
            tempfile::Builder::new().prefix("kvloft-bench").tempdir_in("/tmp").map_err(io("temporary directory"))?;
        let socket = dir.path().join("kvloft.sock");
        let mut cmd = Command::new(exe);
        cmd.arg("serve").arg("--socket").arg(&socket).args(["--metrics-addr", "off"]);
        cmd.arg("--pool-size").arg(pool_bytes.to_string());
        match config {
            Some(c) => {
                cmd.arg("--config").arg(c);
            }
            None if hugepages => {
                let path = dir.path().join("topology.toml");
                std::fs::write(&path, "[memory]\nhugepages = true\n").map_err(io("topology file"))?;
                cmd.arg("--config").arg(path);
            }
            None => {}
        }
        let log = dir.path().join("server.log");
        let stderr = std::fs::File::create(&log).map_err(io("server log"))?;
        let child = cmd
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(io(&format!("cannot start {} serve", exe.display())))?;
        let mut server = Self { child, socket, log, _dir: dir };
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(ServerError::Start(format!("kvloft serve exited with {status}: {}", server.log().trim())));
            }
            if server.socket.exists() && Client::connect(&server.socket, "kvloft-bench", Duration::from_secs(5)).is_ok()
            {
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(ServerError::Start(format!("no client accepted within {START_TIMEOUT:?}: {}", server.log().trim())))
    }

    /// The server's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// What the server wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The lines of [`OwnServer::log`] worth reporting: all but the start, signal and stop lines.
    pub fn remarks(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| {
                !l.trim().is_empty()
                    && !l.starts_with("kvloft: serving on")
                    && !l.starts_with("kvloft: signal")
                    && !l.starts_with("kvloft: stopped")
            })
            .map(str::to_string)
            .collect()
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

/// Shards started inside this process on a private socket; stopped and joined when dropped.
#[derive(Debug)]
pub struct InProcessServer {
    server: Option<kvloft_shard::Server>,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl InProcessServer {
    /// Starts the discovered machine's default shards with a pool of `pool_bytes`, metrics off.
    pub fn start(pool_bytes: u64, hugepages: bool) -> Result<Self, ServerError> {
        let machine = kvloft_topology::discover().map_err(|e| ServerError::Start(e.to_string()))?;
        let mut topology = kvloft_topology::validate::embedded_default(&machine)
            .map_err(|d| ServerError::Start(d.to_string()))?
            .topology;
        let dir = tempfile::Builder::new()
            .prefix("kvloft-bench")
            .tempdir_in("/tmp")
            .map_err(|source| ServerError::Io { what: "temporary directory".into(), source })?;
        let socket = dir.path().join("kvloft.sock");
        topology.server.socket = socket.clone();
        topology.server.metrics_addr = None;
        topology.memory.pool = kvloft_topology::PoolSize::Total(pool_bytes);
        topology.memory.hugepages = hugepages;
        let server = kvloft_shard::Server::start(topology).map_err(|e| ServerError::Start(e.to_string()))?;
        Ok(Self { server: Some(server), socket, _dir: dir })
    }

    /// The server's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for InProcessServer {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown_handle().shutdown();
            let _ = server.wait();
        }
    }
}
