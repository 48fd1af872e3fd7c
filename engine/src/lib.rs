//! kvloft's storage logic as plain state machines with no I/O, and the wire-protocol types.
//!
//! Nothing in this crate reads a socket, a file or a clock: the runtime (`kvloft-shard`) feeds it
//! bytes and events and carries out what it returns. That keeps every rule testable in isolation
//! and lets the fuzzer drive the frame decoder directly.
//!
//! - [`protocol`]: frames (length prefix, versioned header, MessagePack body) and the request,
//!   reply and error types of protocol v1, specified in `docs/src/protocol.md`.
#![deny(unsafe_code)]

pub mod protocol;
