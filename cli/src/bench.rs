//! `kvloft bench SUITE`.

use anyhow::Context;
use kvloft_bench::server::OwnServer;
use kvloft_bench::socket::{self, SocketOptions};
use kvloft_bench::ssd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// `kvloft bench` suites.
#[derive(Debug, clap::Subcommand)]
pub enum Suite {
    /// Control path: lookup round trips (1, 64, 1,024 hashes) and lookups per second per shard.
    Socket {
        /// A running server's socket; without it the bench starts its own server.
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Topology file for the server the bench starts.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Timed lookups per batch size.
        #[arg(long, default_value_t = 2000)]
        repetitions: u32,
        /// Seconds of the throughput run.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Clients per shard in the throughput run.
        #[arg(long, default_value_t = 2)]
        clients_per_shard: usize,
        /// Microseconds each client polls for a reply before it sleeps (0: sleep at once).
        #[arg(long, default_value_t = 100)]
        client_spin_us: u64,
        /// Sends lookups and releases through a shared-memory mailbox instead of the socket
        /// (`attach_mailbox`, decision 47).
        #[arg(long)]
        mailbox: bool,
        /// Blocks saved before the timed lookups and never looked up, so that they run against
        /// an index of production size (2 KiB of pool each)
        #[arg(long, default_value_t = 0, value_name = "N")]
        resident_blocks: u64,
        /// Where to write the JSON result.
        #[arg(long, value_name = "FILE", default_value = "bench-socket.json")]
        out: PathBuf,
        /// Also writes a chart of p50 and p99 latency per batch size (`.svg` or `.png`).
        #[arg(long, value_name = "FILE")]
        plot: Option<PathBuf>,
    },
    /// Save path: scattered KV blocks from engine memory into pool pages, through the server and
    /// in-process, against a contiguous copy of the same bytes.
    D2h(kvloft_bench::copy::CopyArgs),
    /// Load path: scattered KV blocks from pool pages into engine memory, through the server and
    /// in-process, against a contiguous copy of the same bytes.
    H2d(kvloft_bench::copy::CopyArgs),
    /// GPU path: scattered KV blocks between GPU memory and pinned pool pages with the cuda
    /// backend (copy kernel and DMA), every layout, verified, against a contiguous copy.
    Gpu(kvloft_bench::gpu::GpuArgs),
    /// Measures this machine's copy curves (GB/s by block size and method) for the topology
    /// file's [calibration] section.
    Calibrate(kvloft_bench::calibrate::CalibrateArgs),
    /// Raw io_uring random writes and reads (O_DIRECT and buffered) on a file or block device,
    /// swept over queue depth and block size.
    Ssd {
        /// A directory (a temporary test file is made in it and removed after), a new or existing
        /// file, or a block device. Default: a temporary file in /tmp.
        #[arg(long, value_name = "PATH")]
        path: Option<PathBuf>,
        /// Bytes the cases use: the size of a new test file (default 1GiB), or the leading region
        /// of an existing file or device (default all of it).
        #[arg(long, value_name = "SIZE", value_parser = ssd::parse_size)]
        file_size: Option<u64>,
        /// Allows the write cases on an existing file or a block device (never a mounted one).
        #[arg(long)]
        allow_write: bool,
        /// Queue depths: operations kept in flight.
        #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "1,2,4,8,16,32,64")]
        qd: Vec<usize>,
        /// Batches in flight (e.g. `1,2,4`): each of N submitters issues a batch of `qd`
        /// operations at once and waits for the whole batch; latency is per batch. Without it,
        /// `qd` tasks each keep one operation in flight (per-operation latency).
        #[arg(long, value_name = "LIST", value_delimiter = ',', num_args = 0..=1, default_missing_value = "1")]
        inflight: Option<Vec<usize>>,
        /// Block sizes (4K, 16KiB, 1M, 4096: K, M, G are binary).
        #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = ssd::parse_size)]
        #[arg(default_value = "4K,16K,64K,256K,1M")]
        block_sizes: Vec<u64>,
        /// Modes: direct (O_DIRECT), buffered (page cache).
        #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "direct,buffered")]
        modes: Vec<ssd::Mode>,
        /// Operations: write, read.
        #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "write,read")]
        ops: Vec<ssd::Op>,
        /// Seconds of each case's timed phase.
        #[arg(long, default_value_t = 0.4)]
        seconds_per_case: f64,
        /// Seconds of each case's untimed warm-up.
        #[arg(long, default_value_t = 0.04)]
        warmup_seconds: f64,
        /// Ends a case's timed phase after this many operations, if that comes first.
        #[arg(long, value_name = "N")]
        max_ops_per_case: Option<u64>,
        /// CPU the executor is pinned to (default: the last online CPU).
        #[arg(long)]
        cpu: Option<usize>,
        /// Where to write the JSON result.
        #[arg(long, value_name = "FILE", default_value = "bench-ssd.json")]
        out: PathBuf,
        /// Also writes a chart: GB/s, IOPS and p99 against queue depth (`.svg` or `.png`).
        #[arg(long, value_name = "FILE")]
        plot: Option<PathBuf>,
    },
}

/// Runs a suite and writes its JSON result.
pub fn run(suite: &Suite) -> anyhow::Result<ExitCode> {
    match suite {
        Suite::D2h(args) | Suite::H2d(args) => {
            use kvloft_topology::model::CopyDirection;
            let direction = if matches!(suite, Suite::D2h(_)) { CopyDirection::D2h } else { CopyDirection::H2d };
            kvloft_bench::copy::main(direction, args, std::env::current_exe()?)?;
            Ok(ExitCode::SUCCESS)
        }
        Suite::Gpu(args) => {
            kvloft_bench::gpu::main(args)?;
            Ok(ExitCode::SUCCESS)
        }
        Suite::Calibrate(args) => {
            kvloft_bench::calibrate::main(args)?;
            Ok(ExitCode::SUCCESS)
        }
        Suite::Socket {
            socket,
            config,
            repetitions,
            seconds,
            clients_per_shard,
            client_spin_us,
            mailbox,
            resident_blocks,
            out,
            plot,
        } => {
            let mut own = None;
            let socket = match socket {
                Some(s) => s.clone(),
                None => {
                    let exe = std::env::current_exe()?;
                    // Room for the working set and the resident blocks (2 KiB each), twice over.
                    let pool = (256u64 << 20).saturating_add(resident_blocks.saturating_mul(4096));
                    let server = OwnServer::start(&exe, config.as_deref(), pool, false)?;
                    let s = server.socket().to_path_buf();
                    own = Some(server);
                    s
                }
            };
            let opts = SocketOptions {
                socket,
                repetitions: *repetitions,
                throughput_time: Duration::from_secs_f64(*seconds),
                clients_per_shard: *clients_per_shard,
                client_spin: Duration::from_micros(*client_spin_us),
                mailbox: *mailbox,
                resident_blocks: *resident_blocks,
                ..SocketOptions::default()
            };
            let report = socket::run(&opts).context("the socket suite failed")?;
            drop(own);
            report.write(out).with_context(|| format!("cannot write {}", out.display()))?;
            println!("{:<20} {:>10} {:>10} {:>10} {:>14}", "case", "p50 us", "p99 us", "max us", "ops/s/shard");
            for c in &report.cases {
                let f = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
                println!(
                    "{:<20} {:>10} {:>10} {:>10} {:>14}",
                    c.name,
                    f(c.p50_us),
                    f(c.p99_us),
                    f(c.max_us),
                    f(c.ops_per_s)
                );
            }
            println!("wrote {}", out.display());
            write_plot(&report, &kvloft_bench::plot::socket_spec(&report), plot.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Suite::Ssd {
            path,
            file_size,
            allow_write,
            qd,
            inflight,
            block_sizes,
            modes,
            ops,
            seconds_per_case,
            warmup_seconds,
            max_ops_per_case,
            cpu,
            out,
            plot,
        } => {
            let opts = ssd::SsdOptions {
                path: path.clone(),
                file_size: *file_size,
                allow_write: *allow_write,
                qds: qd.clone(),
                inflights: inflight.clone(),
                block_sizes: block_sizes.clone(),
                modes: modes.clone(),
                ops: ops.clone(),
                seconds_per_case: Duration::from_secs_f64(*seconds_per_case),
                warmup: Duration::from_secs_f64(*warmup_seconds),
                max_ops_per_case: *max_ops_per_case,
                cpu: *cpu,
                progress: true,
            };
            let report = ssd::run(&opts).context("the ssd suite failed")?;
            report.write(out).with_context(|| format!("cannot write {}", out.display()))?;
            ssd::print_table(&report);
            println!("wrote {}", out.display());
            write_plot(&report, &ssd::plot_spec(&report), plot.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Writes the chart of `report` to `path`, when given.
fn write_plot(
    report: &kvloft_bench::report::Report,
    spec: &kvloft_bench::plot::PlotSpec,
    path: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    if let Some(path) = path {
        kvloft_bench::plot::plot(report, spec, path)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
