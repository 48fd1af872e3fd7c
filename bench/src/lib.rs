//! The bench harness behind `kvloft bench`: suites that measure one I/O path each, latency
//! percentiles from HDR histograms, and results as JSON (see `docs/src/bench.md`).
//!
//! - [`report`]: the result file (suite, machine, command, git revision, cases) and the
//!   machine description.
//! - [`socket`]: the control path, lookup round trips and lookup throughput over the Unix socket.
//! - [`copy`]: the `d2h` and `h2d` suites, scattered KV blocks between engine memory and pool
//!   pages through the copy path, against the contiguous ceiling; [`calibrate`]: the copy curves
//!   written into the topology file.
//! - [`placement`]: thread pinning and the CPUs of a NUMA node; [`server`]: the server a suite
//!   measures through (a running one, a `kvloft serve` child, or one in this process).
//! - [`ssd`]: raw io_uring random writes and reads (O_DIRECT and buffered) against a file or a
//!   block device, swept over queue depth and block size.
//! - [`plot`]: `--plot FILE`, an SVG or PNG chart of a sweep.
//! - [`progress`]: the progress bar on stderr.
#![deny(unsafe_code)]

pub mod calibrate;
pub mod copy;
#[allow(unsafe_code)]
pub mod gpu;
pub mod placement;
pub mod plot;
pub mod progress;
pub mod report;
pub mod server;
pub mod socket;
pub mod ssd;
