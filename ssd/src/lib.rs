//! The NVMe tier: log-structured segment files written with O_DIRECT through io_uring (glommio
//! `DmaFile`), a key and checksum per record, and index recovery after a restart.
//!
//! Empty in this release; a shard's `ssd` path is already validated by the topology crate.
#![deny(unsafe_code)]
