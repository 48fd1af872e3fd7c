//! A copier: one CUDA stream on one GPU that moves planned batches and reports when they are done.

use super::device::Device;
use super::kernel::Kernel;
use super::memory::{DeviceBuffer, PinnedBuffer};
use super::{check, CudaError};
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
}

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
        Ok(Copier { dev, stream, start, slots, next: 0, last: None, kernel, kernel_note, batch, capacity })
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
        // SAFETY: as for the start event.
        check("cuEventRecord", unsafe { sys::cuEventRecord(self.slots[i].event, self.stream) })?;
        self.slots[i].pending = true;
        self.last = Some(i);
        self.next = (i + 1) % self.slots.len();
        Ok(())
    }

    /// Queues `ranges` (at least one) as one `cuMemcpyBatchAsync` on the stream. The copies are
    /// ordered after the stream's earlier work and before its later work; among themselves, in
    /// any order (ranges of one plan never overlap).
    fn batch_async(&self, ranges: &[Range]) -> Result<(), CudaError> {
        let Some(batch) = self.batch else {
            return Err(CudaError::Invalid("this driver has no cuMemcpyBatchAsync".into()));
        };
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
                self.stream,
            )
        };
        check("cuMemcpyBatchAsync", r)
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
