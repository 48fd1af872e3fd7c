//! The copy planner: turns a batch of byte ranges into the cheapest way to move them.
//!
//! A save or load of `n` blocks is `n * layers * segments` ranges between the inference engine's
//! KV cache and pool slots. [`Planner::plan`] first merges ranges that continue each other on both
//! sides (adjacent blocks of a cross-layer cache, neighbouring segments), then picks one method per
//! batch:
//!
//! - [`Method::Dma`]: one `cuMemcpyAsync` per range on the copy engines. Free for the inference
//!   engine's SMs, and at the PCIe ceiling when ranges are large. On the H100 test machine
//!   (bench/results/2026-11-24-h100-gpu-inprocess.json) DMA reaches 0.95-0.99 of the contiguous
//!   ceiling with runs of 2 MiB and more, but only 0.63-0.69 at 256 KiB and 0.06-0.14 at 16 KiB.
//! - [`Method::DmaBatch`]: the same copies handed to the driver in one `cuMemcpyBatchAsync` call
//!   (drivers of CUDA 12.8 and later), which keeps the copy engines busy with small ranges far
//!   better than a call per range: 27-31 GB/s at 16 KiB on the H100 against 6
//!   (../shared/research/ceilings.md). Used instead of [`Method::Dma`] whenever the driver has it
//!   and a batch has more than one range.
//! - [`Method::Kernel`]: a gather/scatter kernel over device-mapped pool pages, with 16-byte
//!   accesses, on at most `sm_budget` SMs (two CTAs of 512 threads per SM). It reaches the PCIe
//!   ceiling at any range size (0.89-0.95 of it at 16 KiB with 16 SMs), but SMs it takes are SMs the engine's
//!   decode does not get, so it is chosen only where DMA would be slow: many ranges whose average
//!   is below `dma_min_bytes`, and an SM budget above zero.
//!
//! Kernel ranges longer than `chunk_bytes` are split so that one CTA never serialises a long run
//! while others idle. The planner is pure: it is tested here and used by the `cuda` backend.

/// One contiguous copy: `len` bytes from `src` to `dst` (device or device-mapped addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Range {
    /// Source address.
    pub src: u64,
    /// Destination address.
    pub dst: u64,
    /// Bytes.
    pub len: u64,
}

/// How a batch is moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// One DMA copy per range on the copy engines.
    Dma,
    /// Every range in one `cuMemcpyBatchAsync` call, on the copy engines.
    DmaBatch,
    /// The gather/scatter kernel with this many CTAs of `threads` threads.
    Kernel {
        /// CTAs launched.
        ctas: u32,
        /// Threads per CTA.
        threads: u32,
    },
}

/// A planned batch: its method and the (merged, possibly split) ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// How the ranges are moved.
    pub method: Method,
    /// The ranges, in submission order.
    pub ranges: Vec<Range>,
}

impl Plan {
    /// Bytes the plan moves.
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.len).sum()
    }
}

/// The planner's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planner {
    /// Most SMs a kernel copy may occupy; 0 forbids kernel copies (DMA only).
    pub sm_budget: u32,
    /// SMs the GPU has (the budget is capped at this).
    pub sm_count: u32,
    /// A batch whose merged ranges average at least this many bytes goes to DMA.
    pub dma_min_bytes: u64,
    /// Fewest ranges for which a kernel launch pays off.
    pub kernel_min_ranges: usize,
    /// Longest range one CTA copies; longer kernel ranges are split.
    pub chunk_bytes: u64,
    /// Whether the driver offers `cuMemcpyBatchAsync` ([`Method::DmaBatch`]).
    pub dma_batch: bool,
}

/// Threads per CTA of the copy kernel.
pub const KERNEL_THREADS: u32 = 512;
/// CTAs per SM of the copy kernel (two of 512 threads fill an SM's 2,048 thread slots halfway).
pub const CTAS_PER_SM: u32 = 2;

impl Default for Planner {
    fn default() -> Self {
        Planner {
            sm_budget: 16,
            sm_count: 132,
            dma_min_bytes: 1 << 20,
            kernel_min_ranges: 8,
            chunk_bytes: 64 << 10,
            dma_batch: false,
        }
    }
}

impl Planner {
    /// The plan for `ranges` (in the order given; merging keeps that order).
    pub fn plan(&self, ranges: &[Range]) -> Plan {
        let merged = merge(ranges);
        let total: u64 = merged.iter().map(|r| r.len).sum();
        let sms = self.sm_budget.min(self.sm_count);
        let average = if merged.is_empty() { 0 } else { total / merged.len() as u64 };
        if sms == 0 || merged.len() < self.kernel_min_ranges || average >= self.dma_min_bytes {
            let method = if self.dma_batch && merged.len() > 1 { Method::DmaBatch } else { Method::Dma };
            return Plan { method, ranges: merged };
        }
        let ranges = split(&merged, self.chunk_bytes.max(16));
        let ctas = (sms * CTAS_PER_SM).min(u32::try_from(ranges.len()).unwrap_or(u32::MAX)).max(1);
        Plan { method: Method::Kernel { ctas, threads: KERNEL_THREADS }, ranges }
    }
}

/// Merges each range into the one before it when both its source and destination continue it.
pub fn merge(ranges: &[Range]) -> Vec<Range> {
    let mut out: Vec<Range> = Vec::with_capacity(ranges.len());
    for r in ranges.iter().filter(|r| r.len > 0) {
        if let Some(last) = out.last_mut() {
            if last.src + last.len == r.src && last.dst + last.len == r.dst {
                last.len += r.len;
                continue;
            }
        }
        out.push(*r);
    }
    out
}

/// Splits ranges longer than `chunk` into pieces of at most `chunk` bytes (16-byte multiples
/// except the last, so aligned ranges stay aligned).
pub fn split(ranges: &[Range], chunk: u64) -> Vec<Range> {
    let chunk = (chunk / 16).max(1) * 16;
    let mut out = Vec::with_capacity(ranges.len());
    for r in ranges {
        let mut off = 0;
        while off < r.len {
            let len = chunk.min(r.len - off);
            out.push(Range { src: r.src + off, dst: r.dst + off, len });
            off += len;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(src: u64, dst: u64, len: u64) -> Range {
        Range { src, dst, len }
    }

    #[test]
    fn merges_only_ranges_continuing_on_both_sides() {
        let m = merge(&[r(0, 1000, 10), r(10, 1010, 5), r(15, 2000, 5), r(20, 2005, 0), r(20, 2005, 1)]);
        assert_eq!(m, vec![r(0, 1000, 15), r(15, 2000, 6)]);
        assert!(merge(&[]).is_empty());
    }

    #[test]
    fn split_keeps_bytes_and_alignment() {
        let s = split(&[r(0, 4096, 100_000)], 64 << 10);
        assert_eq!(s.iter().map(|x| x.len).sum::<u64>(), 100_000);
        assert_eq!(s[0], r(0, 4096, 65536));
        assert_eq!(s[1], r(65536, 4096 + 65536, 100_000 - 65536));
        assert!(s.iter().all(|x| x.src % 16 == 0 && x.dst % 16 == 0));
    }

    #[test]
    fn small_scattered_ranges_go_to_the_kernel_within_the_sm_budget() {
        let ranges: Vec<Range> = (0..1000u64).map(|i| r(i * 1_000_000, (999 - i) * 16384, 16384)).collect();
        let p = Planner::default().plan(&ranges);
        assert_eq!(p.method, Method::Kernel { ctas: 32, threads: 512 });
        assert_eq!(p.bytes(), 1000 * 16384);
        let p = Planner { sm_budget: 4, ..Planner::default() }.plan(&ranges);
        assert_eq!(p.method, Method::Kernel { ctas: 8, threads: 512 });
        let p = Planner { sm_budget: 500, sm_count: 10, ..Planner::default() }.plan(&ranges);
        assert_eq!(p.method, Method::Kernel { ctas: 20, threads: 512 }, "capped at the GPU's SMs");
    }

    #[test]
    fn dma_for_large_ranges_few_ranges_or_no_budget() {
        let big: Vec<Range> = (0..100u64).map(|i| r(i << 30, (99 - i) << 20, 1 << 20)).collect();
        assert_eq!(Planner::default().plan(&big).method, Method::Dma);
        let few: Vec<Range> = (0..4u64).map(|i| r(i << 30, i << 20, 4096)).collect();
        assert_eq!(Planner::default().plan(&few).method, Method::Dma);
        let small: Vec<Range> = (0..100u64).map(|i| r(i << 30, (99 - i) << 20, 4096)).collect();
        assert_eq!(Planner { sm_budget: 0, ..Planner::default() }.plan(&small).method, Method::Dma);
    }

    #[test]
    fn contiguous_blocks_merge_into_one_dma() {
        // A cross-layer cache: blocks 5, 6, 7 adjacent on both sides.
        let ranges: Vec<Range> = (5..8u64).map(|b| r(b * 65536, (1 << 20) + (b - 5) * 65536, 65536)).collect();
        let p = Planner::default().plan(&ranges);
        assert_eq!(p, Plan { method: Method::Dma, ranges: vec![r(5 * 65536, 1 << 20, 3 * 65536)] });
    }

    #[test]
    fn copy_engine_plans_are_batched_where_the_driver_can() {
        let batch = Planner { dma_batch: true, ..Planner::default() };
        let small: Vec<Range> = (0..100u64).map(|i| r(i << 30, (99 - i) << 20, 4096)).collect();
        assert_eq!(Planner { sm_budget: 0, ..batch }.plan(&small).method, Method::DmaBatch);
        let big: Vec<Range> = (0..100u64).map(|i| r(i << 30, (99 - i) << 20, 1 << 20)).collect();
        assert_eq!(batch.plan(&big).method, Method::DmaBatch);
        assert!(matches!(batch.plan(&small).method, Method::Kernel { .. }), "the kernel still wins small ranges");
        let one = [r(0, 1 << 20, 4096)];
        assert_eq!(batch.plan(&one).method, Method::Dma, "a single range needs no batch");
        let contiguous: Vec<Range> = (5..8u64).map(|b| r(b * 65536, (1 << 20) + (b - 5) * 65536, 65536)).collect();
        assert_eq!(batch.plan(&contiguous).method, Method::Dma, "merged into one range");
    }

    #[test]
    fn kernel_ctas_never_exceed_ranges() {
        let ranges: Vec<Range> = (0..10u64).map(|i| r(i << 30, (9 - i) << 20, 4096)).collect();
        assert_eq!(Planner::default().plan(&ranges).method, Method::Kernel { ctas: 10, threads: 512 });
    }
}
