//! The `socket` suite: control-path round trips over the Unix socket, measured at the client.
//!
//! It saves a working set of small blocks through the host backend (from this process's own
//! memory), then times `lookup` round trips of 1, 64 and 1,024 hashes that all hit (each lease
//! released untimed after the measurement), and runs one client per shard doing 1,024-hash
//! lookups back to back to count hash lookups per second per shard.
//!
//! With `resident_blocks`, that many other blocks are saved first, so that the lookups run
//! against an index of production size rather than one that fits the CPU's caches (the index's
//! hash table then takes TLB and cache misses a small bench would never see).

use crate::report::{Case, Report};
use hdrhistogram::Histogram;
use kvloft_engine::protocol::{LayerMemory, NamespaceSpec};
use kvloft_shard::client::{Client, ClientError};
use std::path::Path;
use std::time::{Duration, Instant};

/// Options of the suite.
#[derive(Debug, Clone)]
pub struct SocketOptions {
    /// Server socket.
    pub socket: std::path::PathBuf,
    /// Timed lookups per batch size.
    pub repetitions: u32,
    /// Untimed lookups before each measurement.
    pub warmup: u32,
    /// Length of the throughput run.
    pub throughput_time: Duration,
    /// Batch sizes to time.
    pub batch_sizes: Vec<usize>,
    /// Clients per shard in the throughput run; more than one overlaps one client's round trip
    /// with another's work, so the run measures the shards rather than one client's latency.
    pub clients_per_shard: usize,
    /// How long each client polls for a reply before it sleeps ([`Client::set_spin`]).
    pub client_spin: Duration,
    /// Whether the clients send lookups and releases through a mailbox
    /// ([`Client::attach_mailbox`]) instead of the socket.
    pub mailbox: bool,
    /// Blocks saved before the working set and never looked up, to give the index a realistic
    /// size.
    pub resident_blocks: u64,
}

impl Default for SocketOptions {
    fn default() -> Self {
        Self {
            socket: kvloft_topology::model::default_socket(),
            repetitions: 2000,
            warmup: 200,
            throughput_time: Duration::from_secs(3),
            batch_sizes: vec![1, 64, 1024],
            clients_per_shard: 2,
            client_spin: Duration::from_micros(100),
            mailbox: false,
            resident_blocks: 0,
        }
    }
}

/// Blocks saved for the suite (the largest batch must fit).
const WORKING_SET_BLOCKS: usize = 4096;
/// Bytes per K or V segment of a block: small, since this suite measures the control path.
const SEGMENT_BYTES: usize = 1024;

/// A deterministic 32-byte block hash for block `i` of run `salt`.
pub fn block_hash(salt: u64, i: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    let mut x = salt ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for _ in 0..4 {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out
}

fn namespace() -> NamespaceSpec {
    NamespaceSpec {
        model: "kvloft-bench".into(),
        dtype: "bfloat16".into(),
        kv_dtype: "auto".into(),
        num_layers: 1,
        num_kv_heads: 1,
        head_size: 64,
        block_size: 16,
        layout: "nhd".into(),
        tp_size: 1,
        pp_size: 1,
        group: 0,
        variant: String::new(),
    }
}

/// A connected client registered as a worker over `memory` (one layer, K and V segments).
fn worker(socket: &Path, instance: &str, memory: &[u8], spin: Duration, mailbox: bool) -> Result<Client, ClientError> {
    let mut c = Client::connect(socket, "kvloft-bench", Duration::from_secs(30))?;
    c.set_spin(spin);
    if mailbox {
        c.attach_mailbox()?;
    }
    c.register_instance(instance, namespace())?;
    let layer = LayerMemory {
        base: memory.as_ptr() as u64,
        num_blocks: WORKING_SET_BLOCKS as u32,
        block_stride: SEGMENT_BYTES as u64,
        segments: 2,
        segment_stride: (WORKING_SET_BLOCKS * SEGMENT_BYTES) as u64,
        segment_bytes: SEGMENT_BYTES as u64,
    };
    c.register_memory(0, vec![layer])?;
    Ok(c)
}

/// Runs the suite against the server at `opts.socket` and returns its report.
pub fn run(opts: &SocketOptions) -> Result<Report, ClientError> {
    let mut report = Report::new("socket");
    let salt = std::process::id() as u64 ^ 0x6b76_6c6f_6674;
    // The "KV cache" the server copies from: K and V halves of WORKING_SET_BLOCKS blocks.
    let memory: Vec<u8> = (0..2 * WORKING_SET_BLOCKS * SEGMENT_BYTES).map(|i| (i % 251) as u8).collect();
    let instance = format!("bench-{salt:x}");
    let mut client = worker(&opts.socket, &instance, &memory, opts.client_spin, opts.mailbox)?;
    let shards = client.server.shards.max(1) as usize;
    // The resident blocks' hashes come from another salt, and their bytes from the same engine
    // blocks as the working set's. They are saved interleaved with the working set, so that the
    // working set's index entries lie scattered among theirs, as they would after hours of
    // traffic.
    let hashes: Vec<Vec<u8>> = (0..WORKING_SET_BLOCKS as u64).map(|i| block_hash(salt, i)).collect();
    let resident_salt = salt ^ 0x7265_7369_6465_6e74;
    let every = opts.resident_blocks / WORKING_SET_BLOCKS as u64 + 1;
    let total = opts.resident_blocks + WORKING_SET_BLOCKS as u64;
    let (mut next_ws, mut next_resident) = (0u64, 0u64);
    let mut order = (0..total).map(|p| {
        let ws = (p % every == 0 && next_ws < WORKING_SET_BLOCKS as u64) || next_resident == opts.resident_blocks;
        if ws {
            next_ws += 1;
            (hashes[next_ws as usize - 1].clone(), (next_ws - 1) as u32)
        } else {
            next_resident += 1;
            let i = next_resident - 1;
            (block_hash(resident_salt, i), (i % WORKING_SET_BLOCKS as u64) as u32)
        }
    });
    let mut saved = 0u64;
    while saved < total {
        let blocks: Vec<(Vec<u8>, u32)> = order.by_ref().take(1024).collect();
        let done = client.save(&blocks)?;
        if done.failed > 0 {
            return Err(ClientError::Decode(format!(
                "saving the working set and resident blocks failed ({:?}); lower --resident-blocks or raise the pool \
                 size",
                done.error
            )));
        }
        saved += blocks.len() as u64;
    }
    // What the index holds while the lookups run (resident blocks may have been evicted).
    let index_slices: u64 = client.stats()?.shards.iter().map(|s| s.slices).sum();

    for &n in &opts.batch_sizes {
        let n = n.min(WORKING_SET_BLOCKS);
        let mut h = Histogram::<u64>::new(3).map_err(|e| ClientError::Decode(e.to_string()))?;
        for r in 0..(opts.warmup + opts.repetitions) {
            let start = (r as usize * 97) % (WORKING_SET_BLOCKS - n + 1);
            let batch = &hashes[start..start + n];
            let t0 = Instant::now();
            let reply = client.lookup(batch)?;
            let ns = t0.elapsed().as_nanos() as u64;
            if reply.hits as usize != n {
                return Err(ClientError::Decode(format!("lookup of {n} saved hashes hit {}", reply.hits)));
            }
            client.release(reply.lease)?;
            if r >= opts.warmup {
                let _ = h.record(ns);
            }
        }
        let mut case = Case { name: format!("lookup_{n}"), ..Case::default() }.with_latency(&h);
        case.params.insert("hashes".into(), n.into());
        case.params.insert("shards".into(), shards.into());
        case.params.insert("hits".into(), n.into());
        case.params.insert("client_spin_us".into(), (opts.client_spin.as_micros() as u64).into());
        case.params.insert("mailbox".into(), opts.mailbox.into());
        case.params.insert("resident_blocks".into(), opts.resident_blocks.into());
        case.params.insert("index_slices".into(), index_slices.into());
        report.cases.push(case);
    }

    // Throughput: `clients_per_shard` clients per shard, 1,024-hash lookups that all hit, each
    // lease released.
    let clients = shards * opts.clients_per_shard.max(1);
    let n = 1024.min(WORKING_SET_BLOCKS);
    let deadline = opts.throughput_time;
    let results: Vec<Result<(u64, Duration), ClientError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|t| {
                let (hashes, memory, instance, socket, spin, mailbox) =
                    (&hashes, &memory, &instance, &opts.socket, opts.client_spin, opts.mailbox);
                s.spawn(move || -> Result<(u64, Duration), ClientError> {
                    let mut c = worker(socket, instance, memory, spin, mailbox)?;
                    let (t0, mut looked_up, mut r) = (Instant::now(), 0u64, t);
                    while t0.elapsed() < deadline {
                        let start = (r * 131) % (WORKING_SET_BLOCKS - n + 1);
                        let reply = c.lookup(&hashes[start..start + n])?;
                        c.release(reply.lease)?;
                        looked_up += n as u64;
                        r += 1;
                    }
                    Ok((looked_up, t0.elapsed()))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(ClientError::Decode("client panicked".into()))))
            .collect()
    });
    let mut total = 0u64;
    let mut longest = Duration::ZERO;
    for r in results {
        let (n, d) = r?;
        total += n;
        longest = longest.max(d);
    }
    let per_shard = total as f64 / longest.as_secs_f64() / shards as f64;
    let mut case = Case { name: "lookup_throughput".into(), samples: total, ..Case::default() };
    case.ops_per_s = Some(per_shard);
    case.params.insert("hashes_per_lookup".into(), n.into());
    case.params.insert("clients".into(), clients.into());
    case.params.insert("shards".into(), shards.into());
    case.params.insert("client_spin_us".into(), (opts.client_spin.as_micros() as u64).into());
    case.params.insert("unit".into(), "hash lookups per second per shard (lookup + release)".into());
    case.params.insert("mailbox".into(), opts.mailbox.into());
    case.params.insert("resident_blocks".into(), opts.resident_blocks.into());
    case.params.insert("index_slices".into(), index_slices.into());
    report.cases.push(case);
    Ok(report)
}
