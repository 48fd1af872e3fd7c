//! Data movement between inference-engine memory and kvloft's pinned pool.
//!
//! What exists today:
//! - [`arena`]: [`Arena`], one shard's slice of the pinned host pool: an anonymous mapping with
//!   2 MiB hugepages where reserved, bound to the shard's NUMA node, pre-touched in parallel and
//!   locked in memory.
//! - [`host`]: the `host` backend for CPU inference: [`HostMemory`] describes a client process's KV
//!   cache and copies blocks between it and pool slots with `process_vm_readv`/`process_vm_writev`,
//!   one copy per byte and no staging.
//!
//! The `cuda` backend named in DESIGN.md (CUDA IPC import, streams, events, the copy planner and
//! gather/scatter kernels) comes later.
//!
//! Unsafe code (system calls and raw pool pointers) is confined to those two modules; the crate
//! denies it everywhere else.
#![deny(unsafe_code)]

#[allow(unsafe_code)]
pub mod arena;
#[allow(unsafe_code)]
pub mod host;

pub use arena::{Arena, ArenaError};
pub use host::{HostError, HostMemory};
