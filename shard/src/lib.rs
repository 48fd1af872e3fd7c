//! kvloft's runtime: one pinned glommio executor per shard, hash routing, bounded cross-shard
//! channels, the Unix-socket server and the Prometheus endpoint.
//!
//! [`Server::start`] turns a validated [`kvloft_topology::Topology`] into running shards: one
//! executor thread per `[[shard]]`, pinned to its CPU, joined in a full mesh of bounded channels.
//! Each shard owns a slice of the pinned pool, the index of the block slices hashed to it and the
//! leases its connections created. An accept thread hands each client connection to a shard in
//! turn; the connection's shard answers its requests, asking the owner shards over the mesh.
//! [`signals::block`] and [`signals::install`] turn SIGINT/SIGTERM into a clean shutdown: every shard stops, the threads
//! are joined and the socket file is removed.
//!
//! [`route`] holds the pure block-to-shard mapping; [`client`] is a blocking Rust client of the
//! protocol, for the CLI, tests and benchmarks; [`mailbox`] is the shared memory a connection may
//! carry its requests through instead of the socket.

mod acceptor;
pub mod client;
mod conn;
mod error;
mod gpu_path;
pub mod mailbox;
mod mesh;
mod metrics;
pub mod route;
mod server;
mod shard;
pub mod signals;
mod store;
mod trace;

pub use error::ServeError;
pub use gpu_path::calibrated_rate;
pub use mesh::MESH_CHANNEL_CAPACITY;
pub use server::{Server, ShutdownHandle};
