//! Byte-offset allocation over one shard's pool arena. The allocator only does arithmetic: it
//! never touches the arena's memory, so it is exact, testable and cheap to snapshot.
//!
//! The arena is cut into [`CHUNK_BYTES`] chunks (capacity rounds down to whole chunks). A slot is
//! rounded up to [`SLOT_ALIGN_BYTES`] and starts on that alignment, as O_DIRECT and DMA require.
//! A chunk serves slots of one size (a size class is the exact rounded size, so a pool holding one
//! namespace's slices wastes at most the chunk's tail); a chunk whose slots are all free returns
//! to the free pool, where any class (or a large slot) can take it. A slot larger than a chunk
//! takes a contiguous run of chunks, first fit by address.
//!
//! Costs: a slot of a class with a non-full chunk is O(log chunks) to allocate or free; taking
//! a fresh chunk is O(log runs); a multi-chunk run is first fit, O(runs).

use crate::limits::{CHUNK_BYTES, SLOT_ALIGN_BYTES};
use std::collections::{BTreeMap, BTreeSet};

/// 64-bit words of a chunk's live map: one bit per slot, at most 512 slots per chunk.
const LIVE_WORDS: usize = (CHUNK_BYTES / SLOT_ALIGN_BYTES).div_ceil(64) as usize;

/// A place in the arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Slot {
    /// Byte offset from the arena's start; a multiple of [`SLOT_ALIGN_BYTES`].
    pub offset: u64,
    /// Bytes requested.
    pub len: u64,
    /// Bytes set aside: `len` rounded up to [`SLOT_ALIGN_BYTES`].
    pub reserved: u64,
}

/// What one chunk is doing.
#[derive(Debug, Clone)]
enum Chunk {
    /// In the free pool.
    Free,
    /// Serves slots of `slot_bytes`; bit `i` of `live` is set while slot `i` is allocated.
    Class { slot_bytes: u64, live: [u64; LIVE_WORDS], used: u32 },
    /// First chunk of a multi-chunk slot of `reserved` bytes spanning `chunks` chunks.
    RunHead { chunks: u32, reserved: u64 },
    /// A later chunk of a multi-chunk slot.
    RunTail,
}

/// Allocates slots of one shard's pool arena; see the module doc.
#[derive(Debug)]
pub struct SlabAllocator {
    capacity_bytes: u64,
    chunks: Vec<Chunk>,
    /// Free chunk runs, start -> length, coalesced (no two touch).
    free_runs: BTreeMap<u32, u32>,
    free_chunks: u64,
    /// Per slot size, the chunks of that class with a free slot, lowest address first so live
    /// slots pack into few chunks and the rest can drain back to the pool. A class with no
    /// non-full chunk has no entry, so the map is bounded by the chunk count.
    partial: BTreeMap<u64, BTreeSet<u32>>,
    used_bytes: u64,
    slack_bytes: u64,
}

impl SlabAllocator {
    /// An allocator over an arena of `capacity_bytes`, rounded down to whole chunks (an arena
    /// smaller than one chunk holds nothing).
    pub fn new(capacity_bytes: u64) -> Self {
        let n = u32::try_from(capacity_bytes / CHUNK_BYTES).unwrap_or(u32::MAX);
        let mut free_runs = BTreeMap::new();
        if n > 0 {
            free_runs.insert(0, n);
        }
        Self {
            capacity_bytes: u64::from(n) * CHUNK_BYTES,
            chunks: vec![Chunk::Free; n as usize],
            free_runs,
            free_chunks: u64::from(n),
            partial: BTreeMap::new(),
            used_bytes: 0,
            slack_bytes: 0,
        }
    }

    /// Usable bytes: the arena rounded down to whole chunks.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    /// Reserved bytes of live slots.
    pub fn used_bytes(&self) -> u64 {
        self.used_bytes
    }

    /// Bytes of chunks out of the free pool that no live slot holds: free slots of partly used
    /// chunks, chunk tails no slot fits, and the tail of multi-chunk slots. Always
    /// `used_bytes + slack_bytes + free_chunks * CHUNK_BYTES == capacity_bytes`.
    pub fn slack_bytes(&self) -> u64 {
        self.slack_bytes
    }

    /// Chunks in the free pool.
    pub fn free_chunks(&self) -> u64 {
        self.free_chunks
    }

    /// A slot of at least `bytes`, or `None` when `bytes` is 0 or no room is left for it (the
    /// caller evicts and retries).
    pub fn alloc(&mut self, bytes: u64) -> Option<Slot> {
        if bytes == 0 || bytes > self.capacity_bytes {
            return None;
        }
        // Cannot overflow: bytes <= capacity, a multiple of the alignment.
        let reserved = bytes.div_ceil(SLOT_ALIGN_BYTES) * SLOT_ALIGN_BYTES;
        let offset = if reserved <= CHUNK_BYTES { self.alloc_in_class(reserved)? } else { self.alloc_run(reserved)? };
        self.used_bytes += reserved;
        Some(Slot { offset, len: bytes, reserved })
    }

    /// Returns `slot` to the allocator. Returns false, changing nothing, when `slot` is not live
    /// (freed twice, or never handed out by this allocator): a bug in the caller.
    pub fn free(&mut self, slot: Slot) -> bool {
        let ok = slot.len > 0
            && slot.len <= slot.reserved
            && slot.offset % SLOT_ALIGN_BYTES == 0
            && slot.offset < self.capacity_bytes
            && if slot.reserved <= CHUNK_BYTES { self.free_in_class(slot) } else { self.free_run(slot) };
        if ok {
            self.used_bytes -= slot.reserved;
        }
        ok
    }

    /// Takes a slot of `size` (aligned, at most a chunk) from the class's lowest non-full chunk,
    /// opening a fresh chunk when the class has none.
    fn alloc_in_class(&mut self, size: u64) -> Option<u64> {
        let per_chunk = CHUNK_BYTES / size;
        let c = match self.partial.get(&size).and_then(|set| set.first().copied()) {
            Some(c) => c,
            None => {
                let c = self.take_chunks(1)?;
                self.chunks[c as usize] = Chunk::Class { slot_bytes: size, live: [0; LIVE_WORDS], used: 0 };
                self.slack_bytes += CHUNK_BYTES;
                self.partial.entry(size).or_default().insert(c);
                c
            }
        };
        let Chunk::Class { live, used, .. } = &mut self.chunks[c as usize] else {
            unreachable!("chunk {c} in the partial set of class {size} is not a class chunk")
        };
        // The first clear bit; one exists because the chunk is in the partial set.
        let (w, word) = live.iter_mut().enumerate().find(|(_, word)| **word != u64::MAX)?;
        let bit = u64::from((!*word).trailing_zeros());
        let idx = w as u64 * 64 + bit;
        debug_assert!(idx < per_chunk, "partial chunk {c} has no free slot below {per_chunk}");
        *word |= 1 << bit;
        *used += 1;
        if u64::from(*used) == per_chunk {
            let set = self.partial.get_mut(&size)?;
            set.remove(&c);
            if set.is_empty() {
                self.partial.remove(&size);
            }
        }
        self.slack_bytes -= size;
        Some(u64::from(c) * CHUNK_BYTES + idx * size)
    }

    /// Frees a slot of a class chunk, returning the chunk to the pool when it empties.
    fn free_in_class(&mut self, slot: Slot) -> bool {
        let c = (slot.offset / CHUNK_BYTES) as u32;
        let Chunk::Class { slot_bytes, live, used } = &mut self.chunks[c as usize] else { return false };
        let (size, within) = (*slot_bytes, slot.offset % CHUNK_BYTES);
        let per_chunk = CHUNK_BYTES / size;
        if slot.reserved != size || within % size != 0 || within / size >= per_chunk {
            return false;
        }
        let idx = within / size;
        let (w, bit) = ((idx / 64) as usize, idx % 64);
        if live[w] & (1 << bit) == 0 {
            return false;
        }
        live[w] &= !(1 << bit);
        let was_full = u64::from(*used) == per_chunk;
        *used -= 1;
        self.slack_bytes += size;
        if *used == 0 {
            if let Some(set) = self.partial.get_mut(&size) {
                set.remove(&c);
                if set.is_empty() {
                    self.partial.remove(&size);
                }
            }
            self.chunks[c as usize] = Chunk::Free;
            self.slack_bytes -= CHUNK_BYTES;
            self.release_chunks(c, 1);
        } else if was_full {
            self.partial.entry(size).or_default().insert(c);
        }
        true
    }

    /// Takes the first run of enough contiguous chunks for a slot larger than one chunk.
    fn alloc_run(&mut self, reserved: u64) -> Option<u64> {
        let n = u32::try_from(reserved.div_ceil(CHUNK_BYTES)).ok()?;
        let c = self.take_chunks(n)?;
        self.chunks[c as usize] = Chunk::RunHead { chunks: n, reserved };
        for t in c + 1..c + n {
            self.chunks[t as usize] = Chunk::RunTail;
        }
        self.slack_bytes += u64::from(n) * CHUNK_BYTES - reserved;
        Some(u64::from(c) * CHUNK_BYTES)
    }

    /// Frees a multi-chunk slot.
    fn free_run(&mut self, slot: Slot) -> bool {
        let c = (slot.offset / CHUNK_BYTES) as u32;
        match self.chunks[c as usize] {
            Chunk::RunHead { chunks, reserved } if reserved == slot.reserved && slot.offset % CHUNK_BYTES == 0 => {
                for t in c..c + chunks {
                    self.chunks[t as usize] = Chunk::Free;
                }
                self.slack_bytes -= u64::from(chunks) * CHUNK_BYTES - reserved;
                self.release_chunks(c, chunks);
                true
            }
            _ => false,
        }
    }

    /// Removes `n` contiguous chunks from the free pool, first fit by address (a single chunk is
    /// the lowest free one, O(log runs)).
    fn take_chunks(&mut self, n: u32) -> Option<u32> {
        let (&start, &len) = self.free_runs.iter().find(|(_, &len)| len >= n)?;
        self.free_runs.remove(&start);
        if len > n {
            self.free_runs.insert(start + n, len - n);
        }
        self.free_chunks -= u64::from(n);
        Some(start)
    }

    /// Returns `n` chunks from `start` to the free pool, merging with the neighbouring runs so a
    /// large slot can find them contiguous again.
    fn release_chunks(&mut self, mut start: u32, mut n: u32) {
        self.free_chunks += u64::from(n);
        if let Some((&prev, &len)) = self.free_runs.range(..start).next_back() {
            if prev + len == start {
                self.free_runs.remove(&prev);
                start = prev;
                n += len;
            }
        }
        if let Some(next) = self.free_runs.remove(&(start + n)) {
            n += next;
        }
        self.free_runs.insert(start, n);
    }

    /// Recomputes every counter from the chunk table and checks the free-run and partial sets
    /// against it; panics on the first disagreement.
    #[cfg(test)]
    pub(crate) fn check(&self) {
        let mut used = 0;
        let mut slack = 0;
        let mut free = 0u64;
        let mut c = 0usize;
        while c < self.chunks.len() {
            match &self.chunks[c] {
                Chunk::Free => {
                    free += 1;
                    let in_run =
                        self.free_runs.range(..=c as u32).next_back().is_some_and(|(&s, &l)| (c as u32) < s + l);
                    assert!(in_run, "free chunk {c} is in no free run");
                }
                Chunk::Class { slot_bytes, live, used: n } => {
                    let ones: u32 = live.iter().map(|w| w.count_ones()).sum();
                    assert_eq!(ones, *n, "chunk {c} live map");
                    assert!(*n > 0, "empty class chunk {c} was not returned");
                    used += u64::from(*n) * slot_bytes;
                    slack += CHUNK_BYTES - u64::from(*n) * slot_bytes;
                    let full = u64::from(*n) == CHUNK_BYTES / slot_bytes;
                    let listed = self.partial.get(slot_bytes).is_some_and(|s| s.contains(&(c as u32)));
                    assert_eq!(listed, !full, "chunk {c} partial membership");
                }
                Chunk::RunHead { chunks, reserved } => {
                    used += reserved;
                    slack += u64::from(*chunks) * CHUNK_BYTES - reserved;
                    for t in c + 1..c + *chunks as usize {
                        assert!(matches!(self.chunks[t], Chunk::RunTail), "run at {c} broken at {t}");
                    }
                    c += *chunks as usize;
                    continue;
                }
                Chunk::RunTail => panic!("run tail {c} without a head"),
            }
            c += 1;
        }
        assert_eq!(used, self.used_bytes, "used bytes");
        assert_eq!(slack, self.slack_bytes, "slack bytes");
        assert_eq!(free, self.free_chunks, "free chunks");
        assert_eq!(self.used_bytes + self.slack_bytes + self.free_chunks * CHUNK_BYTES, self.capacity_bytes);
        let mut end = 0;
        for (&s, &l) in &self.free_runs {
            assert!(l > 0 && (s > end || s == 0), "free runs not coalesced at {s}");
            end = s + l;
        }
        assert!(self.partial.values().all(|s| !s.is_empty()), "empty partial set kept");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    const MIB: u64 = 1 << 20;

    #[test]
    fn sizes_out_of_range_are_refused() {
        let mut s = SlabAllocator::new(4 * CHUNK_BYTES);
        assert_eq!(s.alloc(0), None);
        assert_eq!(s.alloc(4 * CHUNK_BYTES + 1), None);
        assert_eq!(s.alloc(u64::MAX), None);
        let all = s.alloc(4 * CHUNK_BYTES).unwrap();
        assert_eq!((all.offset, all.reserved), (0, 4 * CHUNK_BYTES));
        assert_eq!(s.alloc(1), None, "nothing left");
        assert!(s.free(all));
        s.check();
    }

    #[test]
    fn capacity_rounds_down_to_whole_chunks() {
        let s = SlabAllocator::new(3 * CHUNK_BYTES + CHUNK_BYTES / 2);
        assert_eq!((s.capacity_bytes(), s.free_chunks()), (3 * CHUNK_BYTES, 3));
        let mut tiny = SlabAllocator::new(CHUNK_BYTES - 1);
        assert_eq!(tiny.capacity_bytes(), 0);
        assert_eq!(tiny.alloc(1), None);
        tiny.check();
    }

    #[test]
    fn slots_are_rounded_and_aligned() {
        let mut s = SlabAllocator::new(2 * CHUNK_BYTES);
        let a = s.alloc(1).unwrap();
        let b = s.alloc(1).unwrap();
        assert_eq!((a.offset, a.len, a.reserved), (0, 1, 4096));
        assert_eq!(b.offset, 4096);
        let c = s.alloc(5000).unwrap();
        assert_eq!((c.reserved, c.offset % SLOT_ALIGN_BYTES), (8192, 0));
        assert_eq!(c.offset, CHUNK_BYTES, "another size class takes another chunk");
        assert_eq!(s.used_bytes(), 4096 * 2 + 8192);
        assert_eq!(s.free_chunks(), 0);
        s.check();
    }

    #[test]
    fn a_chunk_serves_one_class_and_returns_when_empty() {
        let mut s = SlabAllocator::new(2 * CHUNK_BYTES);
        let per_chunk = (CHUNK_BYTES / (16 << 10)) as usize;
        let slots: Vec<Slot> = (0..per_chunk + 1).map(|_| s.alloc(16 << 10).unwrap()).collect();
        assert!(slots[..per_chunk].iter().all(|x| x.offset < CHUNK_BYTES));
        assert_eq!(slots[per_chunk].offset, CHUNK_BYTES, "a full chunk opens the next");
        s.check();
        // Freeing the lone slot of the second chunk returns that chunk to the pool.
        assert!(s.free(slots[per_chunk]));
        assert_eq!(s.free_chunks(), 1);
        // The freed slot in a full chunk is handed out again before any fresh chunk.
        assert!(s.free(slots[5]));
        assert_eq!(s.alloc(16 << 10).unwrap().offset, slots[5].offset);
        s.check();
    }

    /// 12 KiB slots leave an 8 KiB tail per chunk: slack, never handed out.
    #[test]
    fn tail_waste_is_slack() {
        let mut s = SlabAllocator::new(CHUNK_BYTES);
        let n = CHUNK_BYTES / (12 << 10);
        for _ in 0..n {
            assert!(s.alloc(12 << 10).is_some());
        }
        assert_eq!(s.alloc(12 << 10), None);
        assert_eq!(s.slack_bytes(), CHUNK_BYTES - n * (12 << 10));
        s.check();
    }

    #[test]
    fn large_slots_take_first_fitting_run_and_runs_coalesce() {
        let mut s = SlabAllocator::new(8 * CHUNK_BYTES);
        let a = s.alloc(3 * MIB).unwrap(); // chunks 0-1
        let b = s.alloc(CHUNK_BYTES).unwrap(); // chunk 2 (one slot of a chunk-sized class)
        let c = s.alloc(5 * MIB).unwrap(); // chunks 3-5
        assert_eq!((a.offset, b.offset, c.offset), (0, 2 * CHUNK_BYTES, 3 * CHUNK_BYTES));
        assert_eq!(s.slack_bytes(), MIB + MIB);
        s.check();
        assert!(s.free(a));
        // Two free runs of 2 chunks each (0-1, 6-7): 3 chunks do not fit, 2 take the first.
        assert_eq!(s.alloc(3 * CHUNK_BYTES), None);
        let d = s.alloc(4 * MIB).unwrap();
        assert_eq!(d.offset, 0);
        assert!(s.free(d));
        assert!(s.free(b));
        assert!(s.free(c));
        s.check();
        assert_eq!(s.alloc(8 * CHUNK_BYTES).unwrap().offset, 0, "all runs merged back into one");
    }

    #[test]
    fn bad_frees_change_nothing() {
        let mut s = SlabAllocator::new(4 * CHUNK_BYTES);
        let a = s.alloc(4096).unwrap();
        let big = s.alloc(3 * MIB).unwrap();
        let bad = [
            Slot { offset: a.offset + 4096, ..a },                    // never allocated
            Slot { reserved: 8192, ..a },                             // wrong class
            Slot { offset: 100, ..a },                                // unaligned
            Slot { offset: 4 * CHUNK_BYTES, ..a },                    // past the arena
            Slot { len: 0, ..a },                                     // empty
            Slot { offset: big.offset + CHUNK_BYTES, ..big },         // inside a run
            Slot { reserved: 4 * MIB, len: 4 * MIB, ..big },          // wrong run length
            Slot { offset: 3 * CHUNK_BYTES, len: 1, reserved: 4096 }, // a free chunk
        ];
        for slot in bad {
            assert!(!s.free(slot), "{slot:?}");
            s.check();
        }
        assert!(s.free(a));
        assert!(!s.free(a), "double free");
        assert!(s.free(big));
        assert!(!s.free(big), "double free of a run");
        assert_eq!((s.used_bytes(), s.free_chunks()), (0, 4));
    }

    /// Random allocs and frees of mixed sizes against a model of live slots: no two live slots
    /// overlap, all lie in the arena, and the accounting identity holds throughout.
    #[test]
    fn randomized_against_a_model() {
        for seed in 0..8 {
            let mut rng = SplitMix64::new(seed);
            let chunks = 4 + rng.below(29);
            let mut s = SlabAllocator::new(chunks * CHUNK_BYTES);
            let mut live: BTreeMap<u64, Slot> = BTreeMap::new();
            let sizes = [4096, 12 << 10, 16 << 10, 100_000, MIB, CHUNK_BYTES, 3 * MIB, 9 * MIB];
            for step in 0..6_000 {
                if rng.below(100) < 55 {
                    let bytes = if rng.below(4) == 0 {
                        1 + rng.below(5 * MIB)
                    } else {
                        let b = sizes[rng.below(sizes.len() as u64) as usize];
                        b - rng.below(2) * rng.below(b.min(4096))
                    };
                    if let Some(slot) = s.alloc(bytes) {
                        assert_eq!((slot.len, slot.reserved), (bytes, bytes.div_ceil(4096) * 4096));
                        assert_eq!(slot.offset % SLOT_ALIGN_BYTES, 0);
                        assert!(slot.offset + slot.reserved <= s.capacity_bytes());
                        if let Some((_, p)) = live.range(..slot.offset).next_back() {
                            assert!(p.offset + p.reserved <= slot.offset, "{p:?} overlaps {slot:?}");
                        }
                        if let Some((_, n)) = live.range(slot.offset..).next() {
                            assert!(slot.offset + slot.reserved <= n.offset, "{slot:?} overlaps {n:?}");
                        }
                        live.insert(slot.offset, slot);
                    } else if bytes <= CHUNK_BYTES {
                        // A class slot fails only when its class is full and no chunk is free.
                        assert_eq!(s.free_chunks(), 0, "seed {seed} step {step}: {bytes} refused");
                    }
                } else if !live.is_empty() {
                    let nth = rng.below(live.len() as u64) as usize;
                    let off = *live.keys().nth(nth).unwrap();
                    assert!(s.free(live.remove(&off).unwrap()));
                }
                assert_eq!(s.used_bytes(), live.values().map(|x| x.reserved).sum::<u64>());
                assert_eq!(s.used_bytes() + s.slack_bytes() + s.free_chunks() * CHUNK_BYTES, s.capacity_bytes());
                if step % 64 == 0 {
                    s.check();
                }
            }
            for (_, slot) in std::mem::take(&mut live) {
                assert!(s.free(slot));
            }
            s.check();
            assert_eq!((s.used_bytes(), s.slack_bytes(), s.free_chunks()), (0, 0, chunks));
        }
    }
}
