//! Why the server could not start or stopped badly.

use std::path::PathBuf;

/// A server start or run failure. Each variant says what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// Another process answers on the socket path: stop it, or give this server another path.
    #[error("another kvloft server is already serving on {0}; stop it or pass --socket with another path")]
    AlreadyServing(PathBuf),
    /// Something that is not a socket sits at the socket path.
    #[error("{0} exists and is not a Unix socket; remove it or choose another socket path")]
    NotASocket(PathBuf),
    /// The socket (or its directory) could not be created.
    #[error("cannot listen on {path}: {cause}; check that the directory exists and is writable")]
    Socket {
        /// Socket path.
        path: PathBuf,
        /// OS error.
        cause: std::io::Error,
    },
    /// The metrics endpoint could not be bound.
    #[error("cannot serve metrics on {addr}: {message}; choose another --metrics-addr or \"off\"")]
    Metrics {
        /// The address.
        addr: std::net::SocketAddr,
        /// What failed.
        message: String,
    },
    /// An executor could not be created or pinned.
    #[error("cannot start shard {shard} on CPU {cpu}: {message}")]
    Executor {
        /// Shard id.
        shard: usize,
        /// Its CPU.
        cpu: u32,
        /// What failed (a memlock limit shows up here: raise `ulimit -l`).
        message: String,
    },
    /// A shard's pool arena could not be allocated, pre-touched or locked.
    #[error("cannot allocate the pool of shard {shard}: {message}")]
    Pool {
        /// Shard id.
        shard: usize,
        /// What failed and how to fix it.
        message: String,
    },
    /// A shard did not report ready in time.
    #[error("shard {0} did not become ready within {1:?}; the machine may be overloaded")]
    StartTimeout(usize, std::time::Duration),
    /// The signal handler could not be installed.
    #[error("cannot install the SIGINT/SIGTERM handler: {0}")]
    Signals(std::io::Error),
    /// An executor thread panicked; the message is the panic's.
    #[error("shard {shard} stopped with a panic: {message}")]
    ShardPanicked {
        /// Shard id.
        shard: usize,
        /// Panic text.
        message: String,
    },
}
