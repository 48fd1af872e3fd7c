//! The CUDA driver and one GPU's primary context.

use super::{check, CudaError};
use cudarc::driver::sys;
use std::sync::OnceLock;

/// Whether the CUDA driver library can be loaded here. Every other call of this module needs it:
/// cudarc's dynamically loaded functions panic without it.
pub fn driver_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: is_culib_present only tries to dlopen the library's candidate names.
    *PRESENT.get_or_init(|| unsafe { sys::is_culib_present() })
}

fn init() -> Result<(), CudaError> {
    if !driver_present() {
        return Err(CudaError::NoDriver);
    }
    static INIT: OnceLock<Result<(), String>> = OnceLock::new();
    // SAFETY: the driver library is present; cuInit(0) may be called any number of times.
    let r = INIT.get_or_init(|| check("cuInit", unsafe { sys::cuInit(0) }).map_err(|e| e.to_string()));
    r.clone().map_err(CudaError::Invalid)
}

/// One GPU with its primary context retained (released on drop).
#[derive(Debug)]
pub struct Device {
    ordinal: i32,
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
    uuid: [u8; 16],
    sms: u32,
    name: String,
}

// SAFETY: a CUdevice is an integer and the primary context handle may be made current on any
// thread (the driver synchronises context use); the struct holds no thread-bound state.
unsafe impl Send for Device {}
// SAFETY: as above; every method makes the context current on the calling thread first.
unsafe impl Sync for Device {}

impl Device {
    /// GPUs the driver sees.
    pub fn count() -> Result<usize, CudaError> {
        init()?;
        let mut n = 0;
        // SAFETY: the driver is initialised; `n` is a valid out-pointer.
        check("cuDeviceGetCount", unsafe { sys::cuDeviceGetCount(&mut n) })?;
        Ok(n.max(0) as usize)
    }

    /// The GPU with this ordinal (as the driver numbers them, after `CUDA_VISIBLE_DEVICES`).
    pub fn open(ordinal: usize) -> Result<Device, CudaError> {
        init()?;
        let count = Self::count()?;
        if ordinal >= count {
            return Err(CudaError::NoDevice(format!("{ordinal} (the driver sees {count})")));
        }
        let mut dev = 0;
        // SAFETY: the ordinal is below the device count; `dev` is a valid out-pointer.
        check("cuDeviceGet", unsafe { sys::cuDeviceGet(&mut dev, ordinal as i32) })?;
        let mut ctx = std::ptr::null_mut();
        // SAFETY: `dev` is a valid device; `ctx` is a valid out-pointer. Released in Drop.
        check("cuDevicePrimaryCtxRetain", unsafe { sys::cuDevicePrimaryCtxRetain(&mut ctx, dev) })?;
        let mut uuid = sys::CUuuid { bytes: [0; 16] };
        let mut sms = 0;
        let mut name = [0 as std::ffi::c_char; 128];
        // SAFETY: valid device and out-pointers; the name buffer's length is passed.
        unsafe {
            check("cuDeviceGetUuid", sys::cuDeviceGetUuid(&mut uuid, dev))?;
            check(
                "cuDeviceGetAttribute",
                sys::cuDeviceGetAttribute(
                    &mut sms,
                    sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
                    dev,
                ),
            )?;
            check("cuDeviceGetName", sys::cuDeviceGetName(name.as_mut_ptr(), name.len() as i32, dev))?;
        }
        // SAFETY: cuDeviceGetName wrote a NUL-terminated string into the buffer.
        let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }.to_string_lossy().into_owned();
        let uuid = uuid.bytes.map(|b| b as u8);
        Ok(Device { ordinal: ordinal as i32, dev, ctx, uuid, sms: sms.max(0) as u32, name })
    }

    /// The GPU with this UUID (16 bytes, as `nvidia-smi -L` prints after `GPU-`), whatever its
    /// ordinal under the caller's `CUDA_VISIBLE_DEVICES`.
    pub fn by_uuid(uuid: &[u8; 16]) -> Result<Device, CudaError> {
        for i in 0..Self::count()? {
            let d = Self::open(i)?;
            if &d.uuid == uuid {
                return Ok(d);
            }
        }
        Err(CudaError::NoDevice(format!("with UUID {}", format_uuid(uuid))))
    }

    /// Makes this GPU's primary context current on the calling thread.
    pub fn bind(&self) -> Result<(), CudaError> {
        // SAFETY: the context was retained in `open` and is released only in Drop.
        check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(self.ctx) })
    }

    /// The driver's ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal as usize
    }

    /// The GPU's UUID.
    pub fn uuid(&self) -> [u8; 16] {
        self.uuid
    }

    /// Streaming multiprocessors.
    pub fn sm_count(&self) -> u32 {
        self.sms
    }

    /// The product name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: balances the retain in `open`.
        unsafe {
            sys::cuDevicePrimaryCtxRelease_v2(self.dev);
        }
    }
}

/// `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, as nvidia-smi prints UUIDs.
pub fn format_uuid(u: &[u8; 16]) -> String {
    let h: Vec<String> = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..].concat()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_formats_like_nvidia_smi() {
        let u: [u8; 16] = std::array::from_fn(|i| i as u8 * 17);
        assert_eq!(format_uuid(&u), "GPU-00112233-4455-6677-8899-aabbccddeeff");
    }

    #[test]
    fn no_driver_is_an_error_not_a_panic() {
        if driver_present() {
            return; // a GPU machine: the device tests cover it
        }
        assert!(matches!(Device::open(0), Err(CudaError::NoDriver)));
        assert!(matches!(Device::count(), Err(CudaError::NoDriver)));
    }
}
