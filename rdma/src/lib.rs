//! Transports between kvloft nodes behind one trait: `verbs` (ibverbs RDMA) and `tcp` (for
//! clusters without RDMA).
//!
//! Empty in this release; a shard's `nic` binding is already discovered and validated by the
//! topology crate.
#![deny(unsafe_code)]
