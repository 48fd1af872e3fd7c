//! The gather/scatter copy kernel, compiled with NVRTC when a copier starts.
//!
//! One launch moves a table of [`Range`](crate::plan::Range)s: CTA `c` copies ranges `c`,
//! `c + gridDim.x`, ...; the threads of a CTA move a range in 16-byte words when its source,
//! destination and length are 16-byte aligned (every KV block is), byte by byte otherwise. Pool
//! pages are addressed through their device-mapped addresses, so one launch reads or writes
//! host memory over PCIe directly, without a staging copy.

use super::device::Device;
use super::{check, CudaError};
use cudarc::driver::sys;
use std::ffi::CString;

/// The kernel's CUDA C source.
pub const SOURCE: &str = r#"
struct KvRange { unsigned long long src, dst, len; };

extern "C" __global__ void kvloft_copy(const KvRange* __restrict__ ranges, unsigned long long n) {
    for (unsigned long long i = blockIdx.x; i < n; i += gridDim.x) {
        const KvRange r = ranges[i];
        if (((r.src | r.dst | r.len) & 15ull) == 0) {
            const uint4* __restrict__ s = (const uint4*)r.src;
            uint4* __restrict__ d = (uint4*)r.dst;
            const unsigned long long words = r.len >> 4;
            for (unsigned long long j = threadIdx.x; j < words; j += blockDim.x) {
                d[j] = s[j];
            }
        } else {
            const unsigned char* s = (const unsigned char*)r.src;
            unsigned char* d = (unsigned char*)r.dst;
            for (unsigned long long j = threadIdx.x; j < r.len; j += blockDim.x) {
                d[j] = s[j];
            }
        }
    }
}
"#;

/// The loaded kernel (module unloaded on drop).
#[derive(Debug)]
pub struct Kernel {
    module: sys::CUmodule,
    func: sys::CUfunction,
}

// SAFETY: module and function handles are usable from any thread with the context current.
unsafe impl Send for Kernel {}

impl Kernel {
    /// Compiles [`SOURCE`] with NVRTC and loads it into `dev`'s context.
    pub fn load(dev: &Device) -> Result<Kernel, CudaError> {
        // SAFETY: only tries to dlopen libnvrtc's candidate names.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(CudaError::Kernel(
                "NVRTC (libnvrtc.so) cannot be loaded: put the CUDA toolkit's lib64 directory on \
                 LD_LIBRARY_PATH; copies use the copy engines meanwhile"
                    .into(),
            ));
        }
        let ptx = cudarc::nvrtc::compile_ptx(SOURCE).map_err(|e| CudaError::Kernel(format!("NVRTC: {e:?}")))?;
        let text = CString::new(ptx.to_src()).map_err(|_| CudaError::Kernel("PTX holds a NUL byte".into()))?;
        dev.bind()?;
        let mut module = std::ptr::null_mut();
        // SAFETY: the context is current; `text` is NUL-terminated PTX that outlives the call.
        check("cuModuleLoadData", unsafe { sys::cuModuleLoadData(&mut module, text.as_ptr().cast()) })?;
        let mut func = std::ptr::null_mut();
        let name = CString::new("kvloft_copy").expect("static name");
        // SAFETY: `module` was loaded above; `name` is NUL-terminated.
        let r = unsafe { sys::cuModuleGetFunction(&mut func, module, name.as_ptr()) };
        if let Err(e) = check("cuModuleGetFunction", r) {
            // SAFETY: loaded above.
            unsafe { sys::cuModuleUnload(module) };
            return Err(e);
        }
        Ok(Kernel { module, func })
    }

    /// Launches the kernel over `n` ranges at device address `table` on `stream`.
    ///
    /// # Safety
    /// The context that loaded the kernel must be current; `table` must hold `n` ranges in
    /// device-readable memory until the launch completes, and every range must be valid for
    /// reading (source) and writing (destination) by the device.
    pub unsafe fn launch(
        &self,
        table: u64,
        n: u64,
        ctas: u32,
        threads: u32,
        stream: sys::CUstream,
    ) -> Result<(), CudaError> {
        let mut table = table;
        let mut n = n;
        let mut params: [*mut std::ffi::c_void; 2] = [(&mut table as *mut u64).cast(), (&mut n as *mut u64).cast()];
        // SAFETY: the caller's contract covers the kernel's memory accesses; `params` points at
        // the two arguments, which live until the call returns (the driver copies them).
        check("cuLaunchKernel", unsafe {
            sys::cuLaunchKernel(
                self.func,
                ctas,
                1,
                1,
                threads,
                1,
                1,
                0,
                stream,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        })
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        // SAFETY: loaded in `load`, unloaded once (the owning copier binds its context first).
        unsafe {
            sys::cuModuleUnload(self.module);
        }
    }
}
