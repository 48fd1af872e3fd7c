//! kvloft's storage logic as plain state machines with no I/O, and the wire-protocol types.
//!
//! Nothing in this crate reads a socket, a file or a clock: the runtime (`kvloft-shard`) feeds it
//! bytes, events and the time (`now_ms`) and carries out what it returns. That keeps every rule
//! testable in isolation and lets the fuzzer drive the frame decoder directly.
//!
//! - [`protocol`]: frames (length prefix, versioned header, MessagePack body) and the request,
//!   reply and error types of protocol v1, specified in `docs/src/protocol.md`.
//! - [`namespace`]: the namespace id, a stable fingerprint of everything that changes a block's
//!   bytes.
//! - [`key`]: block hashes, block keys and their routing hash, slice keys.
//! - [`slab`]: byte-offset allocation of one shard's pool arena (chunks, size classes, alignment).
//! - [`index`]: one shard's slice index: reserve, seal, pin, S3-FIFO eviction.
//! - [`lease`]: the lease records a `lookup` creates and `load` consumes, kept at their home shard.
//! - [`limits`]: every bound of the engine's tables, in one place.
//! - [`rng`]: the crate's one source of deterministic pseudo-randomness.
//! - [`table`]: the index's hash table, built for batches of lookups. Its two hints, a prefetch
//!   and a request for huge pages (`huge_pages`), are the crate's only `unsafe`.
#![deny(unsafe_code)]

/// Fuzz bodies shared by the cargo-fuzz targets in `fuzz/` and their stable smoke tests.
pub mod fuzzing;
mod huge_pages;
pub mod index;
pub mod key;
pub mod lease;
pub mod limits;
pub mod namespace;
pub mod protocol;
pub mod rng;
pub mod slab;
pub mod table;
