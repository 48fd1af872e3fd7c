//! The gather/scatter copy kernel, compiled with NVRTC when a copier starts.
//!
//! One launch moves a table of [`Range`](crate::plan::Range)s: CTA `c` copies ranges `c`,
//! `c + gridDim.x`, ...; the threads of a CTA move a range in 16-byte words when its source,
//! destination and length are 16-byte aligned (every KV block is), byte by byte otherwise. Pool
//! pages are addressed through their device-mapped addresses, so one launch reads or writes
//! host memory over PCIe directly, without a staging copy.
//!
//! A second kernel, `kvloft_copy_blocks`, takes a block template and (block, slot) pairs
//! ([`crate::blocks`]) instead of a range table and computes each range itself; with a staging
//! buffer it gathers blocks into (or scatters them from) device memory in the slot layout, for the
//! copy engines to move over PCIe.

use super::device::Device;
use super::{check, CudaError};
use cudarc::driver::sys;
use std::ffi::CString;

/// The kernel's CUDA C source.
pub const SOURCE: &str = r#"
struct KvRange { unsigned long long src, dst, len; };
struct KvPiece { unsigned long long engine, stride, pool, len; };
struct KvPair { unsigned long long slot; unsigned int block, pad; };

// The threads of one CTA copy one run.
__device__ __forceinline__ void kvloft_run(unsigned long long src, unsigned long long dst, unsigned long long len) {
    if (((src | dst | len) & 15ull) == 0) {
        const uint4* __restrict__ s = (const uint4*)src;
        uint4* __restrict__ d = (uint4*)dst;
        const unsigned long long words = len >> 4;
        for (unsigned long long j = threadIdx.x; j < words; j += blockDim.x) {
            d[j] = s[j];
        }
    } else {
        const unsigned char* s = (const unsigned char*)src;
        unsigned char* d = (unsigned char*)dst;
        for (unsigned long long j = threadIdx.x; j < len; j += blockDim.x) {
            d[j] = s[j];
        }
    }
}

extern "C" __global__ void kvloft_copy(const KvRange* __restrict__ ranges, unsigned long long n) {
    for (unsigned long long i = blockIdx.x; i < n; i += gridDim.x) {
        const KvRange r = ranges[i];
        kvloft_run(r.src, r.dst, r.len);
    }
}

// Block copies: work item i is piece i % n_pieces of pair i / n_pieces. The pool side is the
// pair's slot, or, with `staging` set, block p of a staging buffer in the slot layout.
extern "C" __global__ void kvloft_copy_blocks(const KvPiece* __restrict__ pieces, unsigned long long n_pieces,
                                              const KvPair* __restrict__ pairs, unsigned long long n_pairs,
                                              unsigned long long staging, unsigned long long slice_bytes,
                                              unsigned int d2h) {
    const unsigned long long n = n_pieces * n_pairs;
    for (unsigned long long i = blockIdx.x; i < n; i += gridDim.x) {
        const unsigned long long p = i / n_pieces;
        const KvPiece c = pieces[i - p * n_pieces];
        const KvPair b = pairs[p];
        const unsigned long long engine = c.engine + (unsigned long long)b.block * c.stride;
        const unsigned long long pool = (staging ? staging + p * slice_bytes : b.slot) + c.pool;
        if (d2h) {
            kvloft_run(engine, pool, c.len);
        } else {
            kvloft_run(pool, engine, c.len);
        }
    }
}
"#;

/// The loaded kernel (module unloaded on drop).
#[derive(Debug)]
pub struct Kernel {
    module: sys::CUmodule,
    func: sys::CUfunction,
    blocks: sys::CUfunction,
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
        let function = |name: &std::ffi::CStr| {
            let mut func = std::ptr::null_mut();
            // SAFETY: `module` was loaded above; `name` is NUL-terminated.
            check("cuModuleGetFunction", unsafe { sys::cuModuleGetFunction(&mut func, module, name.as_ptr()) })
                .map(|()| func)
        };
        match (function(c"kvloft_copy"), function(c"kvloft_copy_blocks")) {
            (Ok(func), Ok(blocks)) => Ok(Kernel { module, func, blocks }),
            (Err(e), _) | (_, Err(e)) => {
                // SAFETY: loaded above, and no function of it is kept.
                unsafe { sys::cuModuleUnload(module) };
                Err(e)
            }
        }
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

/// Where a block launch's table and pool side are (see [`Kernel::launch_blocks`]).
#[derive(Debug, Clone, Copy)]
pub struct BlockLaunch {
    /// Device address of the [`crate::blocks::Piece`] table.
    pub pieces: u64,
    /// Pieces in it.
    pub n_pieces: u64,
    /// Device address of the [`crate::blocks::BlockPair`] table.
    pub pairs: u64,
    /// Pairs in it.
    pub n_pairs: u64,
    /// Device address of a staging buffer that takes the pool side (block `p` at
    /// `p * slice_bytes`), or 0 for the pairs' slots.
    pub staging: u64,
    /// Bytes of one block's slice.
    pub slice_bytes: u64,
    /// Engine to pool (else pool to engine).
    pub d2h: bool,
}

impl Kernel {
    /// Launches the block kernel: `l.n_pairs` blocks of `l.n_pieces` pieces each.
    ///
    /// # Safety
    /// The context that loaded the kernel must be current; both tables must stay in
    /// device-readable memory until the launch completes, and every range they expand to must be
    /// valid for reading (source) and writing (destination) by the device.
    pub unsafe fn launch_blocks(
        &self,
        l: BlockLaunch,
        ctas: u32,
        threads: u32,
        stream: sys::CUstream,
    ) -> Result<(), CudaError> {
        let (mut pieces, mut n_pieces, mut pairs, mut n_pairs) = (l.pieces, l.n_pieces, l.pairs, l.n_pairs);
        let (mut staging, mut slice_bytes, mut d2h) = (l.staging, l.slice_bytes, u32::from(l.d2h));
        let mut params: [*mut std::ffi::c_void; 7] = [
            (&mut pieces as *mut u64).cast(),
            (&mut n_pieces as *mut u64).cast(),
            (&mut pairs as *mut u64).cast(),
            (&mut n_pairs as *mut u64).cast(),
            (&mut staging as *mut u64).cast(),
            (&mut slice_bytes as *mut u64).cast(),
            (&mut d2h as *mut u32).cast(),
        ];
        // SAFETY: the caller's contract covers the kernel's memory accesses; `params` points at
        // the seven arguments, which live until the call returns (the driver copies them).
        check("cuLaunchKernel", unsafe {
            sys::cuLaunchKernel(
                self.blocks,
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
