//! Machine discovery, the TOML topology model, validation and shard placement.
//!
//! kvloft runs one pinned executor (a *shard*) per chosen core, each bound to the GPU, NIC and
//! NVMe drive on its NUMA node. This crate answers "which shards, where":
//!
//! - [`discover`] reads the real machine (hwloc through hwlocality, plus sysfs) into a
//!   [`Machine`], plain data that tests build by hand with [`synthetic`].
//! - [`file`] is the topology file as written (TOML, kebab-case keys, unknown keys rejected);
//!   [`validate`] turns it into a [`Topology`] for a given machine, or into [`Diagnostic`]s that
//!   name the file, line, key and fix.
//! - [`placement`] derives the default shards from a machine alone; [`render`] writes a topology
//!   back out as a commented TOML file for the user to edit.
#![deny(unsafe_code)]

pub mod diagnostic;
pub mod discover;
pub mod file;
pub mod machine;
pub mod model;
pub mod placement;
pub mod render;
pub mod synthetic;
pub mod validate;

pub use diagnostic::{Diagnostic, Diagnostics, Severity, Source};
pub use discover::{discover, DiscoverError};
pub use machine::{CpuId, Machine, NodeId};
pub use model::{PoolSize, ShardSpec, Topology};
pub use validate::Checked;
