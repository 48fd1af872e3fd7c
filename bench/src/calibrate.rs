//! `kvloft bench calibrate`: this machine's copy curves, GB/s by block size for every copy method
//! available here, written into the topology file's `[calibration]` section for the copy planner.
//!
//! Methods measured on a machine without the `cuda` backend (all machines today):
//!
//! - `process_vm`: what the host backend does. Scattered pieces of `block_bytes` (random order in
//!   a buffer twice the batch) packed into consecutive pool slots of an [`Arena`], by
//!   `process_vm_readv` (d2h) and `process_vm_writev` (h2d) through [`HostMemory`], one range per
//!   piece on the scattered side;
//! - `memcpy`: the same pieces, one `memcpy` each (what a shared-memory copy path would do).
//!
//! Each point is the median GB/s (10^9 bytes per second) of `--repetitions` batches of about
//! `--batch-bytes`, after `--warmup` untimed ones. A round measures every block size, direction
//! and method once, and the rounds repeat, so that a slow phase of a busy machine spreads over
//! every point rather than bending one part of a curve.

use crate::copy::{parse_on_off, parse_size, size_label, CopyError, PageBuf, Rng, Timings};
use crate::placement;
use crate::report::{Case, Report};
use kvloft_engine::protocol::LayerMemory;
use kvloft_gpu::{Arena, HostMemory};
use kvloft_topology::model::{CopyCurvePoint, CopyDirection, CopyMethod};
use kvloft_topology::{render, validate, Machine, Source};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Default block sizes: 4 KiB to 1 MiB, by powers of 4.
pub const DEFAULT_BLOCK_BYTES: [u64; 5] = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20];
/// Most pieces one host copy call is given (the backend's own limit is higher).
const ITEMS_PER_CALL: usize = 16 << 10;

/// Options of a calibration run.
#[derive(Debug, Clone)]
pub struct CalibrateOptions {
    /// Piece sizes, one point per method and direction each.
    pub block_bytes: Vec<u64>,
    /// Bytes moved per measured batch (rounded down to whole pieces, at least one).
    pub batch_bytes: u64,
    /// Timed batches per point.
    pub repetitions: u32,
    /// Untimed batches before them.
    pub warmup: u32,
    /// Hugepages for the arena.
    pub hugepages: bool,
    /// NUMA node of the arena and the measuring thread.
    pub node: Option<u32>,
    /// CPU to pin the measuring thread to.
    pub cpu: Option<u32>,
    /// Print notes and one line per point to stderr while running.
    pub print: bool,
}

impl Default for CalibrateOptions {
    fn default() -> Self {
        Self {
            block_bytes: DEFAULT_BLOCK_BYTES.to_vec(),
            batch_bytes: 256 << 20,
            repetitions: 7,
            warmup: 1,
            hugepages: false,
            node: None,
            cpu: None,
            print: false,
        }
    }
}

/// A calibration run's result.
#[derive(Debug)]
pub struct Calibration {
    /// The measured points, sorted by method, direction and block size, GB/s rounded to 3
    /// decimals.
    pub points: Vec<CopyCurvePoint>,
    /// The same measurements as a result file (suite `calibrate`).
    pub report: Report,
    /// Remarks (backend, placement, arena).
    pub notes: Vec<String>,
    /// The machine it ran on.
    pub machine: Machine,
}

/// Measures the copy curves of this machine.
pub fn run(opts: &CalibrateOptions) -> Result<Calibration, CopyError> {
    if opts.block_bytes.is_empty() || opts.block_bytes.contains(&0) || opts.repetitions == 0 {
        return Err(CopyError::Invalid("--block-bytes and --repetitions must be positive".into()));
    }
    let machine = kvloft_topology::discover().map_err(|e| CopyError::Discover(e.to_string()))?;
    let place = placement::resolve(&machine, opts.node, opts.cpu)?;
    let mut report = Report::new("calibrate");
    let mut notes = vec![match report.machine.gpus.first() {
        None => "no GPU: measuring the host backend's copy methods".to_string(),
        Some(g) => {
            format!("GPU found ({g}): measuring the host backend's copy methods, then the GPU's (unless --gpu off)")
        }
    }];
    notes.extend(place.notes.iter().cloned());
    let say = |line: &str| {
        if opts.print {
            eprintln!("{line}");
        }
    };
    notes.iter().for_each(|n| say(n));
    let measured_at = report.started_at.clone();
    let largest = *opts.block_bytes.iter().max().unwrap_or(&4096);
    let batch_bytes = opts.batch_bytes.max(largest);
    let (cases, arena_notes) = placement::run_on(place.cpu, || measure(opts, batch_bytes, &say))??;
    for n in arena_notes {
        say(&n);
        notes.push(n);
    }
    let mut points = Vec::new();
    for (mut case, method, direction, block_bytes, gbps) in cases {
        for (k, v) in place.params() {
            case.params.insert(k.into(), v);
        }
        let gbps = ((gbps * 1000.0).round() / 1000.0).max(0.001);
        points.push(CopyCurvePoint { method, direction, block_bytes, gbps, measured_at: Some(measured_at.clone()) });
        report.cases.push(case);
    }
    points.sort_by_key(|p| (p.method, p.direction, p.block_bytes));
    Ok(Calibration { points, report, notes, machine })
}

type Measured = (Case, CopyMethod, CopyDirection, u64, f64);

/// The measurements, on the measuring thread: every block size, both directions, both methods.
fn measure(
    opts: &CalibrateOptions,
    batch_bytes: u64,
    say: &(dyn Fn(&str) + Sync),
) -> Result<(Vec<Measured>, Vec<String>), CopyError> {
    /// One block size: its scattered pieces and the timings of (direction, method).
    struct Size {
        bb: u64,
        mem: HostMemory,
        items: Vec<(u32, u64)>,
        timings: [[Timings; 2]; 2],
    }
    let directions = [CopyDirection::D2h, CopyDirection::H2d];
    let methods = [CopyMethod::ProcessVm, CopyMethod::Memcpy];
    let pid = std::process::id() as i32;
    let mut engine = PageBuf::patterned(2 * batch_bytes as usize, 0x6361_6c69_6272_6174);
    let mut arena = Arena::new(batch_bytes, opts.node, opts.hugepages)?;
    let arena_notes = arena.notes().to_vec();
    let mut sizes = Vec::new();
    for &bb in &opts.block_bytes {
        let pieces = (batch_bytes / bb).max(1) as usize;
        let engine_pieces = u32::try_from(2 * pieces).map_err(|_| CopyError::Invalid("too many pieces".into()))?;
        let ids: Vec<u32> = Rng::new(bb ^ 0x5eed).permutation(engine_pieces).into_iter().take(pieces).collect();
        let items: Vec<(u32, u64)> = ids.iter().enumerate().map(|(i, &id)| (id, i as u64 * bb)).collect();
        let layer = LayerMemory {
            base: engine.addr(),
            num_blocks: engine_pieces,
            block_stride: bb,
            segments: 1,
            segment_stride: bb,
            segment_bytes: bb,
        };
        let mem = HostMemory::new(pid, vec![layer])?;
        let timings = std::array::from_fn(|_| std::array::from_fn(|_| Timings::new()));
        sizes.push(Size { bb, mem, items, timings });
    }
    // Rounds over every size, direction and method, so that a slow phase of the machine spreads
    // over all points instead of bending one part of a curve.
    for round in 0..opts.warmup + opts.repetitions {
        for size in &mut sizes {
            let b = size.bb as usize;
            for (di, &direction) in directions.iter().enumerate() {
                let t = Instant::now();
                for chunk in size.items.chunks(ITEMS_PER_CALL) {
                    match direction {
                        CopyDirection::D2h => size.mem.save_into(&mut arena, chunk)?,
                        CopyDirection::H2d => size.mem.load_from(&arena, chunk)?,
                    }
                }
                let d_pv = t.elapsed();
                if round == 0 && direction == CopyDirection::D2h {
                    verify(&engine, &arena, &size.items, size.bb)?;
                }
                let t = Instant::now();
                for &(id, slot) in &size.items {
                    let at = id as usize * b;
                    match direction {
                        CopyDirection::D2h => arena.write(slot, &engine.bytes()[at..at + b])?,
                        CopyDirection::H2d => arena.read(slot, &mut engine.bytes_mut()[at..at + b])?,
                    }
                }
                let d_mc = t.elapsed();
                if round >= opts.warmup {
                    size.timings[di][0].record(d_pv);
                    size.timings[di][1].record(d_mc);
                }
            }
        }
    }
    if opts.print {
        eprintln!("{:<12} {:>4} {:>8} {:>8} {:>10} {:>10}", "method", "dir", "block", "GB/s", "p50 ms", "p99 ms");
    }
    let mut out = Vec::new();
    for (mi, &method) in methods.iter().enumerate() {
        for (di, &direction) in directions.iter().enumerate() {
            for size in &sizes {
                let t = &size.timings[di][mi];
                let bytes = size.items.len() as u64 * size.bb;
                let gbps = t.median_gbps(bytes);
                let mut case = Case {
                    name: format!("calibrate_{}_{}_{}", method.as_str(), direction.as_str(), size_label(size.bb)),
                    ..Case::default()
                }
                .with_latency(&t.hist);
                case.gbps = Some(gbps);
                let p = &mut case.params;
                p.insert("backend".into(), "host".into());
                p.insert("method".into(), method.as_str().into());
                p.insert("direction".into(), direction.as_str().into());
                p.insert("block_bytes".into(), size.bb.into());
                p.insert("pieces".into(), size.items.len().into());
                p.insert("batch_bytes".into(), bytes.into());
                p.insert("hugepages".into(), opts.hugepages.into());
                p.insert("hugepages_effective".into(), arena.hugepages().into());
                p.insert("mean_gbps".into(), t.gbps(bytes).into());
                p.insert("unit".into(), "gbps: median batch; latency: one batch".into());
                say(&format!(
                    "{:<12} {:>4} {:>8} {:>8.3} {:>10.3} {:>10.3}",
                    method.as_str(),
                    direction.as_str(),
                    size_label(size.bb),
                    gbps,
                    case.p50_us.unwrap_or(0.0) / 1000.0,
                    case.p99_us.unwrap_or(0.0) / 1000.0
                ));
                out.push((case, method, direction, size.bb, gbps));
            }
        }
    }
    Ok((out, arena_notes))
}

/// Checks that each pool slot holds the piece it was copied from.
fn verify(engine: &PageBuf, arena: &Arena, items: &[(u32, u64)], bb: u64) -> Result<(), CopyError> {
    let mut buf = vec![0u8; bb as usize];
    for &(id, slot) in items {
        arena.read(slot, &mut buf)?;
        let at = id as usize * bb as usize;
        if buf != engine.bytes()[at..at + bb as usize] {
            return Err(CopyError::Verify(format!("pool slot at {slot} does not hold piece {id} of {bb} bytes")));
        }
    }
    Ok(())
}

/// `old` with every point of `new` put in: a new point replaces the old one of the same method,
/// direction and block size; the others are kept. Sorted by method, direction and block size.
pub fn merge(old: &[CopyCurvePoint], new: &[CopyCurvePoint]) -> Vec<CopyCurvePoint> {
    let key = |p: &CopyCurvePoint| (p.method, p.direction, p.block_bytes);
    let mut out: Vec<CopyCurvePoint> =
        old.iter().filter(|o| !new.iter().any(|n| key(n) == key(o))).chain(new).cloned().collect();
    out.sort_by_key(key);
    out
}

/// `path` with `points` in its `[calibration]` section (merged into the points it has, see
/// [`merge`]; the rest of the file kept as it is), or a new file for `machine` (the default
/// topology, as `kvloft topology` prints it) with the section when `path` does not exist. The text
/// must check against `machine` as `kvloft topology --check` does; otherwise the diagnostics come
/// back as the error.
pub fn rewritten(path: &Path, points: &[CopyCurvePoint], machine: &Machine) -> Result<String, CopyError> {
    let (text, points) = match std::fs::read_to_string(path) {
        Ok(text) => {
            let source = Source { path, text: &text };
            kvloft_topology::file::parse(&source)
                .map_err(|d| CopyError::Topology(format!("{d}\n{} is not a valid topology file", path.display())))?;
            // Points already there are kept when the file checks; otherwise the check below says why.
            let old = validate::check(&source, machine).map(|c| c.topology.calibration).unwrap_or_default();
            let points = merge(&old, points);
            (render::replace_calibration(&text, &render::calibration_section(&points)), points)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let checked = validate::embedded_default(machine).map_err(|d| CopyError::Topology(d.to_string()))?;
            let placed = kvloft_topology::placement::place(machine, &Default::default());
            let text = render::render(machine, &checked.topology, Some(&placed));
            (render::replace_calibration(&text, &render::calibration_section(points)), points.to_vec())
        }
        Err(source) => return Err(CopyError::Write { path: path.into(), source }),
    };
    match validate::check(&Source { path, text: &text }, machine) {
        Ok(checked) if checked.topology.calibration == points => Ok(text),
        Ok(_) => Err(CopyError::Topology(format!(
            "the rewritten {} does not read back the measured points; its calibration tables are not where \
             `kvloft bench calibrate` can replace them",
            path.display()
        ))),
        Err(d) => Err(CopyError::Topology(format!(
            "{d}\nwith the new [calibration] section {} would not pass `kvloft topology --check`; fix the errors \
             above and run again",
            path.display()
        ))),
    }
}

/// Writes `text` to `path` through a temporary file in the same directory and a rename, keeping
/// the permissions of an existing file.
pub fn write_atomically(path: &Path, text: &str) -> Result<(), CopyError> {
    let err = |source| CopyError::Write { path: path.into(), source };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir).map_err(err)?;
    std::fs::write(tmp.path(), text).map_err(err)?;
    if let Ok(meta) = std::fs::metadata(path) {
        std::fs::set_permissions(tmp.path(), meta.permissions()).map_err(err)?;
    }
    tmp.persist(path).map_err(|e| err(e.error))?;
    Ok(())
}

/// `kvloft bench calibrate` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct CalibrateArgs {
    /// Topology file: with --write it is rewritten in place (created when missing); without,
    /// the section that would go into it is printed.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Replace the [calibration] section of --config, keeping the rest of the file.
    #[arg(long, requires = "config")]
    pub write: bool,
    /// Piece sizes to measure, comma-separated [default: 4K,16K,64K,256K,1M].
    #[arg(long, value_name = "SIZES", value_delimiter = ',', value_parser = parse_size)]
    pub block_bytes: Vec<u64>,
    /// Bytes moved per measured batch.
    #[arg(long, value_name = "SIZE", default_value = "256MiB", value_parser = parse_size)]
    pub batch_bytes: u64,
    /// Timed batches per point (the point is their median).
    #[arg(long, default_value_t = 7)]
    pub repetitions: u32,
    /// Hugepages for the arena: on or off.
    #[arg(long, value_name = "on|off", default_value = "off", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    pub hugepages: bool,
    /// NUMA node of the arena and of the measuring thread.
    #[arg(long, value_name = "N")]
    pub node: Option<u32>,
    /// CPU to pin the measuring thread to.
    #[arg(long, value_name = "CPU")]
    pub cpu: Option<u32>,
    /// Also write the measurements as a JSON result file.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Also measure the GPU copy methods (copy kernel, one copy-engine call per range, batched
    /// copy-engine calls) for the `cuda` backend's planner: `auto` does when a CUDA driver and
    /// the GPU are there, `on` fails without them, `off` never does.
    #[arg(long, value_enum, default_value_t = GpuCurves::Auto)]
    pub gpu: GpuCurves,
    /// The GPU to measure (CUDA ordinal).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub gpu_ordinal: usize,
    /// SMs the copy kernel may use while it is measured: the server's `[copy] sm-budget`.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub sm_budget: u32,
}

/// Whether `kvloft bench calibrate` measures the GPU copy methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GpuCurves {
    /// When a CUDA driver and the GPU are present.
    Auto,
    /// Always; no driver or GPU is an error.
    On,
    /// Never.
    Off,
}

/// The GPU part of the calibration: the in-process cases of `kvloft bench gpu` over the layouts
/// whose runs span 16 KiB to 8 MiB (`nhd` and `mla` blocks of 16, 64 and 256 KiB, and
/// `cross_layer` blocks of 32 layers of them), batches of 256 and 1,024 blocks, every case verified
/// byte for byte before it is timed; returns their copy-curve points and cases. `None` when
/// `auto` finds no driver or GPU (the reason is printed).
fn gpu_curves(args: &CalibrateArgs) -> Result<Option<(Vec<CopyCurvePoint>, Report)>, CopyError> {
    if args.gpu == GpuCurves::Off {
        return Ok(None);
    }
    if args.gpu == GpuCurves::Auto && !kvloft_gpu::cuda::device::driver_present() {
        eprintln!("no CUDA driver here: the GPU copy methods are not measured (--gpu on to insist)");
        return Ok(None);
    }
    let gpu = crate::gpu::GpuArgs {
        gpu: args.gpu_ordinal,
        block_bytes: vec![16 << 10, 64 << 10, 256 << 10],
        batches: vec![256, 1024],
        layers: 32,
        layouts: ["nhd", "mla", "cross_layer"].map(String::from).to_vec(),
        sm_budget: args.sm_budget,
        max_batch_bytes: 2 << 30,
        repetitions: args.repetitions.clamp(1, 3),
        out: PathBuf::new(),
        server: false,
        server_pool_bytes: 0,
        server_spin_us: None,
        client_spin_us: 0,
        server_shards: None,
        server_hugepages: false,
        server_depth: 1,
        server_log: None,
        write_calibration: None,
        // The copy curves' methods only.
        methods: ["kernel", "dma", "dma_batch"].map(String::from).to_vec(),
        staging_bytes: 0,
    };
    match crate::gpu::run(&gpu) {
        Ok(report) => Ok(Some((crate::gpu::curve_points(&report), report))),
        Err(crate::gpu::GpuBenchError::Cuda(e)) if args.gpu == GpuCurves::Auto => {
            eprintln!("GPU {} cannot be measured ({e}): the GPU copy methods are not measured", args.gpu_ordinal);
            Ok(None)
        }
        Err(e) => Err(CopyError::Invalid(format!("measuring GPU {}: {e}", args.gpu_ordinal))),
    }
}

/// `kvloft bench calibrate`: measures, then prints the section or rewrites `--config`.
pub fn main(args: &CalibrateArgs) -> Result<(), CopyError> {
    let started = Instant::now();
    let opts = CalibrateOptions {
        block_bytes: if args.block_bytes.is_empty() { DEFAULT_BLOCK_BYTES.to_vec() } else { args.block_bytes.clone() },
        batch_bytes: args.batch_bytes,
        repetitions: args.repetitions,
        hugepages: args.hugepages,
        node: args.node,
        cpu: args.cpu,
        print: true,
        ..CalibrateOptions::default()
    };
    let mut cal = run(&opts)?;
    if let Some((points, gpu_report)) = gpu_curves(args)? {
        eprintln!("measured {} GPU copy-curve points", points.len());
        cal.points.extend(points);
        cal.points.sort_by_key(|p| (p.method, p.direction, p.block_bytes));
        cal.report.cases.extend(gpu_report.cases);
    }
    if let Some(out) = &args.out {
        cal.report.write(out).map_err(|source| CopyError::Write { path: out.clone(), source })?;
        eprintln!("wrote {}", out.display());
    }
    match (&args.config, args.write) {
        (Some(path), true) => {
            let text = rewritten(path, &cal.points, &cal.machine)?;
            write_atomically(path, &text)?;
            eprintln!(
                "wrote {} measured points into the [calibration] section of {} ({:.1} s)",
                cal.points.len(),
                path.display(),
                started.elapsed().as_secs_f64()
            );
        }
        (config, _) => {
            if let Some(path) = config {
                // Check now that the section would fit the file, so that --write will work.
                rewritten(path, &cal.points, &cal.machine)?;
                eprintln!("add --write to put this section into {}", path.display());
            }
            print!("{}", render::calibration_section(&cal.points));
            eprintln!("measured in {:.1} s", started.elapsed().as_secs_f64());
        }
    }
    Ok(())
}
