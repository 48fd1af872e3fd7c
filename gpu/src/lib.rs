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
//! - [`plan`]: the copy planner (merge adjacent ranges; DMA or a gather/scatter kernel within an
//!   SM budget), pure and tested everywhere.
//! - [`blocks`]: block copies the GPU expands itself: a block's template of pieces, one
//!   (block, slot) pair per block, and the chunks and slot runs of a copy staged through device
//!   memory.
//! - [`cuda`]: the `cuda` backend (cudarc, loaded at run time, so the same binary runs where no
//!   driver exists): GPUs by ordinal or UUID, CUDA IPC import, pool registration, the NVRTC copy
//!   kernel and a copier that moves planned batches on its own stream.
//!
//! Unsafe code (system calls, driver calls and raw pool pointers) is confined to `arena`, `host`
//! and `cuda`; the crate denies it everywhere else.
#![deny(unsafe_code)]

#[allow(unsafe_code)]
pub mod arena;
pub mod blocks;
#[allow(unsafe_code)]
pub mod cuda;
#[allow(unsafe_code)]
pub mod host;
pub mod plan;

pub use arena::{Arena, ArenaError};
pub use host::{HostError, HostMemory};
