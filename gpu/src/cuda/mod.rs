//! The `cuda` backend: KV blocks between GPU memory and the pinned pool, on the copy engines or
//! with a gather/scatter kernel, through the CUDA driver API (cudarc, loaded at run time).
//!
//! - [`device`]: the driver (present or not: the same binary runs without one), a GPU by
//!   ordinal or UUID, its primary context made current on the calling thread.
//! - [`memory`]: device allocations (tests and benches), CUDA IPC import of an inference engine's
//!   KV-cache allocation, and registration of pool memory with the driver (mapped, so kernels
//!   can address it; the device pointer is queried, never assumed).
//! - [`engine_memory`]: an inference engine's KV cache on a GPU, opened from its IPC handles,
//!   and the ranges that move its blocks to and from pool slots.
//! - [`kernel`]: the NVRTC-compiled gather/scatter kernel.
//! - [`copier`]: one stream, its completion event and the range table a kernel reads; submits a
//!   [`crate::plan::Plan`], or a block copy ([`crate::blocks`]), staged through device memory on a
//!   second stream where it has a staging buffer.
//!
//! Every driver call returns its `CUresult` as a [`CudaError`] naming the call.

pub mod copier;
pub mod device;
pub mod engine_memory;
pub mod kernel;
pub mod memory;

pub use copier::{BlockJob, Copier, LayerJob};
pub use device::{driver_present, Device};
pub use engine_memory::{device_by_uuid, CudaMemory};
pub use memory::{DeviceBuffer, HostRegistration, IpcEvent, IpcMapping, PinnedBuffer, SharedEvent};

use cudarc::driver::sys;

/// Why a CUDA operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    /// No CUDA driver library (`libcuda.so.1`) can be loaded on this machine.
    #[error("no CUDA driver on this machine (libcuda.so.1 cannot be loaded); the GPU path needs an NVIDIA driver")]
    NoDriver,
    /// A driver call failed.
    #[error("{call} failed: {code:?} ({message})")]
    Driver {
        /// The driver function.
        call: &'static str,
        /// Its result code.
        code: sys::CUresult,
        /// The driver's description of the code.
        message: String,
    },
    /// No GPU has the requested ordinal or UUID.
    #[error("no GPU {0} on this machine; `nvidia-smi -L` lists the GPUs and their UUIDs")]
    NoDevice(String),
    /// The copy kernel could not be compiled or loaded.
    #[error("copy kernel: {0}")]
    Kernel(String),
    /// A batch has more ranges than the copier's range table holds.
    #[error("{ranges} ranges in one batch; this copier holds {capacity}: split the batch")]
    TooManyRanges {
        /// Ranges asked for.
        ranges: usize,
        /// The table's capacity.
        capacity: usize,
    },
    /// An argument is out of range (the message names it).
    #[error("{0}")]
    Invalid(String),
}

/// Turns a driver result into `Ok` or a [`CudaError::Driver`] naming `call`.
pub(crate) fn check(call: &'static str, code: sys::CUresult) -> Result<(), CudaError> {
    if code == sys::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let mut text: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: cuGetErrorString writes a pointer to a static string (or leaves it null) for any
    // code; the driver library is loaded, since `code` came from a driver call.
    let message = unsafe {
        if sys::cuGetErrorString(code, &mut text) == sys::CUresult::CUDA_SUCCESS && !text.is_null() {
            std::ffi::CStr::from_ptr(text).to_string_lossy().into_owned()
        } else {
            "no description".to_string()
        }
    };
    Err(CudaError::Driver { call, code, message })
}
