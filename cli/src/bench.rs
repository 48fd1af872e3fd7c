//! `kvloft bench SUITE`.

use anyhow::Context;
use kvloft_bench::socket::{self, SocketOptions};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

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
        /// Where to write the JSON result.
        #[arg(long, value_name = "FILE", default_value = "bench-socket.json")]
        out: PathBuf,
    },
}

/// Runs a suite and writes its JSON result.
pub fn run(suite: &Suite) -> anyhow::Result<ExitCode> {
    match suite {
        Suite::Socket { socket, config, repetitions, seconds, out } => {
            let mut own = None;
            let socket = match socket {
                Some(s) => s.clone(),
                None => {
                    let server = OwnServer::start(config.as_ref())?;
                    let s = server.socket.clone();
                    own = Some(server);
                    s
                }
            };
            let opts = SocketOptions {
                socket,
                repetitions: *repetitions,
                throughput_time: Duration::from_secs_f64(*seconds),
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
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A `kvloft serve` child on a private socket, stopped with SIGTERM when dropped.
struct OwnServer {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl OwnServer {
    fn start(config: Option<&PathBuf>) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("kvloft-bench").tempdir_in("/tmp")?;
        let socket = dir.path().join("kvloft.sock");
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("serve").arg("--socket").arg(&socket).args(["--metrics-addr", "off", "--pool-size", "256MiB"]);
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::inherit()).spawn().context("cannot start kvloft serve")?;
        let server = Self { child, socket, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if kvloft_shard::client::Client::connect(&server.socket, "kvloft-bench", Duration::from_secs(5)).is_ok() {
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        anyhow::bail!("the bench's server did not start within 30 s")
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}
