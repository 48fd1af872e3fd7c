//! `kvloft stats`.

use bytesize::ByteSize;
use kvloft_shard::client::Client;
use kvloft_topology::model::default_socket;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// `kvloft stats` options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Unix socket of the server [default: $KVLOFT_SOCKET, else /tmp/kvloft.sock].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Print the raw figures as JSON.
    #[arg(long)]
    json: bool,
}

/// Prints the server's figures.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let socket = args.socket.clone().unwrap_or_else(default_socket);
    let mut client = Client::connect(&socket, "kvloft-cli", Duration::from_secs(5))?;
    let stats = client.stats()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "kvloft {} pid {} up {:.1} s on {}, pool {}",
        stats.server_version,
        stats.pid,
        stats.uptime_s,
        stats.socket,
        ByteSize(stats.pool_bytes).display().iec()
    );
    println!(
        "{:>5} {:>4} {:>4} {:>4} {:>8} {:>7} {:>8} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>6} {:>5} {:>8}",
        "shard",
        "cpu",
        "node",
        "gpu",
        "nic",
        "pinned",
        "tid",
        "pool",
        "used",
        "slices",
        "hits",
        "misses",
        "saves",
        "leases",
        "conns",
        "requests"
    );
    for s in &stats.shards {
        let pinned: Vec<String> = s.allowed_cpus.iter().map(u32::to_string).collect();
        println!(
            "{:>5} {:>4} {:>4} {:>4} {:>8} {:>7} {:>8} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>6} {:>5} {:>8}",
            s.id,
            s.cpu,
            s.numa_node,
            s.gpu.map_or_else(|| "-".into(), |g| g.to_string()),
            s.nic.as_deref().unwrap_or("-"),
            pinned.join(","),
            s.thread_id,
            ByteSize(s.pool_bytes).display().iec().to_string(),
            ByteSize(s.used_bytes).display().iec().to_string(),
            s.slices,
            s.hits,
            s.misses,
            s.saves,
            s.leases,
            s.connections,
            s.requests
        );
    }
    Ok(ExitCode::SUCCESS)
}
