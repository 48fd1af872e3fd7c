//! GPU allocations, CUDA IPC import and host-memory registration.

use super::device::Device;
use super::{check, CudaError};
use cudarc::driver::sys;
use std::sync::Arc;

/// Device memory allocated here (tests, benches, the kernel's range table).
#[derive(Debug)]
pub struct DeviceBuffer {
    dev: Arc<Device>,
    ptr: sys::CUdeviceptr,
    len: usize,
}

impl DeviceBuffer {
    /// Allocates `len` bytes on `dev`.
    pub fn new(dev: Arc<Device>, len: usize) -> Result<DeviceBuffer, CudaError> {
        if len == 0 {
            return Err(CudaError::Invalid("a device buffer needs at least one byte".into()));
        }
        dev.bind()?;
        let mut ptr = 0;
        // SAFETY: the context is current; `ptr` is a valid out-pointer. Freed in Drop.
        check("cuMemAlloc", unsafe { sys::cuMemAlloc_v2(&mut ptr, len) })?;
        Ok(DeviceBuffer { dev, ptr, len })
    }

    /// The device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty (never: allocation needs a byte).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `data` to `offset` (synchronously).
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), CudaError> {
        self.check_range(offset, data.len())?;
        self.dev.bind()?;
        // SAFETY: the range lies inside the allocation (checked); `data` is readable for its length.
        check("cuMemcpyHtoD", unsafe {
            sys::cuMemcpyHtoD_v2(self.ptr + offset as u64, data.as_ptr().cast(), data.len())
        })
    }

    /// Copies from `offset` into `out` (synchronously).
    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<(), CudaError> {
        self.check_range(offset, out.len())?;
        self.dev.bind()?;
        // SAFETY: the range lies inside the allocation (checked); `out` is writable for its length.
        check("cuMemcpyDtoH", unsafe {
            sys::cuMemcpyDtoH_v2(out.as_mut_ptr().cast(), self.ptr + offset as u64, out.len())
        })
    }

    /// Sets every byte to `value` (synchronously).
    pub fn fill(&self, value: u8) -> Result<(), CudaError> {
        self.dev.bind()?;
        // SAFETY: the whole allocation.
        check("cuMemsetD8", unsafe { sys::cuMemsetD8_v2(self.ptr, value, self.len) })
    }

    /// The CUDA IPC handle of this allocation, for another process to open.
    pub fn ipc_handle(&self) -> Result<[u8; 64], CudaError> {
        self.dev.bind()?;
        let mut h = sys::CUipcMemHandle { reserved: [0; 64] };
        // SAFETY: `ptr` is the base of a cuMemAlloc allocation; `h` is a valid out-pointer.
        check("cuIpcGetMemHandle", unsafe { sys::cuIpcGetMemHandle(&mut h, self.ptr) })?;
        Ok(h.reserved.map(|b| b as u8))
    }

    fn check_range(&self, offset: usize, len: usize) -> Result<(), CudaError> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(CudaError::Invalid(format!(
                "bytes {offset}..{} are outside the {}-byte buffer",
                offset.saturating_add(len),
                self.len
            )));
        }
        Ok(())
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.dev.bind().is_ok() {
            // SAFETY: allocated in `new`, freed once.
            unsafe {
                sys::cuMemFree_v2(self.ptr);
            }
        }
    }
}

/// Pinned, device-mapped host memory allocated by the driver (the kernel's range staging table,
/// bench buffers).
#[derive(Debug)]
pub struct PinnedBuffer {
    dev: Arc<Device>,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is plain memory owned by this value; the driver may be called from any thread.
unsafe impl Send for PinnedBuffer {}

impl PinnedBuffer {
    /// Allocates `len` pinned bytes mapped into `dev`'s address space.
    pub fn new(dev: Arc<Device>, len: usize) -> Result<PinnedBuffer, CudaError> {
        if len == 0 {
            return Err(CudaError::Invalid("a pinned buffer needs at least one byte".into()));
        }
        dev.bind()?;
        let mut p = std::ptr::null_mut();
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
        // SAFETY: the context is current; `p` is a valid out-pointer. Freed in Drop.
        check("cuMemHostAlloc", unsafe { sys::cuMemHostAlloc(&mut p, len, flags) })?;
        Ok(PinnedBuffer { dev, ptr: p.cast(), len })
    }

    /// The host address (also the device address: the driver maps it at the same address under
    /// unified addressing, which every 64-bit Linux CUDA platform has).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty (never).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memory as a byte slice.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points at `len` bytes owned by this value for its lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The memory as a mutable byte slice.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        if self.dev.bind().is_ok() {
            // SAFETY: allocated by cuMemHostAlloc in `new`, freed once.
            unsafe {
                sys::cuMemFreeHost(self.ptr.cast());
            }
        }
    }
}

/// Another process's device allocation opened from its CUDA IPC handle. The mapping is closed on
/// drop; the caller keeps it until every copy queued on it has drained.
#[derive(Debug)]
pub struct IpcMapping {
    dev: Arc<Device>,
    ptr: sys::CUdeviceptr,
}

// SAFETY: a device address; the driver may be called from any thread with the context current.
unsafe impl Send for IpcMapping {}
// SAFETY: as above; the mapping is immutable after opening.
unsafe impl Sync for IpcMapping {}

impl IpcMapping {
    /// Opens `handle` (from `cudaIpcGetMemHandle` / torch's `_share_cuda_()`) on `dev`.
    pub fn open(dev: Arc<Device>, handle: &[u8; 64]) -> Result<IpcMapping, CudaError> {
        dev.bind()?;
        let h = sys::CUipcMemHandle { reserved: handle.map(|b| b as std::ffi::c_char) };
        let mut ptr = 0;
        let flags = sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32;
        // SAFETY: the context is current; `ptr` is a valid out-pointer; the handle is passed by
        // value. Closed in Drop.
        check("cuIpcOpenMemHandle", unsafe { sys::cuIpcOpenMemHandle_v2(&mut ptr, h, flags) })?;
        Ok(IpcMapping { dev, ptr })
    }

    /// The base address of the opened allocation in this process.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
}

impl Drop for IpcMapping {
    fn drop(&mut self) {
        if self.dev.bind().is_ok() {
            // SAFETY: opened in `open`, closed once.
            unsafe {
                sys::cuIpcCloseMemHandle(self.ptr);
            }
        }
    }
}

/// Host memory (the pool arena) registered with the driver: pinned, mapped into the GPU's
/// address space. Unregistered on drop.
#[derive(Debug)]
pub struct HostRegistration {
    dev: Arc<Device>,
    host: *mut u8,
    len: usize,
    dptr: u64,
}

// SAFETY: holds addresses only; the memory is owned elsewhere (see `register`'s contract).
unsafe impl Send for HostRegistration {}
// SAFETY: as above.
unsafe impl Sync for HostRegistration {}

impl HostRegistration {
    /// Registers `len` bytes at `host` with `dev` and queries their device address.
    ///
    /// # Safety
    /// `host..host + len` must be a live mapping that outlives the returned value.
    pub unsafe fn register(dev: Arc<Device>, host: *mut u8, len: usize) -> Result<HostRegistration, CudaError> {
        dev.bind()?;
        let flags = sys::CU_MEMHOSTREGISTER_DEVICEMAP | sys::CU_MEMHOSTREGISTER_PORTABLE;
        // SAFETY: the caller guarantees the range is live memory; unregistered in Drop.
        check("cuMemHostRegister", unsafe { sys::cuMemHostRegister_v2(host.cast(), len, flags) })?;
        let mut dptr = 0;
        // SAFETY: `host` was just registered with DEVICEMAP; `dptr` is a valid out-pointer.
        let r = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dptr, host.cast(), 0) };
        if let Err(e) = check("cuMemHostGetDevicePointer", r) {
            // SAFETY: registered above.
            unsafe { sys::cuMemHostUnregister(host.cast()) };
            return Err(e);
        }
        Ok(HostRegistration { dev, host, len, dptr })
    }

    /// The device address of the first registered byte.
    pub fn device_ptr(&self) -> u64 {
        self.dptr
    }

    /// The device address of the host address `p`, which must lie in the registered range.
    pub fn device_addr(&self, p: *const u8) -> Option<u64> {
        let off = (p as usize).checked_sub(self.host as usize)?;
        (off < self.len).then(|| self.dptr + off as u64)
    }

    /// Registered bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for HostRegistration {
    fn drop(&mut self) {
        if self.dev.bind().is_ok() {
            // SAFETY: registered in `register`, unregistered once.
            unsafe {
                sys::cuMemHostUnregister(self.host.cast());
            }
        }
    }
}

/// Another process's CUDA event opened from its IPC handle (`cudaIpcGetEventHandle`, torch's
/// `Event(interprocess=True).ipc_handle()`): a copy can be ordered after the work that process
/// recorded it behind, without either side waiting on the CPU.
#[derive(Debug)]
pub struct IpcEvent {
    dev: Arc<Device>,
    event: sys::CUevent,
}

// SAFETY: an event handle is usable from any thread with its context current.
unsafe impl Send for IpcEvent {}
// SAFETY: as above; the handle is only passed to stream waits.
unsafe impl Sync for IpcEvent {}

impl IpcEvent {
    /// Opens the 64-byte event `handle` on `dev`.
    pub fn open(dev: Arc<Device>, handle: &[u8; 64]) -> Result<IpcEvent, CudaError> {
        dev.bind()?;
        let h = sys::CUipcEventHandle { reserved: handle.map(|b| b as std::ffi::c_char) };
        let mut event = std::ptr::null_mut();
        // SAFETY: the context is current; `event` is a valid out-pointer. Destroyed in Drop.
        check("cuIpcOpenEventHandle", unsafe { sys::cuIpcOpenEventHandle(&mut event, h) })?;
        Ok(IpcEvent { dev, event })
    }

    /// Whether the work the other process recorded this event behind has finished. An error
    /// (for instance when that process died and the driver gave up on the event) means the event
    /// will not fire.
    pub fn fired(&self) -> Result<bool, CudaError> {
        self.dev.bind()?;
        // SAFETY: the event was opened in `open` and lives until Drop.
        let r = unsafe { sys::cuEventQuery(self.event) };
        if r == sys::CUresult::CUDA_ERROR_NOT_READY {
            return Ok(false);
        }
        check("cuEventQuery", r).map(|()| true)
    }
}

impl Drop for IpcEvent {
    fn drop(&mut self) {
        if self.dev.bind().is_ok() {
            // SAFETY: opened in `open`, destroyed once.
            unsafe {
                sys::cuEventDestroy_v2(self.event);
            }
        }
    }
}

/// An interprocess CUDA event this process creates and records on its copier's stream, for
/// another process to wait on (a layer-wise load's per-layer events): the worker opens
/// [`SharedEvent::handle`] once and makes its stream wait on it.
#[derive(Debug)]
pub struct SharedEvent {
    dev: Arc<Device>,
    event: sys::CUevent,
    handle: [u8; 64],
}

// SAFETY: an event handle is usable from any thread with its context current.
unsafe impl Send for SharedEvent {}
// SAFETY: as above; the handle is only recorded on streams and read.
unsafe impl Sync for SharedEvent {}

impl SharedEvent {
    /// Creates an interprocess event (no timing) on `dev` and exports its handle.
    pub fn new(dev: Arc<Device>) -> Result<SharedEvent, CudaError> {
        dev.bind()?;
        let mut event = std::ptr::null_mut();
        let flags =
            sys::CUevent_flags::CU_EVENT_INTERPROCESS as u32 | sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
        // SAFETY: the context is current; `event` is a valid out-pointer. Destroyed in Drop.
        check("cuEventCreate", unsafe { sys::cuEventCreate(&mut event, flags) })?;
        let mut h = sys::CUipcEventHandle { reserved: [0; 64] };
        // SAFETY: `event` was created above with CU_EVENT_INTERPROCESS; `h` is a valid out-pointer.
        if let Err(e) = check("cuIpcGetEventHandle", unsafe { sys::cuIpcGetEventHandle(&mut h, event) }) {
            // SAFETY: created above, destroyed once.
            unsafe { sys::cuEventDestroy_v2(event) };
            return Err(e);
        }
        Ok(SharedEvent { dev, event, handle: h.reserved.map(|b| b as u8) })
    }

    /// The 64-byte handle another process opens (`cudaIpcOpenEventHandle`,
    /// `torch.cuda.Event.from_ipc_handle`).
    pub fn handle(&self) -> [u8; 64] {
        self.handle
    }

    /// The raw event, for [`crate::cuda::Copier::record`].
    pub(crate) fn raw(&self) -> sys::CUevent {
        self.event
    }

    /// The GPU the event lives on.
    pub fn device(&self) -> &Arc<Device> {
        &self.dev
    }
}

impl Drop for SharedEvent {
    fn drop(&mut self) {
        if self.dev.bind().is_ok() {
            // SAFETY: created in `new`, destroyed once.
            unsafe {
                sys::cuEventDestroy_v2(self.event);
            }
        }
    }
}
