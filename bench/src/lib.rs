//! The bench harness behind `kvloft bench`: suites that measure one I/O path each, latency
//! percentiles from HDR histograms, and results as JSON (see `docs/src/bench.md`).
//!
//! - [`report`]: the result file (suite, machine, command, git revision, cases) and the
//!   machine description.
//! - [`socket`]: the control path, lookup round trips and lookup throughput over the Unix socket.
#![deny(unsafe_code)]

pub mod report;
pub mod socket;
