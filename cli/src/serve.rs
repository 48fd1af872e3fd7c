//! `kvloft serve`.

use anyhow::Context;
use bytesize::ByteSize;
use kvloft_shard::{signals, Server};
use kvloft_topology::machine::compact_list;
use kvloft_topology::validate::{self, parse_metrics_addr, pool_fits};
use kvloft_topology::{discover, PoolSize};
use std::path::PathBuf;
use std::process::ExitCode;

/// `kvloft serve` options; each flag overrides the topology file.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Topology file (see `kvloft topology`); without it the discovered machine is used.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Unix socket path [default: $KVLOFT_SOCKET, else /tmp/kvloft.sock].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Pinned host pool for the whole machine, such as 16GiB.
    #[arg(long, value_name = "SIZE")]
    pool_size: Option<String>,
    /// Prometheus endpoint, host:port, or "off".
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<String>,
}

/// Validates the topology, starts the shards, and serves until SIGINT or SIGTERM.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    // Before any thread starts, so that every thread inherits the blocked mask.
    let blocked = signals::block()?;
    let machine = discover()?;
    let checked = match &args.config {
        Some(path) => validate::load(path, &machine),
        None => validate::embedded_default(&machine),
    };
    let checked = match checked {
        Ok(c) => c,
        Err(diagnostics) => {
            eprintln!("{diagnostics}");
            eprintln!("kvloft: the topology is not valid; fix it (check with `kvloft topology --check FILE`)");
            return Ok(ExitCode::FAILURE);
        }
    };
    for w in &checked.warnings {
        eprintln!("{w}");
    }
    for n in &checked.notes {
        eprintln!("kvloft: note: {n}");
    }
    let mut topology = checked.topology;
    if let Some(socket) = &args.socket {
        topology.server.socket = socket.clone();
    }
    if let Some(text) = &args.pool_size {
        let size: ByteSize = text
            .parse()
            .map_err(|e| anyhow::anyhow!("--pool-size {text:?} is not a size ({e}); write it like 16GiB or 512MiB"))?;
        topology.memory.pool = PoolSize::Total(size.as_u64());
    }
    if let Some(text) = &args.metrics_addr {
        topology.server.metrics_addr = parse_metrics_addr(text).map_err(|e| anyhow::anyhow!("--metrics-addr: {e}"))?;
    }
    pool_fits(&topology, &machine).map_err(|e| anyhow::anyhow!("{e}; lower --pool-size"))?;

    let server = Server::start(topology.clone()).context("the server did not start")?;
    signals::install(server.shutdown_handle(), blocked)?;
    let cpus = compact_list(topology.shards.iter().map(|s| s.cpu).collect::<std::collections::BTreeSet<_>>());
    let metrics = topology.server.metrics_addr.map_or_else(|| "off".to_string(), |a| format!("http://{a}/metrics"));
    eprintln!(
        "kvloft: serving on {} with {} shards (CPUs {cpus}), pool {}, metrics {metrics}",
        server.socket().display(),
        topology.shards.len(),
        ByteSize(topology.pool_bytes()).display().iec(),
    );
    server.wait()?;
    eprintln!("kvloft: stopped");
    Ok(ExitCode::SUCCESS)
}
