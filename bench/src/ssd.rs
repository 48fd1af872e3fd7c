//! The `ssd` suite: raw random writes and reads through io_uring (glommio), against a file or a
//! block device, without the cache tier.
//!
//! One glommio executor pinned to one CPU runs the whole sweep. A case is one operation (write or
//! read), one mode (O_DIRECT through [`DmaFile`], or the page cache through [`BufferedFile`]), one
//! block size and one queue depth: `qd` tasks each keep one operation in flight, so `qd`
//! operations are outstanding at all times. Offsets are block-aligned and visit the file's blocks
//! in a pseudo-random order without repeats (a keyed permutation), so a case re-reads a block only
//! once it has covered the whole file (`file_passes` > 1).
//!
//! With `inflights` set (`--inflight LIST`), a case instead has `inflight` submitter tasks, each
//! issuing a batch of `qd` operations at once (all polled, so all queued, together), waiting for
//! the whole batch, and issuing the next: up to `inflight` × `qd` operations are outstanding, and
//! the histogram holds the latency of whole batches (`params.batch_latency`).
//!
//! Each case runs a warm-up (untimed), then a timed phase of `seconds_per_case` (or
//! `max_ops_per_case` operations, whichever ends first). Per operation latency goes into an HDR
//! histogram; IOPS and GB/s are the operations and bytes over the timed phase. Write cases end with
//! an `fdatasync` inside the time, so buffered writes count the writeback of what they dirtied.
//! Buffered read cases start with the file's page cache dropped (`fdatasync`, then
//! `POSIX_FADV_DONTNEED`) and readahead off (`POSIX_FADV_RANDOM`), so they read from the device.

use crate::plot::{format_bytes, Figure, PlotSpec, Row};
use crate::progress::Progress;
use crate::report::{Case, Report};
use glommio::io::{BufferedFile, DmaFile, OpenOptions};
use glommio::{LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;
use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
use std::cell::Cell;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Size of the test file the suite creates when `file_size` is not given.
pub const DEFAULT_FILE_SIZE: u64 = 1 << 30;

/// O_DIRECT or the page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// O_DIRECT, through glommio's `DmaFile`.
    Direct,
    /// The page cache, through glommio's `BufferedFile`.
    Buffered,
}

impl Mode {
    /// `direct` or `buffered`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Buffered => "buffered",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "direct" | "o_direct" | "dma" => Ok(Mode::Direct),
            "buffered" | "cached" => Ok(Mode::Buffered),
            other => Err(format!("unknown mode `{other}`: use direct or buffered")),
        }
    }
}

/// The operation of a case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Random reads (the prefetch path).
    Read,
    /// Random writes.
    Write,
}

impl Op {
    /// `read` or `write`.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
        }
    }
}

impl std::str::FromStr for Op {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "read" | "reads" => Ok(Op::Read),
            "write" | "writes" => Ok(Op::Write),
            other => Err(format!("unknown operation `{other}`: use read or write")),
        }
    }
}

/// Parses a size: a whole number with an optional binary unit. `K`, `KB` and `KiB` all mean 1024
/// (as do `M`, `G`, `T` and their forms); case does not matter: `4K`, `16KiB`, `1M`, `4096`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a size (use forms like 4096, 4K, 16KiB, 1M)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("`{s}` has an unknown unit (use K, M, G, T, with or without iB)")),
    };
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("`{s}` is too large"))
}

/// Options of the suite.
#[derive(Debug, Clone)]
pub struct SsdOptions {
    /// A directory (a temporary test file is created in it), a file, or a block device.
    /// `None`: a temporary file in `/tmp`.
    pub path: Option<PathBuf>,
    /// Bytes of the file region the cases use. `None`: [`DEFAULT_FILE_SIZE`] for a file the suite
    /// creates, the whole file or device otherwise.
    pub file_size: Option<u64>,
    /// Allows writes to an existing file or a block device (never to a mounted device).
    pub allow_write: bool,
    /// Queue depths (operations in flight; with `inflights`, operations per batch).
    pub qds: Vec<usize>,
    /// Batches in flight. `None`: no batches, `qd` tasks each keep one operation in flight and
    /// the histogram holds per-operation latency. `Some`: each value is a case dimension with
    /// that many submitters, each keeping one batch of `qd` operations in flight; the histogram
    /// holds batch latency.
    pub inflights: Option<Vec<usize>>,
    /// Block sizes, bytes.
    pub block_sizes: Vec<u64>,
    /// Modes, in run order.
    pub modes: Vec<Mode>,
    /// Operations, in run order.
    pub ops: Vec<Op>,
    /// Length of each case's timed phase.
    pub seconds_per_case: Duration,
    /// Length of each case's untimed warm-up.
    pub warmup: Duration,
    /// Stops a case's timed phase after this many operations, if it comes first.
    pub max_ops_per_case: Option<u64>,
    /// CPU the executor is pinned to. `None`: the last online CPU.
    pub cpu: Option<usize>,
    /// Shows a progress bar on stderr (when it is a terminal and the run takes over a second).
    pub progress: bool,
}

impl Default for SsdOptions {
    fn default() -> Self {
        Self {
            path: None,
            file_size: None,
            allow_write: false,
            qds: vec![1, 2, 4, 8, 16, 32, 64],
            inflights: None,
            block_sizes: vec![4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20],
            modes: vec![Mode::Direct, Mode::Buffered],
            ops: vec![Op::Write, Op::Read],
            seconds_per_case: Duration::from_millis(400),
            warmup: Duration::from_millis(40),
            max_ops_per_case: None,
            cpu: None,
            progress: true,
        }
    }
}

/// Why the suite failed.
#[derive(Debug, thiserror::Error)]
pub enum SsdError {
    /// The options or the target do not allow the run.
    #[error("{0}")]
    Invalid(String),
    /// An I/O call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
}

fn io_err<E: Into<std::io::Error>>(what: impl Into<String>) -> impl FnOnce(E) -> SsdError {
    let what = what.into();
    move |e| SsdError::Io { what, source: e.into() }
}

/// Runs the sweep and returns its report.
pub fn run(opts: &SsdOptions) -> Result<Report, SsdError> {
    validate(opts)?;
    let mut report = Report::new("ssd");
    let target = resolve(opts)?;
    let cpu = match opts.cpu {
        Some(c) => c,
        None => last_cpu(),
    };
    let n_inflight = opts.inflights.as_ref().map_or(1, Vec::len);
    let total = (opts.modes.len() * opts.ops.len() * opts.block_sizes.len() * n_inflight * opts.qds.len()) as u64;
    let progress = Arc::new(if opts.progress { Progress::new(total) } else { Progress::hidden(total) });
    let info = TargetInfo {
        path: target.path.clone(),
        bytes: target.bytes,
        created: matches!(target.kind, Kind::Created),
        device: target.device.clone(),
        cpu,
    };
    let (o, p) = (opts.clone(), progress.clone());
    let handle = LocalExecutorBuilder::new(Placement::Fixed(cpu))
        .name("kvloft-bench-ssd")
        .spawn(move || async move { sweep(info, o, p).await })
        .map_err(io_err(format!("cannot start an executor on CPU {cpu}")))?;
    let result = handle.join().map_err(io_err("the executor failed"));
    progress.finish();
    report.cases = result??;
    drop(target);
    Ok(report)
}

fn validate(opts: &SsdOptions) -> Result<(), SsdError> {
    let bad = |m: &str| Err(SsdError::Invalid(m.into()));
    if opts.qds.is_empty() || opts.block_sizes.is_empty() || opts.modes.is_empty() || opts.ops.is_empty() {
        return bad("queue depths, block sizes, modes and operations must each name at least one value");
    }
    if opts.qds.iter().any(|&q| q == 0 || q > 1024) {
        return bad("queue depths must be 1 to 1024");
    }
    if let Some(ifs) = &opts.inflights {
        if ifs.is_empty() || ifs.iter().any(|&n| n == 0 || n > 1024) {
            return bad("inflight counts must name at least one value, each 1 to 1024");
        }
    }
    if let Some(&b) = opts.block_sizes.iter().find(|&&b| b == 0 || b % 512 != 0 || b > (64 << 20)) {
        return Err(SsdError::Invalid(format!("block size {b} is not a multiple of 512 from 512 B to 64 MiB")));
    }
    Ok(())
}

/// Where the cases run.
#[derive(Debug)]
struct Target {
    path: PathBuf,
    kind: Kind,
    bytes: u64,
    device: String,
    /// Removes a file the suite created.
    _cleanup: Option<RemoveOnDrop>,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Created,
    Existing,
    Device,
}

#[derive(Debug)]
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// What the executor needs of the target.
#[derive(Debug, Clone)]
struct TargetInfo {
    path: PathBuf,
    bytes: u64,
    created: bool,
    device: String,
    cpu: usize,
}

fn resolve(opts: &SsdOptions) -> Result<Target, SsdError> {
    let writes = opts.ops.contains(&Op::Write);
    let max_bs = opts.block_sizes.iter().copied().max().unwrap_or(4096);
    let path = opts.path.clone().unwrap_or_else(|| PathBuf::from("/tmp"));
    let (path, kind, bytes, cleanup) = match std::fs::metadata(&path) {
        Ok(m) if m.is_dir() => {
            let tmp = tempfile::Builder::new()
                .prefix("kvloft-bench-ssd-")
                .suffix(".dat")
                .tempfile_in(&path)
                .map_err(io_err(format!("cannot create a test file in {}", path.display())))?;
            let p = tmp.path().to_path_buf();
            let (file, _) = tmp.keep().map_err(|e| io_err(format!("cannot keep {}", p.display()))(e.error))?;
            let guard = RemoveOnDrop(p.clone());
            write_head(file, &p)?;
            (p, Kind::Created, opts.file_size.unwrap_or(DEFAULT_FILE_SIZE), Some(guard))
        }
        Ok(m) if m.file_type().is_block_device() => {
            if writes {
                if !opts.allow_write {
                    return Err(SsdError::Invalid(format!(
                        "{} is a block device: writing to it destroys its contents; pass --ops read, or \
                         --allow-write to write to it",
                        path.display()
                    )));
                }
                check_unused(&path, m.rdev())?;
            }
            let size = std::fs::File::open(&path)
                .and_then(|mut f| f.seek(SeekFrom::End(0)))
                .map_err(io_err(format!("cannot read the size of {}", path.display())))?;
            (path, Kind::Device, opts.file_size.map_or(size, |s| s.min(size)), None)
        }
        Ok(m) if m.is_file() => {
            if writes && !opts.allow_write {
                return Err(SsdError::Invalid(format!(
                    "{} exists: the write cases overwrite its contents; pass --allow-write, --ops read, or \
                     name a directory or a new file",
                    path.display()
                )));
            }
            (path, Kind::Existing, opts.file_size.map_or(m.len(), |s| s.min(m.len())), None)
        }
        Ok(_) => {
            return Err(SsdError::Invalid(format!(
                "{} is not a directory, a regular file or a block device",
                path.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let file = std::fs::File::create_new(&path).map_err(io_err(format!("cannot create {}", path.display())))?;
            let guard = RemoveOnDrop(path.clone());
            write_head(file, &path)?;
            (path, Kind::Created, opts.file_size.unwrap_or(DEFAULT_FILE_SIZE), Some(guard))
        }
        Err(e) => return Err(io_err(format!("cannot stat {}", path.display()))(e)),
    };
    let bytes = bytes / max_bs * max_bs;
    if bytes == 0 {
        return Err(SsdError::Invalid(format!(
            "the file region of {} is smaller than the largest block ({})",
            path.display(),
            format_bytes(max_bs)
        )));
    }
    let device = device_name(&path, matches!(kind, Kind::Device));
    Ok(Target { path, kind, bytes, device, _cleanup: cleanup })
}

/// Writes and syncs the first MiB of a new test file before glommio opens it. glommio probes
/// whether the device supports polled I/O (io_uring IOPOLL) with a direct read at offset 0 and
/// remembers the answer per device; a read past the end of an empty file (or of a hole) succeeds
/// without reaching the device and would wrongly enable the poll ring, whose reads then fail with
/// EOPNOTSUPP on devices without poll queues.
fn write_head(mut file: std::fs::File, path: &Path) -> Result<(), SsdError> {
    use std::io::Write;
    let mut head = vec![0u8; 1 << 20];
    fill(&mut head, 0x5eed);
    file.write_all(&head)
        .and_then(|()| file.sync_data())
        .map_err(io_err(format!("cannot write the test file {}", path.display())))
}

/// glibc's `major()` of a `dev_t`.
fn major(dev: u64) -> u64 {
    ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff)
}

/// glibc's `minor()` of a `dev_t`.
fn minor(dev: u64) -> u64 {
    ((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff)
}

/// The kernel name of the block device holding `path` (or of `path` itself, a device).
fn device_name(path: &Path, is_device: bool) -> String {
    let Ok(m) = std::fs::metadata(path) else { return String::new() };
    let dev = if is_device { m.rdev() } else { m.dev() };
    std::fs::canonicalize(format!("/sys/dev/block/{}:{}", major(dev), minor(dev)))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default()
}

/// Refuses a block device that is mounted, is swap, or is held by another device (LVM, md, dm),
/// counting its partitions.
fn check_unused(path: &Path, rdev: u64) -> Result<(), SsdError> {
    let me = format!("{}:{}", major(rdev), minor(rdev));
    let mut devs = vec![me.clone()];
    if let Ok(dir) = std::fs::read_dir(format!("/sys/dev/block/{me}")) {
        for e in dir.flatten() {
            let p = e.path();
            if p.join("partition").exists() {
                if let Ok(d) = std::fs::read_to_string(p.join("dev")) {
                    devs.push(d.trim().to_string());
                }
            }
        }
    }
    let refuse = |why: String| Err(SsdError::Invalid(format!("refusing to write to {}: {why}", path.display())));
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_err("cannot read /proc/self/mountinfo to check that the device is not mounted"))?;
    for line in mountinfo.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() > 4 && devs.iter().any(|d| d == f[2]) {
            return refuse(format!("device {} is mounted at {}", f[2], f[4]));
        }
    }
    for d in &devs {
        if let Ok(dir) = std::fs::read_dir(format!("/sys/dev/block/{d}/holders")) {
            if dir.flatten().next().is_some() {
                return refuse(format!("device {d} is held by another device (LVM, md or dm)"));
            }
        }
    }
    for line in std::fs::read_to_string("/proc/swaps").unwrap_or_default().lines().skip(1) {
        let Some(p) = line.split_whitespace().next() else { continue };
        if let Ok(m) = std::fs::metadata(p) {
            if m.file_type().is_block_device() && devs.contains(&format!("{}:{}", major(m.rdev()), minor(m.rdev()))) {
                return refuse(format!("{p} is in use as swap"));
            }
        }
    }
    Ok(())
}

/// The last online CPU (`/sys/devices/system/cpu/online`), else the last of the available ones.
fn last_cpu() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|s| s.trim().rsplit([',', '-']).next().and_then(|v| v.parse().ok()))
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()) - 1)
}

/// A keyed pseudo-random permutation of `0..n`: block indices without repeats.
#[derive(Debug, Clone, Copy)]
pub struct Permutation {
    n: u64,
    mask: u64,
    shift: u32,
    key: u64,
}

impl Permutation {
    /// A permutation of `0..n` (n >= 1) chosen by `key`.
    pub fn new(n: u64, key: u64) -> Self {
        let bits = 64 - n.saturating_sub(1).leading_zeros();
        let mask = if bits >= 64 { u64::MAX } else { (1u64 << bits) - 1 };
        Self { n: n.max(1), mask, shift: (bits / 2).max(1), key }
    }

    /// A bijection of `0..2^bits`: xor with the key, multiply by odd constants, xor-shift.
    fn mix(&self, x: u64) -> u64 {
        let m = self.mask;
        let mut x = (x ^ self.key) & m;
        x = x.wrapping_mul(0x9e37_79b9_7f4a_7c15) & m;
        x ^= x >> self.shift;
        x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9) & m;
        x ^= x >> self.shift;
        x.wrapping_add(self.key >> 17) & m
    }

    /// `n`, the number of elements.
    pub fn len(&self) -> u64 {
        self.n
    }

    /// Always false: a permutation has at least one element.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The `i`-th element (`i` wraps around `n`). Cycle-walks the bijection of `0..2^bits` until it
    /// lands in `0..n`, which keeps it a bijection of `0..n`.
    pub fn at(&self, i: u64) -> u64 {
        let mut x = i % self.n;
        loop {
            x = self.mix(x);
            if x < self.n {
                return x;
            }
        }
    }
}

/// splitmix64.
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `buf` with pseudo-random bytes (no run of zeros a device could compress away).
fn fill(buf: &mut [u8], seed: u64) {
    let mut s = seed;
    for chunk in buf.chunks_mut(8) {
        s = splitmix(s);
        chunk.copy_from_slice(&s.to_le_bytes()[..chunk.len()]);
    }
}

/// `4k`, `64k`, `1m` (for case names).
fn block_label(bs: u64) -> String {
    if bs % (1 << 20) == 0 {
        format!("{}m", bs >> 20)
    } else if bs % 1024 == 0 {
        format!("{}k", bs >> 10)
    } else {
        format!("{bs}b")
    }
}

/// The open files of a sweep.
struct Files {
    dma: DmaFile,
    buffered: Option<BufferedFile>,
    bytes: u64,
}

impl Files {
    fn buffered(&self) -> &BufferedFile {
        self.buffered.as_ref().expect("the buffered file is open whenever a buffered case runs")
    }

    async fn sync(&self, mode: Mode) -> Result<(), SsdError> {
        match mode {
            Mode::Direct => self.dma.fdatasync().await.map_err(io_err("fdatasync")),
            Mode::Buffered => self.buffered().fdatasync().await.map_err(io_err("fdatasync")),
        }
    }

    /// Drops the file's pages from the page cache (they are clean after the `fdatasync`).
    async fn drop_cache(&self) -> Result<(), SsdError> {
        self.sync(Mode::Buffered).await?;
        posix_fadvise(self.buffered().as_raw_fd(), 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED)
            .map_err(io_err("posix_fadvise(DONTNEED)"))
    }
}

/// One case's settings.
#[derive(Debug, Clone, Copy)]
struct CaseSpec {
    op: Op,
    mode: Mode,
    bs: u64,
    qd: usize,
    /// Batches in flight; `None`: one operation per task, no batches.
    inflight: Option<usize>,
    seed: u64,
}

async fn sweep(t: TargetInfo, opts: SsdOptions, progress: Arc<Progress>) -> Result<Vec<Case>, SsdError> {
    let writes = opts.ops.contains(&Op::Write);
    let path_s = t.path.display().to_string();
    let dma = OpenOptions::new()
        .read(true)
        .write(writes || t.created)
        .dma_open(&t.path)
        .await
        .map_err(io_err(format!("cannot open {path_s} with O_DIRECT")))?;
    let align = dma.alignment();
    let direct = opts.modes.contains(&Mode::Direct);
    if let Some(&b) = opts.block_sizes.iter().find(|&&b| direct && b % align != 0) {
        return Err(SsdError::Invalid(format!(
            "block size {b} is not a multiple of {path_s}'s O_DIRECT alignment {align}"
        )));
    }
    let buffered = if opts.modes.contains(&Mode::Buffered) {
        let f = OpenOptions::new()
            .read(true)
            .write(writes)
            .buffered_open(&t.path)
            .await
            .map_err(io_err(format!("cannot open {path_s}")))?;
        posix_fadvise(f.as_raw_fd(), 0, 0, PosixFadviseAdvice::POSIX_FADV_RANDOM)
            .map_err(io_err("posix_fadvise(RANDOM)"))?;
        Some(f)
    } else {
        None
    };
    let files = Rc::new(Files { dma, buffered, bytes: t.bytes });
    if t.created {
        progress.set_message(format!("writing the {} test file", format_bytes(t.bytes)));
        let max_bs = opts.block_sizes.iter().copied().max().unwrap_or(4096);
        prepare(&files, max_bs).await?;
    }
    let mut cases = Vec::new();
    let mut index = 0u64;
    let inflights: Vec<Option<usize>> = match &opts.inflights {
        Some(v) => v.iter().copied().map(Some).collect(),
        None => vec![None],
    };
    for &mode in &opts.modes {
        for &op in &opts.ops {
            for &bs in &opts.block_sizes {
                for &inflight in &inflights {
                    for &qd in &opts.qds {
                        let name = case_name(op, mode, inflight, qd, bs);
                        progress.set_message(name.clone());
                        index += 1;
                        let seed = splitmix(index ^ 0x6b76_6c6f_6674);
                        let spec = CaseSpec { op, mode, bs, qd, inflight, seed };
                        let mut case = run_case(&files, spec, &opts).await?;
                        case.name = name;
                        let p = &mut case.params;
                        p.insert("path".into(), path_s.clone().into());
                        p.insert("device".into(), t.device.clone().into());
                        p.insert("cpu".into(), t.cpu.into());
                        cases.push(case);
                        progress.inc();
                    }
                }
            }
        }
    }
    Ok(cases)
}

/// `read_direct_qd8_64k`; with batches in flight, `read_direct_if2_qd8_64k`.
fn case_name(op: Op, mode: Mode, inflight: Option<usize>, qd: usize, bs: u64) -> String {
    let inflight = inflight.map_or_else(String::new, |n| format!("_if{n}"));
    format!("{}_{}{inflight}_qd{qd}_{}", op.as_str(), mode.as_str(), block_label(bs))
}

/// Writes the whole region once, sequentially with O_DIRECT, and syncs it.
async fn prepare(files: &Rc<Files>, max_bs: u64) -> Result<(), SsdError> {
    let chunk = if files.bytes % (1 << 20) == 0 { 1u64 << 20 } else { max_bs };
    // Some file systems cannot preallocate; the writes below allocate the blocks anyway.
    let _ = files.dma.pre_allocate(files.bytes, false).await;
    let mut buf = files.dma.alloc_dma_buffer(chunk as usize);
    fill(buf.as_bytes_mut(), 0x5eed);
    let buf = Rc::new(buf);
    let next = Rc::new(Cell::new(0u64));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (files, buf, next) = (files.clone(), buf.clone(), next.clone());
            glommio::spawn_local(async move {
                loop {
                    let off = next.get();
                    if off >= files.bytes {
                        return Ok(());
                    }
                    next.set(off + chunk);
                    let n = files.dma.write_rc_at(buf.clone(), off).await.map_err(io_err("writing the test file"))?;
                    if n as u64 != chunk {
                        return Err(SsdError::Invalid(format!("short write preparing the test file at {off}")));
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await?;
    }
    files.dma.fdatasync().await.map_err(io_err("fdatasync of the test file"))
}

async fn run_case(files: &Rc<Files>, spec: CaseSpec, opts: &SsdOptions) -> Result<Case, SsdError> {
    let blocks = files.bytes / spec.bs;
    let perm = Permutation::new(blocks, spec.seed);
    let next = Rc::new(Cell::new(0u64));
    if spec.mode == Mode::Buffered && spec.op == Op::Read {
        files.drop_cache().await?;
    }
    // Warm-up: same load, not recorded; the timed phase continues the permutation, so it does not
    // re-read what the warm-up read.
    phase(files, spec, perm, &next, Instant::now() + opts.warmup, u64::MAX).await?;
    if spec.op == Op::Write {
        files.sync(spec.mode).await?;
    }
    let first = next.get();
    let limit = opts.max_ops_per_case.map_or(u64::MAX, |m| first.saturating_add(m));
    let t0 = Instant::now();
    let (hist, ops) = phase(files, spec, perm, &next, t0 + opts.seconds_per_case, limit).await?;
    if spec.op == Op::Write {
        files.sync(spec.mode).await?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let bytes = ops * spec.bs;
    let mut case = Case::default().with_latency(&hist);
    case.samples = ops;
    case.iops = Some(ops as f64 / secs);
    case.gbps = Some(bytes as f64 / secs / 1e9);
    let page_cache = match (spec.mode, spec.op) {
        (Mode::Direct, _) => "bypassed",
        (Mode::Buffered, Op::Read) => "dropped",
        (Mode::Buffered, Op::Write) => "write-back",
    };
    let round = |v: f64, d: i32| (v * 10f64.powi(d)).round() / 10f64.powi(d);
    let p = &mut case.params;
    p.insert("op".into(), spec.op.as_str().into());
    p.insert("direct".into(), (spec.mode == Mode::Direct).into());
    p.insert("mode".into(), spec.mode.as_str().into());
    p.insert("qd".into(), spec.qd.into());
    if let Some(n) = spec.inflight {
        p.insert("inflight".into(), n.into());
        p.insert("batch_latency".into(), true.into());
    }
    p.insert("block_bytes".into(), spec.bs.into());
    p.insert("file_bytes".into(), files.bytes.into());
    p.insert("page_cache".into(), page_cache.into());
    p.insert("synced".into(), (spec.op == Op::Write).into());
    p.insert("seconds".into(), round(secs, 4).into());
    p.insert("file_passes".into(), round((first + ops) as f64 * spec.bs as f64 / files.bytes as f64, 3).into());
    Ok(case)
}

/// Runs `qd` workers (or, with batches, `inflight` batch workers) until `deadline` or until the
/// shared index reaches `limit`.
async fn phase(
    files: &Rc<Files>,
    spec: CaseSpec,
    perm: Permutation,
    next: &Rc<Cell<u64>>,
    deadline: Instant,
    limit: u64,
) -> Result<(Histogram<u64>, u64), SsdError> {
    let tasks: Vec<_> = match spec.inflight {
        None => (0..spec.qd)
            .map(|w| {
                let (files, next) = (files.clone(), next.clone());
                glommio::spawn_local(worker(files, spec, perm, next, deadline, limit, w as u64))
            })
            .collect(),
        Some(n) => (0..n)
            .map(|w| {
                let (files, next) = (files.clone(), next.clone());
                glommio::spawn_local(batch_worker(files, spec, perm, next, deadline, limit, w as u64))
            })
            .collect(),
    };
    let mut hist = new_histogram()?;
    let mut ops = 0;
    for t in tasks {
        let (h, n) = t.await?;
        hist.add(&h).map_err(|e| SsdError::Invalid(format!("merging histograms: {e}")))?;
        ops += n;
    }
    Ok((hist, ops))
}

fn new_histogram() -> Result<Histogram<u64>, SsdError> {
    Histogram::<u64>::new(3).map_err(|e| SsdError::Invalid(format!("histogram: {e}")))
}

/// One in-flight slot: issues an operation, waits for it, records its latency, repeats.
async fn worker(
    files: Rc<Files>,
    spec: CaseSpec,
    perm: Permutation,
    next: Rc<Cell<u64>>,
    deadline: Instant,
    limit: u64,
    w: u64,
) -> Result<(Histogram<u64>, u64), SsdError> {
    let mut hist = new_histogram()?;
    let bs = spec.bs as usize;
    let seed = spec.seed ^ (w << 32);
    let dma_buf = match (spec.op, spec.mode) {
        (Op::Write, Mode::Direct) => {
            let mut b = files.dma.alloc_dma_buffer(bs);
            fill(b.as_bytes_mut(), seed);
            Some(Rc::new(b))
        }
        _ => None,
    };
    let template = match (spec.op, spec.mode) {
        (Op::Write, Mode::Buffered) => {
            let mut v = vec![0u8; bs];
            fill(&mut v, seed);
            v
        }
        _ => Vec::new(),
    };
    let mut ops = 0u64;
    loop {
        let i = next.get();
        if i >= limit || Instant::now() >= deadline {
            break;
        }
        next.set(i + 1);
        if spec.op == Op::Read && spec.mode == Mode::Buffered && i > 0 && i % perm.len() == 0 {
            // A new pass over the file: what the last pass read is cached, so drop it again.
            posix_fadvise(files.buffered().as_raw_fd(), 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED)
                .map_err(io_err("posix_fadvise(DONTNEED)"))?;
        }
        let pos = perm.at(i) * spec.bs;
        let (took, done) = match (spec.op, spec.mode) {
            (Op::Read, Mode::Direct) => {
                let t0 = Instant::now();
                let r = files.dma.read_at_aligned(pos, bs).await;
                (t0.elapsed(), r.map(|r| r.len()))
            }
            (Op::Read, Mode::Buffered) => {
                let t0 = Instant::now();
                let r = files.buffered().read_at(pos, bs).await;
                (t0.elapsed(), r.map(|r| r.len()))
            }
            (Op::Write, Mode::Direct) => {
                let buf = dma_buf.clone().expect("a direct writer has its buffer");
                let t0 = Instant::now();
                let r = files.dma.write_rc_at(buf, pos).await;
                (t0.elapsed(), r)
            }
            (Op::Write, Mode::Buffered) => {
                // glommio takes the buffer by value: each write hands over its own copy.
                let data = template.clone();
                let t0 = Instant::now();
                let r = files.buffered().write_at(data, pos).await;
                (t0.elapsed(), r)
            }
        };
        let n = done.map_err(io_err(format!("{} of {bs} bytes at {pos}", spec.op.as_str())))?;
        if n != bs {
            return Err(SsdError::Invalid(format!("short {}: {n} of {bs} bytes at {pos}", spec.op.as_str())));
        }
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX).max(1);
        hist.record(ns).map_err(|e| SsdError::Invalid(format!("recording a latency of {ns} ns: {e}")))?;
        ops += 1;
    }
    Ok((hist, ops))
}

/// One batch submitter: claims up to `qd` indices, issues all their operations at once, waits for
/// the whole batch, records the batch's latency, repeats.
async fn batch_worker(
    files: Rc<Files>,
    spec: CaseSpec,
    perm: Permutation,
    next: Rc<Cell<u64>>,
    deadline: Instant,
    limit: u64,
    w: u64,
) -> Result<(Histogram<u64>, u64), SsdError> {
    let mut hist = new_histogram()?;
    let bs = spec.bs as usize;
    // One buffer per slot of the batch, each with its own data.
    let seeds: Vec<u64> = (0..spec.qd as u64).map(|k| spec.seed ^ (w << 32) ^ (k << 16)).collect();
    let dma_bufs: Vec<_> = match (spec.op, spec.mode) {
        (Op::Write, Mode::Direct) => seeds
            .iter()
            .map(|&s| {
                let mut b = files.dma.alloc_dma_buffer(bs);
                fill(b.as_bytes_mut(), s);
                Rc::new(b)
            })
            .collect(),
        _ => Vec::new(),
    };
    let templates: Vec<Vec<u8>> = match (spec.op, spec.mode) {
        (Op::Write, Mode::Buffered) => seeds
            .iter()
            .map(|&s| {
                let mut v = vec![0u8; bs];
                fill(&mut v, s);
                v
            })
            .collect(),
        _ => Vec::new(),
    };
    let mut ops = 0u64;
    loop {
        let i = next.get();
        if i >= limit || Instant::now() >= deadline {
            break;
        }
        let n = (spec.qd as u64).min(limit - i);
        next.set(i + n);
        if spec.op == Op::Read && spec.mode == Mode::Buffered && (i..i + n).any(|j| j > 0 && j % perm.len() == 0) {
            // A new pass over the file: what the last pass read is cached, so drop it again.
            posix_fadvise(files.buffered().as_raw_fd(), 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED)
                .map_err(io_err("posix_fadvise(DONTNEED)"))?;
        }
        // Buffered writes hand over a copy of their block (outside the timer, as in `worker`).
        let datas: Vec<Vec<u8>> = (0..n as usize).map(|k| templates.get(k).cloned().unwrap_or_default()).collect();
        let t0 = Instant::now();
        let batch: Vec<_> = datas
            .into_iter()
            .enumerate()
            .map(|(k, data)| {
                let pos = perm.at(i + k as u64) * spec.bs;
                let buf = dma_bufs.get(k).cloned();
                let files = &files;
                async move { (pos, batch_op(files, spec, pos, buf, data).await) }
            })
            .collect();
        let results = join_all(batch).await;
        let took = t0.elapsed();
        for (pos, done) in results {
            let got = done.map_err(io_err(format!("{} of {bs} bytes at {pos}", spec.op.as_str())))?;
            if got != bs {
                return Err(SsdError::Invalid(format!("short {}: {got} of {bs} bytes at {pos}", spec.op.as_str())));
            }
        }
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX).max(1);
        hist.record(ns).map_err(|e| SsdError::Invalid(format!("recording a latency of {ns} ns: {e}")))?;
        ops += n;
    }
    Ok((hist, ops))
}

/// One operation of a batch; returns the bytes done.
async fn batch_op(
    files: &Files,
    spec: CaseSpec,
    pos: u64,
    dma_buf: Option<Rc<glommio::io::DmaBuffer>>,
    data: Vec<u8>,
) -> std::io::Result<usize> {
    let bs = spec.bs as usize;
    let r = match (spec.op, spec.mode) {
        (Op::Read, Mode::Direct) => files.dma.read_at_aligned(pos, bs).await.map(|r| r.len()),
        (Op::Read, Mode::Buffered) => files.buffered().read_at(pos, bs).await.map(|r| r.len()),
        (Op::Write, Mode::Direct) => {
            files.dma.write_rc_at(dma_buf.expect("a direct batch writer has its buffers"), pos).await
        }
        (Op::Write, Mode::Buffered) => files.buffered().write_at(data, pos).await,
    };
    r.map_err(Into::into)
}

/// Awaits all `futs`, polling each on every wake-up, so that their first polls (which queue their
/// operations) happen together; returns their outputs in order.
async fn join_all<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    use std::task::Poll;
    let mut futs: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => *o = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(|o| o.expect("every future finished")).collect()
}

/// Prints one line per case.
pub fn print_table(report: &Report) {
    println!("{:<28} {:>10} {:>8} {:>10} {:>10} {:>10}", "case", "IOPS", "GB/s", "p50 us", "p99 us", "max us");
    let f = |v: Option<f64>, d: usize| v.map_or_else(|| "-".to_string(), |v| format!("{v:.d$}"));
    for c in &report.cases {
        println!(
            "{:<28} {:>10} {:>8} {:>10} {:>10} {:>10}",
            c.name,
            f(c.iops, 0),
            f(c.gbps, 3),
            f(c.p50_us, 1),
            f(c.p99_us, 1),
            f(c.max_us, 1)
        );
    }
}

/// The suite's chart: GB/s, IOPS and p99 latency against queue depth, one line per block size,
/// one column per operation and mode.
pub fn plot_spec(report: &Report) -> PlotSpec {
    let first = report.cases.first().map(|c| &c.params);
    let get = |k: &str| first.and_then(|p| p.get(k)).cloned().unwrap_or_default();
    let file = get("file_bytes").as_u64().map(format_bytes).unwrap_or_default();
    let path = get("path").as_str().unwrap_or_default().to_string();
    let device = get("device").as_str().map(|d| format!(" on {d}")).unwrap_or_default();
    PlotSpec {
        title: format!(
            "kvloft bench ssd: random I/O through io_uring, {file} region of {path}{device} ({}, {})",
            report.machine.hostname, report.started_at
        ),
        x_param: "qd".into(),
        x_label: "queue depth (operations in flight)".into(),
        x_log2: true,
        group_by: vec!["block_bytes".into()],
        legend_title: "block size".into(),
        panel_by: vec!["op".into(), "mode".into()],
        rows: vec![
            Row { figures: vec![Figure::Gbps], y_log: false, y_label: "GB/s".into() },
            Row { figures: vec![Figure::Iops], y_log: true, y_label: "IOPS".into() },
            Row { figures: vec![Figure::P99Us], y_log: true, y_label: "p99 latency (µs)".into() },
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("16KiB"), Ok(16384));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("1mib"), Ok(1 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert!(parse_size("4X").is_err());
        assert!(parse_size("K").is_err());
    }

    #[test]
    fn permutations_visit_every_block_once() {
        for n in [1u64, 2, 3, 7, 64, 100, 1000, 4097] {
            for key in [0u64, 1, 0xdead_beef] {
                let p = Permutation::new(n, key);
                let mut seen = vec![false; n as usize];
                for i in 0..n {
                    let x = p.at(i) as usize;
                    assert!(!seen[x], "n={n} key={key}: {x} twice");
                    seen[x] = true;
                }
            }
        }
    }

    #[test]
    fn permutations_are_not_sequential() {
        let p = Permutation::new(1 << 18, 42);
        let sequential = (0..1000).filter(|&i| p.at(i + 1) == p.at(i) + 1).count();
        assert!(sequential < 10, "{sequential}");
    }

    #[test]
    fn case_names() {
        assert_eq!(case_name(Op::Read, Mode::Direct, None, 8, 64 << 10), "read_direct_qd8_64k");
        assert_eq!(case_name(Op::Write, Mode::Buffered, Some(2), 4, 4096), "write_buffered_if2_qd4_4k");
        assert_eq!(block_label(4096), "4k");
        assert_eq!(block_label(1 << 20), "1m");
        assert_eq!(block_label(256 << 10), "256k");
        assert_eq!(block_label(512), "512b");
    }

    #[test]
    fn device_numbers() {
        // makedev(259, 3) as glibc encodes it.
        let dev = ((259u64 & 0xfff) << 8) | (3 & 0xff);
        assert_eq!((major(dev), minor(dev)), (259, 3));
    }

    #[test]
    fn mounted_devices_are_refused() {
        // Only looks: check_unused never writes. Skips where no mount source is a device node here.
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut checked = 0;
        for line in mountinfo.lines() {
            let Some((_, after)) = line.split_once(" - ") else { continue };
            let Some(source) = after.split(' ').nth(1) else { continue };
            let Ok(m) = std::fs::metadata(source) else { continue };
            if !m.file_type().is_block_device() {
                continue;
            }
            let e = check_unused(Path::new(source), m.rdev()).unwrap_err();
            assert!(e.to_string().contains("mounted"), "{e}");
            checked += 1;
        }
        eprintln!("checked {checked} mounted devices");
    }

    #[test]
    fn a_tiny_inflight_case_runs() {
        let dir = tempfile::tempdir().unwrap();
        let opts = SsdOptions {
            path: Some(dir.path().to_path_buf()),
            file_size: Some(16 << 20),
            qds: vec![4],
            inflights: Some(vec![2]),
            block_sizes: vec![4 << 10],
            modes: vec![Mode::Direct],
            ops: vec![Op::Read],
            seconds_per_case: Duration::from_millis(100),
            warmup: Duration::from_millis(10),
            progress: false,
            ..SsdOptions::default()
        };
        let report = run(&opts).expect("an inflight case runs on a temporary file");
        assert_eq!(report.cases.len(), 1);
        let c = &report.cases[0];
        assert_eq!(c.name, "read_direct_if2_qd4_4k");
        assert!(c.iops.unwrap() > 0.0 && c.samples > 0, "{c:?}");
        assert_eq!(c.params["inflight"], 2);
        assert_eq!(c.params["qd"], 4);
        assert_eq!(c.params["batch_latency"], true);
        assert!(c.p50_us.unwrap() > 0.0);
    }

    #[test]
    fn inflight_counts_are_validated() {
        assert!(validate(&SsdOptions { inflights: Some(vec![]), ..SsdOptions::default() }).is_err());
        assert!(validate(&SsdOptions { inflights: Some(vec![0]), ..SsdOptions::default() }).is_err());
        assert!(validate(&SsdOptions::default()).is_ok());
    }

    #[test]
    fn existing_files_need_allow_write() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let opts = SsdOptions { path: Some(f.path().to_path_buf()), ..SsdOptions::default() };
        let e = resolve(&opts).unwrap_err();
        assert!(e.to_string().contains("--allow-write"), "{e}");
    }
}
