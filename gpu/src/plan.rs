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
//! Where the machine's copy curves were measured (`kvloft bench gpu --write-calibration`, the
//! `[calibration]` section of the topology file), [`Planner::calibrated`] replaces the fixed
//! 1 MiB bound between the kernel and the copy engines with the smallest piece size from which
//! this GPU's copy engines reach [`COPY_ENGINE_SHARE`] of the kernel's rate in both directions.
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
    /// Where measured curves found one `cuMemcpyAsync` per range faster than the batched call:
    /// per direction (`[loads, saves]`), bit `i` set for copy-engine batches whose merged runs
    /// average about `4 KiB << i` (see [`size_class`]). Empty by default: batched wherever the
    /// driver can.
    pub single_dma: [u32; 2],
}

/// Size classes [`Planner::single_dma`] tells apart: 4 KiB up to 1 GiB in powers of two.
const SIZE_CLASSES: u32 = 19;

/// The class of copy-engine batches whose merged runs average `bytes`: the power of two from
/// 4 KiB nearest below it (0 for 4 KiB and less, at most `SIZE_CLASSES - 1`).
pub fn size_class(bytes: u64) -> u32 {
    (bytes.max(4096) >> 12).ilog2().min(SIZE_CLASSES - 1)
}

/// Threads per CTA of the copy kernel.
pub const KERNEL_THREADS: u32 = 512;
/// A GPU copy method, as copy curves name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CurveMethod {
    /// One `cuMemcpyAsync` per range.
    Dma,
    /// `cuMemcpyBatchAsync`.
    DmaBatch,
    /// The gather/scatter kernel.
    Kernel,
}

/// Share of the kernel's rate from which the copy engines get a batch: they cost the inference
/// engine no SMs, so they win a near tie.
pub const COPY_ENGINE_SHARE: f64 = 0.9;

/// The largest piece size [`Planner::calibrated`] considers for the bound.
const LARGEST_CALIBRATED_PIECE: u64 = 1 << 30;

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
            single_dma: [0, 0],
        }
    }
}

impl Planner {
    /// This planner with `dma_min_bytes` set from measured copy curves: `rate(method, d2h,
    /// piece_bytes)` is the calibrated GB/s of `method` for pieces of that size (`None` where not
    /// measured). The bound becomes the smallest power-of-two piece size from 4 KiB on at which
    /// the copy engines (batched where `dma_batch` is set and that is faster) reach
    /// [`COPY_ENGINE_SHARE`] of the kernel in both directions. Returns the planner and a line
    /// saying what was decided; unchanged, with no line, when the curves lack the kernel or the
    /// copy engines in either direction, or when the budget forbids the kernel anyway.
    pub fn calibrated(self, rate: impl Fn(CurveMethod, bool, u64) -> Option<f64>) -> (Planner, Option<String>) {
        let (this, single_note) = self.calibrated_batching(&rate);
        let (this, bound_note) = this.calibrated_bound(&rate);
        let note = match (single_note, bound_note) {
            (Some(a), Some(b)) => Some(format!("{b}; {a}")),
            (a, b) => b.or(a),
        };
        (this, note)
    }

    /// Sets [`Planner::single_dma`] where the curves measured both copy-engine methods and one
    /// call per range was faster; with a line naming those sizes, if any.
    fn calibrated_batching(self, rate: &impl Fn(CurveMethod, bool, u64) -> Option<f64>) -> (Planner, Option<String>) {
        if !self.dma_batch {
            return (self, None);
        }
        let mut single = [0u32; 2];
        let mut named = Vec::new();
        for (i, d2h) in [false, true].into_iter().enumerate() {
            for class in 0..SIZE_CLASSES {
                let size = 4096u64 << class;
                if let (Some(one), Some(batched)) =
                    (rate(CurveMethod::Dma, d2h, size), rate(CurveMethod::DmaBatch, d2h, size))
                {
                    if one > batched {
                        single[i] |= 1 << class;
                        named.push(format!("{} of {size}-byte runs", if d2h { "saves" } else { "loads" }));
                    }
                }
            }
        }
        let note = (!named.is_empty()).then(|| {
            format!("one copy-engine call per range where the curves measured it faster: {}", named.join(", "))
        });
        (Planner { single_dma: single, ..self }, note)
    }

    /// Sets [`Planner::dma_min_bytes`] from the curves; see [`Planner::calibrated`].
    fn calibrated_bound(self, rate: &impl Fn(CurveMethod, bool, u64) -> Option<f64>) -> (Planner, Option<String>) {
        if self.sm_budget.min(self.sm_count) == 0 {
            return (self, None);
        }
        let engines = |d2h: bool, size: u64| {
            let batch = if self.dma_batch { rate(CurveMethod::DmaBatch, d2h, size) } else { None };
            match (rate(CurveMethod::Dma, d2h, size), batch) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            }
        };
        let measured = |size: u64| -> Option<bool> {
            let mut keep_up = true;
            for d2h in [true, false] {
                let (kernel, engines) = (rate(CurveMethod::Kernel, d2h, size)?, engines(d2h, size)?);
                keep_up &= engines >= COPY_ENGINE_SHARE * kernel;
            }
            Some(keep_up)
        };
        if measured(4096).is_none() {
            return (self, None);
        }
        let mut size = 4096u64;
        while size <= LARGEST_CALIBRATED_PIECE {
            if measured(size) == Some(true) {
                let note = format!(
                    "copy planner (calibrated): the copy engines from an average run of {size} bytes, the kernel below"
                );
                return (Planner { dma_min_bytes: size, ..self }, Some(note));
            }
            size *= 2;
        }
        let note = format!(
            "copy planner (calibrated): the copy engines never reach {COPY_ENGINE_SHARE} of the kernel in the \
             measured curves; keeping the bound at {} bytes",
            self.dma_min_bytes
        );
        (self, Some(note))
    }

    /// The plan for `ranges` (in the order given; merging keeps that order), a save (`d2h`: GPU
    /// to host) or a load.
    pub fn plan(&self, ranges: &[Range], d2h: bool) -> Plan {
        let merged = merge(ranges);
        let total: u64 = merged.iter().map(|r| r.len).sum();
        let sms = self.sm_budget.min(self.sm_count);
        let average = if merged.is_empty() { 0 } else { total / merged.len() as u64 };
        if sms == 0 || merged.len() < self.kernel_min_ranges || average >= self.dma_min_bytes {
            let method = self.dma_method(merged.len(), average, d2h);
            return Plan { method, ranges: merged };
        }
        let ranges = split(&merged, self.chunk_bytes.max(16));
        let ctas = (sms * CTAS_PER_SM).min(u32::try_from(ranges.len()).unwrap_or(u32::MAX)).max(1);
        Plan { method: Method::Kernel { ctas, threads: KERNEL_THREADS }, ranges }
    }
}

impl Planner {
    /// The copy-engine method for `runs` merged ranges averaging `average` bytes: one call per
    /// range for a single range, where the driver cannot batch, or where the curves measured
    /// single calls faster for such runs in this direction ([`Planner::single_dma`]).
    pub fn dma_method(&self, runs: usize, average: u64, d2h: bool) -> Method {
        let single = self.single_dma[usize::from(d2h)] & (1 << size_class(average)) != 0;
        if self.dma_batch && runs > 1 && !single {
            Method::DmaBatch
        } else {
            Method::Dma
        }
    }

    /// The block kernel's launch for the scatter or gather half of a layer-wise staged copy
    /// ([`crate::cuda::Copier::submit_layers`]) of `blocks` blocks with at most
    /// `pieces_per_layer` pieces in a layer, or `None` without an SM budget. That kernel only
    /// moves one layer within device memory at a time (the copy engines carry PCIe), so it wins
    /// whatever the runs; the budget bounds its CTAs as for every kernel.
    pub fn layer_kernel(&self, pieces_per_layer: usize, blocks: usize) -> Option<Method> {
        let sms = self.sm_budget.min(self.sm_count);
        let work = pieces_per_layer.saturating_mul(blocks);
        if sms == 0 || work == 0 {
            return None;
        }
        let ctas = (sms * CTAS_PER_SM).min(u32::try_from(work).unwrap_or(u32::MAX)).max(1);
        Some(Method::Kernel { ctas, threads: KERNEL_THREADS })
    }

    /// The block kernel's launch for `blocks` blocks shaped like `template`
    /// ([`crate::blocks`]), or `None` where the planner sends such a batch to the copy engines
    /// (no SM budget, too few pieces, or runs that average at least `dma_min_bytes`): the same
    /// decision as [`Planner::plan`] on the batch's ranges, weighed on one block's runs.
    pub fn block_kernel(&self, template: &crate::blocks::BlockTemplate, blocks: usize) -> Option<Method> {
        let sms = self.sm_budget.min(self.sm_count);
        let work = template.pieces.len().saturating_mul(blocks);
        if sms == 0 || work == 0 || work < self.kernel_min_ranges || template.merged_average >= self.dma_min_bytes {
            return None;
        }
        let ctas = (sms * CTAS_PER_SM).min(u32::try_from(work).unwrap_or(u32::MAX)).max(1);
        Some(Method::Kernel { ctas, threads: KERNEL_THREADS })
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
        let p = Planner::default().plan(&ranges, true);
        assert_eq!(p.method, Method::Kernel { ctas: 32, threads: 512 });
        assert_eq!(p.bytes(), 1000 * 16384);
        let p = Planner { sm_budget: 4, ..Planner::default() }.plan(&ranges, true);
        assert_eq!(p.method, Method::Kernel { ctas: 8, threads: 512 });
        let p = Planner { sm_budget: 500, sm_count: 10, ..Planner::default() }.plan(&ranges, true);
        assert_eq!(p.method, Method::Kernel { ctas: 20, threads: 512 }, "capped at the GPU's SMs");
    }

    #[test]
    fn dma_for_large_ranges_few_ranges_or_no_budget() {
        let big: Vec<Range> = (0..100u64).map(|i| r(i << 30, (99 - i) << 20, 1 << 20)).collect();
        assert_eq!(Planner::default().plan(&big, true).method, Method::Dma);
        let few: Vec<Range> = (0..4u64).map(|i| r(i << 30, i << 20, 4096)).collect();
        assert_eq!(Planner::default().plan(&few, true).method, Method::Dma);
        let small: Vec<Range> = (0..100u64).map(|i| r(i << 30, (99 - i) << 20, 4096)).collect();
        assert_eq!(Planner { sm_budget: 0, ..Planner::default() }.plan(&small, true).method, Method::Dma);
    }

    #[test]
    fn contiguous_blocks_merge_into_one_dma() {
        // A cross-layer cache: blocks 5, 6, 7 adjacent on both sides.
        let ranges: Vec<Range> = (5..8u64).map(|b| r(b * 65536, (1 << 20) + (b - 5) * 65536, 65536)).collect();
        let p = Planner::default().plan(&ranges, true);
        assert_eq!(p, Plan { method: Method::Dma, ranges: vec![r(5 * 65536, 1 << 20, 3 * 65536)] });
    }

    #[test]
    fn copy_engine_plans_are_batched_where_the_driver_can() {
        let batch = Planner { dma_batch: true, ..Planner::default() };
        let small: Vec<Range> = (0..100u64).map(|i| r(i << 30, (99 - i) << 20, 4096)).collect();
        assert_eq!(Planner { sm_budget: 0, ..batch }.plan(&small, true).method, Method::DmaBatch);
        let big: Vec<Range> = (0..100u64).map(|i| r(i << 30, (99 - i) << 20, 1 << 20)).collect();
        assert_eq!(batch.plan(&big, true).method, Method::DmaBatch);
        assert!(matches!(batch.plan(&small, true).method, Method::Kernel { .. }), "the kernel still wins small ranges");
        let one = [r(0, 1 << 20, 4096)];
        assert_eq!(batch.plan(&one, true).method, Method::Dma, "a single range needs no batch");
        let contiguous: Vec<Range> = (5..8u64).map(|b| r(b * 65536, (1 << 20) + (b - 5) * 65536, 65536)).collect();
        assert_eq!(batch.plan(&contiguous, true).method, Method::Dma, "merged into one range");
    }

    /// Curves like the H100's: the kernel flat near the ceiling, the copy engines climbing with
    /// the piece size, batched faster than one call per range.
    fn h100_like(method: CurveMethod, d2h: bool, size: u64) -> Option<f64> {
        let kib = (size >> 10).max(1) as f64;
        Some(match method {
            CurveMethod::Kernel => 50.0,
            CurveMethod::Dma => (kib / 8.0).min(52.0),
            CurveMethod::DmaBatch if d2h => (kib / 2.0).min(52.0),
            CurveMethod::DmaBatch => (kib / 4.0).min(52.0),
        })
    }

    #[test]
    fn calibration_moves_the_bound_to_where_the_copy_engines_keep_up() {
        // Batched: h2d reaches 45 GB/s (0.9 of 50) at 180 KiB, so 256 KiB is the first power of two.
        let (p, note) = Planner { dma_batch: true, ..Planner::default() }.calibrated(h100_like);
        assert_eq!(p.dma_min_bytes, 256 << 10);
        assert!(note.unwrap().contains("262144 bytes"));
        // One call per range: 45 GB/s at 360 KiB, so 512 KiB.
        let (p, _) = Planner::default().calibrated(h100_like);
        assert_eq!(p.dma_min_bytes, 512 << 10);
        let ranges: Vec<Range> = (0..100u64).map(|i| r(i << 30, (99 - i) << 20, 600 << 10)).collect();
        assert_eq!(p.plan(&ranges, true).method, Method::Dma, "600 KiB runs: copy engines");
        let ranges: Vec<Range> = (0..100u64).map(|i| r(i << 30, (99 - i) << 20, 300 << 10)).collect();
        assert!(matches!(p.plan(&ranges, true).method, Method::Kernel { .. }), "300 KiB runs: the kernel");
    }

    #[test]
    fn calibration_without_curves_or_budget_changes_nothing() {
        let none = |_: CurveMethod, _: bool, _: u64| None;
        assert_eq!(Planner::default().calibrated(none), (Planner::default(), None));
        let no_kernel =
            |m: CurveMethod, d: bool, s: u64| if m == CurveMethod::Kernel { None } else { h100_like(m, d, s) };
        assert_eq!(Planner::default().calibrated(no_kernel).1, None);
        let d2h_only = |m: CurveMethod, d: bool, s: u64| if d { h100_like(m, d, s) } else { None };
        assert_eq!(Planner::default().calibrated(d2h_only).1, None, "both directions are needed");
        let no_budget = Planner { sm_budget: 0, ..Planner::default() };
        assert_eq!(no_budget.calibrated(h100_like), (no_budget, None));
        let slow = |m: CurveMethod, _: bool, _: u64| Some(if m == CurveMethod::Kernel { 50.0 } else { 5.0 });
        let (p, note) = Planner::default().calibrated(slow);
        assert_eq!(p, Planner::default());
        assert!(note.unwrap().contains("never reach"));
    }

    #[test]
    fn size_classes_are_powers_of_two_from_4_kib() {
        assert_eq!(size_class(0), 0);
        assert_eq!(size_class(4096), 0);
        assert_eq!(size_class(8191), 0);
        assert_eq!(size_class(16 << 10), 2);
        assert_eq!(size_class(300 << 10), 6);
        assert_eq!(size_class(1 << 30), SIZE_CLASSES - 1);
        assert_eq!(size_class(u64::MAX), SIZE_CLASSES - 1);
    }

    #[test]
    fn curves_keep_single_calls_where_they_beat_the_batch() {
        // Like decision 42's H100 figures: batched loads of 16 KiB runs lost to one call per range.
        let curves = |m: CurveMethod, d2h: bool, size: u64| match m {
            CurveMethod::Dma if !d2h && size == 16 << 10 => Some(5.7),
            CurveMethod::DmaBatch if !d2h && size == 16 << 10 => Some(4.4),
            CurveMethod::Dma => Some(3.0),
            CurveMethod::DmaBatch => Some(18.0),
            CurveMethod::Kernel => None,
        };
        let batch = Planner { dma_batch: true, sm_budget: 0, ..Planner::default() };
        let (p, note) = batch.calibrated(curves);
        assert_eq!(p.single_dma, [1 << 2, 0]);
        assert!(note.unwrap().contains("loads of 16384-byte runs"), "the log line names the sizes");
        let runs = |len: u64| -> Vec<Range> { (0..64u64).map(|i| r(i << 30, (63 - i) << 20, len)).collect() };
        assert_eq!(p.plan(&runs(16 << 10), false).method, Method::Dma, "16 KiB loads: single calls");
        assert_eq!(p.plan(&runs(16 << 10), true).method, Method::DmaBatch, "16 KiB saves: batched");
        assert_eq!(p.plan(&runs(64 << 10), false).method, Method::DmaBatch, "64 KiB loads: batched");
        assert_eq!(p.dma_method(64, 20 << 10, false), Method::Dma, "20 KiB averages are in the 16 KiB class");
        // Without the batched call, or without its curve, nothing is recorded.
        assert_eq!(Planner { dma_batch: false, ..batch }.calibrated(curves).0.single_dma, [0, 0]);
        let no_batch_curve =
            |m: CurveMethod, d: bool, s: u64| if m == CurveMethod::DmaBatch { None } else { curves(m, d, s) };
        assert_eq!(batch.calibrated(no_batch_curve), (batch, None));
    }

    #[test]
    fn block_kernels_follow_the_range_planner() {
        use crate::blocks::BlockTemplate;
        use kvloft_engine::protocol::LayerMemory;
        let layer = |base: u64, bytes: u64| LayerMemory {
            base,
            num_blocks: 1000,
            block_stride: bytes,
            segments: 1,
            segment_stride: 0,
            segment_bytes: bytes,
        };
        let small = BlockTemplate::new(&(0..32u64).map(|i| layer(i << 32, 16384)).collect::<Vec<_>>(), 64 << 10);
        assert_eq!(Planner::default().block_kernel(&small, 64), Some(Method::Kernel { ctas: 32, threads: 512 }));
        assert_eq!(Planner { sm_budget: 0, ..Planner::default() }.block_kernel(&small, 64), None, "no SMs");
        assert_eq!(Planner::default().block_kernel(&small, 0), None, "nothing to move");
        assert_eq!(
            Planner::default().block_kernel(&small, 1),
            Some(Method::Kernel { ctas: 32, threads: 512 }),
            "32 pieces of one block are enough"
        );
        let few = BlockTemplate::new(&[layer(0, 16384)], 64 << 10);
        assert_eq!(Planner::default().block_kernel(&few, 4), None, "4 pieces: below kernel_min_ranges");
        assert_eq!(Planner::default().block_kernel(&few, 10), Some(Method::Kernel { ctas: 10, threads: 512 }));
        let big = BlockTemplate::new(&[layer(0, 2 << 20)], 64 << 10);
        assert_eq!(big.pieces.len(), 32, "split for the kernel");
        assert_eq!(Planner::default().block_kernel(&big, 100), None, "2 MiB runs: copy engines");
    }

    #[test]
    fn kernel_ctas_never_exceed_ranges() {
        let ranges: Vec<Range> = (0..10u64).map(|i| r(i << 30, (9 - i) << 20, 4096)).collect();
        assert_eq!(Planner::default().plan(&ranges, true).method, Method::Kernel { ctas: 10, threads: 512 });
    }
}
