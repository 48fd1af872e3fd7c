//! Data movement between inference-engine memory and kvloft's pinned pool.
//!
//! This crate will hold the two copy backends named in DESIGN.md: `cuda` (CUDA IPC import of the
//! engine's KV tensors, streams, events, the copy planner and gather/scatter kernels) and `host`
//! (CPU-inference memory reached directly, without a copy through the client). It is empty in
//! this release: the block store and the host backend arrive next, the CUDA backend after them.
#![deny(unsafe_code)]
