//! The `kvloft` binary: `serve` runs the shards, `topology` prints or checks a topology file,
//! `stats` asks a running server for its figures.
#![deny(unsafe_code)]

mod bench;
mod serve;
mod stats;
mod topology;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's allocator: shards hand vectors to each other in messages, and
/// glibc frees a block into the arena of the thread that allocated it, under that arena's lock.
/// With 8 shards, a third of the server's CPU went to those locks and their futex waits
/// (decision 50).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::path::PathBuf;
use std::process::ExitCode;

/// kvloft: a KV-cache storage and transfer engine for LLM inference.
#[derive(Debug, Parser)]
#[command(name = "kvloft", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the server: one pinned shard per configured core, listening on a Unix socket.
    Serve(serve::Args),
    /// Print this machine's topology as an editable TOML file, or check a file with --check.
    Topology {
        /// Validate FILE against this machine instead of printing; exits 1 with the errors.
        #[arg(long, value_name = "FILE")]
        check: Option<PathBuf>,
    },
    /// Show a running server's shards, their cores and NUMA nodes, uptime and store figures.
    Stats(stats::Args),
    /// Run a benchmark suite and write its JSON result.
    #[command(subcommand)]
    Bench(bench::Suite),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(&args),
        Command::Topology { check } => topology::run(check.as_deref()),
        Command::Stats(args) => stats::run(&args),
        Command::Bench(suite) => bench::run(&suite),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kvloft: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
