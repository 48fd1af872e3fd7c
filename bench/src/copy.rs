//! The `d2h` and `h2d` suites: scattered KV blocks between an inference engine's memory and
//! pinned pool pages, through kvloft's own copy path, judged against a contiguous copy of the
//! same bytes between the same two memories measured in the same run.
//!
//! The "engine" is this process: it allocates a KV cache laid out like vLLM's (per layer one
//! tensor `[2, num_blocks, block_bytes]`: the K plane, then the V plane) and fills it with a
//! pattern that differs at every byte offset. A batch is `batch` blocks at random block ids; one
//! block's slice is `2 * layers * block_bytes` bytes.
//!
//! For every block size and batch size the suite measures, on a thread placed by `--node`/`--cpu`:
//!
//! - `path=direct`: [`HostMemory::save_into`] (d2h) or [`HostMemory::load_from`] (h2d) between the
//!   cache and an [`Arena`] in this process: the copy alone, no socket;
//! - the ceilings, interleaved with the direct copies round by round: `process_vm` moves the same
//!   number of bytes as one contiguous range between the start of the cache and the arena with
//!   `process_vm_readv`/`writev` (the kernel call the host backend uses), `memcpy` moves them
//!   with one `memcpy`;
//! - `path=server`: the full server path over the Unix socket. d2h: `save` of a batch of fresh
//!   hashes, timed from the request to `save_done`. h2d: the batch saved once, then `lookup` +
//!   `load` into other scattered block ids, timed from the lookup request to `load_done`.
//!
//! Every direct and server case checks the bytes once (a verification round before the timed
//! ones): saved slices against the cache, and loaded blocks, poisoned first, against the blocks
//! they were saved from.
//!
//! Figures: GB/s is 10^9 bytes of KV moved per second over all timed rounds (bytes / summed
//! time); p50/p99 are per batch. `ceiling_gbps` is the contiguous `process_vm` ceiling and `ratio`
//! is `gbps / ceiling_gbps`; the memcpy ceiling and ratio are in `params`.
//!
//! The host backend is the only one: on a machine without an NVIDIA GPU the suite says so, and
//! with one it says that the `cuda` backend does not exist yet.

use crate::placement::{self, PlacementError, ThreadPlacement};
use crate::report::{Case, Report};
use crate::server::{BenchServer, ServerError, ServerMode};
use hdrhistogram::Histogram;
use kvloft_engine::protocol::{LayerMemory, NamespaceSpec};
use kvloft_gpu::{Arena, ArenaError, HostError, HostMemory};
use kvloft_shard::client::{Client, ClientError};
use kvloft_topology::model::CopyDirection;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Default block sizes (bytes per layer per K/V segment).
pub const DEFAULT_BLOCK_BYTES: [u64; 3] = [4 << 10, 16 << 10, 64 << 10];
/// Default batch sizes (blocks per save or load).
pub const DEFAULT_BATCHES: [usize; 3] = [64, 256, 1024];
/// Default layer count.
pub const DEFAULT_LAYERS: u32 = 32;
/// Default cap on the bytes of one batch; larger cases are skipped.
pub const DEFAULT_MAX_BATCH_BYTES: u64 = 1 << 30;
/// Bytes each timed path moves per case when the repetitions are chosen automatically.
pub const AUTO_BYTES_PER_CASE: u64 = 2 << 30;
/// Fewest and most automatic repetitions.
pub const AUTO_REPETITIONS: (u32, u32) = (5, 200);

/// Why a suite run failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CopyError {
    /// `--node` or `--cpu` cannot be used.
    #[error(transparent)]
    Placement(#[from] PlacementError),
    /// Discovery failed.
    #[error("cannot discover this machine: {0}")]
    Discover(String),
    /// The pool arena could not be made.
    #[error("pool arena: {0}")]
    Arena(#[from] ArenaError),
    /// A host copy failed.
    #[error("host copy: {0}")]
    Host(#[from] HostError),
    /// The bench's server did not start.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// A protocol call failed.
    #[error("server path: {0}")]
    Client(#[from] ClientError),
    /// The server answered, but not with what the bench asked for.
    #[error("server path: {0}")]
    ServerPath(String),
    /// Copied bytes differ from their source.
    #[error("verification failed: {0}")]
    Verify(String),
    /// Options that cannot run.
    #[error("{0}")]
    Invalid(String),
    /// The topology file cannot take the calibration (its diagnostics).
    #[error("{0}")]
    Topology(String),
    /// The result file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Options of the `d2h` and `h2d` suites.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    /// `d2h` (save) or `h2d` (load).
    pub direction: CopyDirection,
    /// Bytes per layer per K/V segment of one block, one case group each.
    pub block_bytes: Vec<u64>,
    /// Layer counts of the fake KV cache, one case group each.
    pub layers: Vec<u32>,
    /// Blocks per batch, one case each.
    pub batches: Vec<usize>,
    /// Timed rounds per case; `None` picks them so each path moves about
    /// [`AUTO_BYTES_PER_CASE`] bytes, within [`AUTO_REPETITIONS`].
    pub repetitions: Option<u32>,
    /// Untimed rounds before the timed ones (after the verification round).
    pub warmup: u32,
    /// Back the arena (and the pool of a server the bench starts) with hugepages where reserved.
    pub hugepages: bool,
    /// NUMA node of the arena and of the measuring thread.
    pub node: Option<u32>,
    /// CPU the measuring thread is pinned to.
    pub cpu: Option<u32>,
    /// Cases whose batch is larger than this are skipped.
    pub max_batch_bytes: u64,
    /// Where `path=server` finds its server.
    pub server: ServerMode,
    /// Print notes and one line per case to stdout while running.
    pub print: bool,
}

impl CopyOptions {
    /// The default sweep for `direction`, against servers the bench starts from `exe`.
    pub fn new(direction: CopyDirection, server: ServerMode) -> Self {
        Self {
            direction,
            block_bytes: DEFAULT_BLOCK_BYTES.to_vec(),
            layers: vec![DEFAULT_LAYERS],
            batches: DEFAULT_BATCHES.to_vec(),
            repetitions: None,
            warmup: 2,
            hugepages: false,
            node: None,
            cpu: None,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            server,
            print: false,
        }
    }
}

/// What a run produced: the report and the notes it printed (backend, placement, skipped cases).
#[derive(Debug)]
pub struct CopyRun {
    /// The result file's content.
    pub report: Report,
    /// Remarks about the run.
    pub notes: Vec<String>,
}

/// The line saying which backend is measured, from the GPUs of this machine.
pub fn backend_note(gpus: &[String]) -> String {
    match gpus.first() {
        None => "no GPU: measuring the host backend".into(),
        Some(g) => format!(
            "GPU found ({g}): these suites measure the host backend; `kvloft bench gpu` and \
             scripts/device/gpu_roundtrip.py measure the cuda backend"
        ),
    }
}

/// Runs the `d2h` or `h2d` suite.
pub fn run(opts: &CopyOptions) -> Result<CopyRun, CopyError> {
    if opts.layers.is_empty() || opts.layers.contains(&0) || opts.block_bytes.contains(&0) || opts.batches.contains(&0)
    {
        return Err(CopyError::Invalid("--layers, --block-bytes and --batch must be positive".into()));
    }
    if opts.repetitions == Some(0) {
        return Err(CopyError::Invalid("--repetitions must be at least 1".into()));
    }
    let machine = kvloft_topology::discover().map_err(|e| CopyError::Discover(e.to_string()))?;
    let place = placement::resolve(&machine, opts.node, opts.cpu)?;
    let suite = opts.direction.as_str();
    let mut report = Report::new(suite);
    let mut notes = vec![backend_note(&report.machine.gpus)];
    notes.extend(place.notes.iter().cloned());
    let say = |line: &str| {
        if opts.print {
            println!("{line}");
        }
    };
    notes.iter().for_each(|n| say(n));
    if opts.print {
        println!(
            "{:<38} {:>9} {:>9} {:>7} {:>9} {:>6} {:>6}",
            "case", "p50 ms", "p99 ms", "GB/s", "ceil GB/s", "ratio", "memcpy"
        );
    }
    let (mut arena_noted, mut server_noted) = (false, false);
    let geometries = opts.layers.iter().flat_map(|&layers| {
        opts.block_bytes.iter().flat_map(move |&block_bytes| {
            opts.batches.iter().map(move |&batch| Geometry { layers, block_bytes: block_bytes as usize, batch })
        })
    });
    for geometry in geometries {
        let total = geometry.batch_bytes();
        if total > opts.max_batch_bytes || geometry.batch > kvloft_gpu::host::MAX_ITEMS {
            let note = format!(
                "skipped {}: a batch of {} blocks of {} is {} bytes, over --max-batch-bytes {}",
                geometry.label(suite, "*"),
                geometry.batch,
                size_label(geometry.block_bytes as u64),
                total,
                opts.max_batch_bytes
            );
            say(&note);
            notes.push(note);
            continue;
        }
        let cases = run_case(opts, &place, geometry)?;
        // Arena and server remarks (hugepage fallback, NUMA binding): printed once per run.
        for (key, seen) in [("arena_notes", &mut arena_noted), ("server_notes", &mut server_noted)] {
            let found = cases.iter().find_map(|c| c.params.get(key)).and_then(serde_json::Value::as_array);
            if let (false, Some(lines)) = (*seen, found) {
                *seen = true;
                for line in lines.iter().filter_map(serde_json::Value::as_str) {
                    let line = format!("{}: {line}", if key == "arena_notes" { "arena" } else { "server" });
                    say(&line);
                    notes.push(line);
                }
            }
        }
        for c in &cases {
            say(&case_line(c));
        }
        report.cases.extend(cases);
    }
    Ok(CopyRun { report, notes })
}

/// One line of the progress table.
pub fn case_line(c: &Case) -> String {
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{:.3}", v / 1000.0));
    let f = |v: Option<f64>, p: usize| v.map_or_else(|| "-".to_string(), |v| format!("{v:.p$}"));
    let memcpy = c.params.get("memcpy_ratio").and_then(serde_json::Value::as_f64);
    format!(
        "{:<38} {:>9} {:>9} {:>7} {:>9} {:>6} {:>6}",
        c.name,
        ms(c.p50_us),
        ms(c.p99_us),
        f(c.gbps, 2),
        f(c.ceiling_gbps, 2),
        f(c.ratio, 3),
        f(memcpy, 3)
    )
}

/// Shape of one case.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    layers: u32,
    block_bytes: usize,
    batch: usize,
}

impl Geometry {
    fn slice_bytes(&self) -> usize {
        2 * self.layers as usize * self.block_bytes
    }

    fn batch_bytes(&self) -> u64 {
        (self.slice_bytes() as u64).saturating_mul(self.batch as u64)
    }

    fn label(&self, suite: &str, path: &str) -> String {
        format!("{suite}_{path}_{}_l{}_b{}", size_label(self.block_bytes as u64), self.layers, self.batch)
    }

    fn repetitions(&self, asked: Option<u32>) -> u32 {
        asked.unwrap_or_else(|| {
            let n = AUTO_BYTES_PER_CASE.div_ceil(self.batch_bytes().max(1));
            n.clamp(u64::from(AUTO_REPETITIONS.0), u64::from(AUTO_REPETITIONS.1)) as u32
        })
    }
}

/// `4k`, `16k`, `1m`, or a byte count.
pub fn size_label(bytes: u64) -> String {
    for (shift, unit) in [(30, "g"), (20, "m"), (10, "k")] {
        if bytes >= 1 << shift && bytes % (1 << shift) == 0 {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// Timings of one measured operation.
#[derive(Debug)]
pub(crate) struct Timings {
    pub(crate) hist: Histogram<u64>,
    sum_ns: u128,
}

impl Timings {
    pub(crate) fn new() -> Self {
        Self { hist: Histogram::new(3).expect("3 significant digits is a valid histogram"), sum_ns: 0 }
    }

    pub(crate) fn record(&mut self, d: Duration) {
        let ns = d.as_nanos();
        self.sum_ns += ns;
        let _ = self.hist.record(ns.min(u128::from(u64::MAX)) as u64);
    }

    pub(crate) fn samples(&self) -> u64 {
        self.hist.len()
    }

    /// 10^9 bytes per second over every recorded operation of `bytes_each`.
    pub(crate) fn gbps(&self, bytes_each: u64) -> f64 {
        if self.sum_ns == 0 {
            return 0.0;
        }
        (bytes_each as f64 * self.samples() as f64) / self.sum_ns as f64
    }

    /// 10^9 bytes per second of the median operation.
    pub(crate) fn median_gbps(&self, bytes_each: u64) -> f64 {
        let ns = self.hist.value_at_quantile(0.5).max(1);
        bytes_each as f64 / ns as f64
    }

    fn case(&self, name: String, bytes_each: u64) -> Case {
        let mut c = Case { name, ..Case::default() }.with_latency(&self.hist);
        c.gbps = Some(self.gbps(bytes_each));
        c
    }
}

/// A small deterministic generator (xorshift64*), enough to scatter block ids.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// `0..n` in random order.
    pub(crate) fn permutation(&mut self, n: u32) -> Vec<u32> {
        let mut v: Vec<u32> = (0..n).collect();
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
        v
    }
}

/// A page-aligned, pattern-filled buffer of this process, first touched by the calling thread.
#[derive(Debug)]
pub(crate) struct PageBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl PageBuf {
    pub(crate) const ALIGN: usize = 4096;

    /// `len` bytes where the 8-byte word at offset `o` holds `pattern_word(seed, o)`.
    pub(crate) fn patterned(len: usize, seed: u64) -> Self {
        let raw = vec![0u8; len + Self::ALIGN];
        let start = raw.as_ptr().align_offset(Self::ALIGN).min(Self::ALIGN);
        let mut b = Self { raw, start, len };
        for (i, word) in b.bytes_mut().chunks_mut(8).enumerate() {
            let w = pattern_word(seed, i as u64 * 8).to_le_bytes();
            word.copy_from_slice(&w[..word.len()]);
        }
        b
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }

    pub(crate) fn addr(&self) -> u64 {
        self.bytes().as_ptr() as u64
    }
}

/// The pattern word at byte offset `offset` (distinct for every offset of one buffer).
pub(crate) fn pattern_word(seed: u64, offset: u64) -> u64 {
    let mut z = seed ^ offset.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z ^ (z >> 31) ^ offset
}

/// Byte that loaded blocks are overwritten with before a checked load.
const POISON: u8 = 0xa5;

/// The fake engine KV cache: `layers` tensors `[2, num_blocks, block_bytes]`, one after another in
/// one page-aligned allocation.
#[derive(Debug)]
struct EngineCache {
    buf: PageBuf,
    layers: usize,
    num_blocks: usize,
    block_bytes: usize,
}

impl EngineCache {
    fn new(layers: u32, num_blocks: u32, block_bytes: usize, seed: u64) -> Self {
        let (layers, num_blocks) = (layers as usize, num_blocks as usize);
        let buf = PageBuf::patterned(layers * 2 * num_blocks * block_bytes, seed);
        Self { buf, layers, num_blocks, block_bytes }
    }

    fn layer_bytes(&self) -> usize {
        2 * self.num_blocks * self.block_bytes
    }

    fn offset(&self, layer: usize, segment: usize, block: u32) -> usize {
        layer * self.layer_bytes() + segment * self.num_blocks * self.block_bytes + block as usize * self.block_bytes
    }

    fn segment(&self, layer: usize, segment: usize, block: u32) -> &[u8] {
        let o = self.offset(layer, segment, block);
        &self.buf.bytes()[o..o + self.block_bytes]
    }

    /// What `register_memory` and [`HostMemory::new`] take: K plane then V plane per layer.
    fn layer_memory(&self) -> Vec<LayerMemory> {
        (0..self.layers)
            .map(|l| LayerMemory {
                base: self.buf.addr() + (l * self.layer_bytes()) as u64,
                num_blocks: self.num_blocks as u32,
                block_stride: self.block_bytes as u64,
                segments: 2,
                segment_stride: (self.num_blocks * self.block_bytes) as u64,
                segment_bytes: self.block_bytes as u64,
            })
            .collect()
    }

    fn poison(&mut self, blocks: &[u32]) {
        for &b in blocks {
            for l in 0..self.layers {
                for s in 0..2 {
                    let o = self.offset(l, s, b);
                    self.buf.bytes_mut()[o..o + self.block_bytes].fill(POISON);
                }
            }
        }
    }

    /// Checks that every `dst[i]` holds the bytes of `src[i]`; returns the blocks checked.
    fn verify_copies(&self, src: &[u32], dst: &[u32]) -> Result<usize, CopyError> {
        for (&s, &d) in src.iter().zip(dst) {
            for l in 0..self.layers {
                for seg in 0..2 {
                    if self.segment(l, seg, s) != self.segment(l, seg, d) {
                        return Err(CopyError::Verify(format!(
                            "engine block {d} (layer {l}, segment {seg}) does not hold the bytes of block {s} it was \
                             loaded from"
                        )));
                    }
                }
            }
        }
        Ok(src.len())
    }

    /// Checks that each slot of the arena holds the slice of its block: every layer, K then V.
    fn verify_slots(&self, arena: &Arena, items: &[(u32, u64)]) -> Result<usize, CopyError> {
        let mut buf = vec![0u8; self.block_bytes];
        for &(block, slot) in items {
            let mut at = slot;
            for l in 0..self.layers {
                for seg in 0..2 {
                    arena.read(at, &mut buf)?;
                    if buf != self.segment(l, seg, block) {
                        return Err(CopyError::Verify(format!(
                            "the pool slot at {slot} does not hold layer {l}, segment {seg} of engine block {block}"
                        )));
                    }
                    at += self.block_bytes as u64;
                }
            }
        }
        Ok(items.len())
    }
}

/// The parameters every case of one geometry shares.
fn base_params(opts: &CopyOptions, place: &ThreadPlacement, g: Geometry, path: &str, method: &str) -> Case {
    let mut c = Case::default();
    let p = &mut c.params;
    p.insert("backend".into(), "host".into());
    p.insert("direction".into(), opts.direction.as_str().into());
    p.insert("path".into(), path.into());
    p.insert("method".into(), method.into());
    p.insert("block_bytes".into(), g.block_bytes.into());
    p.insert("layers".into(), g.layers.into());
    p.insert("batch".into(), g.batch.into());
    p.insert("slice_bytes".into(), g.slice_bytes().into());
    p.insert("batch_bytes".into(), g.batch_bytes().into());
    p.insert("engine_blocks".into(), (2 * g.batch).into());
    p.insert("hugepages".into(), opts.hugepages.into());
    for (k, v) in place.params() {
        p.insert(k.into(), v);
    }
    c
}

/// What the direct phase of a case measured.
struct DirectPhase {
    direct: Timings,
    ceiling_pv: Timings,
    ceiling_memcpy: Timings,
    verified: usize,
    hugepages_effective: bool,
    arena_node: Option<u32>,
    arena_notes: Vec<String>,
}

/// The chart of a d2h or h2d report: GB/s and p99 per batch size, one line per block size, one
/// chart per path (server, direct) and ceiling.
pub fn plot_spec(report: &Report) -> crate::plot::PlotSpec {
    use crate::plot::{Figure, PlotSpec, Row};
    PlotSpec {
        title: format!(
            "kvloft bench {}: scattered KV blocks through the host backend ({}, {})",
            report.suite, report.machine.hostname, report.started_at
        ),
        x_param: "batch".into(),
        x_label: "blocks per batch".into(),
        x_log2: true,
        group_by: vec!["block_bytes".into()],
        legend_title: "bytes per K/V segment".into(),
        panel_by: vec!["path".into(), "method".into()],
        rows: vec![
            Row { figures: vec![Figure::Gbps], y_log: false, y_label: "GB/s".into() },
            Row { figures: vec![Figure::P99Us], y_log: true, y_label: "p99 per batch (µs)".into() },
        ],
    }
}

/// Runs one geometry: the direct phase and the ceilings on the measuring thread, then the server
/// path (its server started from the calling thread, so that it does not inherit the pinning).
fn run_case(opts: &CopyOptions, place: &ThreadPlacement, g: Geometry) -> Result<Vec<Case>, CopyError> {
    let suite = opts.direction.as_str();
    let reps = g.repetitions(opts.repetitions);
    let num_blocks = u32::try_from(2 * g.batch).map_err(|_| CopyError::Invalid("--batch is too large".into()))?;
    let seed = std::process::id() as u64 ^ (g.block_bytes as u64) << 20 ^ g.batch as u64;
    let mut ids = Rng::new(seed).permutation(num_blocks);
    let dst = ids.split_off(g.batch);
    let src = ids;
    let (mut cache, phase) = placement::run_on(place.cpu, || -> Result<_, CopyError> {
        let mut cache = EngineCache::new(g.layers, num_blocks, g.block_bytes, seed);
        let phase = direct_phase(opts, place, g, reps, &mut cache, &src, &dst)?;
        Ok((cache, phase))
    })??;

    let bytes = g.batch_bytes();
    let ceiling = phase.ceiling_pv.gbps(bytes);
    let memcpy_ceiling = phase.ceiling_memcpy.gbps(bytes);
    let finish = |mut c: Case, t: &Timings, name: String, verified: Option<usize>| {
        let m = t.case(name, bytes);
        c.name = m.name;
        c.samples = m.samples;
        (c.p50_us, c.p90_us, c.p99_us, c.max_us, c.gbps) = (m.p50_us, m.p90_us, m.p99_us, m.max_us, m.gbps);
        c.params.insert("median_gbps".into(), t.median_gbps(bytes).into());
        // The bench's own arena; a server's pool is described by `server_notes`.
        if c.params.get("path").and_then(serde_json::Value::as_str) != Some("server") {
            c.params.insert("hugepages_effective".into(), phase.hugepages_effective.into());
            c.params.insert("arena_node".into(), phase.arena_node.map_or(serde_json::Value::Null, Into::into));
            if !phase.arena_notes.is_empty() {
                c.params.insert("arena_notes".into(), phase.arena_notes.clone().into());
            }
        }
        if let Some(v) = verified {
            let gbps = c.gbps.unwrap_or(0.0);
            c.ceiling_gbps = Some(ceiling);
            c.ratio = Some(if ceiling > 0.0 { gbps / ceiling } else { 0.0 });
            c.params.insert("memcpy_ceiling_gbps".into(), memcpy_ceiling.into());
            c.params
                .insert("memcpy_ratio".into(), (if memcpy_ceiling > 0.0 { gbps / memcpy_ceiling } else { 0.0 }).into());
            c.params.insert("verified_blocks".into(), v.into());
        }
        c
    };
    let mut cases = vec![
        finish(
            base_params(opts, place, g, "direct", "process_vm"),
            &phase.direct,
            g.label(suite, "direct"),
            Some(phase.verified),
        ),
        finish(
            base_params(opts, place, g, "ceiling", "process_vm_contiguous"),
            &phase.ceiling_pv,
            g.label(suite, "ceiling-process_vm"),
            None,
        ),
        finish(
            base_params(opts, place, g, "ceiling", "memcpy_contiguous"),
            &phase.ceiling_memcpy,
            g.label(suite, "ceiling-memcpy"),
            None,
        ),
    ];

    // Pool for a server the bench starts: the batch with room for uneven spread over shards.
    let pool_bytes = (bytes + bytes / 2 + (64 << 20)).max(256 << 20).next_multiple_of(2 << 20);
    if let Some(server) = BenchServer::start(&opts.server, pool_bytes, opts.hugepages)? {
        let socket = server.socket().to_path_buf();
        let sp = placement::run_on(place.cpu, || server_phase(opts, g, reps, &mut cache, &src, &dst, &socket, seed))??;
        let mut c = finish(
            base_params(opts, place, g, "server", "process_vm"),
            &sp.timings,
            g.label(suite, "server"),
            Some(sp.verified),
        );
        c.params.insert("server".into(), server.kind().into());
        c.params.insert("server_shards".into(), sp.shards.into());
        if !matches!(server, BenchServer::External(_)) {
            c.params.insert("server_pool_bytes".into(), pool_bytes.into());
        }
        let remarks = server.remarks();
        if !remarks.is_empty() {
            c.params.insert("server_notes".into(), remarks.into());
        }
        if let Some(lookup) = sp.lookup {
            let us = |q: f64| lookup.hist.value_at_quantile(q) as f64 / 1000.0;
            c.params.insert("lookup_p50_us".into(), us(0.5).into());
            c.params.insert("lookup_p99_us".into(), us(0.99).into());
        }
        drop(server);
        cases.insert(1, c);
    }
    Ok(cases)
}

/// The direct copy and the two ceilings, interleaved round by round, after a verification round.
fn direct_phase(
    opts: &CopyOptions,
    place: &ThreadPlacement,
    g: Geometry,
    reps: u32,
    cache: &mut EngineCache,
    src: &[u32],
    dst: &[u32],
) -> Result<DirectPhase, CopyError> {
    let pid = std::process::id() as i32;
    let total = g.batch_bytes();
    let mut arena = Arena::new(total, place.node, opts.hugepages)?;
    let mem = HostMemory::new(pid, cache.layer_memory())?;
    let slice = mem.slice_bytes();
    let slots: Vec<u64> = (0..g.batch as u64).map(|i| i * slice).collect();
    let save_items: Vec<(u32, u64)> = src.iter().copied().zip(slots.iter().copied()).collect();
    let load_items: Vec<(u32, u64)> = dst.iter().copied().zip(slots.iter().copied()).collect();
    // The ceiling: the same bytes as one contiguous range at the start of the cache. Pieces of one
    // slice each, at consecutive addresses on both sides, merge into ranges of up to 1 GiB.
    let contiguous = HostMemory::new(
        pid,
        vec![LayerMemory {
            base: cache.buf.addr(),
            num_blocks: g.batch as u32,
            block_stride: slice,
            segments: 1,
            segment_stride: slice,
            segment_bytes: slice,
        }],
    )?;
    let contiguous_items: Vec<(u32, u64)> = (0..g.batch as u32).map(|i| (i, u64::from(i) * slice)).collect();

    // Verification round: save and check the slots; for h2d also load into poisoned blocks.
    mem.save_into(&mut arena, &save_items)?;
    let mut verified = cache.verify_slots(&arena, &save_items)?;
    if opts.direction == CopyDirection::H2d {
        cache.poison(dst);
        mem.load_from(&arena, &load_items)?;
        verified = cache.verify_copies(src, dst)?;
    }

    let (mut direct, mut ceiling_pv, mut ceiling_memcpy) = (Timings::new(), Timings::new(), Timings::new());
    let total_usize = total as usize;
    for round in 0..opts.warmup + reps {
        let timed = round >= opts.warmup;
        let t = Instant::now();
        match opts.direction {
            CopyDirection::D2h => mem.save_into(&mut arena, &save_items)?,
            CopyDirection::H2d => mem.load_from(&arena, &load_items)?,
        }
        let d = t.elapsed();
        if timed {
            direct.record(d);
        }
        let t = Instant::now();
        match opts.direction {
            CopyDirection::D2h => contiguous.save_into(&mut arena, &contiguous_items)?,
            CopyDirection::H2d => contiguous.load_from(&arena, &contiguous_items)?,
        }
        let d = t.elapsed();
        if timed {
            ceiling_pv.record(d);
        }
        let t = Instant::now();
        match opts.direction {
            CopyDirection::D2h => arena.write(0, &cache.buf.bytes()[..total_usize])?,
            CopyDirection::H2d => arena.read(0, &mut cache.buf.bytes_mut()[..total_usize])?,
        }
        let d = t.elapsed();
        if timed {
            ceiling_memcpy.record(d);
        }
    }
    Ok(DirectPhase {
        direct,
        ceiling_pv,
        ceiling_memcpy,
        verified,
        hugepages_effective: arena.hugepages(),
        arena_node: arena.node(),
        arena_notes: arena.notes().to_vec(),
    })
}

/// What the server phase of a case measured.
struct ServerPhase {
    timings: Timings,
    lookup: Option<Timings>,
    verified: usize,
    shards: u32,
}

fn namespace(g: Geometry) -> NamespaceSpec {
    NamespaceSpec {
        model: "kvloft-bench-copy".into(),
        dtype: "bfloat16".into(),
        kv_dtype: "auto".into(),
        num_layers: g.layers,
        num_kv_heads: 1,
        head_size: (g.block_bytes / 32).max(1) as u32,
        block_size: 16,
        layout: "nhd".into(),
        tp_size: 1,
        pp_size: 1,
        group: 0,
        variant: String::new(),
    }
}

/// Saves of fresh hashes (d2h) or lookup + load of one saved batch (h2d) through the server,
/// after a verification round that loads the saved batch into poisoned blocks.
#[allow(clippy::too_many_arguments)]
fn server_phase(
    opts: &CopyOptions,
    g: Geometry,
    reps: u32,
    cache: &mut EngineCache,
    src: &[u32],
    dst: &[u32],
    socket: &std::path::Path,
    seed: u64,
) -> Result<ServerPhase, CopyError> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let salt = seed ^ now;
    let mut client = Client::connect(socket, "kvloft-bench", Duration::from_secs(120))?;
    client.register_instance(&format!("bench-copy-{salt:x}"), namespace(g))?;
    let slice = client.register_memory(0, cache.layer_memory())?;
    if slice != g.slice_bytes() as u64 {
        return Err(CopyError::ServerPath(format!(
            "the server counts {slice} bytes per slice, not {}",
            g.slice_bytes()
        )));
    }
    let hashes = |round: u64| -> Vec<Vec<u8>> {
        (0..g.batch as u64).map(|i| crate::socket::block_hash(salt ^ round.wrapping_mul(0x1000_0000_01b3), i)).collect()
    };
    let save = |client: &mut Client, hashes: &[Vec<u8>]| -> Result<(), CopyError> {
        let blocks: Vec<(Vec<u8>, u32)> = hashes.iter().cloned().zip(src.iter().copied()).collect();
        let done = client.save(&blocks)?;
        if done.saved as usize != g.batch {
            return Err(CopyError::ServerPath(format!(
                "save of {} blocks: {} saved, {} present, {} failed ({})",
                g.batch,
                done.saved,
                done.present,
                done.failed,
                done.error.unwrap_or_default()
            )));
        }
        Ok(())
    };
    let lookup = |client: &mut Client, hashes: &[Vec<u8>]| -> Result<u64, CopyError> {
        let r = client.lookup(hashes)?;
        if r.hits as usize != g.batch {
            return Err(CopyError::ServerPath(format!("lookup of {} saved blocks hit {}", g.batch, r.hits)));
        }
        Ok(r.lease)
    };
    let load = |client: &mut Client, lease: u64| -> Result<(), CopyError> {
        let done = client.load(lease, dst)?;
        if done.loaded as usize != g.batch || done.error.is_some() {
            return Err(CopyError::ServerPath(format!(
                "load of {} blocks loaded {} ({})",
                g.batch,
                done.loaded,
                done.error.unwrap_or_default()
            )));
        }
        Ok(())
    };

    // Verification round: save, then load into poisoned blocks and compare.
    let first = hashes(0);
    save(&mut client, &first)?;
    cache.poison(dst);
    let lease = lookup(&mut client, &first)?;
    load(&mut client, lease)?;
    let verified = cache.verify_copies(src, dst)?;

    let mut timings = Timings::new();
    let mut lookups = Timings::new();
    for round in 0..opts.warmup + reps {
        let timed = round >= opts.warmup;
        match opts.direction {
            CopyDirection::D2h => {
                let fresh = hashes(u64::from(round) + 1);
                let t = Instant::now();
                save(&mut client, &fresh)?;
                let d = t.elapsed();
                if timed {
                    timings.record(d);
                }
            }
            CopyDirection::H2d => {
                let t = Instant::now();
                let lease = lookup(&mut client, &first)?;
                let looked = t.elapsed();
                load(&mut client, lease)?;
                let d = t.elapsed();
                if timed {
                    timings.record(d);
                    lookups.record(looked);
                }
            }
        }
    }
    let shards = client.server.shards;
    Ok(ServerPhase { timings, lookup: (opts.direction == CopyDirection::H2d).then_some(lookups), verified, shards })
}

/// Parses a size: a byte count or a number with `K`/`KiB`, `M`/`MiB`, `G`/`GiB` (powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{text:?} is not a size such as 16384, 16K or 16KiB"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(format!("{text:?} has an unknown unit; write 16384, 16K or 16KiB")),
    };
    n.checked_mul(1 << shift).ok_or_else(|| format!("{text:?} is too large"))
}

/// Parses `on` or `off`.
pub fn parse_on_off(text: &str) -> Result<bool, String> {
    match text.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("{text:?}: write on or off")),
    }
}

/// `kvloft bench d2h` and `kvloft bench h2d` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct CopyArgs {
    /// A running server's socket for path=server; without it the bench starts `kvloft serve` per
    /// case with a pool sized for the case.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Topology file for the servers the bench starts.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Measure only path=direct and the ceilings: no server.
    #[arg(long)]
    pub no_server: bool,
    /// Bytes of one block per layer per K/V segment, comma-separated for a sweep
    /// [default: 4K,16K,64K].
    #[arg(long, value_name = "SIZES", value_delimiter = ',', value_parser = parse_size)]
    pub block_bytes: Vec<u64>,
    /// Layers of the fake KV cache (a block's slice is 2 * layers * block bytes), comma-separated
    /// for a sweep [default: 32].
    #[arg(long, value_name = "COUNTS", value_delimiter = ',')]
    pub layers: Vec<u32>,
    /// Blocks per batch, comma-separated for a sweep [default: 64,256,1024].
    #[arg(long, value_name = "BLOCKS", value_delimiter = ',')]
    pub batch: Vec<usize>,
    /// Timed rounds per case [default: enough to move 2 GiB per path, 5 to 200].
    #[arg(long)]
    pub repetitions: Option<u32>,
    /// Untimed rounds per case before the timed ones.
    #[arg(long, default_value_t = 2)]
    pub warmup: u32,
    /// Hugepages for the arena and for the pool of a server the bench starts: on or off.
    #[arg(long, value_name = "on|off", default_value = "off", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    pub hugepages: bool,
    /// NUMA node of the arena and of the measuring thread.
    #[arg(long, value_name = "N")]
    pub node: Option<u32>,
    /// CPU to pin the measuring thread to.
    #[arg(long, value_name = "CPU")]
    pub cpu: Option<u32>,
    /// Skip cases whose batch is larger than this.
    #[arg(long, value_name = "SIZE", default_value = "1GiB", value_parser = parse_size)]
    pub max_batch_bytes: u64,
    /// Where to write the JSON result [default: bench-d2h.json or bench-h2d.json].
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Also writes a chart: GB/s and p99 against batch size, per path and block size
    /// (`.svg` or `.png`).
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
}

impl CopyArgs {
    /// The options these flags ask for; `exe` is the `kvloft` binary for the servers the bench
    /// starts.
    pub fn options(&self, direction: CopyDirection, exe: PathBuf) -> CopyOptions {
        let server = match (&self.socket, self.no_server) {
            (_, true) => ServerMode::Off,
            (Some(s), false) => ServerMode::Socket(s.clone()),
            (None, false) => ServerMode::Spawn { exe, config: self.config.clone() },
        };
        let mut o = CopyOptions::new(direction, server);
        if !self.block_bytes.is_empty() {
            o.block_bytes = self.block_bytes.clone();
        }
        if !self.batch.is_empty() {
            o.batches = self.batch.clone();
        }
        if !self.layers.is_empty() {
            o.layers = self.layers.clone();
        }
        o.repetitions = self.repetitions;
        o.warmup = self.warmup;
        o.hugepages = self.hugepages;
        o.node = self.node;
        o.cpu = self.cpu;
        o.max_batch_bytes = self.max_batch_bytes;
        o.print = true;
        o
    }
}

/// `kvloft bench d2h|h2d`: runs the suite, prints a table, writes the JSON result.
pub fn main(direction: CopyDirection, args: &CopyArgs, exe: PathBuf) -> Result<(), CopyError> {
    let started = Instant::now();
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from(format!("bench-{}.json", direction.as_str())));
    let run = run(&args.options(direction, exe))?;
    run.report.write(&out).map_err(|source| CopyError::Write { path: out.clone(), source })?;
    if let Some(path) = &args.plot {
        crate::plot::plot(&run.report, &plot_spec(&run.report), path).map_err(|e| CopyError::Invalid(e.to_string()))?;
        println!("wrote {}", path.display());
    }
    println!("wrote {} ({} cases, {:.1} s)", out.display(), run.report.cases.len(), started.elapsed().as_secs_f64());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_label() {
        assert_eq!(parse_size("16K").unwrap(), 16384);
        assert_eq!(parse_size("16KiB").unwrap(), 16384);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("3X").is_err());
        assert_eq!(size_label(16384), "16k");
        assert_eq!(size_label(1 << 20), "1m");
        assert_eq!(size_label(1000), "1000");
        assert!(parse_on_off("on").unwrap() && !parse_on_off("off").unwrap() && parse_on_off("x").is_err());
    }

    #[test]
    fn automatic_repetitions_are_bounded() {
        let g = |block_bytes, batch| Geometry { layers: 32, block_bytes, batch };
        assert_eq!(g(16 << 10, 1024).repetitions(None), 5);
        assert_eq!(g(4 << 10, 64).repetitions(None), 128);
        assert_eq!(g(4 << 10, 1).repetitions(None), 200);
        assert_eq!(g(4 << 10, 1).repetitions(Some(3)), 3);
        assert_eq!(g(16 << 10, 1024).label("d2h", "server"), "d2h_server_16k_l32_b1024");
    }

    #[test]
    fn permutation_is_a_permutation() {
        let mut p = Rng::new(7).permutation(1000);
        assert_ne!(p[..10], (0..10).collect::<Vec<u32>>()[..]);
        p.sort_unstable();
        assert_eq!(p, (0..1000).collect::<Vec<u32>>());
    }

    #[test]
    fn cache_layout_matches_vllm_tensors() {
        let c = EngineCache::new(2, 4, 4096, 1);
        assert_eq!(c.buf.addr() % 4096, 0);
        let l = c.layer_memory();
        assert_eq!(l.len(), 2);
        assert_eq!(l[1].base - l[0].base, 2 * 4 * 4096);
        assert_eq!((l[0].segment_stride, l[0].block_stride), (4 * 4096, 4096));
        assert_eq!(c.offset(1, 1, 3), 8 * 4096 + 4 * 4096 + 3 * 4096);
        assert_ne!(c.segment(0, 0, 0), c.segment(0, 0, 1));
    }

    #[test]
    fn flags_parse() {
        use clap::Parser;
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: CopyArgs,
        }
        let cli =
            Cli::try_parse_from(["x", "--hugepages", "on", "--block-bytes", "4K,16KiB", "--batch", "8,16"]).unwrap();
        let o = cli.args.options(CopyDirection::H2d, "kvloft".into());
        assert!(o.hugepages);
        assert_eq!((o.block_bytes, o.batches, o.layers), (vec![4096, 16384], vec![8, 16], vec![32]));
        assert_eq!(o.server, ServerMode::Spawn { exe: "kvloft".into(), config: None });
        let cli = Cli::try_parse_from(["x", "--no-server", "--max-batch-bytes", "64M"]).unwrap();
        let o = cli.args.options(CopyDirection::D2h, "kvloft".into());
        assert!(!o.hugepages);
        assert_eq!((o.server, o.max_batch_bytes), (ServerMode::Off, 64 << 20));
        assert_eq!(o.block_bytes, DEFAULT_BLOCK_BYTES);
        assert!(Cli::try_parse_from(["x", "--hugepages", "maybe"]).is_err());
    }

    #[test]
    fn backend_note_says_what_runs() {
        assert_eq!(backend_note(&[]), "no GPU: measuring the host backend");
        assert!(backend_note(&["H100".into()]).contains("kvloft bench gpu"));
    }
}
