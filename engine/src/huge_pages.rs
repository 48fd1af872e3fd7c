//! A hint that the index's large arrays be backed by transparent huge pages.
//!
//! A 1,024-hash lookup touches 1,024 buckets and 1,024 items spread over arrays of tens or
//! hundreds of megabytes once a shard holds a few hundred thousand slices: with 4 KiB pages that
//! is a TLB miss per key, and under a hypervisor (nested paging) each costs a two-level page walk.
//! On our 2-core VM, looking up the same 1,024 keys in a table of 200,000 slices took 20.4 us with
//! 4 KiB pages and 13.1 us with transparent huge pages (2 million slices: 29.1 and 16.4 us; a table
//! of 1,100: 7.8 us either way). Most kernels ship THP in `madvise` mode, so the table asks for
//! them with `madvise(MADV_HUGEPAGE)` on each array it allocates, before the array is first
//! written, so that the first touches fault in huge pages. Where THP is off, or the system is not
//! Linux, the hint does nothing.

/// Arrays smaller than this are left alone: a hint costs a system call, and below two huge pages
/// there is little to gain.
pub(crate) const MIN_BYTES: usize = 4 << 20;

/// Asks the kernel to back the 2 MiB-aligned part of `[at, at + bytes)` with huge pages. A hint:
/// it never changes what the memory holds, and its failure is ignored (the memory then keeps
/// 4 KiB pages).
pub(crate) fn advise(at: *const u8, bytes: usize) {
    if bytes < MIN_BYTES {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = (at as usize).next_multiple_of(HUGE);
        let end = (at as usize).saturating_add(bytes) & !(HUGE - 1);
        if end > start {
            #[allow(unsafe_code)]
            // SAFETY: `[start, end)` lies inside an allocation the caller owns (a `Vec`'s
            // buffer), and MADV_HUGEPAGE only changes how the kernel backs those pages, never
            // their contents or the mapping's protection: nothing the program reads changes.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = at;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advised_memory_keeps_its_contents() {
        let mut v: Vec<u64> = Vec::with_capacity(MIN_BYTES / 8 * 2);
        advise(v.as_ptr().cast(), v.capacity() * 8);
        v.extend(0..v.capacity() as u64);
        advise(v.as_ptr().cast(), v.len() * 8);
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as u64));
        // Small, unaligned or empty ranges are ignored.
        advise(std::ptr::null(), 0);
        advise(v.as_ptr().cast::<u8>().wrapping_add(1), 100);
    }
}
