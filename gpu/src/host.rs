//! The `host` backend: KV caches that live in an ordinary CPU process.
//!
//! vLLM's CPU backend keeps its KV cache in torch CPU tensors. kvloft copies between those tensors
//! and pool pages with `process_vm_readv` (save: client to pool) and `process_vm_writev` (load: pool
//! to client): the kernel moves each byte once, straight between the client's pages and the pool,
//! with no staging buffer and no help from the client.
//!
//! # Layout
//! A client registers one [`LayerMemory`] per layer: segment `s` of engine block `b` starts at
//! `base + b * block_stride + s * segment_stride` and is `segment_bytes` long. A block's slice in
//! the pool is, for each layer in order and each segment in order, that segment's bytes, packed
//! ([`HostMemory::slice_bytes`] in all). Copies hand the kernel lists of ranges, merging ranges
//! that touch (a slot is one range on the pool side; K and V of one block, or neighbouring layers,
//! merge on the client side where they are adjacent), at most [`MAX_IOVECS`] per call.
//!
//! # Permissions
//! The server needs ptrace access to the client: the client calls `prctl(PR_SET_PTRACER, <server
//! pid>)`, or both run as the same user with `kernel.yama.ptrace_scope = 0`, or the server runs as
//! root (CAP_SYS_PTRACE). Otherwise copies fail with [`HostError::Permission`].
//!
//! # The server's own process
//! A [`HostMemory`] may name the server's own pid (tests do). `load_from` then writes into this
//! process's memory through the kernel, as writing `/proc/self/mem` would, outside what the
//! compiler can see. The server must take the client pid from the socket (`SO_PEERCRED`), never
//! from a message, so that only tests ever do this.

use std::io;

use kvloft_engine::protocol::{LayerMemory, MAX_BATCH_BLOCKS, MAX_LAYERS};

use crate::arena::{Arena, ArenaError};

/// Most ranges on either side of one `process_vm_readv`/`process_vm_writev` call (the kernel's
/// `IOV_MAX`); longer lists go in several calls.
pub const MAX_IOVECS: usize = 1024;
/// Most blocks one [`HostMemory::save`] or [`HostMemory::load`] may carry (the protocol's limit).
pub const MAX_ITEMS: usize = MAX_BATCH_BLOCKS;
/// Ranges are merged only while the result stays at or below this many bytes.
pub const MAX_IOV_BYTES: usize = 1 << 30;

/// Why a host copy or registration failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// The pid cannot name a client process.
    #[error("pid {pid} is not a valid client process id")]
    InvalidPid {
        /// The pid given.
        pid: i32,
    },
    /// No layers were registered.
    #[error("no layers registered: a KV cache needs at least one layer")]
    NoLayers,
    /// More layers than the protocol allows.
    #[error("{count} layers registered, more than the limit of {max}")]
    TooManyLayers {
        /// Layers given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// One layer description is unusable.
    #[error("layer {layer}: {field} {reason}")]
    InvalidLayer {
        /// Index of the layer.
        layer: usize,
        /// The field at fault.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// An engine block id beyond the registered cache.
    #[error("engine block {block_id} is out of range: layer {layer} holds {num_blocks} blocks")]
    BlockOutOfRange {
        /// The block id.
        block_id: u32,
        /// The first layer it does not fit.
        layer: usize,
        /// That layer's block count.
        num_blocks: u32,
    },
    /// Too many blocks in one copy.
    #[error("{items} blocks in one copy, more than the limit of {max}; split the batch")]
    TooManyItems {
        /// Blocks given.
        items: usize,
        /// The limit.
        max: usize,
    },
    /// A pool slot lies outside the arena.
    #[error("pool slot: {0}")]
    Slot(#[from] ArenaError),
    /// The kernel refused access to the client's memory.
    #[error(
        "no access to the memory of client process {pid} ({source}): the client must allow it with \
         prctl(PR_SET_PTRACER, {server_pid}), or run as the server's user with kernel.yama.ptrace_scope = 0, \
         or the server must run as root"
    )]
    Permission {
        /// Client pid.
        pid: i32,
        /// This server's pid, to pass to `PR_SET_PTRACER`.
        server_pid: u32,
        /// The OS error.
        source: io::Error,
    },
    /// Part of the registered memory is not mapped in the client.
    #[error(
        "client process {pid}: registered KV memory is not mapped ({source}); the client freed its cache \
         or registered wrong addresses"
    )]
    BadAddress {
        /// Client pid.
        pid: i32,
        /// The OS error.
        source: io::Error,
    },
    /// The client process no longer exists.
    #[error("client process {pid} has exited")]
    ClientGone {
        /// Client pid.
        pid: i32,
    },
    /// Any other failure of the copy call.
    #[error("{op} on client process {pid} failed: {source}")]
    Io {
        /// Client pid.
        pid: i32,
        /// The system call.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// The KV cache of one CPU-inference process, validated, and the copies in and out of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostMemory {
    pid: i32,
    layers: Vec<LayerMemory>,
    slice_bytes: u64,
}

#[derive(Debug, Clone, Copy)]
enum Direction {
    /// Client to pool.
    Save,
    /// Pool to client.
    Load,
}

impl HostMemory {
    /// Validates the layer descriptions of process `pid`'s KV cache. Errors name the layer index
    /// and the field at fault.
    ///
    /// Per layer: `segments` is 1 or 2, `segment_bytes` > 0, `num_blocks` > 0, with two segments
    /// `segment_stride >= segment_bytes`, no two segments of different blocks overlap (this accepts
    /// both K/V inside each block, `block_stride >= segment_stride + segment_bytes`, and a K plane
    /// followed by a V plane, `segment_stride >= num_blocks * block_stride`), and the last block
    /// ends below 2^64.
    pub fn new(pid: i32, layers: Vec<LayerMemory>) -> Result<Self, HostError> {
        if pid <= 0 {
            return Err(HostError::InvalidPid { pid });
        }
        let slice_bytes = validate_layers(&layers)?;
        Ok(HostMemory { pid, layers, slice_bytes })
    }

    /// The client process.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The layers, as registered.
    pub fn layers(&self) -> &[LayerMemory] {
        &self.layers
    }

    /// Bytes of one block's slice in the pool: every segment of every layer.
    pub fn slice_bytes(&self) -> u64 {
        self.slice_bytes
    }

    /// Checks that engine block `block_id` exists in every layer.
    pub fn check_block(&self, block_id: u32) -> Result<(), HostError> {
        match self.layers.iter().position(|l| block_id >= l.num_blocks) {
            Some(layer) => {
                Err(HostError::BlockOutOfRange { block_id, layer, num_blocks: self.layers[layer].num_blocks })
            }
            None => Ok(()),
        }
    }

    /// Copies engine blocks from the client into pool slots: for each `(block_id, slot)`, the block's
    /// slice is written to `slot..slot + slice_bytes`. Block ids are all checked before any copy.
    ///
    /// # Safety
    /// Every `slot` must be valid for writes of [`HostMemory::slice_bytes`] bytes, and nothing else
    /// may read or write those bytes until this returns (slots may overlap one another: the later
    /// item's bytes win).
    pub unsafe fn save(&self, items: &[(u32, *mut u8)]) -> Result<(), HostError> {
        self.check_items(items.iter().map(|&(block, _)| block), items.len())?;
        // SAFETY: block ids are checked; the caller guarantees the slots, as `copy` requires.
        unsafe { self.copy(Direction::Save, items.iter().copied()) }
    }

    /// Copies pool slots into engine blocks of the client: for each `(block_id, slot)`, the slice at
    /// `slot..slot + slice_bytes` is written to the block. Block ids are all checked before any copy.
    ///
    /// # Safety
    /// Every `slot` must be valid for reads of [`HostMemory::slice_bytes`] bytes, and nothing may
    /// write those bytes until this returns.
    pub unsafe fn load(&self, items: &[(u32, *const u8)]) -> Result<(), HostError> {
        self.check_items(items.iter().map(|&(block, _)| block), items.len())?;
        // SAFETY: block ids are checked; the caller guarantees the slots readable and unwritten, and
        // a load only reads them.
        unsafe { self.copy(Direction::Load, items.iter().map(|&(block, slot)| (block, slot.cast_mut()))) }
    }

    /// [`HostMemory::save`] into `arena`, at byte offsets checked against it.
    pub fn save_into(&self, arena: &mut Arena, items: &[(u32, u64)]) -> Result<(), HostError> {
        self.check_slots(arena, items)?;
        let base = arena.as_ptr();
        let slots = items.iter().map(|&(block, offset)| (block, base.wrapping_add(offset as usize)));
        // SAFETY: `check_slots` checked the block ids and that every slot's `slice_bytes` lie inside
        // the arena, whose mapping is writable; `&mut Arena` keeps every other access out meanwhile.
        unsafe { self.copy(Direction::Save, slots) }
    }

    /// [`HostMemory::load`] from `arena`, at byte offsets checked against it.
    pub fn load_from(&self, arena: &Arena, items: &[(u32, u64)]) -> Result<(), HostError> {
        self.check_slots(arena, items)?;
        let base = arena.as_ptr();
        let slots = items.iter().map(|&(block, offset)| (block, base.wrapping_add(offset as usize)));
        // SAFETY: `check_slots` checked the block ids and that every slot lies inside the arena; the
        // shared borrow keeps writers out (arena writes need `&mut Arena`), and a load only reads.
        unsafe { self.copy(Direction::Load, slots) }
    }

    fn check_items(&self, mut blocks: impl Iterator<Item = u32>, count: usize) -> Result<(), HostError> {
        if count > MAX_ITEMS {
            return Err(HostError::TooManyItems { items: count, max: MAX_ITEMS });
        }
        blocks.try_for_each(|block| self.check_block(block))
    }

    fn check_slots(&self, arena: &Arena, items: &[(u32, u64)]) -> Result<(), HostError> {
        self.check_items(items.iter().map(|&(block, _)| block), items.len())?;
        for &(_, offset) in items {
            arena.check_range(offset, self.slice_bytes)?;
        }
        Ok(())
    }

    /// Moves every item's slice, batching ranges into calls of at most [`MAX_IOVECS`] per side.
    ///
    /// # Safety
    /// Every block id must have passed [`HostMemory::check_block`], and every slot must be valid for
    /// `slice_bytes` bytes (of writes for a save, of reads for a load) that nothing else writes (or,
    /// for a save, reads) until this returns.
    unsafe fn copy(&self, dir: Direction, items: impl Iterator<Item = (u32, *mut u8)>) -> Result<(), HostError> {
        let mut local = IovList::new();
        let mut remote = IovList::new();
        for (block, slot) in items {
            let mut offset = 0usize;
            for layer in &self.layers {
                let len = layer.segment_bytes as usize;
                for segment in 0..u64::from(layer.segments) {
                    // No overflow: `new` checked the end of the last block, and `block < num_blocks`.
                    let addr = layer.base + u64::from(block) * layer.block_stride + segment * layer.segment_stride;
                    let pool = slot.wrapping_add(offset) as usize;
                    if !local.fits(pool, len) || !remote.fits(addr as usize, len) {
                        // SAFETY: the batch holds pieces of slots this function's caller vouched for.
                        unsafe { self.submit(dir, &mut local, &mut remote)? };
                    }
                    local.push(pool, len);
                    remote.push(addr as usize, len);
                    offset += len;
                }
            }
        }
        // SAFETY: as above.
        unsafe { self.submit(dir, &mut local, &mut remote) }
    }

    /// Runs one batch to completion, resuming after partial transfers.
    ///
    /// # Safety
    /// `local` must list ranges valid as [`HostMemory::copy`] requires of its slots, and `local` and
    /// `remote` must hold the same number of bytes.
    unsafe fn submit(&self, dir: Direction, local: &mut IovList, remote: &mut IovList) -> Result<(), HostError> {
        let (mut li, mut ri) = (0, 0);
        while li < local.len {
            let (lv, rv) = (&local.iov[li..local.len], &remote.iov[ri..remote.len]);
            // SAFETY: the local ranges are pieces of pool slots this function's caller guarantees
            // valid (writable for a save) and untouched by anyone else during the call; the remote
            // ranges are in the client process and checked by the kernel; both lists are valid
            // arrays of the lengths passed.
            let n = unsafe {
                match dir {
                    Direction::Save => libc::process_vm_readv(
                        self.pid,
                        lv.as_ptr(),
                        lv.len() as libc::c_ulong,
                        rv.as_ptr(),
                        rv.len() as libc::c_ulong,
                        0,
                    ),
                    Direction::Load => libc::process_vm_writev(
                        self.pid,
                        lv.as_ptr(),
                        lv.len() as libc::c_ulong,
                        rv.as_ptr(),
                        rv.len() as libc::c_ulong,
                        0,
                    ),
                }
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(map_error(self.pid, dir, e));
            }
            if n == 0 {
                // No progress with bytes left: a range the kernel cannot reach.
                return Err(map_error(self.pid, dir, io::Error::from_raw_os_error(libc::EFAULT)));
            }
            advance(&mut local.iov[..local.len], &mut li, n as usize);
            advance(&mut remote.iov[..remote.len], &mut ri, n as usize);
        }
        local.len = 0;
        remote.len = 0;
        Ok(())
    }
}

/// Checks a KV cache's layer descriptions (the rules of [`HostMemory::new`], shared by every
/// backend) and returns the bytes of one block's slice: every segment of every layer.
pub fn validate_layers(layers: &[LayerMemory]) -> Result<u64, HostError> {
    if layers.is_empty() {
        return Err(HostError::NoLayers);
    }
    if layers.len() > MAX_LAYERS {
        return Err(HostError::TooManyLayers { count: layers.len(), max: MAX_LAYERS });
    }
    let mut slice_bytes: u64 = 0;
    for (i, layer) in layers.iter().enumerate() {
        let layer_bytes = validate_layer(i, layer)?;
        slice_bytes = slice_bytes
            .checked_add(layer_bytes)
            .filter(|&b| b <= isize::MAX as u64)
            .ok_or_else(|| invalid(i, "segment_bytes", "makes the block slice larger than memory"))?;
    }
    Ok(slice_bytes)
}

/// Returns the bytes one block takes in the layer, or why the layer is unusable.
fn validate_layer(i: usize, l: &LayerMemory) -> Result<u64, HostError> {
    if l.segments != 1 && l.segments != 2 {
        return Err(invalid(i, "segments", &format!("is {}, must be 1 or 2", l.segments)));
    }
    if l.segment_bytes == 0 {
        return Err(invalid(i, "segment_bytes", "is 0"));
    }
    if l.segment_bytes > MAX_IOV_BYTES as u64 {
        return Err(invalid(i, "segment_bytes", &format!("is {}, more than {MAX_IOV_BYTES}", l.segment_bytes)));
    }
    if l.num_blocks == 0 {
        return Err(invalid(i, "num_blocks", "is 0"));
    }
    let two = l.segments == 2;
    if two && l.segment_stride < l.segment_bytes {
        return Err(invalid(
            i,
            "segment_stride",
            &format!("{} is less than segment_bytes {}: the segments overlap", l.segment_stride, l.segment_bytes),
        ));
    }
    if l.num_blocks > 1 && l.block_stride < l.segment_bytes {
        return Err(invalid(
            i,
            "block_stride",
            &format!("{} is less than segment_bytes {}: blocks overlap", l.block_stride, l.segment_bytes),
        ));
    }
    if two && segments_cross_overlap(l) {
        return Err(invalid(
            i,
            "block_stride",
            &format!(
                "{} with segment_stride {} makes segment 1 of one block overlap segment 0 of another",
                l.block_stride, l.segment_stride
            ),
        ));
    }
    let extent = if two { l.segment_stride.checked_add(l.segment_bytes) } else { Some(l.segment_bytes) };
    let end = extent
        .and_then(|e| u64::from(l.num_blocks - 1).checked_mul(l.block_stride)?.checked_add(e))
        .and_then(|e| e.checked_add(l.base))
        .filter(|&end| end <= usize::MAX as u64);
    if end.is_none() {
        return Err(invalid(i, "base", "plus the extent of the last block overflows the address space"));
    }
    Ok(u64::from(l.segments) * l.segment_bytes)
}

/// With two segments, whether segment 1 of some block overlaps segment 0 of another: for blocks
/// `b1`, `b0`, `|segment_stride + (b1 - b0) * block_stride| < segment_bytes`. Only the multiples of
/// `block_stride` nearest `segment_stride` need checking. Same-segment overlap is checked apart.
fn segments_cross_overlap(l: &LayerMemory) -> bool {
    let (s, b, bytes, max_k) = (
        i128::from(l.segment_stride),
        i128::from(l.block_stride),
        i128::from(l.segment_bytes),
        i128::from(l.num_blocks) - 1,
    );
    if max_k == 0 || b == 0 {
        // One block, or (with several) a zero stride caught by the same-segment check.
        return s < bytes;
    }
    let q = s / b;
    [q, q + 1].into_iter().map(|k| k.min(max_k)).filter(|&k| k >= 1).any(|k| (s - k * b).abs() < bytes)
}

fn invalid(layer: usize, field: &'static str, reason: &str) -> HostError {
    HostError::InvalidLayer { layer, field, reason: reason.to_string() }
}

fn map_error(pid: i32, dir: Direction, e: io::Error) -> HostError {
    let op = match dir {
        Direction::Save => "process_vm_readv",
        Direction::Load => "process_vm_writev",
    };
    match e.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => HostError::Permission { pid, server_pid: std::process::id(), source: e },
        Some(libc::EFAULT) => HostError::BadAddress { pid, source: e },
        Some(libc::ESRCH) => HostError::ClientGone { pid },
        _ => HostError::Io { pid, op, source: e },
    }
}

/// A fixed-capacity list of ranges for one call, merging a range into the previous one when they
/// touch. Kept on the stack: the copy path does not allocate.
struct IovList {
    iov: [libc::iovec; MAX_IOVECS],
    len: usize,
}

impl IovList {
    fn new() -> Self {
        IovList { iov: [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_IOVECS], len: 0 }
    }

    fn merges(&self, addr: usize, len: usize) -> bool {
        self.len > 0 && {
            let last = &self.iov[self.len - 1];
            last.iov_base as usize + last.iov_len == addr && last.iov_len + len <= MAX_IOV_BYTES
        }
    }

    fn fits(&self, addr: usize, len: usize) -> bool {
        self.len < MAX_IOVECS || self.merges(addr, len)
    }

    fn push(&mut self, addr: usize, len: usize) {
        if self.merges(addr, len) {
            self.iov[self.len - 1].iov_len += len;
        } else {
            self.iov[self.len] = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: len };
            self.len += 1;
        }
    }
}

/// Drops the first `n` bytes of `iov[*at..]`, moving `*at` past finished entries and trimming a
/// partly done one.
fn advance(iov: &mut [libc::iovec], at: &mut usize, mut n: usize) {
    while n > 0 && *at < iov.len() {
        let v = &mut iov[*at];
        if n >= v.iov_len {
            n -= v.iov_len;
            *at += 1;
        } else {
            v.iov_base = v.iov_base.wrapping_byte_add(n);
            v.iov_len -= n;
            n = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(
        block_stride: u64,
        segments: u32,
        segment_stride: u64,
        segment_bytes: u64,
        num_blocks: u32,
    ) -> LayerMemory {
        LayerMemory { base: 1 << 20, num_blocks, block_stride, segments, segment_stride, segment_bytes }
    }

    #[test]
    fn advance_trims_partial_entries() {
        let mut iov = [
            libc::iovec { iov_base: 0x1000 as *mut libc::c_void, iov_len: 100 },
            libc::iovec { iov_base: 0x5000 as *mut libc::c_void, iov_len: 50 },
        ];
        let mut at = 0;
        advance(&mut iov, &mut at, 30);
        assert_eq!((at, iov[0].iov_base as usize, iov[0].iov_len), (0, 0x1000 + 30, 70));
        advance(&mut iov, &mut at, 80);
        assert_eq!((at, iov[1].iov_base as usize, iov[1].iov_len), (1, 0x5000 + 10, 40));
        advance(&mut iov, &mut at, 40);
        assert_eq!(at, 2);
    }

    #[test]
    fn iov_list_merges_touching_ranges_and_bounds_entries() {
        let mut l = IovList::new();
        l.push(100, 10);
        l.push(110, 5);
        l.push(200, 5);
        assert_eq!(l.len, 2);
        assert_eq!(l.iov[0].iov_len, 15);
        for i in 0..MAX_IOVECS - 2 {
            l.push(1000 + 2 * i, 1);
        }
        assert_eq!(l.len, MAX_IOVECS);
        let last = 1000 + 2 * (MAX_IOVECS - 3) + 1;
        assert!(l.fits(last, 1), "a touching range still merges into a full list");
        assert!(!l.fits(last + 1, 1));
    }

    #[test]
    fn errno_maps_to_what_the_caller_must_do() {
        let e = |errno| map_error(42, Direction::Save, io::Error::from_raw_os_error(errno));
        let perm = e(libc::EPERM);
        assert!(matches!(perm, HostError::Permission { pid: 42, .. }));
        assert!(perm.to_string().contains(&format!("prctl(PR_SET_PTRACER, {})", std::process::id())));
        assert!(matches!(e(libc::EACCES), HostError::Permission { .. }));
        assert!(matches!(e(libc::EFAULT), HostError::BadAddress { pid: 42, .. }));
        assert!(matches!(e(libc::ESRCH), HostError::ClientGone { pid: 42 }));
        assert!(matches!(e(libc::ENOMEM), HostError::Io { op: "process_vm_readv", .. }));
    }

    #[test]
    fn overlap_check_accepts_interleaved_and_planar_layouts() {
        // K and V inside each block.
        assert!(validate_layer(0, &layer(2048, 2, 1024, 1024, 16)).is_ok());
        // vLLM's (2, num_blocks, ...) tensors: a K plane then a V plane.
        assert!(validate_layer(0, &layer(1024, 2, 16 * 1024, 1024, 16)).is_ok());
        // V plane starting one block early: V of block 0 lands on K of block 15.
        assert!(validate_layer(0, &layer(1024, 2, 15 * 1024, 1024, 16)).is_err());
        // Segment stride between blocks: V of block b overlaps K of block b + 1.
        assert!(validate_layer(0, &layer(2048, 2, 1536, 1024, 16)).is_err());
        // Interleaved with a gap that exactly fits: K0 V0 K1 V1 with stride 2 * bytes is fine.
        assert!(validate_layer(0, &layer(2048, 2, 1024, 1024, 1)).is_ok());
        // Same-segment overlap.
        assert!(validate_layer(0, &layer(512, 1, 0, 1024, 2)).is_err());
        // One block: block_stride is irrelevant.
        assert!(validate_layer(0, &layer(0, 2, 1024, 1024, 1)).is_ok());
    }
}
