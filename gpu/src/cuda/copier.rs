//! A copier: one CUDA stream on one GPU that moves planned batches and reports when they are done.

use super::device::Device;
use super::kernel::Kernel;
use super::memory::{DeviceBuffer, PinnedBuffer};
use super::{check, CudaError};
use crate::plan::{Method, Plan, Range};
use cudarc::driver::sys;
use std::sync::Arc;

/// Moves [`Plan`]s on its own stream: DMA plans as one `cuMemcpyAsync` per range, kernel plans as
/// a range-table upload and one launch. One batch is in flight at a time: [`Copier::submit`]
/// waits for the previous one first. Completion is an event, polled with [`Copier::done`] or
/// awaited with [`Copier::wait`].
#[derive(Debug)]
pub struct Copier {
    dev: Arc<Device>,
    stream: sys::CUstream,
    start: sys::CUevent,
    end: sys::CUevent,
    kernel: Option<Kernel>,
    kernel_note: Option<String>,
    staging: PinnedBuffer,
    table: DeviceBuffer,
    capacity: usize,
    pending: bool,
}

// SAFETY: stream and event handles are usable from any thread with the context current, which
// every method makes so first.
unsafe impl Send for Copier {}

const RANGE_BYTES: usize = std::mem::size_of::<Range>();

impl Copier {
    /// A copier on `dev` whose kernel batches hold up to `capacity` ranges. The kernel is compiled
    /// when `kernel` is set; if that fails, [`Copier::kernel_note`] says why and kernel plans
    /// are moved by DMA instead.
    pub fn new(dev: Arc<Device>, capacity: usize, kernel: bool) -> Result<Copier, CudaError> {
        let capacity = capacity.max(1);
        dev.bind()?;
        let mut stream = std::ptr::null_mut();
        // SAFETY: the context is current; `stream` is a valid out-pointer. Destroyed in Drop.
        check("cuStreamCreate", unsafe {
            sys::cuStreamCreate(&mut stream, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32)
        })?;
        let mut start = std::ptr::null_mut();
        let mut end = std::ptr::null_mut();
        // SAFETY: as above for the events (timed, so elapsed times can be read).
        unsafe {
            check("cuEventCreate", sys::cuEventCreate(&mut start, 0))?;
            check("cuEventCreate", sys::cuEventCreate(&mut end, 0))?;
        }
        let staging = PinnedBuffer::new(dev.clone(), capacity * RANGE_BYTES)?;
        let table = DeviceBuffer::new(dev.clone(), capacity * RANGE_BYTES)?;
        let (kernel, kernel_note) = if kernel {
            match Kernel::load(&dev) {
                Ok(k) => (Some(k), None),
                Err(e) => (None, Some(e.to_string())),
            }
        } else {
            (None, Some("kernel copies disabled".into()))
        };
        Ok(Copier { dev, stream, start, end, kernel, kernel_note, staging, table, capacity, pending: false })
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

    /// Queues `plan` on the stream (after the previous batch finished) and returns at once.
    ///
    /// # Safety
    /// Every range must be valid device-accessible memory for the whole copy: sources readable,
    /// destinations writable (device memory, IPC mappings or registered, mapped host memory),
    /// and stay so until [`Copier::done`] reports completion.
    pub unsafe fn submit(&mut self, plan: &Plan) -> Result<(), CudaError> {
        self.wait()?;
        self.dev.bind()?;
        // SAFETY: the events and stream belong to this copier's current context.
        check("cuEventRecord", unsafe { sys::cuEventRecord(self.start, self.stream) })?;
        match (plan.method, &self.kernel) {
            (Method::Kernel { ctas, threads }, Some(kernel)) => {
                if plan.ranges.len() > self.capacity {
                    return Err(CudaError::TooManyRanges { ranges: plan.ranges.len(), capacity: self.capacity });
                }
                let bytes = plan.ranges.len() * RANGE_BYTES;
                // SAFETY: Range is repr(C) plain data; the staging buffer holds `capacity`
                // ranges and is not read by a pending copy (we waited above).
                unsafe {
                    std::ptr::copy_nonoverlapping(plan.ranges.as_ptr().cast::<u8>(), self.staging.as_ptr(), bytes);
                }
                // SAFETY: both buffers hold `bytes`; the stream orders the upload before the launch.
                check("cuMemcpyHtoDAsync", unsafe {
                    sys::cuMemcpyHtoDAsync_v2(self.table.ptr(), self.staging.as_ptr().cast(), bytes, self.stream)
                })?;
                // SAFETY: the table holds the ranges; the caller's contract covers them.
                unsafe { kernel.launch(self.table.ptr(), plan.ranges.len() as u64, ctas, threads, self.stream)? };
            }
            _ => {
                for r in &plan.ranges {
                    // SAFETY: the caller's contract covers every range; with unified addressing
                    // cuMemcpyAsync takes device and mapped host addresses alike.
                    check("cuMemcpyAsync", unsafe { sys::cuMemcpyAsync(r.dst, r.src, r.len as usize, self.stream) })?;
                }
            }
        }
        // SAFETY: as for the start event.
        check("cuEventRecord", unsafe { sys::cuEventRecord(self.end, self.stream) })?;
        self.pending = true;
        Ok(())
    }

    /// Whether the last submitted batch has finished (true when none was submitted).
    pub fn done(&mut self) -> Result<bool, CudaError> {
        if !self.pending {
            return Ok(true);
        }
        self.dev.bind()?;
        // SAFETY: the event was recorded on this copier's stream.
        let r = unsafe { sys::cuEventQuery(self.end) };
        if r == sys::CUresult::CUDA_ERROR_NOT_READY {
            return Ok(false);
        }
        check("cuEventQuery", r)?;
        self.pending = false;
        Ok(true)
    }

    /// Blocks until the last submitted batch has finished.
    pub fn wait(&mut self) -> Result<(), CudaError> {
        if !self.pending {
            return Ok(());
        }
        self.dev.bind()?;
        // SAFETY: the event was recorded on this copier's stream.
        check("cuEventSynchronize", unsafe { sys::cuEventSynchronize(self.end) })?;
        self.pending = false;
        Ok(())
    }

    /// GPU time of the last finished batch, in seconds (from the stream's events).
    pub fn elapsed_s(&mut self) -> Result<f64, CudaError> {
        self.wait()?;
        let mut ms = 0f32;
        // SAFETY: both events were recorded and have completed.
        check("cuEventElapsedTime", unsafe { sys::cuEventElapsedTime(&mut ms, self.start, self.end) })?;
        Ok(f64::from(ms) / 1e3)
    }
}

impl Drop for Copier {
    fn drop(&mut self) {
        let _ = self.wait();
        if self.dev.bind().is_ok() {
            // SAFETY: created in `new`, destroyed once, after the last batch finished.
            unsafe {
                sys::cuEventDestroy_v2(self.start);
                sys::cuEventDestroy_v2(self.end);
                sys::cuStreamDestroy_v2(self.stream);
            }
        }
    }
}
