//! Block copies: what the GPU is told when it computes a request's ranges itself.
//!
//! A save or load of `n` blocks moves `n * layers * segments` ranges, and every block has the same
//! shape: only its engine block id and its pool slot differ. So instead of building, planning and
//! uploading thousands of [`Range`]s per request, the server builds a block's *template* once (a
//! [`Piece`] per run of bytes, relative to the block) and uploads one [`BlockPair`] per block; the
//! block kernel expands `pairs x pieces` on the GPU. A 64-block request of 32 layers uploads 64
//! pairs and 64 pieces (3 KiB) instead of 4,096 ranges (96 KiB), with no planning on the CPU.
//!
//! **Staging.** Over PCIe, an SM copy reaches 0.93-0.95 of a contiguous DMA on the H100 test
//! machine (../shared/research/ceilings.md); a DMA of runs of 512 KiB and more reaches
//! 0.95-0.99. A pool slot holds a block's every layer back to back, so on the pool side a block
//! is one run (and neighbouring slots merge into longer ones); only the engine side is scattered.
//! A *staged* copy therefore gathers blocks on the GPU into a device staging buffer, in the slot
//! layout, and moves each chunk to its slots with the copy engines (save); a load does the
//! reverse. The kernel then only moves bytes within HBM, about ten times faster than over PCIe, so
//! it holds its SMs for a tenth of the time, and PCIe sees DMA of whole slots. [`staged_chunks`]
//! cuts a request into chunks so that the GPU copies and the DMA overlap; [`slot_runs`] gives a
//! chunk's DMA.

use crate::plan::{merge, Range};
use kvloft_engine::protocol::LayerMemory;

/// One run of a block's bytes, relative to the block: engine address
/// `engine + block * block_stride`, pool address `slot + pool`, `len` bytes. Read by the block
/// kernel, so laid out as it expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Piece {
    /// Engine address of this run in block 0.
    pub engine: u64,
    /// Bytes from one engine block to the next in this run's layer.
    pub block_stride: u64,
    /// Offset of the run in a pool slot.
    pub pool: u64,
    /// Bytes.
    pub len: u64,
}

/// One block of a block copy: its pool slot's device address and its engine block id. Read by the
/// block kernel, so laid out as it expects (16 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct BlockPair {
    /// Device address of the block's pool slot.
    pub slot: u64,
    /// Engine block id.
    pub block: u32,
    /// Padding (zero).
    pub pad: u32,
}

impl BlockPair {
    /// The pair for engine block `block` and pool slot `slot`.
    pub fn new(block: u32, slot: u64) -> Self {
        BlockPair { slot, block, pad: 0 }
    }
}

/// Every block's shape: the pieces one block's slice is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockTemplate {
    /// The pieces, split to at most the chunk size given.
    pub pieces: Vec<Piece>,
    /// Bytes of one block's slice (one pool slot).
    pub slice_bytes: u64,
    /// Average bytes of a piece before splitting: the run size the planner weighs.
    pub merged_average: u64,
}

impl BlockTemplate {
    /// The template of `layers` (bases as device addresses): each layer's segments in order, the
    /// slot layout of [`crate::cuda::CudaMemory::ranges`]; pieces that continue each other on
    /// both sides for every block are merged, then split to at most `chunk_bytes` (so one CTA
    /// never serialises a long run).
    pub fn new(layers: &[LayerMemory], chunk_bytes: u64) -> Self {
        let mut merged: Vec<Piece> = Vec::new();
        let mut pool = 0u64;
        for l in layers {
            for s in 0..u64::from(l.segments) {
                let p = Piece {
                    engine: l.base + s * l.segment_stride,
                    block_stride: l.block_stride,
                    pool,
                    len: l.segment_bytes,
                };
                pool += l.segment_bytes;
                if p.len == 0 {
                    continue;
                }
                match merged.last_mut() {
                    Some(last)
                        if last.block_stride == p.block_stride
                            && last.engine + last.len == p.engine
                            && last.pool + last.len == p.pool =>
                    {
                        last.len += p.len;
                    }
                    _ => merged.push(p),
                }
            }
        }
        let merged_average = if merged.is_empty() { 0 } else { pool / merged.len() as u64 };
        let chunk = (chunk_bytes / 16).max(1) * 16;
        let mut pieces = Vec::with_capacity(merged.len());
        for p in merged {
            let mut off = 0;
            while off < p.len {
                let len = chunk.min(p.len - off);
                pieces.push(Piece { engine: p.engine + off, pool: p.pool + off, len, ..p });
                off += len;
            }
        }
        BlockTemplate { pieces, slice_bytes: pool, merged_average }
    }

    /// The ranges the block kernel moves for `pairs` (what the GPU computes; for tests and
    /// checks): pair-major, each block's pieces in order. `d2h` copies engine to pool.
    pub fn expand(&self, pairs: &[BlockPair], d2h: bool) -> Vec<Range> {
        let mut out = Vec::with_capacity(pairs.len() * self.pieces.len());
        for b in pairs {
            for p in &self.pieces {
                let engine = p.engine + u64::from(b.block) * p.block_stride;
                let pool = b.slot + p.pool;
                out.push(if d2h {
                    Range { src: engine, dst: pool, len: p.len }
                } else {
                    Range { src: pool, dst: engine, len: p.len }
                });
            }
        }
        out
    }
}

/// How many blocks each chunk of a staged copy of `blocks` blocks takes, with at most `cap`
/// blocks (one staging part) per chunk. A save's chunks start at one block and double up to `cap`,
/// so the first DMA starts after one block's gather, the rest merged into the last where it
/// fits. A load's rise the same way over its first
/// half and fall back over its second (`rise_and_fall`): the first DMA starts early and each
/// next one is queued while the one before runs, and the last scatter after the last DMA is
/// one block's (decision 58). Empty when `blocks` is 0.
pub fn staged_chunks(blocks: usize, cap: usize, d2h: bool) -> Vec<usize> {
    if d2h {
        merged(doubling(blocks, cap), cap)
    } else {
        rise_and_fall(blocks, cap)
    }
}

/// `chunks` with a last chunk smaller than the one before merged into it where both fit `cap`:
/// one copy-engine operation fewer (each costs about 2.5 us on the H100 box, decision 58).
fn merged(mut chunks: Vec<usize>, cap: usize) -> Vec<usize> {
    if chunks.len() >= 2 {
        let last = chunks[chunks.len() - 1];
        let before = chunks[chunks.len() - 2];
        if last < before && before + last <= cap.max(1) {
            chunks.pop();
            *chunks.last_mut().expect("two chunks") += last;
        }
    }
    chunks
}

/// 1, 2, 4, ... blocks up to `cap` each, the rest in a last chunk.
fn doubling(blocks: usize, cap: usize) -> Vec<usize> {
    let cap = cap.max(1);
    let mut out = Vec::new();
    let (mut left, mut next) = (blocks, 1usize);
    while left > 0 {
        let n = next.min(cap).min(left);
        out.push(n);
        left -= n;
        next = next.saturating_mul(2);
    }
    out
}

/// A load's chunks: [`doubling`] over the first half, [`merged`], then the mirror image over the
/// second half.
fn rise_and_fall(blocks: usize, cap: usize) -> Vec<usize> {
    let half = |n: usize| merged(doubling(n, cap), cap);
    let head = blocks.div_ceil(2);
    let mut out = half(head);
    let mut tail = half(blocks - head);
    tail.reverse();
    out.extend(tail);
    out
}

/// The copy-engine ranges of one staged chunk: block `i` of `slots` sits at
/// `staging + i * slice_bytes` in the staging buffer and at its slot in the pool; neighbouring
/// slots merge into one run. `d2h` moves staging to pool (a save), else pool to staging.
pub fn slot_runs(slots: impl IntoIterator<Item = u64>, slice_bytes: u64, staging: u64, d2h: bool) -> Vec<Range> {
    let ranges: Vec<Range> = slots
        .into_iter()
        .enumerate()
        .map(|(i, slot)| {
            let s = staging + i as u64 * slice_bytes;
            if d2h {
                Range { src: s, dst: slot, len: slice_bytes }
            } else {
                Range { src: slot, dst: s, len: slice_bytes }
            }
        })
        .collect();
    merge(&ranges)
}

/// One registered layer's share of every pool slot in a layer-wise block copy: bytes
/// `offset..offset + bytes` of a slot, moved by `pieces` of a [`LayerTemplate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Band {
    /// The layer's pieces: indices into [`LayerTemplate::pieces`].
    pub pieces: std::ops::Range<usize>,
    /// Offset of the layer's bytes in a slot.
    pub offset: u64,
    /// Bytes of the layer in a slot (one block's layer).
    pub bytes: u64,
}

/// The template of a layer-wise block copy: like [`BlockTemplate`], but no piece spans two
/// layers, and the pieces come grouped by layer ([`Band`]), so the GPU can move one layer of every
/// block at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerTemplate {
    /// Every layer's pieces, layer by layer; offsets are from the slot's start.
    pub pieces: Vec<Piece>,
    /// One band per registered layer, in order.
    pub bands: Vec<Band>,
    /// Bytes of one block's slice (one pool slot).
    pub slice_bytes: u64,
}

impl LayerTemplate {
    /// The template of `layers` (as [`BlockTemplate::new`], one layer at a time).
    pub fn new(layers: &[LayerMemory], chunk_bytes: u64) -> Self {
        let mut pieces = Vec::new();
        let mut bands = Vec::with_capacity(layers.len());
        let mut offset = 0u64;
        for l in layers {
            let one = BlockTemplate::new(std::slice::from_ref(l), chunk_bytes);
            let start = pieces.len();
            pieces.extend(one.pieces.iter().map(|p| Piece { pool: p.pool + offset, ..*p }));
            bands.push(Band { pieces: start..pieces.len(), offset, bytes: one.slice_bytes });
            offset += one.slice_bytes;
        }
        LayerTemplate { pieces, bands, slice_bytes: offset }
    }

    /// The ranges a layer-wise copy of band `layer` moves for `pairs` (for tests and checks).
    pub fn expand_band(&self, layer: usize, pairs: &[BlockPair], d2h: bool) -> Vec<Range> {
        let t = BlockTemplate {
            pieces: self.pieces[self.bands[layer].pieces.clone()].to_vec(),
            slice_bytes: self.slice_bytes,
            merged_average: 0,
        };
        t.expand(pairs, d2h)
    }
}

/// A pitched copy on the copy engines (`cuMemcpy2DAsync`): `height` rows of `width` bytes, row
/// `r` from `src + r * src_pitch` to `dst + r * dst_pitch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PitchedCopy {
    /// First source byte.
    pub src: u64,
    /// Bytes from one source row to the next.
    pub src_pitch: u64,
    /// First destination byte.
    pub dst: u64,
    /// Bytes from one destination row to the next.
    pub dst_pitch: u64,
    /// Bytes of a row.
    pub width: u64,
    /// Rows.
    pub height: u64,
}

impl PitchedCopy {
    /// The copy as one range per row (for tests and checks).
    pub fn rows(&self) -> impl Iterator<Item = Range> + '_ {
        (0..self.height).map(|r| Range {
            src: self.src + r * self.src_pitch,
            dst: self.dst + r * self.dst_pitch,
            len: self.width,
        })
    }
}

/// The copy-engine copies of one chunk of a layer-wise staged copy: block `i` of `slots` has its
/// `band` at `staging + i * band.bytes` in the staging buffer and at `slot + band.offset` in the
/// pool, whose slots are `slice_bytes` long. Slots that follow each other make one pitched copy
/// (a row per block), so a chunk costs the copy engines a descriptor per run of slots, not per
/// block. `d2h` moves staging to pool (a save), else pool to staging.
pub fn band_copies(
    slots: impl IntoIterator<Item = u64>,
    slice_bytes: u64,
    band: &Band,
    staging: u64,
    d2h: bool,
) -> Vec<PitchedCopy> {
    let mut out: Vec<PitchedCopy> = Vec::new();
    let mut last_slot = None;
    for (i, slot) in slots.into_iter().enumerate() {
        let s = staging + i as u64 * band.bytes;
        let continues = last_slot.is_some_and(|l: u64| l.checked_add(slice_bytes) == Some(slot));
        last_slot = Some(slot);
        match out.last_mut() {
            Some(run) if continues => run.height += 1,
            _ => {
                let pool = slot + band.offset;
                let (src, src_pitch, dst, dst_pitch) =
                    if d2h { (s, band.bytes, pool, slice_bytes) } else { (pool, slice_bytes, s, band.bytes) };
                out.push(PitchedCopy { src, src_pitch, dst, dst_pitch, width: band.bytes, height: 1 });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(base: u64, segments: u32, block_stride: u64, segment_stride: u64, segment_bytes: u64) -> LayerMemory {
        LayerMemory { base, num_blocks: 100, block_stride, segments, segment_stride, segment_bytes }
    }

    /// The ranges `CudaMemory::ranges` builds on the CPU, for comparison.
    fn cpu_ranges(layers: &[LayerMemory], pairs: &[BlockPair], d2h: bool) -> Vec<Range> {
        let mut out = Vec::new();
        for b in pairs {
            let mut off = 0;
            for l in layers {
                for s in 0..u64::from(l.segments) {
                    let engine = l.base + u64::from(b.block) * l.block_stride + s * l.segment_stride;
                    let pool = b.slot + off;
                    off += l.segment_bytes;
                    out.push(if d2h {
                        Range { src: engine, dst: pool, len: l.segment_bytes }
                    } else {
                        Range { src: pool, dst: engine, len: l.segment_bytes }
                    });
                }
            }
        }
        out
    }

    /// Byte-level map of a range list: (source byte, destination byte) for every byte moved, so
    /// merged or split lists compare equal when they move the same bytes.
    fn bytes_moved(ranges: &[Range]) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> =
            ranges.iter().flat_map(|r| (0..r.len).step_by(16).map(move |o| (r.src + o, r.dst + o))).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn templates_move_exactly_the_bytes_of_the_cpu_ranges() {
        let nhd: Vec<LayerMemory> = (0..4u64).map(|i| layer(i << 32, 2, 8192, 100 * 8192, 8192)).collect();
        let mla: Vec<LayerMemory> = (0..4u64).map(|i| layer(i << 32, 1, 16384, 0, 16384)).collect();
        // Cross-layer: one tensor, a block's layers back to back (they merge into one piece).
        let cross: Vec<LayerMemory> = (0..4u64).map(|i| layer((1 << 40) + i * 4096, 1, 4 * 4096, 0, 4096)).collect();
        let pairs = [BlockPair::new(7, 1 << 30), BlockPair::new(0, 3 << 30), BlockPair::new(99, 2 << 30)];
        for (layers, pieces) in [(&nhd, 8), (&mla, 4), (&cross, 1)] {
            let t = BlockTemplate::new(layers, 1 << 20);
            assert_eq!(t.pieces.len(), pieces);
            assert_eq!(t.slice_bytes, layers.iter().map(|l| u64::from(l.segments) * l.segment_bytes).sum::<u64>());
            for d2h in [true, false] {
                assert_eq!(bytes_moved(&t.expand(&pairs, d2h)), bytes_moved(&cpu_ranges(layers, &pairs, d2h)));
            }
        }
        let t = BlockTemplate::new(&cross, 1 << 20);
        assert_eq!(t.merged_average, 4 * 4096);
        // Split to the chunk size, still the same bytes, 16-byte aligned pieces.
        let t = BlockTemplate::new(&cross, 5000);
        assert_eq!(t.pieces.len(), 4, "16 KiB in pieces of 4,992 bytes");
        assert!(t.pieces.iter().all(|p| p.len <= 5000 && p.pool % 16 == 0 && p.engine % 16 == 0));
        assert_eq!(t.merged_average, 4 * 4096, "the planner weighs runs before splitting");
        assert_eq!(bytes_moved(&t.expand(&pairs, true)), bytes_moved(&cpu_ranges(&cross, &pairs, true)));
    }

    #[test]
    fn pieces_merge_only_when_every_block_continues() {
        // Same addresses for block 0, but different block strides: never one piece.
        let layers = [layer(0, 1, 4096, 0, 4096), layer(4096, 1, 8192, 0, 4096)];
        assert_eq!(BlockTemplate::new(&layers, 1 << 20).pieces.len(), 2);
        assert!(BlockTemplate::new(&[], 1 << 20).pieces.is_empty());
    }

    #[test]
    fn saves_ramp_up_and_loads_rise_and_fall() {
        assert_eq!(staged_chunks(64, 8, true), vec![1, 2, 4, 8, 8, 8, 8, 8, 8, 8, 1]);
        assert_eq!(staged_chunks(64, 8, false), vec![1, 2, 4, 8, 8, 8, 1, 1, 8, 8, 8, 4, 2, 1]);
        assert_eq!(staged_chunks(64, 64, false), vec![1, 2, 4, 8, 17, 17, 8, 4, 2, 1]);
        assert_eq!(staged_chunks(3, 8, false), vec![1, 1, 1]);
        assert_eq!(staged_chunks(1, 8, false), vec![1]);
        assert_eq!(staged_chunks(64, 64, true), vec![1, 2, 4, 8, 16, 33]);
        assert_eq!(staged_chunks(3, 8, true), vec![1, 2]);
        assert_eq!(staged_chunks(4, 8, true), vec![1, 3]);
        assert_eq!(staged_chunks(5, 1, true), vec![1; 5]);
        assert!(staged_chunks(0, 8, true).is_empty());
        for n in 0..300 {
            for cap in 1..20 {
                let c = staged_chunks(n, cap, n % 2 == 0);
                assert_eq!(c.iter().sum::<usize>(), n);
                assert!(c.iter().all(|&x| (1..=cap).contains(&x)));
            }
        }
    }

    #[test]
    fn layer_templates_move_each_layer_and_all_of_them_the_whole_slot() {
        let nhd: Vec<LayerMemory> = (0..4u64).map(|i| layer(i << 32, 2, 8192, 100 * 8192, 8192)).collect();
        let cross: Vec<LayerMemory> = (0..4u64).map(|i| layer((1 << 40) + i * 4096, 1, 4 * 4096, 0, 4096)).collect();
        let pairs = [BlockPair::new(7, 1 << 30), BlockPair::new(0, 3 << 30), BlockPair::new(99, 2 << 30)];
        for layers in [&nhd, &cross] {
            let t = LayerTemplate::new(layers, 1 << 20);
            assert_eq!(t.bands.len(), layers.len());
            assert_eq!(t.slice_bytes, BlockTemplate::new(layers, 1 << 20).slice_bytes);
            for d2h in [true, false] {
                let mut all = Vec::new();
                for (i, band) in t.bands.iter().enumerate() {
                    let one = t.expand_band(i, &pairs, d2h);
                    // Each layer stays inside its band of every slot.
                    for r in &one {
                        let pool = if d2h { r.dst } else { r.src };
                        let slot = pairs.iter().map(|p| p.slot).filter(|&s| s <= pool).max().unwrap();
                        assert!(pool - slot >= band.offset && pool - slot + r.len <= band.offset + band.bytes);
                    }
                    // And moves exactly what the whole copy moves inside that band.
                    let in_band: Vec<Range> = cpu_ranges(layers, &pairs, d2h)
                        .into_iter()
                        .filter(|r| {
                            let pool = if d2h { r.dst } else { r.src };
                            let slot = pairs.iter().map(|p| p.slot).filter(|&s| s <= pool).max().unwrap();
                            (band.offset..band.offset + band.bytes).contains(&(pool - slot))
                        })
                        .collect();
                    assert_eq!(bytes_moved(&one), bytes_moved(&in_band));
                    all.extend(one);
                }
                assert_eq!(bytes_moved(&all), bytes_moved(&cpu_ranges(layers, &pairs, d2h)));
            }
        }
    }

    #[test]
    fn following_slots_make_one_pitched_copy() {
        let s = 512 << 10;
        let band = Band { pieces: 0..2, offset: 3 * 16384, bytes: 16384 };
        let st = 1 << 40;
        let copies = band_copies([10 * s, 11 * s, 12 * s, 40 * s], s, &band, st, false);
        assert_eq!(
            copies,
            vec![
                PitchedCopy {
                    src: 10 * s + 3 * 16384,
                    src_pitch: s,
                    dst: st,
                    dst_pitch: 16384,
                    width: 16384,
                    height: 3
                },
                PitchedCopy {
                    src: 40 * s + 3 * 16384,
                    src_pitch: s,
                    dst: st + 3 * 16384,
                    dst_pitch: 16384,
                    width: 16384,
                    height: 1
                },
            ]
        );
        // A save is the mirror image, and the rows are exactly the band of each slot.
        let copies = band_copies([10 * s, 11 * s, 12 * s, 40 * s], s, &band, st, true);
        let rows: Vec<Range> = copies.iter().flat_map(|c| c.rows().collect::<Vec<_>>()).collect();
        let want: Vec<Range> = [10, 11, 12, 40]
            .iter()
            .enumerate()
            .map(|(i, &k)| Range { src: st + i as u64 * 16384, dst: k * s + 3 * 16384, len: 16384 })
            .collect();
        assert_eq!(rows, want);
        assert!(band_copies([], s, &band, st, true).is_empty());
    }

    #[test]
    fn neighbouring_slots_make_one_run() {
        let s = 512 << 10;
        let runs = slot_runs([10 * s, 11 * s, 12 * s, 40 * s], s, 1 << 40, true);
        assert_eq!(
            runs,
            vec![
                Range { src: 1 << 40, dst: 10 * s, len: 3 * s },
                Range { src: (1 << 40) + 3 * s, dst: 40 * s, len: s }
            ]
        );
        let runs = slot_runs([10 * s, 11 * s], s, 1 << 40, false);
        assert_eq!(runs, vec![Range { src: 10 * s, dst: 1 << 40, len: 2 * s }]);
    }
}
