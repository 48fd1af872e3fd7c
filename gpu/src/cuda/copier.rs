//! A copier: one CUDA stream on one GPU that moves planned batches and reports when they are done.

use super::device::Device;
use super::kernel::Kernel;
use super::memory::{DeviceBuffer, PinnedBuffer};
use super::{check, CudaError};
use crate::blocks::{band_copies, slot_runs, staged_chunks, Band, BlockPair, Piece, PitchedCopy};
use crate::plan::{Method, Plan, Range};
use cudarc::driver::sys;
use std::sync::Arc;

/// Moves [`Plan`]s on its own stream: DMA plans as one `cuMemcpyAsync` per range, batched DMA
/// plans as one `cuMemcpyBatchAsync` (or a call per range on drivers before CUDA 12.8), kernel
/// plans as a range-table upload and one launch (batched DMA where the kernel is not loaded). Up to [`SLOTS`] batches may be queued at once, each with
/// its own range table and event, so the caller prepares the next batch while the GPU moves the
/// previous ones ([`Copier::ready`] says whether a slot is free). Completion is polled with
/// [`Copier::done`] or awaited with [`Copier::wait`].
#[derive(Debug)]
pub struct Copier {
    dev: Arc<Device>,
    stream: sys::CUstream,
    start: sys::CUevent,
    slots: Vec<Slot>,
    next: usize,
    last: Option<usize>,
    kernel: Option<Kernel>,
    kernel_note: Option<String>,
    /// The driver's `cuMemcpyBatchAsync` (CUDA 12.8 ABI), when it has one.
    batch: Option<MemcpyBatchFn>,
    capacity: usize,
    /// The device staging buffer of staged block copies, once [`Copier::set_staging`] made it.
    staging: Option<Staging>,
    /// Batches queued since the copier was made ([`Copier::submitted`]).
    submitted: u64,
}

/// Parts of the staging buffer: a staged copy's chunks take them in turn, so the GPU fills one
/// while the copy engines drain another.
pub const STAGING_PARTS: usize = 4;
// A staged load queues each DMA one chunk ahead of the scatter before it (`submit_blocks`).
const _: () = assert!(STAGING_PARTS >= 2);

/// The device staging buffer of staged block copies ([`crate::blocks`]), its side stream and the
/// events that join the two streams.
#[derive(Debug)]
struct Staging {
    buffer: DeviceBuffer,
    part_bytes: u64,
    next: usize,
    /// The side stream: the block kernel's for whole-request copies (`submit_blocks`), the copy
    /// engines' for layer-wise ones (`submit_layers`).
    stream: sys::CUstream,
    /// Recorded on the main stream when a staged copy starts; the side stream waits for it.
    fork: sys::CUevent,
    /// Recorded on the side stream at a staged copy's end where the main stream must follow it.
    join: sys::CUevent,
    /// Per part: recorded once its producer (the gather kernel, or a load's DMA) filled it, where
    /// the consumer runs on the other stream.
    filled: Vec<sys::CUevent>,
    /// Per part: recorded once its consumer (a save's DMA, or the scatter kernel) drained it.
    /// Never recorded at first: waiting on it then waits for nothing.
    free: Vec<sys::CUevent>,
}

/// One block copy for [`Copier::submit_blocks`].
#[derive(Debug, Clone, Copy)]
pub struct BlockJob<'a> {
    /// The block template's pieces.
    pub pieces: &'a [Piece],
    /// One pair per block (sorted by slot, neighbouring slots make longer staged DMA runs).
    pub pairs: &'a [BlockPair],
    /// Bytes of one block's slice (one pool slot).
    pub slice_bytes: u64,
    /// Engine to pool (a save), else pool to engine.
    pub d2h: bool,
    /// CTAs of the block kernel.
    pub ctas: u32,
    /// Threads per CTA.
    pub threads: u32,
    /// Through the staging buffer ([`Copier::staging_part_bytes`] must hold a slice), else the
    /// kernel moves the bytes over PCIe itself.
    pub staged: bool,
}

/// A layer-wise block copy for [`Copier::submit_layers`]: some layers of every block, one layer
/// at a time, staged through device memory with the copy engines on the pool side.
#[derive(Debug, Clone)]
pub struct LayerJob<'a> {
    /// The pieces of a [`crate::blocks::LayerTemplate`] (every layer's).
    pub pieces: &'a [Piece],
    /// The template's bands, one per layer.
    pub bands: &'a [Band],
    /// One pair per block.
    pub pairs: &'a [BlockPair],
    /// Bytes of one block's slice (one pool slot).
    pub slice_bytes: u64,
    /// The layers to move now, in order.
    pub layers: std::ops::Range<usize>,
    /// `(layer, event)`: the event is recorded right behind that layer's copy, so another process
    /// can wait for the layer alone (a layer-wise load). Layers ascending.
    pub marks: &'a [(usize, &'a super::memory::SharedEvent)],
    /// Engine to pool (a save), else pool to engine.
    pub d2h: bool,
    /// CTAs of the block kernel.
    pub ctas: u32,
    /// Threads per CTA.
    pub threads: u32,
}

fn event(flags: u32) -> Result<sys::CUevent, CudaError> {
    let mut e = std::ptr::null_mut();
    // SAFETY: the caller made the context current; `e` is a valid out-pointer.
    check("cuEventCreate", unsafe { sys::cuEventCreate(&mut e, flags) })?;
    Ok(e)
}

const NO_TIMING: u32 = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;

/// `cuMemcpyBatchAsync` as CUDA 12.8 defined it (CUDA 13 headers name a variant without
/// `failIdx` so; asking the driver for the 12.8 version gets this one on every driver).
type MemcpyBatchFn = unsafe extern "C" fn(
    dsts: *mut sys::CUdeviceptr,
    srcs: *mut sys::CUdeviceptr,
    sizes: *mut usize,
    count: usize,
    attrs: *mut sys::CUmemcpyAttributes,
    attrs_idxs: *mut usize,
    num_attrs: usize,
    fail_idx: *mut usize,
    stream: sys::CUstream,
) -> sys::CUresult;

/// The driver's `cuMemcpyBatchAsync` in its CUDA 12.8 form, or `None` for drivers older than
/// 12.8 (the copier then makes one `cuMemcpyAsync` per range).
fn memcpy_batch_fn() -> Option<MemcpyBatchFn> {
    let mut pfn: *mut std::ffi::c_void = std::ptr::null_mut();
    let mut status = sys::CUdriverProcAddressQueryResult::CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
    // SAFETY: the symbol name is a NUL-terminated string; `pfn` and `status` are valid
    // out-pointers; the driver is loaded (a device was opened before any copier).
    let r = unsafe {
        sys::cuGetProcAddress_v2(
            c"cuMemcpyBatchAsync".as_ptr(),
            &mut pfn,
            12080,
            sys::CUdriverProcAddress_flags::CU_GET_PROC_ADDRESS_DEFAULT as u64,
            &mut status,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS
        || status != sys::CUdriverProcAddressQueryResult::CU_GET_PROC_ADDRESS_SUCCESS
        || pfn.is_null()
    {
        return None;
    }
    // SAFETY: asked for version 12080, the driver returns the function with the 12.8 signature,
    // which `MemcpyBatchFn` spells out.
    Some(unsafe { std::mem::transmute::<*mut std::ffi::c_void, MemcpyBatchFn>(pfn) })
}

/// One queued batch's range table and completion event.
#[derive(Debug)]
struct Slot {
    staging: PinnedBuffer,
    table: DeviceBuffer,
    event: sys::CUevent,
    pending: bool,
    /// The number of the batch last queued in this slot ([`Copier::submitted`]), 0 for none.
    seq: u64,
}

/// Batches a copier may have queued at once.
pub const SLOTS: usize = 4;

// SAFETY: stream and event handles are usable from any thread with the context current, which
// every method makes so first.
unsafe impl Send for Copier {}

const RANGE_BYTES: usize = std::mem::size_of::<Range>();

impl Copier {
    /// A copier on `dev` whose kernel batches hold up to `capacity` ranges each. The kernel is
    /// compiled when `kernel` is set; if that fails, [`Copier::kernel_note`] says why and kernel
    /// plans are moved by DMA instead.
    pub fn new(dev: Arc<Device>, capacity: usize, kernel: bool) -> Result<Copier, CudaError> {
        let capacity = capacity.max(1);
        dev.bind()?;
        let mut stream = std::ptr::null_mut();
        // SAFETY: the context is current; `stream` is a valid out-pointer. Destroyed in Drop.
        check("cuStreamCreate", unsafe {
            sys::cuStreamCreate(&mut stream, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32)
        })?;
        let mut start = std::ptr::null_mut();
        // SAFETY: as above for the event (timed, so elapsed times can be read). Destroyed in Drop.
        check("cuEventCreate", unsafe { sys::cuEventCreate(&mut start, 0) })?;
        let mut slots = Vec::with_capacity(SLOTS);
        for _ in 0..SLOTS {
            let mut event = std::ptr::null_mut();
            // SAFETY: as above.
            check("cuEventCreate", unsafe { sys::cuEventCreate(&mut event, 0) })?;
            slots.push(Slot {
                staging: PinnedBuffer::new(dev.clone(), capacity * RANGE_BYTES)?,
                table: DeviceBuffer::new(dev.clone(), capacity * RANGE_BYTES)?,
                event,
                pending: false,
                seq: 0,
            });
        }
        let (kernel, kernel_note) = if kernel {
            match Kernel::load(&dev) {
                Ok(k) => (Some(k), None),
                Err(e) => (None, Some(e.to_string())),
            }
        } else {
            (None, Some("kernel copies disabled".into()))
        };
        let batch = memcpy_batch_fn();
        Ok(Copier {
            dev,
            stream,
            start,
            slots,
            next: 0,
            last: None,
            kernel,
            kernel_note,
            batch,
            capacity,
            staging: None,
            submitted: 0,
        })
    }

    /// Whether [`Method::DmaBatch`] plans go to the driver in one `cuMemcpyBatchAsync` call (a
    /// driver of CUDA 12.8 or later); without it they are moved one `cuMemcpyAsync` per range.
    pub fn has_batch(&self) -> bool {
        self.batch.is_some()
    }

    /// Why kernel plans fall back to DMA, if they do.
    pub fn kernel_note(&self) -> Option<&str> {
        self.kernel_note.as_deref()
    }

    /// Whether the copy kernel is loaded.
    pub fn has_kernel(&self) -> bool {
        self.kernel.is_some()
    }

    /// The GPU.
    pub fn device(&self) -> &Arc<Device> {
        &self.dev
    }

    /// Ranges one kernel batch may hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Allocates a staging buffer of `bytes` in the GPU's memory (in [`STAGING_PARTS`] parts) and
    /// the stream its copy-engine half runs on, for staged block copies; replaces an earlier one
    /// (after waiting for the copies queued).
    pub fn set_staging(&mut self, bytes: u64) -> Result<(), CudaError> {
        let part_bytes = (bytes / STAGING_PARTS as u64) / 16 * 16;
        if part_bytes == 0 {
            return Err(CudaError::Invalid(format!(
                "a staging buffer of {bytes} bytes has no room for {STAGING_PARTS} parts"
            )));
        }
        self.wait()?;
        self.staging = None;
        self.dev.bind()?;
        let buffer = DeviceBuffer::new(self.dev.clone(), (part_bytes * STAGING_PARTS as u64) as usize)?;
        let mut stream = std::ptr::null_mut();
        // SAFETY: the context is current; `stream` is a valid out-pointer. Destroyed in Drop.
        check("cuStreamCreate", unsafe {
            sys::cuStreamCreate(&mut stream, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32)
        })?;
        let mut staging = Staging {
            buffer,
            part_bytes,
            next: 0,
            stream,
            fork: std::ptr::null_mut(),
            join: std::ptr::null_mut(),
            filled: Vec::new(),
            free: Vec::new(),
        };
        // Dropping `staging` on an error below destroys what was made so far.
        staging.fork = event(NO_TIMING)?;
        staging.join = event(NO_TIMING)?;
        for _ in 0..STAGING_PARTS {
            staging.filled.push(event(NO_TIMING)?);
            staging.free.push(event(NO_TIMING)?);
        }
        self.staging = Some(staging);
        Ok(())
    }

    /// Bytes of one part of the staging buffer (a staged chunk holds at most this much); 0
    /// without one.
    pub fn staging_part_bytes(&self) -> u64 {
        self.staging.as_ref().map_or(0, |s| s.part_bytes)
    }

    /// Pairs one [`Copier::submit_blocks`] can take with a template of `pieces` pieces (the
    /// template and the pairs share a batch's table); 0 when the template alone fills it.
    pub fn block_capacity(&self, pieces: usize) -> usize {
        let table = self.capacity * RANGE_BYTES;
        table.saturating_sub(pieces * std::mem::size_of::<Piece>()) / std::mem::size_of::<BlockPair>()
    }

    /// Queues a block copy ([`crate::blocks`]): the template and pairs are uploaded as one table
    /// and the block kernel expands them. A staged job cuts the pairs into
    /// [`staged_chunks`], each through the next staging part: a save gathers a chunk into its
    /// part and the copy engines move it to its slots, a load the reverse. The copy engines run
    /// on the main stream and the kernel on the side stream (but for a save's first chunk and a
    /// load's last, whose kernel runs beside its DMA), with events between them, so chunks
    /// overlap. The batch's completion event follows both streams. Waits first, like [`Copier::submit`], when every batch slot is
    /// busy.
    ///
    /// # Safety
    /// As for [`Copier::submit`], for every range the job expands to: the engine blocks (the
    /// pieces' addresses plus each block times its stride) and every pair's slot, `slice_bytes`
    /// long.
    pub unsafe fn submit_blocks(&mut self, job: &BlockJob<'_>) -> Result<(), CudaError> {
        if self.kernel.is_none() {
            return Err(CudaError::Invalid("block copies need the copy kernel, which is not loaded".into()));
        }
        if job.pairs.len() > self.block_capacity(job.pieces.len()) {
            return Err(CudaError::TooManyRanges {
                ranges: job.pairs.len(),
                capacity: self.block_capacity(job.pieces.len()),
            });
        }
        let part_blocks = match &self.staging {
            Some(st) if job.staged && job.slice_bytes > 0 => (st.part_bytes / job.slice_bytes) as usize,
            _ => 0,
        };
        if job.staged && part_blocks == 0 {
            return Err(CudaError::Invalid(format!(
                "a staged copy of {}-byte slices needs staging parts at least that large (have {})",
                job.slice_bytes,
                self.staging_part_bytes()
            )));
        }
        if job.pairs.is_empty() || job.pieces.is_empty() {
            return Ok(());
        }
        let i = self.next;
        self.wait_slot(i)?;
        self.dev.bind()?;
        if self.last.is_none() {
            // SAFETY: the event and stream belong to this copier's current context.
            check("cuEventRecord", unsafe { sys::cuEventRecord(self.start, self.stream) })?;
        }
        let kernel = self.kernel.as_ref().expect("checked above");
        let slot = &self.slots[i];
        let piece_bytes = std::mem::size_of_val(job.pieces);
        let pair_bytes = std::mem::size_of_val(job.pairs);
        // SAFETY: Piece and BlockPair are repr(C) plain data; the staging buffer holds
        // `capacity * RANGE_BYTES` bytes, at least both tables (checked above), and no pending
        // upload reads it (the slot's event completed above).
        unsafe {
            std::ptr::copy_nonoverlapping(job.pieces.as_ptr().cast::<u8>(), slot.staging.as_ptr(), piece_bytes);
            std::ptr::copy_nonoverlapping(
                job.pairs.as_ptr().cast::<u8>(),
                slot.staging.as_ptr().add(piece_bytes),
                pair_bytes,
            );
        }
        // SAFETY: both buffers hold the tables' bytes; the stream orders the upload before the launches.
        check("cuMemcpyHtoDAsync", unsafe {
            sys::cuMemcpyHtoDAsync_v2(
                slot.table.ptr(),
                slot.staging.as_ptr().cast(),
                piece_bytes + pair_bytes,
                self.stream,
            )
        })?;
        let launch = crate::cuda::kernel::BlockLaunch {
            pieces: slot.table.ptr(),
            n_pieces: job.pieces.len() as u64,
            pairs: slot.table.ptr() + piece_bytes as u64,
            n_pairs: job.pairs.len() as u64,
            staging: 0,
            slice_bytes: job.slice_bytes,
            d2h: job.d2h,
        };
        let Some(st) = self.staging.as_mut().filter(|_| job.staged) else {
            // SAFETY: the tables were uploaded on this stream; the caller's contract covers the ranges.
            unsafe { kernel.launch_blocks(launch, job.ctas, job.threads, self.stream)? };
            return self.finish_batch(i);
        };
        let pair_size = std::mem::size_of::<BlockPair>() as u64;
        let chunks = staged_chunks(job.pairs.len(), part_blocks, job.d2h);
        let last = chunks.len() - 1;
        let main = self.stream;
        let side = st.stream;
        // SAFETY: for every driver call below, the events and both streams belong to this
        // copier's current context; the staging parts lie inside `st.buffer`; the caller's
        // contract covers the slots and engine blocks.
        unsafe {
            // The copy engines run on the main stream, so the batch's event follows the last DMA
            // without a hop between streams (each hop costs the GPU about 10 us on the H100
            // box); the block kernel runs on the side stream, except at the copy's open end: a
            // save's first gather precedes its DMA, and a load's last scatter follows its DMA, on
            // the main stream (decision 58).
            if last > 0 {
                // The side stream starts after the table upload.
                check("cuEventRecord", sys::cuEventRecord(st.fork, main))?;
                check("cuStreamWaitEvent", sys::cuStreamWaitEvent(side, st.fork, 0))?;
            }
            // Each chunk: its part, the kernel's launch on it, its DMA runs, the kernel's stream.
            let mut start = 0usize;
            let mut plan = Vec::with_capacity(chunks.len());
            for (c, &n) in chunks.iter().enumerate() {
                let part = st.next;
                st.next = (part + 1) % STAGING_PARTS;
                let base = st.buffer.ptr() + part as u64 * st.part_bytes;
                let chunk = crate::cuda::kernel::BlockLaunch {
                    pairs: launch.pairs + start as u64 * pair_size,
                    n_pairs: n as u64,
                    staging: base,
                    ..launch
                };
                let runs =
                    slot_runs(job.pairs[start..start + n].iter().map(|p| p.slot), job.slice_bytes, base, job.d2h);
                let edge = if job.d2h { c == 0 } else { c == last };
                plan.push((part, chunk, runs, if edge { main } else { side }));
                start += n;
            }
            let (filled, free) = (&st.filled, &st.free);
            // The part's last consumer must be done with it; then the producer fills it.
            let produce = |(part, chunk, runs, kernel_stream): &(usize, _, Vec<Range>, sys::CUstream)| {
                let producer = if job.d2h { *kernel_stream } else { main };
                check("cuStreamWaitEvent", sys::cuStreamWaitEvent(producer, free[*part], 0))?;
                if job.d2h {
                    kernel.launch_blocks(*chunk, job.ctas, job.threads, producer)?;
                } else {
                    dma(self.batch, runs, producer)?;
                }
                if *kernel_stream != main {
                    check("cuEventRecord", sys::cuEventRecord(filled[*part], producer))
                } else {
                    Ok(())
                }
            };
            let consume = |(part, chunk, runs, kernel_stream): &(usize, _, Vec<Range>, sys::CUstream)| {
                let consumer = if job.d2h { main } else { *kernel_stream };
                if *kernel_stream != main {
                    check("cuStreamWaitEvent", sys::cuStreamWaitEvent(consumer, filled[*part], 0))?;
                }
                if job.d2h {
                    dma(self.batch, runs, consumer)?;
                } else {
                    kernel.launch_blocks(*chunk, job.ctas, job.threads, consumer)?;
                }
                check("cuEventRecord", sys::cuEventRecord(free[*part], consumer))
            };
            if job.d2h {
                for c in &plan {
                    produce(c)?;
                    consume(c)?;
                }
            } else {
                // A load queues each DMA before the scatter of the chunk before it, so the copy
                // engines have their next copy while this thread launches kernels. A DMA's part
                // was last scattered STAGING_PARTS chunks earlier, a scatter already queued.
                for (k, c) in plan.iter().enumerate() {
                    produce(c)?;
                    if k > 0 {
                        consume(&plan[k - 1])?;
                    }
                }
                consume(&plan[last])?;
            }
            if !job.d2h && last > 0 {
                // A load's scatters on the side stream finished while the last DMA ran; the
                // batch's event follows them too.
                check("cuEventRecord", sys::cuEventRecord(st.join, side))?;
                check("cuStreamWaitEvent", sys::cuStreamWaitEvent(main, st.join, 0))?;
            }
        }
        self.finish_batch(i)
    }

    /// Whether [`Copier::submit_layers`] can move a layer-wise copy of `bands`: the kernel is
    /// loaded and one block's layer fits a staging part, for every layer.
    pub fn stages_layers(&self, bands: &[Band]) -> bool {
        let part = self.staging_part_bytes();
        self.kernel.is_some() && part > 0 && bands.iter().all(|b| b.bytes <= part)
    }

    /// Queues layers `job.layers` of every block of `job`, one layer after the other, as one
    /// batch. Per layer and chunk of blocks (as many as a staging part holds of that layer), a
    /// load moves the layer's band of each slot into a staging part with pitched copy-engine
    /// copies (one per run of following slots) and the block kernel scatters the part into the
    /// engine's blocks within device memory; a save is the reverse. So PCIe sees only copy-engine
    /// traffic, and the kernel holds its SMs for an HBM-speed copy of one layer at a time, which
    /// matters when the copy runs beside the engine's forward pass. Each mark's event is recorded
    /// behind its layer's last copy. Waits first, like [`Copier::submit`], when every batch slot
    /// is busy.
    ///
    /// # Safety
    /// As for [`Copier::submit_blocks`], for every layer moved: the pieces of its band at each
    /// pair's engine block, and the band of each pair's slot.
    pub unsafe fn submit_layers(&mut self, job: &LayerJob<'_>) -> Result<(), CudaError> {
        if !self.stages_layers(&job.bands[job.layers.clone()]) {
            return Err(CudaError::Invalid(format!(
                "a layer-wise staged copy needs the copy kernel and staging parts of at least one block's layer ({} \
                 bytes; have {})",
                job.bands.iter().map(|b| b.bytes).max().unwrap_or(0),
                self.staging_part_bytes()
            )));
        }
        if job.layers.end > job.bands.len()
            || job.bands.iter().any(|b| b.pieces.end > job.pieces.len())
            || job.marks.windows(2).any(|w| w[0].0 > w[1].0)
        {
            return Err(CudaError::Invalid("layer-wise copy: layers, bands or marks out of order or range".into()));
        }
        if job.pairs.len() > self.block_capacity(job.pieces.len()) {
            return Err(CudaError::TooManyRanges {
                ranges: job.pairs.len(),
                capacity: self.block_capacity(job.pieces.len()),
            });
        }
        if job.pairs.is_empty() || job.layers.is_empty() {
            // Nothing to move: the marks follow the stream's earlier work.
            for (_, event) in job.marks {
                // SAFETY: marks are live events of this copier's context, as is the stream.
                check("cuEventRecord", unsafe { sys::cuEventRecord(event.raw(), self.stream) })?;
            }
            return Ok(());
        }
        let i = self.next;
        self.wait_slot(i)?;
        self.dev.bind()?;
        if self.last.is_none() {
            // SAFETY: the event and stream belong to this copier's current context.
            check("cuEventRecord", unsafe { sys::cuEventRecord(self.start, self.stream) })?;
        }
        let kernel = self.kernel.as_ref().expect("checked above");
        let slot = &self.slots[i];
        let piece_bytes = std::mem::size_of_val(job.pieces);
        let pair_bytes = std::mem::size_of_val(job.pairs);
        // SAFETY: Piece and BlockPair are repr(C) plain data; the slot's staging buffer holds
        // both tables (block_capacity checked above), and no pending upload reads it (the slot's
        // event completed above).
        unsafe {
            std::ptr::copy_nonoverlapping(job.pieces.as_ptr().cast::<u8>(), slot.staging.as_ptr(), piece_bytes);
            std::ptr::copy_nonoverlapping(
                job.pairs.as_ptr().cast::<u8>(),
                slot.staging.as_ptr().add(piece_bytes),
                pair_bytes,
            );
        }
        // SAFETY: both buffers hold the tables' bytes; the stream orders the upload before the launches.
        check("cuMemcpyHtoDAsync", unsafe {
            sys::cuMemcpyHtoDAsync_v2(
                slot.table.ptr(),
                slot.staging.as_ptr().cast(),
                piece_bytes + pair_bytes,
                self.stream,
            )
        })?;
        let table = slot.table.ptr();
        let st = self.staging.as_mut().expect("checked above");
        let piece_size = std::mem::size_of::<Piece>() as u64;
        let pair_size = std::mem::size_of::<BlockPair>() as u64;
        let (producer, consumer) = if job.d2h { (self.stream, st.stream) } else { (st.stream, self.stream) };
        // SAFETY: for every driver call below, the events and both streams belong to this
        // copier's current context; the staging parts lie inside `st.buffer`; the caller's
        // contract covers the slots' bands and the engine blocks.
        unsafe {
            // The DMA stream starts after everything queued on the main stream so far.
            check("cuEventRecord", sys::cuEventRecord(st.fork, self.stream))?;
            check("cuStreamWaitEvent", sys::cuStreamWaitEvent(st.stream, st.fork, 0))?;
            for layer in job.layers.clone() {
                let band = &job.bands[layer];
                // Whole parts: the layers themselves pipeline through the parts, so a ramp within
                // a layer (as in `submit_blocks`) would only add copies and launches.
                let part_blocks = ((st.part_bytes / band.bytes.max(1)) as usize).max(1);
                let mut start = 0usize;
                let total = job.pairs.len();
                for n in (0..total).step_by(part_blocks).map(|s| part_blocks.min(total - s)) {
                    let part = st.next;
                    st.next = (part + 1) % STAGING_PARTS;
                    let base = st.buffer.ptr() + part as u64 * st.part_bytes;
                    // The kernel puts block p's piece at staging + p * slice_bytes + piece.pool;
                    // the band's pieces sit at band.offset.. in a slot, so the base is shifted
                    // back by it (wrapping: only the sum is an address).
                    let launch = crate::cuda::kernel::BlockLaunch {
                        pieces: table + band.pieces.start as u64 * piece_size,
                        n_pieces: band.pieces.len() as u64,
                        pairs: table + piece_bytes as u64 + start as u64 * pair_size,
                        n_pairs: n as u64,
                        staging: base.wrapping_sub(band.offset),
                        slice_bytes: band.bytes,
                        d2h: job.d2h,
                    };
                    let copies = band_copies(
                        job.pairs[start..start + n].iter().map(|p| p.slot),
                        job.slice_bytes,
                        band,
                        base,
                        job.d2h,
                    );
                    // The part's last consumer must be done with it.
                    check("cuStreamWaitEvent", sys::cuStreamWaitEvent(producer, st.free[part], 0))?;
                    if job.d2h {
                        kernel.launch_blocks(launch, job.ctas, job.threads, producer)?;
                    } else {
                        pitched(&copies, producer)?;
                    }
                    check("cuEventRecord", sys::cuEventRecord(st.filled[part], producer))?;
                    check("cuStreamWaitEvent", sys::cuStreamWaitEvent(consumer, st.filled[part], 0))?;
                    if job.d2h {
                        pitched(&copies, consumer)?;
                    } else {
                        kernel.launch_blocks(launch, job.ctas, job.threads, consumer)?;
                    }
                    check("cuEventRecord", sys::cuEventRecord(st.free[part], consumer))?;
                    start += n;
                }
                for (_, event) in job.marks.iter().filter(|m| m.0 == layer) {
                    check("cuEventRecord", sys::cuEventRecord(event.raw(), consumer))?;
                }
            }
            if job.d2h {
                // The batch ends with the last DMA: the main stream (and its event) follow it.
                check("cuEventRecord", sys::cuEventRecord(st.join, st.stream))?;
                check("cuStreamWaitEvent", sys::cuStreamWaitEvent(self.stream, st.join, 0))?;
            }
        }
        self.finish_batch(i)
    }

    /// Records batch slot `i`'s completion event on the main stream and moves to the next slot.
    fn finish_batch(&mut self, i: usize) -> Result<(), CudaError> {
        // SAFETY: the event and stream belong to this copier's current context.
        check("cuEventRecord", unsafe { sys::cuEventRecord(self.slots[i].event, self.stream) })?;
        self.submitted += 1;
        self.slots[i].pending = true;
        self.slots[i].seq = self.submitted;
        self.last = Some(i);
        self.next = (i + 1) % self.slots.len();
        Ok(())
    }

    /// Whether [`Copier::submit`] can queue a batch now without waiting.
    pub fn ready(&mut self) -> Result<bool, CudaError> {
        let i = self.next;
        self.poll_slot(i)
    }

    /// Queues `plan` on the stream and returns at once, unless all [`SLOTS`] are busy: then it
    /// first waits for the oldest batch.
    ///
    /// # Safety
    /// Every range must be valid device-accessible memory for the whole copy: sources readable,
    /// destinations writable (device memory, IPC mappings or registered, mapped host memory),
    /// and stay so until [`Copier::done`] reports completion.
    pub unsafe fn submit(&mut self, plan: &Plan) -> Result<(), CudaError> {
        // SAFETY: the caller's contract, unchanged.
        unsafe { self.submit_marked(plan, &[]) }
    }

    /// [`Copier::submit`], recording each `(end, event)` of `marks` right behind
    /// `plan.ranges[..end]` (`end` ascending, at most the number of ranges): one batch moves
    /// several parts (a layer-wise load's layers) and another process can wait for each part.
    ///
    /// # Safety
    /// As for [`Copier::submit`].
    pub unsafe fn submit_marked(
        &mut self,
        plan: &Plan,
        marks: &[(usize, &super::memory::SharedEvent)],
    ) -> Result<(), CudaError> {
        if marks.windows(2).any(|w| w[0].0 > w[1].0) || marks.last().is_some_and(|m| m.0 > plan.ranges.len()) {
            return Err(CudaError::Invalid("event marks must ascend and stay within the batch".into()));
        }
        let i = self.next;
        self.wait_slot(i)?;
        self.dev.bind()?;
        if self.last.is_none() {
            // SAFETY: the event and stream belong to this copier's current context.
            check("cuEventRecord", unsafe { sys::cuEventRecord(self.start, self.stream) })?;
        }
        match (plan.method, &self.kernel) {
            (Method::Kernel { ctas, threads }, Some(kernel)) => {
                if plan.ranges.len() > self.capacity {
                    return Err(CudaError::TooManyRanges { ranges: plan.ranges.len(), capacity: self.capacity });
                }
                let slot = &self.slots[i];
                let bytes = plan.ranges.len() * RANGE_BYTES;
                // SAFETY: Range is repr(C) plain data; the slot's staging buffer holds `capacity`
                // ranges and is not read by a pending upload (the slot's event completed above).
                unsafe {
                    std::ptr::copy_nonoverlapping(plan.ranges.as_ptr().cast::<u8>(), slot.staging.as_ptr(), bytes);
                }
                // SAFETY: both buffers hold `bytes`; the stream orders the upload before the launch.
                check("cuMemcpyHtoDAsync", unsafe {
                    sys::cuMemcpyHtoDAsync_v2(slot.table.ptr(), slot.staging.as_ptr().cast(), bytes, self.stream)
                })?;
                // One launch per marked part, each on its slice of the table.
                let mut cuts: Vec<usize> = marks.iter().map(|m| m.0).collect();
                cuts.push(plan.ranges.len());
                cuts.dedup();
                let mut start = 0;
                for end in cuts {
                    if end > start {
                        let table = slot.table.ptr() + (start * RANGE_BYTES) as u64;
                        // SAFETY: the table holds the ranges; the caller's contract covers them.
                        unsafe { kernel.launch(table, (end - start) as u64, ctas, threads, self.stream)? };
                    }
                    for (_, event) in marks.iter().filter(|m| m.0 == end) {
                        // SAFETY: both handles are live and belong to this copier's context.
                        check("cuEventRecord", unsafe { sys::cuEventRecord(event.raw(), self.stream) })?;
                    }
                    start = end;
                }
            }
            (Method::DmaBatch | Method::Kernel { .. }, _) if self.batch.is_some() && plan.ranges.len() > 1 => {
                // One call per marked part, so each part's event follows its copies.
                let mut cuts: Vec<usize> = marks.iter().map(|m| m.0).collect();
                cuts.push(plan.ranges.len());
                cuts.dedup();
                let mut start = 0;
                for end in cuts {
                    if end > start {
                        self.batch_async(&plan.ranges[start..end])?;
                    }
                    for (_, event) in marks.iter().filter(|m| m.0 == end) {
                        // SAFETY: both handles are live and belong to this copier's context.
                        check("cuEventRecord", unsafe { sys::cuEventRecord(event.raw(), self.stream) })?;
                    }
                    start = end;
                }
            }
            _ => {
                let mut marks = marks.iter().peekable();
                for (n, r) in plan.ranges.iter().enumerate() {
                    while let Some((_, event)) = marks.next_if(|m| m.0 <= n) {
                        // SAFETY: both handles are live and belong to this copier's context.
                        check("cuEventRecord", unsafe { sys::cuEventRecord(event.raw(), self.stream) })?;
                    }
                    // SAFETY: the caller's contract covers every range; with unified addressing
                    // cuMemcpyAsync takes device and mapped host addresses alike.
                    check("cuMemcpyAsync", unsafe { sys::cuMemcpyAsync(r.dst, r.src, r.len as usize, self.stream) })?;
                }
                for (_, event) in marks {
                    // SAFETY: as above.
                    check("cuEventRecord", unsafe { sys::cuEventRecord(event.raw(), self.stream) })?;
                }
            }
        }
        self.finish_batch(i)
    }

    /// Queues `ranges` (at least one) as one `cuMemcpyBatchAsync` on the stream. The copies are
    /// ordered after the stream's earlier work and before its later work; among themselves, in
    /// any order (ranges of one plan never overlap).
    fn batch_async(&self, ranges: &[Range]) -> Result<(), CudaError> {
        let Some(batch) = self.batch else {
            return Err(CudaError::Invalid("this driver has no cuMemcpyBatchAsync".into()));
        };
        batch_on(batch, ranges, self.stream)
    }

    /// Records `event` on the stream behind every batch submitted so far: another process that
    /// waits on it waits for those copies.
    pub fn record(&mut self, event: &super::memory::SharedEvent) -> Result<(), CudaError> {
        self.dev.bind()?;
        // SAFETY: both handles are live and belong to this copier's context.
        check("cuEventRecord", unsafe { sys::cuEventRecord(event.raw(), self.stream) })
    }

    /// Whether every submitted batch has finished (true when none was submitted).
    pub fn done(&mut self) -> Result<bool, CudaError> {
        match self.last {
            None => Ok(true),
            // The stream runs batches in order: the last one done means all are.
            Some(i) => self.poll_slot(i),
        }
    }

    /// How many batches were queued since the copier was made: the number of the last one. A
    /// caller that notes it after queuing its own batches asks [`Copier::done_through`] later
    /// whether they are done, whatever was queued behind them meanwhile.
    pub fn submitted(&self) -> u64 {
        self.submitted
    }

    /// Whether batch number `seq` ([`Copier::submitted`]) and every batch before it have
    /// finished (true for 0). Batches finish in the order they were queued, on one stream.
    pub fn done_through(&mut self, seq: u64) -> Result<bool, CudaError> {
        if seq == 0 {
            return Ok(true);
        }
        if seq > self.submitted {
            return Err(CudaError::Invalid(format!("batch {seq} was never queued ({} so far)", self.submitted)));
        }
        // Batches take the slots in turn, so batch `seq` went to slot `(seq - 1) % SLOTS`.
        let i = ((seq - 1) % self.slots.len() as u64) as usize;
        if self.slots[i].seq > seq {
            // The slot was taken again, which waits until its batch (this one) has finished.
            return Ok(true);
        }
        self.poll_slot(i)
    }

    /// Blocks until every submitted batch has finished.
    pub fn wait(&mut self) -> Result<(), CudaError> {
        if let Some(i) = self.last {
            self.wait_slot(i)?;
        }
        for s in &mut self.slots {
            s.pending = false;
        }
        Ok(())
    }

    /// GPU time from the first batch queued after the copier was last idle to the last one's end,
    /// in seconds (waits for completion).
    pub fn elapsed_s(&mut self) -> Result<f64, CudaError> {
        let Some(i) = self.last else { return Ok(0.0) };
        self.wait()?;
        let mut ms = 0f32;
        // SAFETY: both events were recorded and have completed.
        check("cuEventElapsedTime", unsafe { sys::cuEventElapsedTime(&mut ms, self.start, self.slots[i].event) })?;
        Ok(f64::from(ms) / 1e3)
    }

    fn poll_slot(&mut self, i: usize) -> Result<bool, CudaError> {
        if !self.slots[i].pending {
            return Ok(true);
        }
        self.dev.bind()?;
        // SAFETY: the event was recorded on this copier's stream.
        let r = unsafe { sys::cuEventQuery(self.slots[i].event) };
        if r == sys::CUresult::CUDA_ERROR_NOT_READY {
            return Ok(false);
        }
        check("cuEventQuery", r)?;
        self.slots[i].pending = false;
        if self.last == Some(i) {
            self.last = None;
        }
        Ok(true)
    }

    fn wait_slot(&mut self, i: usize) -> Result<(), CudaError> {
        if !self.slots[i].pending {
            return Ok(());
        }
        self.dev.bind()?;
        // SAFETY: the event was recorded on this copier's stream.
        check("cuEventSynchronize", unsafe { sys::cuEventSynchronize(self.slots[i].event) })?;
        self.slots[i].pending = false;
        if self.last == Some(i) {
            self.last = None;
        }
        Ok(())
    }
}

/// `ranges` (at least one) as one `cuMemcpyBatchAsync` on `stream`: ordered after the stream's
/// earlier work and before its later work; among themselves, in any order (ranges of one plan
/// never overlap).
fn batch_on(batch: MemcpyBatchFn, ranges: &[Range], stream: sys::CUstream) -> Result<(), CudaError> {
    let mut dsts: Vec<sys::CUdeviceptr> = ranges.iter().map(|r| r.dst).collect();
    let mut srcs: Vec<sys::CUdeviceptr> = ranges.iter().map(|r| r.src).collect();
    let mut sizes: Vec<usize> = ranges.iter().map(|r| r.len as usize).collect();
    // One attribute set for every copy: ordered with the stream, and the hint that the
    // copies run beside the inference engine's kernels. Location hints apply only to
    // managed memory, which none of these is.
    // SAFETY: CUmemcpyAttributes is plain data for which all-zero bytes are a valid value.
    let mut attrs: sys::CUmemcpyAttributes = unsafe { std::mem::zeroed() };
    attrs.srcAccessOrder = sys::CUmemcpySrcAccessOrder::CU_MEMCPY_SRC_ACCESS_ORDER_STREAM;
    attrs.flags = sys::CUmemcpyFlags::CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE as u32;
    let mut attrs_idx = 0usize;
    let mut fail_idx = usize::MAX;
    // SAFETY: the three arrays hold `ranges.len()` entries each and, like the attributes,
    // are read during the call only; the caller's contract (see `submit`) covers the ranges.
    let r = unsafe {
        batch(
            dsts.as_mut_ptr(),
            srcs.as_mut_ptr(),
            sizes.as_mut_ptr(),
            ranges.len(),
            &mut attrs,
            &mut attrs_idx,
            1,
            &mut fail_idx,
            stream,
        )
    };
    check("cuMemcpyBatchAsync", r)
}

/// Queues `copies` on the copy engines on `stream`, one `cuMemcpy2DAsync` each (addresses are
/// unified: device memory and mapped pool pages alike).
///
/// # Safety
/// Every row of every copy must be valid to read at its source and write at its destination
/// until the stream has run it; `stream` belongs to the current context.
unsafe fn pitched(copies: &[PitchedCopy], stream: sys::CUstream) -> Result<(), CudaError> {
    for c in copies {
        // Unified addresses on both sides: the driver tells device memory from mapped host pages.
        let p = sys::CUDA_MEMCPY2D {
            srcXInBytes: 0,
            srcY: 0,
            srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_UNIFIED,
            srcHost: std::ptr::null(),
            srcDevice: c.src,
            srcArray: std::ptr::null_mut(),
            srcPitch: c.src_pitch as usize,
            dstXInBytes: 0,
            dstY: 0,
            dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_UNIFIED,
            dstHost: std::ptr::null_mut(),
            dstDevice: c.dst,
            dstArray: std::ptr::null_mut(),
            dstPitch: c.dst_pitch as usize,
            WidthInBytes: c.width as usize,
            Height: c.height as usize,
        };
        // SAFETY: the caller's contract covers every row; the driver reads `p` during the call.
        check("cuMemcpy2DAsync", unsafe { sys::cuMemcpy2DAsync_v2(&p, stream) })?;
    }
    Ok(())
}

/// Queues `ranges` on the copy engines on `stream`: one `cuMemcpyAsync` for a single range, else
/// one `cuMemcpyBatchAsync` where the driver has it (`batch`), else a call per range.
///
/// # Safety
/// As for [`Copier::submit`]; `stream` belongs to the current context.
unsafe fn dma(batch: Option<MemcpyBatchFn>, ranges: &[Range], stream: sys::CUstream) -> Result<(), CudaError> {
    match batch {
        Some(batch) if ranges.len() > 1 => batch_on(batch, ranges, stream),
        _ => {
            for r in ranges {
                // SAFETY: the caller's contract covers every range.
                check("cuMemcpyAsync", unsafe { sys::cuMemcpyAsync(r.dst, r.src, r.len as usize, stream) })?;
            }
            Ok(())
        }
    }
}

impl Drop for Copier {
    fn drop(&mut self) {
        let _ = self.wait();
        if self.dev.bind().is_ok() {
            // SAFETY: created in `new`, destroyed once, after the last batch finished.
            unsafe {
                sys::cuEventDestroy_v2(self.start);
                for s in &self.slots {
                    sys::cuEventDestroy_v2(s.event);
                }
                sys::cuStreamDestroy_v2(self.stream);
            }
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // SAFETY: made in `Copier::set_staging` (null where it stopped early), destroyed once;
        // the copier waited for its copies (its Drop and `set_staging` wait first), and the
        // context is current on this thread since then.
        unsafe {
            if !self.stream.is_null() {
                sys::cuStreamSynchronize(self.stream);
            }
            for e in
                [self.fork, self.join].into_iter().chain(self.filled.iter().copied()).chain(self.free.iter().copied())
            {
                if !e.is_null() {
                    sys::cuEventDestroy_v2(e);
                }
            }
            if !self.stream.is_null() {
                sys::cuStreamDestroy_v2(self.stream);
            }
        }
    }
}
