//! The `gpu` suite: scattered KV blocks between GPU memory and pinned pool pages with the `cuda`
//! backend, in-process, for every attention layout, against a contiguous copy of the same bytes
//! between the same two memories measured in the same run.
//!
//! The "engine" is this process: per layer a device allocation laid out like vLLM's caches
//! (`nhd`: K/V-first `[2, num_blocks, block/2]`, two segments per block; `hnd` and `mla`: one
//! run per block; `cross_layer`: one allocation `[num_blocks, layers, block]`, so a block's
//! layers are one run). A block of one layer is `block_bytes`; a batch is `batch` blocks at random
//! block ids, every layer. The pool is an [`Arena`] registered with the driver (pinned, mapped).
//!
//! Every case first proves the bytes: a save (d2h) of blocks A into pool slots, checked against
//! the pattern the engine memory was filled with; then a load (h2d) of those slots into other
//! blocks B, poisoned first, read back and checked. Only then is it timed, for each method: the
//! copy kernel (with `--sm-budget` SMs), DMA (one `cuMemcpyAsync` per merged range) and batched
//! DMA (one `cuMemcpyBatchAsync` for them all, where the driver has it). Time is
//! wall-clock from submission to completion of a batch; GB/s is bytes over the median batch time;
//! the ceiling is one `cuMemcpyAsync` of the same bytes between a device buffer and the arena.

use crate::report::{Case, Report};
use hdrhistogram::Histogram;
use kvloft_engine::protocol::{LayerMemory, NamespaceSpec};
use kvloft_gpu::blocks::{BlockPair, BlockTemplate};
use kvloft_gpu::cuda::{BlockJob, Copier, CudaError, Device, DeviceBuffer, HostRegistration};
use kvloft_gpu::plan::{Method, Plan, Planner, Range, CTAS_PER_SM, KERNEL_THREADS};
use kvloft_gpu::Arena;
use kvloft_shard::client::Client;
use kvloft_topology::model::{CopyCurvePoint, CopyDirection, CopyMethod};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// Attention layouts the suite covers.
pub const LAYOUTS: [&str; 4] = ["nhd", "hnd", "mla", "cross_layer"];

/// `kvloft bench gpu` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct GpuArgs {
    /// GPU ordinal.
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
    /// Bytes of one block of one layer (all its segments), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [16u64 << 10, 64 << 10, 256 << 10])]
    pub block_bytes: Vec<u64>,
    /// Blocks per batch, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [64usize, 256, 1024, 4096])]
    pub batches: Vec<usize>,
    /// Layers.
    #[arg(long, default_value_t = 32)]
    pub layers: u32,
    /// Layouts, comma-separated (nhd, hnd, mla, cross_layer).
    #[arg(long, value_delimiter = ',', default_values_t = LAYOUTS.map(String::from))]
    pub layouts: Vec<String>,
    /// SMs the copy kernel may use.
    #[arg(long, default_value_t = 16)]
    pub sm_budget: u32,
    /// Largest batch in bytes; larger cases are skipped.
    #[arg(long, default_value_t = 2u64 << 30)]
    pub max_batch_bytes: u64,
    /// Timed batches per case and method.
    #[arg(long, default_value_t = 7)]
    pub repetitions: u32,
    /// Where to write the JSON result.
    #[arg(long, value_name = "FILE", default_value = "bench-gpu.json")]
    pub out: PathBuf,
    /// Also measures the full server path: starts `kvloft serve` (this binary) as a child
    /// process, registers the caches by CUDA IPC and times each save (request to `save_done`) and
    /// load (request to `load_done`; the lookup before it is not timed).
    #[arg(long)]
    pub server: bool,
    /// Pool of the server `--server` starts.
    #[arg(long, default_value_t = 8u64 << 30)]
    pub server_pool_bytes: u64,
    /// `[server] spin-us` of the server `--server` starts (how long its shards poll before
    /// they sleep); the server's default when not given.
    #[arg(long)]
    pub server_spin_us: Option<u64>,
    /// How long the bench's client polls its socket before it sleeps while it waits for a
    /// server reply or completion (`Client::set_spin`); 0 sleeps at once.
    #[arg(long, default_value_t = 0)]
    pub client_spin_us: u64,
    /// Shards of the server `--server` starts: the discovered default's last N (the highest
    /// CPUs), leaving the others to this process and the GPU driver; all of them when not given.
    #[arg(long)]
    pub server_shards: Option<usize>,
    /// Backs the pool of the server `--server` starts with 2 MiB hugepages (`[memory]
    /// hugepages`), where enough are reserved; the server falls back to 4 KiB pages and says so
    /// in its log otherwise.
    #[arg(long)]
    pub server_hugepages: bool,
    /// Also times the server path with this many saves (or loads) in flight on the connection:
    /// rounds of [`ROUND_REQUESTS`] requests, each sent as soon as fewer than N are in flight,
    /// timed from the first request to the last completion (cases `..._server_qN`). 1 (the
    /// default) times one request at a time only. Lowered per case so that the requests in
    /// flight take at most half the server's pool.
    #[arg(long, default_value_t = 1)]
    pub server_depth: usize,
    /// Writes what the server `--server` started wrote to stderr into FILE when the suite ends:
    /// its warnings, and one line per GPU request where `KVLOFT_TRACE_GPU=1` is set (the server
    /// inherits this process's environment).
    #[arg(long, value_name = "FILE")]
    pub server_log: Option<PathBuf>,
    /// Also writes the in-process measurements of the three GPU copy methods as copy curves into
    /// the `[calibration]` section of this topology file (created when missing; the rest of the
    /// file kept), for the copy planner of a server started with it.
    #[arg(long, value_name = "FILE")]
    pub write_calibration: Option<PathBuf>,
    /// In-process methods to time, comma-separated: `kernel`, `dma`, `dma_batch`, `planner`,
    /// `blocks` (the block kernel over PCIe) and `staged` (the block kernel through a device
    /// staging buffer and the copy engines). Every method's bytes are verified first.
    #[arg(long, value_delimiter = ',', default_values_t = METHODS.map(String::from))]
    pub methods: Vec<String>,
    /// GPU memory of the staging buffer for `staged` copies (the server's `[copy] staging`).
    #[arg(long, default_value_t = kvloft_topology::model::DEFAULT_STAGING_BYTES)]
    pub staging_bytes: u64,
}

/// In-process methods the suite can time.
pub const METHODS: [&str; 6] = ["kernel", "dma", "dma_batch", "planner", "blocks", "staged"];

/// Why the suite failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GpuBenchError {
    /// A CUDA call failed (or there is no driver or GPU).
    #[error(transparent)]
    Cuda(#[from] CudaError),
    /// The pool arena could not be made.
    #[error("pool arena: {0}")]
    Arena(#[from] kvloft_gpu::ArenaError),
    /// Bytes differed after a copy: the backend is wrong.
    #[error("verification failed: {0}")]
    Mismatch(String),
    /// An argument is unusable.
    #[error("{0}")]
    Args(String),
    /// The server for `--server` did not start.
    #[error(transparent)]
    Server(#[from] crate::server::ServerError),
    /// A request to that server failed.
    #[error("server path: {0}")]
    Client(#[from] kvloft_shard::client::ClientError),
    /// The copy curves could not be written into the topology file.
    #[error("writing the calibration: {0}")]
    Calibration(#[from] crate::copy::CopyError),
    /// The result could not be written.
    #[error("writing {path}: {error}")]
    Write {
        /// The output file.
        path: PathBuf,
        /// The error.
        error: std::io::Error,
    },
}

/// The word at byte offset `off` of layer `layer`'s cache: differs at every 8-byte offset.
fn word(layer: u32, off: u64) -> u64 {
    let mut z = (u64::from(layer) << 48) ^ (off / 8) ^ 0x9e37_79b9_7f4a_7c15;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Layer `layer`'s cache contents: a different word at every 8-byte offset.
fn pattern(layer: u32, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let w = word(layer, i as u64 * 8).to_le_bytes();
        chunk.copy_from_slice(&w[..chunk.len()]);
    }
    out
}

/// A cache's `register_memory`: per layer its geometry and `(IPC handle, offset)`.
type Registration = (Vec<LayerMemory>, Vec<(Vec<u8>, u64)>);

/// The engine's cache for one layout and block size.
struct Engine {
    layout: String,
    layers: u32,
    block_bytes: u64,
    num_blocks: u64,
    /// One buffer per layer, or one for every layer (cross_layer).
    buffers: Vec<DeviceBuffer>,
    /// What each buffer holds, kept in step with every verified load.
    mirror: Vec<Vec<u8>>,
}

impl Engine {
    fn new(
        dev: &Arc<Device>,
        layout: &str,
        layers: u32,
        block_bytes: u64,
        num_blocks: u64,
    ) -> Result<Self, GpuBenchError> {
        let per_layer = (block_bytes * num_blocks) as usize;
        let buffers = if layout == "cross_layer" {
            vec![DeviceBuffer::new(dev.clone(), per_layer * layers as usize)?]
        } else {
            (0..layers).map(|_| DeviceBuffer::new(dev.clone(), per_layer)).collect::<Result<_, _>>()?
        };
        let mut mirror = Vec::with_capacity(buffers.len());
        for (i, b) in buffers.iter().enumerate() {
            let data = pattern(i as u32, b.len());
            b.write(0, &data)?;
            mirror.push(data);
        }
        Ok(Engine { layout: layout.into(), layers, block_bytes, num_blocks, buffers, mirror })
    }

    /// Bytes of one block over every layer: one pool slot.
    fn slice_bytes(&self) -> u64 {
        self.block_bytes * u64::from(self.layers)
    }

    /// The `register_memory` description of the cache: per layer its geometry (`base` = offset
    /// in its allocation) and its allocation's IPC handle.
    fn registration(&self) -> Result<Registration, CudaError> {
        let bb = self.block_bytes;
        let nb = self.num_blocks;
        let mut layers = Vec::new();
        let mut ipc = Vec::new();
        for l in 0..self.layers as usize {
            let (buf, offset, layer) = match self.layout.as_str() {
                "cross_layer" => {
                    let off = l as u64 * bb;
                    let layer = LayerMemory {
                        base: off,
                        num_blocks: nb as u32,
                        block_stride: self.slice_bytes(),
                        segments: 1,
                        segment_stride: 0,
                        segment_bytes: bb,
                    };
                    (0, off, layer)
                }
                "nhd" => {
                    let seg = bb / 2;
                    let layer = LayerMemory {
                        base: 0,
                        num_blocks: nb as u32,
                        block_stride: seg,
                        segments: 2,
                        segment_stride: nb * seg,
                        segment_bytes: seg,
                    };
                    (l, 0, layer)
                }
                _ => {
                    let layer = LayerMemory {
                        base: 0,
                        num_blocks: nb as u32,
                        block_stride: bb,
                        segments: 1,
                        segment_stride: 0,
                        segment_bytes: bb,
                    };
                    (l, 0, layer)
                }
            };
            layers.push(layer);
            ipc.push((self.buffers[buf].ipc_handle()?.to_vec(), offset));
        }
        Ok((layers, ipc))
    }

    /// The cache's layers with `base` as device addresses, as a server sees them once it opened
    /// the IPC handles.
    fn device_layers(&self) -> Result<Vec<LayerMemory>, CudaError> {
        let (mut layers, _) = self.registration()?;
        for (l, layer) in layers.iter_mut().enumerate() {
            let buf = if self.layout == "cross_layer" { 0 } else { l };
            layer.base += self.buffers[buf].ptr();
        }
        Ok(layers)
    }

    /// Checks that blocks `b` hold what blocks `a` held (read back from the GPU), then records
    /// that in the mirror.
    fn check_loaded(&mut self, a: &[u64], b: &[u64]) -> Result<(), GpuBenchError> {
        let device: Vec<Vec<u8>> = self
            .buffers
            .iter()
            .map(|d| {
                let mut v = vec![0u8; d.len()];
                d.read(0, &mut v).map(|()| v)
            })
            .collect::<Result<_, _>>()?;
        for (i, &blk) in b.iter().enumerate() {
            let want_runs = self.runs(a[i]);
            for (j, (buf, off, len, _)) in self.runs(blk).into_iter().enumerate() {
                let (wb, wo, wl, _) = want_runs[j];
                if device[buf][off as usize..(off + len) as usize] != *self.expected(wb, wo, wl) {
                    return Err(GpuBenchError::Mismatch(format!(
                        "{} {}-byte blocks: block {blk} after a load through the server differs from block {}",
                        self.layout, self.block_bytes, a[i]
                    )));
                }
            }
        }
        self.mirror = device;
        Ok(())
    }

    /// (buffer, offset, len, offset in the slot) of every run of block `b`.
    fn runs(&self, b: u64) -> Vec<(usize, u64, u64, u64)> {
        let bb = self.block_bytes;
        match self.layout.as_str() {
            "cross_layer" => vec![(0, b * self.slice_bytes(), self.slice_bytes(), 0)],
            "nhd" => {
                let seg = bb / 2;
                (0..self.layers as usize)
                    .flat_map(|l| {
                        let slot = l as u64 * bb;
                        [(l, b * seg, seg, slot), (l, self.num_blocks * seg + b * seg, seg, slot + seg)]
                    })
                    .collect()
            }
            _ => (0..self.layers as usize).map(|l| (l, b * bb, bb, l as u64 * bb)).collect(),
        }
    }

    /// Ranges moving `blocks` to (d2h) or from (h2d) consecutive pool slots at device address `pool`.
    fn ranges(&self, blocks: &[u64], pool: u64, d2h: bool) -> Vec<Range> {
        let mut out = Vec::new();
        for (i, &b) in blocks.iter().enumerate() {
            let slot = pool + i as u64 * self.slice_bytes();
            for (buf, off, len, in_slot) in self.runs(b) {
                let dev = self.buffers[buf].ptr() + off;
                let host = slot + in_slot;
                out.push(if d2h { Range { src: dev, dst: host, len } } else { Range { src: host, dst: dev, len } });
            }
        }
        out
    }

    /// What run `(buf, off, len)` holds.
    fn expected(&self, buf: usize, off: u64, len: u64) -> &[u8] {
        &self.mirror[buf][off as usize..(off + len) as usize]
    }
}

/// Runs the suite.
pub fn run(args: &GpuArgs) -> Result<Report, GpuBenchError> {
    for l in &args.layouts {
        if !LAYOUTS.contains(&l.as_str()) {
            return Err(GpuBenchError::Args(format!("unknown layout {l:?}; use {}", LAYOUTS.join(", "))));
        }
    }
    for m in &args.methods {
        if !METHODS.contains(&m.as_str()) {
            return Err(GpuBenchError::Args(format!("unknown method {m:?}; use {}", METHODS.join(", "))));
        }
    }
    if args.block_bytes.iter().any(|&b| b < 32 || b % 32 != 0) {
        return Err(GpuBenchError::Args("block sizes must be multiples of 32 bytes".into()));
    }
    let dev = Arc::new(Device::open(args.gpu)?);
    eprintln!("gpu: {} ({} SMs), sm budget {}", dev.name(), dev.sm_count(), args.sm_budget);
    let arena_bytes = args.max_batch_bytes.max(1 << 21);
    let arena = Arena::new(arena_bytes, None, true)?;
    for note in arena.notes() {
        eprintln!("pool: {note}");
    }
    // SAFETY: the arena outlives the registration (dropped at the end of this function, after it).
    let reg = unsafe { HostRegistration::register(dev.clone(), arena.as_ptr(), arena.len() as usize)? };
    let pool = reg.device_ptr();
    let ceiling_buf = DeviceBuffer::new(dev.clone(), arena_bytes as usize)?;
    let max_run = args.block_bytes.iter().max().copied().unwrap_or(0) * u64::from(args.layers);
    let poison = DeviceBuffer::new(dev.clone(), max_run.max(1) as usize)?;
    poison.fill(0xA5)?;
    let mut copier = Copier::new(dev.clone(), 1 << 19, args.sm_budget > 0)?;
    if let Some(note) = copier.kernel_note() {
        eprintln!("kernel: {note}");
    }
    if !copier.has_batch() {
        eprintln!(
            "dma_batch: this driver has no cuMemcpyBatchAsync (CUDA 12.8+); batched plans use one call per range"
        );
    }
    if args.staging_bytes > 0 && copier.has_kernel() && args.methods.iter().any(|m| m == "staged") {
        copier.set_staging(args.staging_bytes)?;
    }
    let planner = Planner {
        sm_budget: args.sm_budget,
        sm_count: dev.sm_count(),
        dma_batch: copier.has_batch(),
        ..Planner::default()
    };
    // The full server path: a `kvloft serve` child (CUDA IPC needs another process).
    let server = if args.server {
        let exe = std::env::current_exe().map_err(|e| GpuBenchError::Args(format!("cannot find this binary: {e}")))?;
        let config = server_config(args)?;
        let s = crate::server::OwnServer::start(&exe, Some(config.path()), args.server_pool_bytes, false)?;
        eprintln!("server path: kvloft serve at {} (sm budget {})", s.socket().display(), args.sm_budget);
        Some((s, config))
    } else {
        None
    };
    let mut instance = 0u32;
    let mut report = Report::new("gpu");
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };

    for &block_bytes in &args.block_bytes {
        let slice = block_bytes * u64::from(args.layers);
        let batches: Vec<usize> =
            args.batches.iter().copied().filter(|&b| b > 0 && b as u64 * slice <= args.max_batch_bytes).collect();
        let Some(&max_batch) = batches.iter().max() else { continue };
        for layout in &args.layouts {
            let num_blocks = 2 * max_batch as u64;
            let mut engine = Engine::new(&dev, layout, args.layers, block_bytes, num_blocks)?;
            for &batch in &batches {
                // Blocks A (saved) and B (loaded into), disjoint, random order.
                let mut ids: Vec<u64> = (0..num_blocks).collect();
                for i in (1..ids.len()).rev() {
                    ids.swap(i, (next() % (i as u64 + 1)) as usize);
                }
                let (a, b) = (ids[..batch].to_vec(), ids[batch..2 * batch].to_vec());
                let bytes = batch as u64 * slice;
                verify(&mut engine, &mut copier, &arena, pool, &poison, (&a, &b), (&planner, args))?;
                for (dir, d2h) in [("d2h", true), ("h2d", false)] {
                    let blocks = if d2h { &a } else { &b };
                    let ranges = engine.ranges(blocks, pool, d2h);
                    let ceiling =
                        time_plan(&mut copier, &contiguous(&ceiling_buf, pool, bytes, d2h), args.repetitions)?;
                    let ceiling_gbps = bytes as f64 / ceiling / 1e9;
                    for method in args.methods.iter().map(String::as_str) {
                        if let "blocks" | "staged" = method {
                            let staged = method == "staged";
                            if !block_way_usable(&copier, &engine, args.sm_budget, staged) {
                                continue;
                            }
                            let way = Way::Blocks { staged, ctas: args.sm_budget * CTAS_PER_SM };
                            let mut h = Histogram::<u64>::new(3).expect("histogram");
                            let mut times = Vec::new();
                            for _ in 0..args.repetitions.max(1) {
                                let s = move_blocks(&mut copier, &engine, &way, blocks, pool, d2h)?;
                                times.push(s);
                                let _ = h.record((s * 1e9) as u64);
                            }
                            times.sort_by(f64::total_cmp);
                            let median = times[times.len() / 2];
                            let gbps = bytes as f64 / median / 1e9;
                            let mut case = Case {
                                name: format!("{dir}_{layout}_{}k_b{batch}_{method}", block_bytes >> 10),
                                gbps: Some(gbps),
                                ceiling_gbps: Some(ceiling_gbps),
                                ratio: Some(gbps / ceiling_gbps),
                                ..Case::default()
                            }
                            .with_latency(&h);
                            let p = &mut case.params;
                            p.insert("direction".into(), dir.into());
                            p.insert("layout".into(), layout.as_str().into());
                            p.insert("block_bytes".into(), block_bytes.into());
                            p.insert("batch".into(), batch.into());
                            p.insert("layers".into(), args.layers.into());
                            p.insert("bytes".into(), bytes.into());
                            p.insert("method".into(), method.into());
                            p.insert("plan".into(), method.into());
                            p.insert("sm_used".into(), args.sm_budget.into());
                            if staged {
                                p.insert("staging_bytes".into(), args.staging_bytes.into());
                            }
                            p.insert("verified".into(), true.into());
                            eprintln!(
                                "{:<36} {:>7.2} GB/s  ceiling {:>6.2}  ratio {:.2}  ({method}, {} SMs)",
                                case.name,
                                gbps,
                                ceiling_gbps,
                                gbps / ceiling_gbps,
                                args.sm_budget
                            );
                            report.cases.push(case);
                            continue;
                        }
                        let plan = match method {
                            "kernel" if copier.has_kernel() && args.sm_budget > 0 => {
                                let mut p = Planner { kernel_min_ranges: 1, dma_min_bytes: u64::MAX, ..planner }
                                    .plan(&ranges, d2h);
                                if let Method::Kernel { .. } = p.method {
                                } else {
                                    p.method =
                                        Method::Kernel { ctas: args.sm_budget * CTAS_PER_SM, threads: KERNEL_THREADS };
                                }
                                p
                            }
                            "kernel" => continue,
                            "dma" => Planner { sm_budget: 0, dma_batch: false, ..planner }.plan(&ranges, d2h),
                            "dma_batch" if copier.has_batch() => {
                                Planner { sm_budget: 0, dma_batch: true, single_dma: [0, 0], ..planner }
                                    .plan(&ranges, d2h)
                            }
                            "dma_batch" => continue,
                            _ => planner.plan(&ranges, d2h),
                        };
                        let mut h = Histogram::<u64>::new(3).expect("histogram");
                        let mut times = Vec::new();
                        for _ in 0..args.repetitions.max(1) {
                            let s = time_once(&mut copier, &plan)?;
                            times.push(s);
                            let _ = h.record((s * 1e9) as u64);
                        }
                        times.sort_by(f64::total_cmp);
                        let median = times[times.len() / 2];
                        let gbps = bytes as f64 / median / 1e9;
                        let mut case = Case {
                            name: format!("{dir}_{layout}_{}k_b{batch}_{method}", block_bytes >> 10),
                            gbps: Some(gbps),
                            ceiling_gbps: Some(ceiling_gbps),
                            ratio: Some(gbps / ceiling_gbps),
                            ..Case::default()
                        }
                        .with_latency(&h);
                        let p = &mut case.params;
                        p.insert("direction".into(), dir.into());
                        p.insert("layout".into(), layout.as_str().into());
                        p.insert("block_bytes".into(), block_bytes.into());
                        p.insert("batch".into(), batch.into());
                        p.insert("layers".into(), args.layers.into());
                        p.insert("bytes".into(), bytes.into());
                        p.insert("method".into(), method.into());
                        let (chosen, sms) = match plan.method {
                            Method::Dma => ("dma", 0),
                            Method::DmaBatch => ("dma_batch", 0),
                            Method::Kernel { ctas, .. } => ("kernel", ctas.div_ceil(CTAS_PER_SM)),
                        };
                        p.insert("plan".into(), chosen.into());
                        p.insert("sm_used".into(), sms.into());
                        p.insert("ranges".into(), plan.ranges.len().into());
                        // Bytes of one contiguous piece the batch is made of (after merging):
                        // the size a copy curve is indexed by.
                        let pieces = kvloft_gpu::plan::merge(&ranges).len().max(1) as u64;
                        p.insert("piece_bytes".into(), (bytes / pieces).into());
                        p.insert("verified".into(), true.into());
                        eprintln!(
                            "{:<36} {:>7.2} GB/s  ceiling {:>6.2}  ratio {:.2}  ({} ranges, {chosen}, {sms} SMs)",
                            case.name,
                            gbps,
                            ceiling_gbps,
                            gbps / ceiling_gbps,
                            plan.ranges.len()
                        );
                        report.cases.push(case);
                    }
                }
                if let Some((server, _)) = &server {
                    instance += 1;
                    let name = format!("bench-gpu-{instance}");
                    let cases = server_cases(server.socket(), &name, &mut engine, &dev, (&a, &b), args, &mut next)?;
                    for mut case in cases {
                        let d2h = case.params.get("direction").and_then(|d| d.as_str()) == Some("d2h");
                        let ceiling =
                            time_plan(&mut copier, &contiguous(&ceiling_buf, pool, bytes, d2h), args.repetitions)?;
                        let ceiling_gbps = bytes as f64 / ceiling / 1e9;
                        let gbps = case.gbps.unwrap_or(0.0);
                        case.ceiling_gbps = Some(ceiling_gbps);
                        case.ratio = Some(gbps / ceiling_gbps);
                        eprintln!(
                            "{:<36} {:>7.2} GB/s  ceiling {:>6.2}  ratio {:.2}  (server path, verified)",
                            case.name,
                            gbps,
                            ceiling_gbps,
                            gbps / ceiling_gbps
                        );
                        report.cases.push(case);
                    }
                }
            }
        }
    }
    if let (Some(path), Some((server, _))) = (&args.server_log, &server) {
        std::fs::write(path, server.log())
            .map_err(|e| GpuBenchError::Args(format!("--server-log {}: {e}", path.display())))?;
    }
    drop(server);
    drop(copier);
    drop(reg); // before the arena it registers
    drop(arena);
    Ok(report)
}

/// A topology file for the server of `--server`: the machine's default shards with this SM
/// budget.
fn server_config(args: &GpuArgs) -> Result<tempfile::NamedTempFile, GpuBenchError> {
    let machine = kvloft_topology::discover().map_err(|e| GpuBenchError::Args(format!("discovery: {e}")))?;
    let mut topology =
        kvloft_topology::validate::embedded_default(&machine).map_err(|d| GpuBenchError::Args(d.to_string()))?.topology;
    topology.copy.sm_budget = args.sm_budget;
    topology.copy.staging_bytes = args.staging_bytes;
    topology.memory.hugepages = args.server_hugepages;
    if let Some(us) = args.server_spin_us {
        topology.server.spin_us = us;
    }
    if let Some(n) = args.server_shards {
        if n == 0 || n > topology.shards.len() {
            return Err(GpuBenchError::Args(format!(
                "--server-shards {n}: this machine's default has {} shards; give 1 to {}",
                topology.shards.len(),
                topology.shards.len()
            )));
        }
        topology.shards.drain(..topology.shards.len() - n);
    }
    let text = kvloft_topology::render::render(&machine, &topology, None);
    let mut file = tempfile::Builder::new()
        .prefix("kvloft-bench-gpu")
        .suffix(".toml")
        .tempfile()
        .map_err(|e| GpuBenchError::Args(format!("temporary topology file: {e}")))?;
    std::io::Write::write_all(&mut file, text.as_bytes())
        .map_err(|e| GpuBenchError::Args(format!("temporary topology file: {e}")))?;
    Ok(file)
}

/// Requests in one timed round of `--server-depth`.
pub const ROUND_REQUESTS: usize = 8;

/// The server-path cases of one engine and batch: registers the cache by CUDA IPC, proves a save
/// of `a` and a load into `b` (poisoned first) byte for byte, then times saves of `a` under fresh
/// hashes (request to `save_done`) and loads into `b` (request to `load_done`).
fn server_cases(
    socket: &std::path::Path,
    name: &str,
    engine: &mut Engine,
    dev: &Arc<Device>,
    (a, b): (&[u64], &[u64]),
    args: &GpuArgs,
    next: &mut impl FnMut() -> u64,
) -> Result<Vec<Case>, GpuBenchError> {
    let mut client = Client::connect(socket, "bench-gpu", std::time::Duration::from_secs(60))?;
    client.set_spin(std::time::Duration::from_micros(args.client_spin_us));
    let ns = NamespaceSpec {
        model: "bench-gpu".into(),
        dtype: "uint8".into(),
        kv_dtype: "auto".into(),
        num_layers: engine.layers,
        num_kv_heads: 1,
        head_size: engine.block_bytes as u32,
        block_size: 1,
        layout: engine.layout.clone(),
        tp_size: 1,
        pp_size: 1,
        group: 0,
        variant: format!("bench/{}/{}", engine.layout, engine.block_bytes),
    };
    client.register_instance(name, ns)?;
    let (layers, ipc) = engine.registration()?;
    client.register_cuda_memory(0, layers, dev.uuid(), ipc)?;
    let ids = |blocks: &[u64]| blocks.iter().map(|&x| x as u32).collect::<Vec<u32>>();
    let mut hashes = || (0..a.len()).map(|_| next().to_le_bytes().repeat(4)).collect::<Vec<Vec<u8>>>();
    let bytes = a.len() as u64 * engine.slice_bytes();
    // Proof: save A, poison B, load A's slices into B, compare.
    let h = hashes();
    let saved = client.save(&h.iter().cloned().zip(ids(a)).collect::<Vec<_>>())?;
    if saved.saved as usize != a.len() {
        return Err(GpuBenchError::Mismatch(format!("server save: {saved:?}")));
    }
    // Twice: a shard learns where the other shards' arenas sit on the GPU from the first load,
    // and the second reads the slots its lookup recorded without asking their owners.
    for _ in 0..2 {
        for (buf, off, len, _) in b.iter().flat_map(|&blk| engine.runs(blk)) {
            engine.buffers[buf].write(off as usize, &vec![0xA5; len as usize])?;
        }
        let hit = client.lookup(&h)?;
        let loaded = client.load(hit.lease, &ids(b))?;
        if loaded.error.is_some() || loaded.loaded as usize != b.len() {
            return Err(GpuBenchError::Mismatch(format!("server load: {loaded:?}")));
        }
        engine.check_loaded(a, b)?;
    }
    let mut out = Vec::new();
    for dir in ["d2h", "h2d"] {
        let mut times = Vec::new();
        let mut hist = Histogram::<u64>::new(3).expect("histogram");
        for _ in 0..args.repetitions.max(1) {
            let h = hashes();
            let t0;
            if dir == "d2h" {
                t0 = Instant::now();
                client.save(&h.iter().cloned().zip(ids(a)).collect::<Vec<_>>())?;
            } else {
                client.save(&h.iter().cloned().zip(ids(a)).collect::<Vec<_>>())?;
                let hit = client.lookup(&h)?;
                t0 = Instant::now();
                let l = client.load(hit.lease, &ids(b))?;
                if l.error.is_some() {
                    return Err(GpuBenchError::Mismatch(format!("server load: {l:?}")));
                }
            }
            let s = t0.elapsed().as_secs_f64();
            times.push(s);
            let _ = hist.record((s * 1e9) as u64);
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let mut case = Case {
            name: format!("{dir}_{}_{}k_b{}_server", engine.layout, engine.block_bytes >> 10, a.len()),
            gbps: Some(bytes as f64 / median / 1e9),
            ..Case::default()
        }
        .with_latency(&hist);
        let p = &mut case.params;
        p.insert("direction".into(), dir.into());
        p.insert("layout".into(), engine.layout.as_str().into());
        p.insert("block_bytes".into(), engine.block_bytes.into());
        p.insert("batch".into(), a.len().into());
        p.insert("layers".into(), engine.layers.into());
        p.insert("bytes".into(), bytes.into());
        p.insert("path".into(), "server".into());
        p.insert("sm_budget".into(), args.sm_budget.into());
        p.insert("client_spin_us".into(), args.client_spin_us.into());
        p.insert("verified".into(), true.into());
        out.push(case);
    }
    let depth = args.server_depth.min((args.server_pool_bytes / (2 * bytes.max(1))) as usize);
    if depth > 1 {
        let ids = (ids(a), ids(b));
        out.extend(pipelined(&mut client, engine, (a, b), &ids, args, depth, &mut hashes)?);
    }
    Ok(out)
}

/// Server-path cases with `depth` requests in flight on `client`'s connection (`--server-depth`):
/// per direction, [`ROUND_REQUESTS`] saves of engine blocks `a` under fresh hashes (or loads of
/// one saved set into `b`, each under its own lease), a request sent whenever fewer than `depth`
/// are in flight, timed from the first request to the last completion; the rate is the round's
/// bytes over the median round. The last round's bytes are verified: its last save is loaded
/// back into `b` (poisoned first) and compared with `a`; its loads went into a poisoned `b`.
fn pipelined(
    client: &mut Client,
    engine: &mut Engine,
    (a, b): (&[u64], &[u64]),
    (ids_a, ids_b): &(Vec<u32>, Vec<u32>),
    args: &GpuArgs,
    depth: usize,
    hashes: &mut impl FnMut() -> Vec<Vec<u8>>,
) -> Result<Vec<Case>, GpuBenchError> {
    let n = a.len() as u32;
    let bytes = a.len() as u64 * engine.slice_bytes();
    let pairs = |h: &[Vec<u8>]| h.iter().cloned().zip(ids_a.iter().copied()).collect::<Vec<_>>();
    let poison = |engine: &mut Engine| -> Result<(), GpuBenchError> {
        for (buf, off, len, _) in b.iter().flat_map(|&blk| engine.runs(blk)) {
            engine.buffers[buf].write(off as usize, &vec![0x5A; len as usize])?;
        }
        Ok(())
    };
    let rounds = args.repetitions.max(1);
    let mut out = Vec::new();
    for dir in ["d2h", "h2d"] {
        let mut times = Vec::new();
        for round in 0..rounds {
            let last = round + 1 == rounds;
            let mut in_flight = std::collections::VecDeque::with_capacity(depth);
            let took;
            if dir == "d2h" {
                let sets: Vec<Vec<(Vec<u8>, u32)>> = (0..ROUND_REQUESTS).map(|_| pairs(&hashes())).collect();
                let check = |d: kvloft_engine::protocol::SaveDone| {
                    if d.saved == n {
                        Ok(())
                    } else {
                        Err(GpuBenchError::Mismatch(format!("server save, {depth} in flight: {d:?}")))
                    }
                };
                let t0 = Instant::now();
                for set in &sets {
                    if in_flight.len() == depth {
                        check(client.wait_saved(in_flight.pop_front().expect("full"))?)?;
                    }
                    in_flight.push_back(client.save_queued(set)?);
                }
                while let Some(id) = in_flight.pop_front() {
                    check(client.wait_saved(id)?)?;
                }
                took = t0.elapsed().as_secs_f64();
                if last {
                    let h: Vec<Vec<u8>> = sets[ROUND_REQUESTS - 1].iter().map(|(h, _)| h.clone()).collect();
                    poison(engine)?;
                    let hit = client.lookup(&h)?;
                    let l = client.load(hit.lease, ids_b)?;
                    if l.error.is_some() || l.loaded != n {
                        return Err(GpuBenchError::Mismatch(format!("server load after pipelined saves: {l:?}")));
                    }
                    engine.check_loaded(a, b)?;
                }
            } else {
                let h = hashes();
                let saved = client.save(&pairs(&h))?;
                if saved.saved != n {
                    return Err(GpuBenchError::Mismatch(format!("server save: {saved:?}")));
                }
                let mut leases = Vec::with_capacity(ROUND_REQUESTS);
                for _ in 0..ROUND_REQUESTS {
                    let hit = client.lookup(&h)?;
                    if hit.hits != n {
                        return Err(GpuBenchError::Mismatch(format!("server lookup: {} of {n} hits", hit.hits)));
                    }
                    leases.push(hit.lease);
                }
                if last {
                    poison(engine)?;
                }
                let check = |l: kvloft_engine::protocol::LoadDone| {
                    if l.error.is_none() && l.loaded == n {
                        Ok(())
                    } else {
                        Err(GpuBenchError::Mismatch(format!("server load, {depth} in flight: {l:?}")))
                    }
                };
                let t0 = Instant::now();
                for &lease in &leases {
                    if in_flight.len() == depth {
                        check(client.wait_loaded(in_flight.pop_front().expect("full"))?)?;
                    }
                    in_flight.push_back(client.load_queued(lease, ids_b)?);
                }
                while let Some(id) = in_flight.pop_front() {
                    check(client.wait_loaded(id)?)?;
                }
                took = t0.elapsed().as_secs_f64();
                if last {
                    engine.check_loaded(a, b)?;
                }
            }
            times.push(took);
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let round_bytes = bytes * ROUND_REQUESTS as u64;
        let mut case = Case {
            name: format!("{dir}_{}_{}k_b{}_server_q{depth}", engine.layout, engine.block_bytes >> 10, a.len()),
            gbps: Some(round_bytes as f64 / median / 1e9),
            ..Case::default()
        };
        let p = &mut case.params;
        p.insert("direction".into(), dir.into());
        p.insert("layout".into(), engine.layout.as_str().into());
        p.insert("block_bytes".into(), engine.block_bytes.into());
        p.insert("batch".into(), a.len().into());
        p.insert("layers".into(), engine.layers.into());
        p.insert("bytes".into(), bytes.into());
        p.insert("path".into(), "server".into());
        p.insert("in_flight".into(), depth.into());
        p.insert("round_requests".into(), ROUND_REQUESTS.into());
        p.insert("round_median_s".into(), median.into());
        p.insert("sm_budget".into(), args.sm_budget.into());
        p.insert("client_spin_us".into(), args.client_spin_us.into());
        p.insert("verified".into(), true.into());
        out.push(case);
    }
    Ok(out)
}

/// One contiguous copy of `bytes` between a device buffer and the pool.
fn contiguous(buf: &DeviceBuffer, pool: u64, bytes: u64, d2h: bool) -> Plan {
    let r = if d2h {
        Range { src: buf.ptr(), dst: pool, len: bytes }
    } else {
        Range { src: pool, dst: buf.ptr(), len: bytes }
    };
    Plan { method: Method::Dma, ranges: vec![r] }
}

fn time_once(copier: &mut Copier, plan: &Plan) -> Result<f64, GpuBenchError> {
    let t0 = Instant::now();
    // SAFETY: every plan of this suite moves bytes between live device buffers of the engine (or
    // the ceiling buffer) and the registered arena, inside their bounds; we wait before reuse.
    unsafe { copier.submit(plan)? };
    copier.wait()?;
    Ok(t0.elapsed().as_secs_f64())
}

fn time_plan(copier: &mut Copier, plan: &Plan, reps: u32) -> Result<f64, GpuBenchError> {
    let mut t: Vec<f64> = (0..reps.max(1)).map(|_| time_once(copier, plan)).collect::<Result<_, _>>()?;
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

/// How a verified or timed batch moves: a plan of ranges, or the block kernel
/// (`kvloft_gpu::blocks`) over PCIe or staged through device memory.
enum Way {
    Plan(Planner),
    Blocks { staged: bool, ctas: u32 },
}

/// Whether the block kernel can move `engine`'s blocks here (kernel loaded, SMs allowed) and,
/// when `staged`, a staging part holds one block's slice.
fn block_way_usable(copier: &Copier, engine: &Engine, sm_budget: u32, staged: bool) -> bool {
    copier.has_kernel() && sm_budget > 0 && (!staged || copier.staging_part_bytes() >= engine.slice_bytes())
}

/// Moves `blocks` to (d2h) or from consecutive pool slots at `pool` with the block kernel and
/// returns the seconds from submission to completion.
fn move_blocks(
    copier: &mut Copier,
    engine: &Engine,
    way: &Way,
    blocks: &[u64],
    pool: u64,
    d2h: bool,
) -> Result<f64, GpuBenchError> {
    let Way::Blocks { staged, ctas } = *way else { return Err(GpuBenchError::Args("not a block way".into())) };
    let template = BlockTemplate::new(&engine.device_layers()?, Planner::default().chunk_bytes);
    let pairs: Vec<BlockPair> = blocks
        .iter()
        .enumerate()
        .map(|(i, &b)| BlockPair::new(b as u32, pool + i as u64 * engine.slice_bytes()))
        .collect();
    let per_batch = copier.block_capacity(template.pieces.len()).max(1);
    let t0 = Instant::now();
    for chunk in pairs.chunks(per_batch) {
        let job = BlockJob {
            pieces: &template.pieces,
            pairs: chunk,
            slice_bytes: template.slice_bytes,
            d2h,
            ctas,
            threads: KERNEL_THREADS,
            staged,
        };
        // SAFETY: every block id is below the engine's block count and every slot lies in the
        // registered arena (batches are capped at its size); we wait before reuse.
        unsafe { copier.submit_blocks(&job)? };
    }
    copier.wait()?;
    Ok(t0.elapsed().as_secs_f64())
}

/// Saves blocks `a` into the pool and checks the pool; loads them into blocks `b` (poisoned
/// first) and checks the engine memory; once per way of moving them.
fn verify(
    engine: &mut Engine,
    copier: &mut Copier,
    arena: &Arena,
    pool: u64,
    poison: &DeviceBuffer,
    (a, b): (&[u64], &[u64]),
    (planner, args): (&Planner, &GpuArgs),
) -> Result<(), GpuBenchError> {
    // The kernel, then the copy engines one call per range, then batched (where the driver can),
    // then the block kernel over PCIe and staged, where they can run here.
    let mut ways = vec![
        Way::Plan(Planner { kernel_min_ranges: 1, dma_min_bytes: u64::MAX, ..*planner }),
        Way::Plan(Planner { sm_budget: 0, dma_batch: false, ..*planner }),
        Way::Plan(Planner { sm_budget: 0, dma_batch: true, ..*planner }),
    ];
    for staged in [false, true] {
        let method = if staged { "staged" } else { "blocks" };
        if args.methods.iter().any(|m| m == method) && block_way_usable(copier, engine, args.sm_budget, staged) {
            ways.push(Way::Blocks { staged, ctas: args.sm_budget * CTAS_PER_SM });
        }
    }
    for way in &ways {
        let move_ = |copier: &mut Copier, engine: &Engine, blocks: &[u64], d2h: bool| match way {
            Way::Plan(p) => time_once(copier, &p.plan(&engine.ranges(blocks, pool, d2h), d2h)),
            blocks_way => move_blocks(copier, engine, blocks_way, blocks, pool, d2h),
        };
        // Save A and check every slot against the engine's bytes.
        move_(copier, engine, a, true)?;
        let mut got = Vec::new();
        for (i, &blk) in a.iter().enumerate() {
            for (buf, off, len, in_slot) in engine.runs(blk) {
                got.resize(len as usize, 0);
                arena.read(i as u64 * engine.slice_bytes() + in_slot, &mut got)?;
                if got != engine.expected(buf, off, len) {
                    return Err(GpuBenchError::Mismatch(format!(
                        "{} {}-byte blocks: pool slot {i} (block {blk}) differs from the engine after a save",
                        engine.layout, engine.block_bytes
                    )));
                }
            }
        }
        // Poison B (a device-to-device copy from a buffer of 0xA5), load A's slots into B.
        let poison_ranges: Vec<Range> = b
            .iter()
            .flat_map(|&blk| engine.runs(blk))
            .map(|(buf, off, len, _)| Range { src: poison.ptr(), dst: engine.buffers[buf].ptr() + off, len })
            .collect();
        time_once(copier, &Plan { method: Method::Dma, ranges: kvloft_gpu::plan::merge(&poison_ranges) })?;
        move_(copier, engine, b, false)?;
        let device: Vec<Vec<u8>> = engine
            .buffers
            .iter()
            .map(|d| {
                let mut v = vec![0u8; d.len()];
                d.read(0, &mut v).map(|()| v)
            })
            .collect::<Result<_, _>>()?;
        for (i, &blk) in b.iter().enumerate() {
            let want_runs = engine.runs(a[i]);
            for (j, (buf, off, len, _)) in engine.runs(blk).into_iter().enumerate() {
                let (wb, wo, wl, _) = want_runs[j];
                if device[buf][off as usize..(off + len) as usize] != *engine.expected(wb, wo, wl) {
                    return Err(GpuBenchError::Mismatch(format!(
                        "{} {}-byte blocks: block {blk} after a load differs from block {} it was saved from",
                        engine.layout, engine.block_bytes, a[i]
                    )));
                }
            }
        }
        // B now holds A's bytes: keep the mirror in step.
        engine.mirror = device;
    }
    Ok(())
}

/// `kvloft bench gpu`: runs the suite and writes its report.
pub fn main(args: &GpuArgs) -> Result<(), GpuBenchError> {
    let report = run(args)?;
    report.write(&args.out).map_err(|error| GpuBenchError::Write { path: args.out.clone(), error })?;
    eprintln!("wrote {}", args.out.display());
    if let Some(path) = &args.write_calibration {
        let points = curve_points(&report);
        let machine = kvloft_topology::discover()
            .map_err(|e| crate::copy::CopyError::Discover(e.to_string()))
            .map_err(GpuBenchError::Calibration)?;
        let text = crate::calibrate::rewritten(path, &points, &machine)?;
        crate::calibrate::write_atomically(path, &text)?;
        eprintln!("wrote {} copy-curve points into the [calibration] section of {}", points.len(), path.display());
        // What a server started with this file would decide (`rewritten` checked that it reads).
        if let Ok(checked) = kvloft_topology::validate::check(&kvloft_topology::Source { path, text: &text }, &machine)
        {
            let t = checked.topology;
            let planner = Planner { sm_budget: t.copy.sm_budget, dma_batch: true, ..Planner::default() };
            let (_, note) =
                planner.calibrated(|method, d2h, piece| kvloft_shard::calibrated_rate(&t, method, d2h, piece));
            eprintln!("{}", note.unwrap_or_else(|| "copy planner: these curves leave the planner unchanged".into()));
        }
    }
    Ok(())
}

/// Copy-curve points from a report's in-process cases: per method (`kernel`, `dma`,
/// `dma_batch`), direction and piece size, the GB/s of the largest batch measured. Several layouts
/// give several piece sizes (an `nhd` block of one layer is two pieces, a `cross_layer` block one
/// piece of every layer).
pub fn curve_points(report: &Report) -> Vec<CopyCurvePoint> {
    let mut best: std::collections::BTreeMap<(CopyMethod, CopyDirection, u64), (u64, f64)> = Default::default();
    for case in &report.cases {
        let p = &case.params;
        let text = |k: &str| p.get(k).and_then(|v| v.as_str());
        let number = |k: &str| p.get(k).and_then(|v| v.as_u64());
        if p.get("path").is_some() {
            continue;
        }
        let method = match text("method") {
            Some("kernel") => CopyMethod::CudaKernel,
            Some("dma") => CopyMethod::CudaMemcpy,
            Some("dma_batch") => CopyMethod::CudaMemcpyBatch,
            _ => continue,
        };
        let direction = match text("direction") {
            Some("d2h") => CopyDirection::D2h,
            Some("h2d") => CopyDirection::H2d,
            _ => continue,
        };
        let (Some(piece), Some(batch), Some(gbps)) = (number("piece_bytes"), number("batch"), case.gbps) else {
            continue;
        };
        let entry = best.entry((method, direction, piece)).or_insert((batch, gbps));
        if batch >= entry.0 {
            *entry = (batch, gbps);
        }
    }
    let measured_at = Some(report.started_at.clone());
    best.into_iter()
        .filter(|(_, (_, gbps))| gbps.is_finite() && *gbps > 0.0)
        .map(|((method, direction, block_bytes), (_, gbps))| CopyCurvePoint {
            method,
            direction,
            block_bytes,
            gbps: ((gbps * 1000.0).round() / 1000.0).max(0.001),
            measured_at: measured_at.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(method: &str, dir: &str, piece: u64, batch: u64, gbps: f64) -> Case {
        let mut c = Case { name: format!("{dir}_{method}_{piece}_{batch}"), gbps: Some(gbps), ..Case::default() };
        c.params.insert("method".into(), method.into());
        c.params.insert("direction".into(), dir.into());
        c.params.insert("piece_bytes".into(), piece.into());
        c.params.insert("batch".into(), batch.into());
        c
    }

    /// Curve points come from the in-process method cases, the largest batch of each method,
    /// direction and piece size; the planner's choice and the server path give none.
    #[test]
    fn curve_points_keep_the_largest_batch_per_method_direction_and_piece() {
        let mut report = Report::new("gpu");
        report.cases = vec![
            case("kernel", "d2h", 16384, 4096, 50.12345),
            case("kernel", "d2h", 16384, 64, 40.0),
            case("dma_batch", "h2d", 16384, 64, 3.5),
            case("dma", "h2d", 65536, 1024, 10.0),
            case("planner", "d2h", 16384, 4096, 49.0),
        ];
        let mut server = case("dma", "d2h", 16384, 4096, 9.0);
        server.params.insert("path".into(), "server".into());
        report.cases.push(server);
        let got: Vec<(CopyMethod, CopyDirection, u64, f64)> =
            curve_points(&report).into_iter().map(|p| (p.method, p.direction, p.block_bytes, p.gbps)).collect();
        assert_eq!(
            got,
            vec![
                (CopyMethod::CudaMemcpy, CopyDirection::H2d, 65536, 10.0),
                (CopyMethod::CudaMemcpyBatch, CopyDirection::H2d, 16384, 3.5),
                (CopyMethod::CudaKernel, CopyDirection::D2h, 16384, 50.123),
            ]
        );
    }
}
