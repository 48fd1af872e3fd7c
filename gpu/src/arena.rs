//! One shard's slice of the pinned host pool.
//!
//! An [`Arena`] is one anonymous private mapping, made once at start and kept for the life of the
//! shard. Building it:
//!
//! 1. `mmap`, with 2 MiB hugepages when asked and the kernel has enough reserved, otherwise with
//!    ordinary pages (the reason is kept in [`Arena::notes`]). The size is rounded up to the page.
//!    The mapping sits inside a larger inaccessible reservation, so at least [`GUARD_BYTES`] of
//!    address space that is no arena's lies on each side: two arenas are never adjacent. Copies
//!    merge neighbouring ranges (`plan::merge`), and a range running from one shard's arena into
//!    the next would span two GPU registrations, which the driver refuses
//!    (`CUDA_ERROR_INVALID_VALUE`); with kernels placing mappings back to back, that happened
//!    as soon as the allocator stopped leaving its own mappings between arenas (decision 50).
//! 2. `mbind(MPOL_BIND)` to the requested NUMA node, on machines with more than one node. A
//!    failure is a note, not an error: the arena still works, only placed by the default policy.
//! 3. Pre-touch: every page is written once, by up to [`MAX_TOUCH_THREADS`] threads in parallel
//!    (pinned to the node's CPUs when bound), so page faults and zeroing happen at start, not on the
//!    first save. [`Arena::touch_duration`] and [`Arena::prefault_gbps`] report how long it took.
//! 4. `mlock`, so the pool is never swapped and its physical pages stay put for DMA registration.
//!
//! The memory is reached by raw pointer ([`Arena::as_ptr`]) by the copy backends, and through the
//! bounds-checked [`Arena::read`] and [`Arena::write`] elsewhere (tests, the SSD tier).

use std::io;
use std::ptr::NonNull;
use std::time::{Duration, Instant};

/// Inaccessible address space kept on each side of an arena (see the module doc).
pub const GUARD_BYTES: usize = 2 << 20;

/// Bytes of one hugepage this module asks for (`MAP_HUGE_2MB`).
pub const HUGE_PAGE_BYTES: u64 = 2 << 20;
/// Most threads that pre-touch one arena.
pub const MAX_TOUCH_THREADS: usize = 8;

/// `MPOL_BIND` from `<linux/mempolicy.h>`: allocate only on the given nodes.
const MPOL_BIND: libc::c_long = 2;
/// `CAP_IPC_LOCK`: the capability that lifts `RLIMIT_MEMLOCK`.
const CAP_IPC_LOCK_BIT: u32 = 14;

/// Why an arena could not be built or accessed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArenaError {
    /// A zero-byte arena was asked for.
    #[error("an arena must hold at least one byte")]
    Empty,
    /// The size does not fit this machine's address space.
    #[error("an arena of {bytes} bytes does not fit the address space; lower the pool size")]
    TooLarge {
        /// Requested bytes.
        bytes: u64,
    },
    /// The kernel refused the mapping.
    #[error("mmap of {bytes} bytes failed: {source}; lower the pool size or free memory")]
    Map {
        /// Bytes asked for (after rounding to the page size).
        bytes: u64,
        /// The OS error.
        source: io::Error,
    },
    /// The arena could not be locked in memory; `message` says what to change.
    #[error("{message}")]
    Lock {
        /// Bytes to lock.
        bytes: u64,
        /// What failed and how to fix it.
        message: String,
        /// The OS error, when `mlock` itself failed (`None` when refused before trying).
        source: Option<io::Error>,
    },
    /// A read or write reaches outside the arena.
    #[error("{len} bytes at offset {offset} reach outside the {arena_bytes}-byte arena")]
    OutOfBounds {
        /// Offset of the access.
        offset: u64,
        /// Bytes of the access.
        len: u64,
        /// Bytes of the arena.
        arena_bytes: u64,
    },
}

/// One shard's slice of the pinned host pool: an anonymous mapping, NUMA-bound where possible,
/// pre-touched and locked. Dropping it unlocks and unmaps the memory.
pub struct Arena {
    ptr: NonNull<u8>,
    len: usize,
    /// The reservation holding the mapping and its guards: what `Drop` unmaps.
    reserved: (usize, usize),
    page_bytes: usize,
    hugepages: bool,
    node: Option<u32>,
    locked: bool,
    touch_duration: Duration,
    notes: Vec<String>,
}

// SAFETY: the arena owns its mapping outright (nothing else holds the address, and the mapping
// lives until `Drop`), so moving it to another thread moves sole ownership, like a `Box<[u8]>`.
unsafe impl Send for Arena {}
// SAFETY: the safe API reads through `&self` ([`Arena::read`]) and writes only through `&mut self`
// ([`Arena::write`]), so shared references never race. Writes through [`Arena::as_ptr`] happen in
// unsafe code that must itself exclude concurrent access, as its documentation says.
unsafe impl Sync for Arena {}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .field("page_bytes", &self.page_bytes)
            .field("hugepages", &self.hugepages)
            .field("node", &self.node)
            .field("locked", &self.locked)
            .field("touch_duration", &self.touch_duration)
            .field("notes", &self.notes)
            .finish()
    }
}

impl Arena {
    /// Maps, binds, pre-touches and locks an arena of at least `bytes` bytes.
    ///
    /// `node` binds the memory to that NUMA node when the machine has more than one (ignored on a
    /// single-node machine). `hugepages` asks for 2 MiB pages; when too few are reserved the arena
    /// uses ordinary pages and says so in [`Arena::notes`]. Fails when the mapping is refused or
    /// the memory cannot be locked ([`ArenaError::Lock`] names the limit to raise).
    pub fn new(bytes: u64, node: Option<u32>, hugepages: bool) -> Result<Arena, ArenaError> {
        if bytes == 0 {
            return Err(ArenaError::Empty);
        }
        let mut notes = Vec::new();
        let multi_node = online_nodes().is_some_and(|nodes| nodes.len() > 1);
        let bind_node = node.filter(|_| multi_node);

        let mut mapped = None;
        if hugepages {
            let len = round_up(bytes, HUGE_PAGE_BYTES)?;
            let need = (len / HUGE_PAGE_BYTES as usize) as u64;
            let free = free_hugepages(bind_node);
            // The hugepage reservation made by mmap is global; with a bound node the pages must come
            // from that node, and a shortfall there would be a SIGBUS at first touch. Check first.
            let node_short = bind_node.is_some() && free.is_none_or(|f| f < need);
            if !node_short {
                mapped = map(len, true).ok().map(|(ptr, reserved)| (ptr, reserved, len, HUGE_PAGE_BYTES as usize));
            }
            if mapped.is_none() {
                notes.push(hugepage_note(free, need, bind_node));
            }
        }
        let (ptr, reserved, len, page_bytes) = match mapped {
            Some(m) => m,
            None => {
                let page = small_page_bytes();
                let len = round_up(bytes, page as u64)?;
                let (ptr, reserved) =
                    map(len, false).map_err(|source| ArenaError::Map { bytes: len as u64, source })?;
                (ptr, reserved, len, page)
            }
        };
        // From here on, `Drop` unmaps on every error path.
        let mut arena = Arena {
            ptr,
            len,
            reserved,
            page_bytes,
            hugepages: page_bytes == HUGE_PAGE_BYTES as usize,
            node: None,
            locked: false,
            touch_duration: Duration::ZERO,
            notes,
        };
        if let Some(n) = bind_node {
            match arena.bind(n) {
                Ok(()) => arena.node = Some(n),
                Err(e) => arena.notes.push(format!(
                    "mbind of the arena to NUMA node {n} failed ({e}): its pages are placed by the default policy"
                )),
            }
        }
        check_memlock_limit(arena.len as u64)?;
        arena.touch(arena.node);
        arena.lock()?;
        Ok(arena)
    }

    /// Bytes of the arena (the request rounded up to the page size).
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// Always false: an arena holds at least one page.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Start of the mapping. Reads and writes through it are the caller's to keep in bounds and
    /// free of races with [`Arena::read`], [`Arena::write`] and other raw users.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Bytes of one page of the mapping: 2 MiB with hugepages, the base page size otherwise.
    pub fn page_bytes(&self) -> u64 {
        self.page_bytes as u64
    }

    /// Whether the arena is actually backed by hugepages.
    pub fn hugepages(&self) -> bool {
        self.hugepages
    }

    /// The NUMA node the memory is bound to; `None` when not asked, on a single-node machine, or
    /// when binding failed (see [`Arena::notes`]).
    pub fn node(&self) -> Option<u32> {
        self.node
    }

    /// Human-readable remarks about what was asked for and not obtained (hugepages, NUMA binding).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Wall time spent pre-touching every page.
    pub fn touch_duration(&self) -> Duration {
        self.touch_duration
    }

    /// Pre-touch speed, in GB/s (10^9 bytes per second).
    pub fn prefault_gbps(&self) -> f64 {
        let secs = self.touch_duration.as_secs_f64();
        if secs > 0.0 {
            self.len as f64 / secs / 1e9
        } else {
            f64::INFINITY
        }
    }

    /// Copies `buf.len()` bytes at `offset` out of the arena.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ArenaError> {
        let start = self.check_range(offset, buf.len() as u64)?;
        // SAFETY: `check_range` keeps `start..start + buf.len()` inside the mapping, which lives as
        // long as `self`; `buf` is a distinct Rust allocation (a `&mut` cannot alias arena bytes
        // that safe code can reach), and writers need `&mut self`, so nothing writes meanwhile.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(start), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies `data` into the arena at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), ArenaError> {
        let start = self.check_range(offset, data.len() as u64)?;
        // SAFETY: as in `read`; `&mut self` makes this the only access to the arena.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(start), data.len()) };
        Ok(())
    }

    /// Checks that `len` bytes at `offset` lie inside the arena; returns `offset` as `usize`.
    pub(crate) fn check_range(&self, offset: u64, len: u64) -> Result<usize, ArenaError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len as u64 => Ok(offset as usize),
            _ => Err(ArenaError::OutOfBounds { offset, len, arena_bytes: self.len as u64 }),
        }
    }

    fn bind(&self, node: u32) -> io::Result<()> {
        let bits = 8 * std::mem::size_of::<libc::c_ulong>();
        let mut mask: Vec<libc::c_ulong> = vec![0; node as usize / bits + 1];
        mask[node as usize / bits] |= 1 << (node as usize % bits);
        // The kernel reads `maxnode - 1` bits.
        let maxnode = (mask.len() * bits + 1) as libc::c_ulong;
        // SAFETY: mbind only changes the memory policy of our own mapping `ptr..ptr + len`; `mask`
        // is valid for `maxnode - 1` bits for the duration of the call.
        let rc = unsafe {
            libc::syscall(libc::SYS_mbind, self.ptr.as_ptr(), self.len, MPOL_BIND, mask.as_ptr(), maxnode, 0u32)
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Writes one byte per page, in parallel, so every page is faulted in and zeroed now.
    fn touch(&mut self, node: Option<u32>) {
        let pages = self.len / self.page_bytes;
        let parallelism = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = parallelism.min(MAX_TOUCH_THREADS).min(pages).max(1);
        let cpus = node.and_then(node_cpus);
        let base = SendPtr(self.ptr.as_ptr());
        let page_bytes = self.page_bytes;
        let start = Instant::now();
        std::thread::scope(|scope| {
            let mut unspawned = Vec::new();
            for t in 0..threads {
                let (lo, hi) = (pages * t / threads, pages * (t + 1) / threads);
                let cpus = cpus.as_deref();
                let spawned = std::thread::Builder::new().name("kvloft-touch".into()).spawn_scoped(scope, move || {
                    if let Some(cpus) = cpus {
                        pin_to(cpus);
                    }
                    touch_pages(base, page_bytes, lo, hi);
                });
                if spawned.is_err() {
                    unspawned.push((lo, hi));
                }
            }
            for (lo, hi) in unspawned {
                touch_pages(base, page_bytes, lo, hi);
            }
        });
        self.touch_duration = start.elapsed();
    }

    fn lock(&mut self) -> Result<(), ArenaError> {
        // SAFETY: mlock only pins the pages of our own mapping `ptr..ptr + len`.
        let rc = unsafe { libc::mlock(self.ptr.as_ptr().cast(), self.len) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(lock_error(self.len as u64, Some(e)));
        }
        self.locked = true;
        Ok(())
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr + len` is the mapping this arena made and owns, inside the reservation
        // `reserved` that it also owns; no reference into them outlives `self`, and raw users must
        // not use `as_ptr` after the arena is dropped.
        unsafe {
            if self.locked {
                libc::munlock(self.ptr.as_ptr().cast(), self.len);
            }
            libc::munmap(self.reserved.0 as *mut libc::c_void, self.reserved.1);
        }
    }
}

/// The arena's base pointer, handed to the pre-touch threads.
#[derive(Clone, Copy)]
struct SendPtr(*mut u8);

// SAFETY: the threads that receive it write disjoint page ranges of the arena's mapping, inside a
// thread scope that ends before `Arena::touch` returns; the arena is borrowed mutably meanwhile.
unsafe impl Send for SendPtr {}
// SAFETY: as for `Send`; the pointer itself is never written.
unsafe impl Sync for SendPtr {}

fn touch_pages(base: SendPtr, page_bytes: usize, lo: usize, hi: usize) {
    for page in lo..hi {
        // SAFETY: `page < len / page_bytes`, so the byte lies inside the mapping; each thread owns a
        // disjoint range of pages, and the mapping is fresh (all zero), so writing 0 changes nothing
        // but forces the fault. Volatile keeps the store from being elided.
        unsafe { base.0.add(page * page_bytes).write_volatile(0) };
    }
}

/// Pins the calling thread to `cpus`; failures are ignored (pinning only speeds the first touch).
fn pin_to(cpus: &[usize]) {
    // SAFETY: `cpu_set_t` is plain data for which all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let max = 8 * std::mem::size_of::<libc::cpu_set_t>();
    for &cpu in cpus.iter().filter(|&&c| c < max) {
        // SAFETY: `cpu` is below the set's capacity, checked above.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: `set` is a valid cpu set of the size passed; pid 0 is the calling thread.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
}

/// Maps `len` bytes inside a reservation with at least [`GUARD_BYTES`] of inaccessible address
/// space on each side, 2 MiB aligned (as hugepages need). Returns the mapping and the reservation
/// (base, length), which the caller unmaps as a whole.
fn map(len: usize, hugepages: bool) -> io::Result<(NonNull<u8>, (usize, usize))> {
    let align = HUGE_PAGE_BYTES as usize;
    let total = len
        .checked_add(2 * GUARD_BYTES + align)
        .ok_or_else(|| io::Error::other("the arena's reservation overflows the address space"))?;
    let none = libc::PROT_NONE;
    let reserve_flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    // SAFETY: an inaccessible anonymous reservation at an address of the kernel's choosing touches
    // no existing memory.
    let base = unsafe { libc::mmap(std::ptr::null_mut(), total, none, reserve_flags, -1, 0) };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let base = base as usize;
    let start = (base + GUARD_BYTES).next_multiple_of(align);
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED;
    if hugepages {
        flags |= libc::MAP_HUGETLB | libc::MAP_HUGE_2MB;
    }
    // SAFETY: `start..start + len` lies inside the reservation just made, which nothing else uses
    // (start + len <= base + GUARD + align + len, which leaves GUARD_BYTES before its end), so
    // MAP_FIXED replaces only our own inaccessible pages.
    let ptr = unsafe { libc::mmap(start as *mut libc::c_void, len, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) };
    if ptr == libc::MAP_FAILED {
        let e = io::Error::last_os_error();
        // SAFETY: the reservation is ours and nothing points into it.
        unsafe { libc::munmap(base as *mut libc::c_void, total) };
        return Err(e);
    }
    match NonNull::new(ptr.cast()) {
        Some(p) => Ok((p, (base, total))),
        None => Err(io::Error::other("mmap returned a null mapping")),
    }
}

fn small_page_bytes() -> usize {
    // SAFETY: sysconf reads a constant of the system.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page > 0 {
        page as usize
    } else {
        4096
    }
}

fn round_up(bytes: u64, page: u64) -> Result<usize, ArenaError> {
    let rounded = bytes.div_ceil(page).checked_mul(page).ok_or(ArenaError::TooLarge { bytes })?;
    if rounded > isize::MAX as u64 {
        return Err(ArenaError::TooLarge { bytes });
    }
    Ok(rounded as usize)
}

fn lock_error(bytes: u64, source: Option<io::Error>) -> ArenaError {
    let why = match &source {
        Some(e) => format!("mlock of the {bytes}-byte arena failed ({e})"),
        None => format!(
            "the {bytes}-byte arena exceeds this process's locked-memory limit ({} bytes)",
            memlock_limit().map_or_else(|| "unknown".to_string(), |l| l.to_string())
        ),
    };
    ArenaError::Lock {
        bytes,
        message: format!(
            "{why}: the pinned pool must be locked in memory; raise the limit (`ulimit -l unlimited` in the \
             shell, LimitMEMLOCK=infinity in the systemd unit, `memlock` in /etc/security/limits.conf, \
             `--ulimit memlock=-1` for docker), or run kvloft as root or with CAP_IPC_LOCK"
        ),
        source,
    }
}

/// Refuses early, before seconds of pre-touching, when `mlock` of `bytes` cannot succeed.
fn check_memlock_limit(bytes: u64) -> Result<(), ArenaError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 || has_cap_ipc_lock() {
        return Ok(());
    }
    match memlock_limit() {
        Some(limit) if limit < bytes => Err(lock_error(bytes, None)),
        _ => Ok(()),
    }
}

/// The soft `RLIMIT_MEMLOCK`, `None` when unlimited or unknown.
fn memlock_limit() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is a valid rlimit to fill in.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) };
    (rc == 0 && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

fn has_cap_ipc_lock() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return false };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK_BIT) != 0)
}

/// Parses a kernel list such as `0-3,8,10-11`.
pub(crate) fn parse_list(text: &str) -> Option<Vec<usize>> {
    let mut out = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi): (usize, usize) = (lo.parse().ok()?, hi.parse().ok()?);
                if hi < lo || hi - lo > 1 << 16 {
                    return None;
                }
                out.extend(lo..=hi);
            }
            None => out.push(part.parse().ok()?),
        }
    }
    Some(out)
}

fn online_nodes() -> Option<Vec<usize>> {
    parse_list(&std::fs::read_to_string("/sys/devices/system/node/online").ok()?)
}

fn node_cpus(node: u32) -> Option<Vec<usize>> {
    parse_list(&std::fs::read_to_string(format!("/sys/devices/system/node/node{node}/cpulist")).ok()?)
        .filter(|cpus| !cpus.is_empty())
}

fn hugepage_dir(node: Option<u32>) -> String {
    match node {
        Some(n) => format!("/sys/devices/system/node/node{n}/hugepages/hugepages-2048kB"),
        None => "/sys/kernel/mm/hugepages/hugepages-2048kB".to_string(),
    }
}

fn read_count(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// 2 MiB hugepages free for a new mapping: on `node`, or machine-wide less those already promised
/// to other mappings. `None` when the kernel has no 2 MiB hugepage support.
pub(crate) fn free_hugepages(node: Option<u32>) -> Option<u64> {
    let dir = hugepage_dir(node);
    let free = read_count(&format!("{dir}/free_hugepages"))?;
    let reserved = if node.is_none() { read_count(&format!("{dir}/resv_hugepages")).unwrap_or(0) } else { 0 };
    Some(free.saturating_sub(reserved))
}

fn hugepage_note(free: Option<u64>, need: u64, node: Option<u32>) -> String {
    let place = node.map_or_else(|| "on this machine".to_string(), |n| format!("on node {n}"));
    let Some(free) = free else {
        return format!(
            "hugepages requested but the kernel offers no 2 MiB hugepages {place}: using 4 KiB pages \
             (enable CONFIG_HUGETLBFS, or drop the hugepages setting)"
        );
    };
    let dir = hugepage_dir(node);
    let path = if node.is_some() { format!("{dir}/nr_hugepages") } else { "/proc/sys/vm/nr_hugepages".to_string() };
    let target = read_count(&format!("{dir}/nr_hugepages")).unwrap_or(0) + need.saturating_sub(free);
    format!(
        "hugepages requested but only {free} free {place} (this arena needs {need} of 2 MiB): using 4 KiB pages; \
         reserve them with `echo {target} > {path}` as root (or `hugepages=` on the kernel command line, \
         where fragmentation cannot get in the way)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_lists() {
        assert_eq!(parse_list("0\n"), Some(vec![0]));
        assert_eq!(parse_list("0-3,8,10-11"), Some(vec![0, 1, 2, 3, 8, 10, 11]));
        assert_eq!(parse_list(""), Some(vec![]));
        assert_eq!(parse_list("3-1"), None);
        assert_eq!(parse_list("x"), None);
    }

    #[test]
    fn rounds_sizes_to_pages() {
        assert_eq!(round_up(1, 4096).unwrap(), 4096);
        assert_eq!(round_up(4096, 4096).unwrap(), 4096);
        assert_eq!(round_up(4097, HUGE_PAGE_BYTES).unwrap(), 2 << 20);
        assert!(matches!(round_up(u64::MAX, 4096), Err(ArenaError::TooLarge { .. })));
        assert!(matches!(round_up(1 << 63, 4096), Err(ArenaError::TooLarge { .. })));
    }

    #[test]
    fn hugepage_note_tells_how_to_reserve() {
        let note = hugepage_note(Some(3), 10, Some(0));
        assert!(note.starts_with("hugepages requested but only 3 free on node 0"), "{note}");
        assert!(note.contains("using 4 KiB pages"), "{note}");
        assert!(note.contains("/sys/devices/system/node/node0/hugepages/hugepages-2048kB/nr_hugepages"), "{note}");
        let note = hugepage_note(Some(0), 1, None);
        assert!(note.contains("on this machine") && note.contains("/proc/sys/vm/nr_hugepages"), "{note}");
        assert!(hugepage_note(None, 1, None).contains("no 2 MiB hugepages"));
    }

    #[test]
    fn lock_error_names_the_fix() {
        let e = lock_error(1 << 30, Some(io::Error::from_raw_os_error(libc::EPERM)));
        let msg = e.to_string();
        assert!(msg.contains("ulimit -l") && msg.contains("LimitMEMLOCK") && msg.contains("root"), "{msg}");
        assert!(matches!(e, ArenaError::Lock { bytes, source: Some(_), .. } if bytes == 1 << 30));
    }
}
