//! The NUMA-aware bench harness behind `kvloft bench`: d2h, h2d, ssd and socket suites with
//! latency percentiles, JSON results and plots.
//!
//! Empty in this release.
#![deny(unsafe_code)]
