//! One shard's slice index over its pool arena: which slices are stored where, which are being
//! written, which are pinned by leases, and which to evict.
//!
//! A slice is first *reserved* (a slot is allocated and the entry is `Writing`: invisible to
//! lookups, never evicted), then *sealed* once its bytes are in the slot (visible, evictable when
//! unpinned) or *aborted* (slot freed). Lookups *pin* sealed slices under a lease; a pinned slice
//! is never evicted, so a lease's slots stay valid until the lease unpins them or expires.
//!
//! Eviction is S3-FIFO (Yang et al., "FIFO queues are all you need for cache eviction", SOSP
//! 2023): new slices enter a small FIFO (about [`SMALL_QUEUE_PERCENT`] of resident slices); one
//! that is hit before it reaches the tail moves to the main FIFO, the others are evicted and
//! remembered in a ghost queue of keys, so a slice saved again soon after goes straight to main.
//! At main's tail a slice with hits is reinserted with one hit less. A scan of one-time blocks
//! therefore churns only the small queue and leaves the working set in main alone. Hits are
//! counted by [`ShardIndex::pin`] (a lookup that found the slice), 0 to [`FREQ_MAX`].
//!
//! Pins: each lease's pins on this shard are a list of entry handles ([`ItemId`]s of the table,
//! stable while the entry exists, and a pinned entry is never removed) in the order they were
//! taken (a multiset: a key pinned twice by one lease holds two pins). A pin is one entry lookup
//! and a push of four bytes; dropping a lease's pins walks its list and touches each entry
//! directly, with no hashing. There is no per-pin table: the calls that drop part of a lease's
//! pins ([`ShardIndex::truncate_pins`], [`ShardIndex::unpin_rank`]) and the check before a load
//! ([`ShardIndex::pinned_slots`]) work on the lease's whole list at once. The eviction queues hold
//! handles too: a sealed entry leaves only by eviction, from a queue's front.
//!
//! Bounds: `max_entries` entries (writing and sealed), a ghost queue of [`GHOST_PERCENT`] of that,
//! [`MAX_LEASES_PER_SHARD`] leases holding pins and [`MAX_PINS_PER_SHARD`] pin records.

use crate::key::{BlockHash, SliceKey};
use crate::limits::{
    EXPIRE_BATCH_LEASES, FREQ_MAX, GHOST_PERCENT, MAX_LEASES_PER_SHARD, MAX_PINS_PER_SHARD, SMALL_QUEUE_PERCENT,
};
use crate::namespace::NamespaceId;
use crate::slab::{SlabAllocator, Slot};
use crate::table::{ItemId, SliceTable};
use std::collections::{BTreeSet, VecDeque};

/// Hash maps keyed by client-chosen hashes: foldhash is several times faster than SipHash on these
/// short keys and is seeded per process, so clients still cannot aim collisions at it.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// What [`ShardIndex::reserve`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserved {
    /// A fresh slot: copy the slice's bytes into it, then [`ShardIndex::seal`] (or
    /// [`ShardIndex::abort`] if the copy failed).
    Slot(Slot),
    /// The slice is stored or being written already: nothing to do.
    Present,
}

/// Why a slice could not be reserved. Either way the save of this slice is skipped; the
/// inference engine goes on without it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IndexError {
    /// The size is 0 or larger than the whole pool.
    #[error(
        "a slice of {bytes} bytes cannot be stored in a pool of {capacity_bytes} bytes; give the shard a larger pool"
    )]
    BadSize {
        /// Bytes asked for.
        bytes: u64,
        /// The pool's usable bytes.
        capacity_bytes: u64,
    },
    /// No room is left and nothing can be evicted: every stored slice is pinned or being written.
    #[error("pool full: no room for {bytes} bytes and nothing evictable ({pinned} slices pinned by leases, {writing} being written); the pool is too small for the load or leases are held too long")]
    Full {
        /// Bytes asked for.
        bytes: u64,
        /// Slices pinned by leases.
        pinned: usize,
        /// Slices being written.
        writing: usize,
    },
    /// The index holds `max` entries and none can be evicted.
    #[error("index full: {max} entries and nothing evictable ({pinned} pinned, {writing} being written); the pool is too small for the load or leases are held too long")]
    TooManyEntries {
        /// The bound.
        max: usize,
        /// Slices pinned by leases.
        pinned: usize,
        /// Slices being written.
        writing: usize,
    },
}

/// Where an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reserved, bytes being copied in: not visible, not evictable, not in a queue.
    Writing,
    /// Visible; in the small FIFO.
    Small,
    /// Visible; in the main FIFO.
    Main,
}

#[derive(Debug, Clone)]
struct Entry {
    slot: Slot,
    state: State,
    /// Pin records on the entry, over all leases.
    pins: u32,
    /// Hits, 0..=FREQ_MAX.
    freq: u8,
}

/// One lease's pins on this shard: never empty (a lease whose last pin goes is forgotten).
#[derive(Debug)]
struct LeasePins {
    expires_ms: u64,
    /// The pinned entries in pin order; an entry appears once per pin.
    pins: Vec<ItemId>,
}

/// The slices a lookup found ([`ShardIndex::find_prefix`]) and has yet to pin
/// ([`ShardIndex::pin_found`]).
#[derive(Debug, Default)]
pub struct FoundPrefix {
    ids: Vec<ItemId>,
    /// The index's eviction count when they were found: a sealed entry leaves only by eviction,
    /// so the same count means every id still names the entry found.
    evictions: u64,
}

impl FoundPrefix {
    /// Slices found.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True when nothing was found.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Capacity of a new lease's pin list: one lookup usually pins many slices on a shard.
const FIRST_PIN_CAPACITY: usize = 16;

/// One shard's slice index; see the module doc.
#[derive(Debug)]
pub struct ShardIndex {
    slab: SlabAllocator,
    max_entries: usize,
    entries: SliceTable<Entry>,
    // Queues hold exactly the sealed entries: the front is the tail (next to leave), new entries
    // are pushed at the back. Sealed entries leave only by eviction, so the queues hold no stale
    // handles.
    small: VecDeque<ItemId>,
    main: VecDeque<ItemId>,
    /// Recently evicted keys with a sequence number; a key re-sealed leaves `ghost_seq` at once
    /// and its queue record is skipped when it reaches the front.
    ghost: VecDeque<(SliceKey, u64)>,
    ghost_seq: HashMap<SliceKey, u64>,
    ghost_cap: usize,
    next_ghost_seq: u64,
    leases: HashMap<u64, LeasePins>,
    /// (expires_ms, lease) of every lease in `leases`.
    expiry: BTreeSet<(u64, u64)>,
    pin_records: usize,
    /// Entries with at least one pin, and those of them in the main queue.
    pinned_entries: usize,
    pinned_main: usize,
    writing: usize,
    evictions: u64,
    /// Slots set aside for GPU saves ([`ShardIndex::stock`]): allocated, in no entry, counted
    /// against `max_entries`.
    stocked: usize,
    stocked_bytes: u64,
}

impl ShardIndex {
    /// An empty index over a pool arena of `capacity_bytes` holding at most `max_entries` slices
    /// (writing and sealed).
    pub fn new(capacity_bytes: u64, max_entries: usize) -> Self {
        Self {
            slab: SlabAllocator::new(capacity_bytes),
            max_entries,
            entries: SliceTable::new(),
            small: VecDeque::new(),
            main: VecDeque::new(),
            ghost: VecDeque::new(),
            ghost_seq: HashMap::default(),
            ghost_cap: max_entries / 100 * GHOST_PERCENT + max_entries % 100 * GHOST_PERCENT / 100,
            next_ghost_seq: 0,
            leases: HashMap::default(),
            expiry: BTreeSet::new(),
            pin_records: 0,
            pinned_entries: 0,
            pinned_main: 0,
            writing: 0,
            evictions: 0,
            stocked: 0,
            stocked_bytes: 0,
        }
    }

    /// Makes room for slice `key` of `bytes`, evicting unpinned sealed slices as needed. The slot
    /// counts as used from now on; the caller copies the bytes in and seals or aborts it.
    pub fn reserve(&mut self, key: SliceKey, bytes: u64) -> Result<Reserved, IndexError> {
        if self.entries.contains_key(&key) {
            return Ok(Reserved::Present);
        }
        if bytes == 0 || bytes > self.slab.capacity_bytes() {
            return Err(IndexError::BadSize { bytes, capacity_bytes: self.slab.capacity_bytes() });
        }
        // Each round either allocates or evicts one entry, so it ends within entries + 1 rounds.
        // With one slice size per shard (one namespace) one eviction always frees a usable slot;
        // with several, a size class may need a whole chunk to drain first.
        loop {
            if self.entries.len() + self.stocked < self.max_entries {
                if let Some(slot) = self.slab.alloc(bytes) {
                    self.entries.insert(key, Entry { slot, state: State::Writing, pins: 0, freq: 0 });
                    self.writing += 1;
                    return Ok(Reserved::Slot(slot));
                }
            }
            if !self.evict_one() {
                let (pinned, writing) = (self.pinned_entries, self.writing);
                return Err(if self.entries.len() + self.stocked >= self.max_entries {
                    IndexError::TooManyEntries { max: self.max_entries, pinned, writing }
                } else {
                    IndexError::Full { bytes, pinned, writing }
                });
            }
        }
    }

    /// Sets a slot of `bytes` aside for a save whose keys are not known yet (a GPU save on another
    /// shard copies into it first and names its key afterwards, decision 54), evicting as
    /// [`ShardIndex::reserve`] does. The slot counts as used, and as an entry, until
    /// [`ShardIndex::adopt`] or [`ShardIndex::unstock`] takes it back. Returns `None` when the
    /// slots set aside would exceed `max_stock_bytes`, or nothing can be evicted.
    pub fn stock(&mut self, bytes: u64, max_stock_bytes: u64) -> Option<Slot> {
        if bytes == 0 || self.stocked_bytes + bytes > max_stock_bytes {
            return None;
        }
        loop {
            if self.entries.len() + self.stocked < self.max_entries {
                if let Some(slot) = self.slab.alloc(bytes) {
                    if self.stocked_bytes + slot.reserved > max_stock_bytes {
                        let freed = self.slab.free(slot);
                        debug_assert!(freed);
                        return None;
                    }
                    self.stocked += 1;
                    self.stocked_bytes += slot.reserved;
                    return Some(slot);
                }
            }
            if !self.evict_one() {
                return None;
            }
        }
    }

    /// Files the bytes a save wrote into stocked `slot` as sealed slice `key`; returns false, and
    /// frees the slot, when `key` is already stored (another save got there first).
    pub fn adopt(&mut self, key: SliceKey, slot: Slot) -> bool {
        self.stocked -= 1;
        self.stocked_bytes -= slot.reserved;
        if self.entries.contains_key(&key) {
            let freed = self.slab.free(slot);
            debug_assert!(freed, "stocked slot {slot:?} was not live");
            return false;
        }
        self.entries.insert(key, Entry { slot, state: State::Writing, pins: 0, freq: 0 });
        self.writing += 1;
        self.seal(key)
    }

    /// Frees stocked `slot` unused (or its save's copy failed).
    pub fn unstock(&mut self, slot: Slot) {
        self.stocked -= 1;
        self.stocked_bytes -= slot.reserved;
        let freed = self.slab.free(slot);
        debug_assert!(freed, "stocked slot {slot:?} was not live");
    }

    /// Slots set aside by [`ShardIndex::stock`], and their bytes.
    pub fn stocked(&self) -> (usize, u64) {
        (self.stocked, self.stocked_bytes)
    }

    /// Publishes a written slice. A key evicted recently (in the ghost queue) goes straight to the
    /// main queue: it is being saved again, so it is worth keeping. Returns false when `key` is
    /// not being written.
    pub fn seal(&mut self, key: SliceKey) -> bool {
        let Some(id) = self.entries.id(&key) else { return false };
        let e = self.entries.item_mut(id).1;
        if e.state != State::Writing {
            return false;
        }
        self.writing -= 1;
        if self.ghost_seq.remove(&key).is_some() {
            e.state = State::Main;
            self.main.push_back(id);
        } else {
            e.state = State::Small;
            self.small.push_back(id);
        }
        true
    }

    /// Drops a slice being written (its copy failed) and frees its slot. Returns false when `key`
    /// is not being written: sealed slices leave only by eviction.
    pub fn abort(&mut self, key: SliceKey) -> bool {
        match self.entries.get(&key) {
            Some(e) if e.state == State::Writing => {
                let slot = e.slot;
                self.entries.remove(&key);
                self.writing -= 1;
                let freed = self.slab.free(slot);
                debug_assert!(freed, "slot of {key:?} was not live");
                true
            }
            _ => false,
        }
    }

    /// Pins sealed slice `key` for `lease` until it is unpinned or `expires_ms` passes, counts a
    /// hit, and returns its slot. Each call adds one pin record, also for a key the lease already
    /// pins (the pins of a lease are a multiset; each goes with the lease, or with
    /// [`ShardIndex::truncate_pins`] or [`ShardIndex::unpin_rank`]). `None` when the slice is not
    /// sealed here, or when the lease or pin tables are at their bound: either way the caller
    /// treats the slice as a miss, which only costs recomputation.
    ///
    /// `expires_ms` is the lease's; a later value for the same lease extends all its pins. A
    /// runtime whose copies outlive the lease should pass its expiry plus the longest copy time.
    pub fn pin(&mut self, key: SliceKey, lease: u64, expires_ms: u64) -> Option<Slot> {
        let id = self.entries.id(&key)?;
        let e = self.entries.item_mut(id).1;
        if e.state == State::Writing || self.pin_records >= MAX_PINS_PER_SHARD {
            return None;
        }
        match self.leases.get_mut(&lease) {
            Some(lp) => {
                if expires_ms > lp.expires_ms {
                    self.expiry.remove(&(lp.expires_ms, lease));
                    self.expiry.insert((expires_ms, lease));
                    lp.expires_ms = expires_ms;
                }
                lp.pins.push(id);
            }
            None => {
                if self.leases.len() >= MAX_LEASES_PER_SHARD {
                    return None;
                }
                let mut pins = Vec::with_capacity(FIRST_PIN_CAPACITY);
                pins.push(id);
                self.leases.insert(lease, LeasePins { expires_ms, pins });
                self.expiry.insert((expires_ms, lease));
            }
        }
        self.pin_records += 1;
        if e.pins == 0 {
            self.pinned_entries += 1;
            self.pinned_main += usize::from(e.state == State::Main);
        }
        e.pins += 1;
        e.freq = (e.freq + 1).min(FREQ_MAX);
        Some(e.slot)
    }

    /// Pins, in order, the sealed slices of namespace `ns` whose block hash and rank are
    /// `key_at(0)`, `key_at(1)`, ... for `lease`, as
    /// [`ShardIndex::pin`] does one by one, and calls `found(i, slot)` for each one pinned, up to
    /// the first it cannot pin (absent, being written, or a bound reached); returns how many it
    /// pinned, all of `0..returned`. A lookup answers with its leading run of hits, so nothing
    /// after a miss could be loaded and is not worth probing. One call looks the lease up once and
    /// overlaps the index's cache misses (see [`SliceTable::get_prefix_mut`]), which is what makes
    /// a 1,024-hash lookup cheap.
    pub fn pin_many(
        &mut self,
        lease: u64,
        expires_ms: u64,
        ns: NamespaceId,
        count: usize,
        key_at: impl Fn(usize) -> (BlockHash, u16),
        mut found: impl FnMut(usize, Slot),
    ) -> usize {
        let room = MAX_PINS_PER_SHARD.saturating_sub(self.pin_records);
        if count == 0 || room == 0 {
            return 0;
        }
        if !self.leases.contains_key(&lease) && self.leases.len() >= MAX_LEASES_PER_SHARD {
            return 0;
        }
        // The lease's list, or a new one: ids are pushed straight onto it.
        let lp = self.leases.entry(lease).or_insert_with(|| LeasePins { expires_ms, pins: Vec::new() });
        let before = lp.pins.len();
        // Each key pinned adds one pin and the walk stops at the first key not pinned, so
        // walking at most `room` keys keeps the bound.
        let count = count.min(room);
        lp.pins.reserve(count);
        let pins = &mut lp.pins;
        let (mut newly_pinned, mut newly_pinned_main) = (0, 0);
        self.entries.get_prefix_mut(ns, count, key_at, |i, id, e| {
            if e.state == State::Writing {
                return false;
            }
            if e.pins == 0 {
                newly_pinned += 1;
                newly_pinned_main += usize::from(e.state == State::Main);
            }
            e.pins += 1;
            e.freq = (e.freq + 1).min(FREQ_MAX);
            pins.push(id);
            found(i, e.slot);
            true
        });
        let n = lp.pins.len() - before;
        if before == 0 {
            // A new lease: on the books only if it pinned something.
            if n == 0 {
                self.leases.remove(&lease);
                return 0;
            }
            self.expiry.insert((expires_ms, lease));
        } else if expires_ms > lp.expires_ms {
            self.expiry.remove(&(lp.expires_ms, lease));
            self.expiry.insert((expires_ms, lease));
            lp.expires_ms = expires_ms;
        }
        self.pin_records += n;
        self.pinned_entries += newly_pinned;
        self.pinned_main += newly_pinned_main;
        n
    }

    /// Finds, without pinning, the sealed slices of namespace `ns` whose block hash and rank are
    /// `key_at(0)`, `key_at(1)`, ... in order, up to the first that [`ShardIndex::pin_many`] would
    /// not pin for `lease` (absent, being written, or a bound reached). The result pins exactly
    /// those slices when passed to [`ShardIndex::pin_found`] before any slice is evicted.
    ///
    /// A one-shard lookup answers with the count and pins afterwards: the count is known once the
    /// slices are found, and as long as nothing runs on the shard in between (a shard is one
    /// thread) no eviction can come between the answer and its pins, so the client hears back
    /// without waiting for the pin records (decision 44).
    pub fn find_prefix(
        &mut self,
        lease: u64,
        ns: NamespaceId,
        count: usize,
        key_at: impl Fn(usize) -> (BlockHash, u16),
    ) -> FoundPrefix {
        let mut found = FoundPrefix { ids: Vec::new(), evictions: self.evictions };
        let room = MAX_PINS_PER_SHARD.saturating_sub(self.pin_records);
        if count == 0 || room == 0 {
            return found;
        }
        if !self.leases.contains_key(&lease) && self.leases.len() >= MAX_LEASES_PER_SHARD {
            return found;
        }
        let count = count.min(room);
        found.ids.reserve_exact(count);
        let ids = &mut found.ids;
        self.entries.get_prefix_mut(ns, count, key_at, |_, id, e| {
            if e.state == State::Writing {
                return false;
            }
            ids.push(id);
            true
        });
        found
    }

    /// The pool offsets of the slots `found` by [`ShardIndex::find_prefix`], in order; valid while
    /// they stay found (see [`ShardIndex::pin_found`]) or pinned.
    pub fn found_offsets(&self, found: &FoundPrefix) -> Vec<u64> {
        if found.evictions != self.evictions {
            return Vec::new();
        }
        found.ids.iter().map(|&id| self.entries.value(id).slot.offset).collect()
    }

    /// Pins for `lease` (expiring at `expires_ms`, as [`ShardIndex::pin_many`]) the slices
    /// `found` by [`ShardIndex::find_prefix`]; returns how many it pinned. When a slice was evicted
    /// since they were found, an entry found may be gone, so nothing is pinned and 0 is returned:
    /// the lease's loads then miss, and the engine recomputes (callers never let that happen).
    pub fn pin_found(&mut self, lease: u64, expires_ms: u64, found: FoundPrefix) -> usize {
        if found.evictions != self.evictions {
            return 0;
        }
        let n = found.ids.len();
        if n == 0 {
            return 0;
        }
        let (mut newly_pinned, mut newly_pinned_main) = (0, 0);
        self.entries.for_ids_mut(&found.ids, |_, e| {
            if e.pins == 0 {
                newly_pinned += 1;
                newly_pinned_main += usize::from(e.state == State::Main);
            }
            e.pins += 1;
            e.freq = (e.freq + 1).min(FREQ_MAX);
        });
        match self.leases.get_mut(&lease) {
            Some(lp) => {
                lp.pins.extend_from_slice(&found.ids);
                if expires_ms > lp.expires_ms {
                    self.expiry.remove(&(lp.expires_ms, lease));
                    self.expiry.insert((expires_ms, lease));
                    lp.expires_ms = expires_ms;
                }
            }
            None => {
                self.leases.insert(lease, LeasePins { expires_ms, pins: found.ids });
                self.expiry.insert((expires_ms, lease));
            }
        }
        self.pin_records += n;
        self.pinned_entries += newly_pinned;
        self.pinned_main += newly_pinned_main;
        n
    }

    /// Keeps the first `keep` pins `lease` took on this shard (in pin order) and drops the rest;
    /// returns how many were dropped. A lookup pins its keys in request order, so this drops the
    /// hits past the leading prefix.
    pub fn truncate_pins(&mut self, lease: u64, keep: usize) -> usize {
        if keep == 0 {
            return self.unpin_lease(lease);
        }
        let Some(lp) = self.leases.get_mut(&lease) else { return 0 };
        if lp.pins.len() <= keep {
            return 0;
        }
        let dropped: Vec<ItemId> = lp.pins.drain(keep..).collect();
        self.drop_pins(&dropped);
        dropped.len()
    }

    /// Drops every pin of `lease` on slices of rank `rank`; returns how many. A rank loads a lease
    /// once, so after its load these pins protect nothing.
    pub fn unpin_rank(&mut self, lease: u64, rank: u16) -> usize {
        let Some(lp) = self.leases.get_mut(&lease) else { return 0 };
        let mut dropped = Vec::new();
        let entries = &self.entries;
        lp.pins.retain(|&id| {
            let drop = entries.key(id).rank == rank;
            if drop {
                dropped.push(id);
            }
            !drop
        });
        if lp.pins.is_empty() {
            self.expiry.remove(&(lp.expires_ms, lease));
            self.leases.remove(&lease);
        }
        self.drop_pins(&dropped);
        dropped.len()
    }

    /// Drops every pin of `lease` on this shard; returns how many.
    pub fn unpin_lease(&mut self, lease: u64) -> usize {
        let Some(lp) = self.leases.remove(&lease) else { return 0 };
        self.expiry.remove(&(lp.expires_ms, lease));
        self.drop_pins(&lp.pins);
        lp.pins.len()
    }

    /// Drops the pins of up to [`EXPIRE_BATCH_LEASES`] leases whose `expires_ms <= now_ms`, so
    /// one call's work is bounded; returns the pins dropped. Call again while
    /// [`ShardIndex::next_expiry_ms`] is due. This is the backstop for leases whose end was never
    /// reported (a client or shard went away); normally pins go with [`ShardIndex::unpin_lease`].
    pub fn expire(&mut self, now_ms: u64) -> usize {
        let mut dropped = 0;
        for _ in 0..EXPIRE_BATCH_LEASES {
            match self.expiry.first() {
                Some(&(at, lease)) if at <= now_ms => dropped += self.unpin_lease(lease),
                _ => break,
            }
        }
        dropped
    }

    /// When the next lease's pins expire, if any lease holds pins here.
    pub fn next_expiry_ms(&self) -> Option<u64> {
        self.expiry.first().map(|&(at, _)| at)
    }

    /// Whether `key` is sealed here. Counts no hit: a lookup probes every rank first and pins only
    /// the hits it will lease.
    pub fn contains_sealed(&self, key: SliceKey) -> bool {
        self.entries.get(&key).is_some_and(|e| e.state != State::Writing)
    }

    /// The slot of sealed slice `key`.
    pub fn slot(&self, key: SliceKey) -> Option<Slot> {
        self.entries.get(&key).filter(|e| e.state != State::Writing).map(|e| e.slot)
    }

    /// The slot of `key` if `lease` pins it: the slot a load may read (pinned, so not evicted).
    /// Walks the lease's pins; to check many keys, use [`ShardIndex::pinned_slots`].
    pub fn pinned_slot(&self, key: SliceKey, lease: u64) -> Option<Slot> {
        let id = self.entries.id(&key)?;
        self.leases.get(&lease).filter(|lp| lp.pins.contains(&id))?;
        Some(self.entries.value(id).slot)
    }

    /// The slots of `keys` (in their order) if `lease` pins every one of them, else `None`. A
    /// load asks for a prefix of the slices its lookup pinned, in order, so the keys are first
    /// matched as a subsequence of the lease's pin list (the list's own keys, no hashing); keys in
    /// any other order are looked up and checked against a set of the lease's pins.
    pub fn pinned_slots(&self, lease: u64, keys: &[SliceKey]) -> Option<Vec<Slot>> {
        let lp = self.leases.get(&lease)?;
        let mut pinned = lp.pins.iter();
        let mut slots = Vec::with_capacity(keys.len());
        let in_order = keys.iter().all(|k| {
            pinned.any(|&id| {
                let hit = self.entries.key(id) == k;
                if hit {
                    slots.push(self.entries.value(id).slot);
                }
                hit
            })
        });
        if in_order {
            return Some(slots);
        }
        let set: std::collections::HashSet<&ItemId, foldhash::fast::RandomState> = lp.pins.iter().collect();
        keys.iter()
            .map(|k| self.entries.id(k).filter(|id| set.contains(id)).map(|id| self.entries.value(id).slot))
            .collect()
    }

    /// Sealed slices.
    pub fn slices(&self) -> usize {
        self.small.len() + self.main.len()
    }

    /// Slices being written.
    pub fn writing(&self) -> usize {
        self.writing
    }

    /// Slices pinned by at least one lease.
    pub fn pinned(&self) -> usize {
        self.pinned_entries
    }

    /// Pool bytes in use: slots of sealed and in-flight slices.
    pub fn used_bytes(&self) -> u64 {
        self.slab.used_bytes()
    }

    /// The pool's usable bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.slab.capacity_bytes()
    }

    /// Slices evicted since start.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Leases holding pins on this shard.
    pub fn leases(&self) -> usize {
        self.leases.len()
    }

    /// Drops one pin record on each of `pins` (which some lease held and has let go).
    fn drop_pins(&mut self, pins: &[ItemId]) {
        self.pin_records -= pins.len();
        let (mut unpinned, mut unpinned_main) = (0, 0);
        self.entries.for_ids_mut(pins, |_, e| {
            e.pins -= 1;
            if e.pins == 0 {
                unpinned += 1;
                unpinned_main += usize::from(e.state == State::Main);
            }
        });
        self.pinned_entries -= unpinned;
        self.pinned_main -= unpinned_main;
    }

    /// Evicts one unpinned sealed slice by S3-FIFO; false when every sealed slice is pinned.
    ///
    /// Pinned slices are rotated, not evicted: at the small tail they move to main (a pin is a
    /// hit), at the main tail they go back to the head with their hits intact. When every slice in
    /// main is pinned (known in O(1) from `pinned_main`) the small queue is drained regardless of
    /// its target size, and when it is empty too nothing is evictable. Every visit to an unpinned
    /// slice evicts it or takes one hit off it, so the loop is bounded by the budget below and is
    /// O(1) amortised when few slices are pinned.
    fn evict_one(&mut self) -> bool {
        let mut budget = 2 * (usize::from(FREQ_MAX) + 2) * self.slices() + 4;
        while budget > 0 {
            budget -= 1;
            let over = self.small.len() * 100 > self.slices() * SMALL_QUEUE_PERCENT;
            let main_evictable = self.main.len() > self.pinned_main;
            if !self.small.is_empty() && (over || !main_evictable) {
                let Some(id) = self.small.pop_front() else { break };
                let e = self.entries.item_mut(id).1;
                if e.pins == 0 && e.freq == 0 {
                    self.evict(id);
                    return true;
                }
                e.state = State::Main;
                self.pinned_main += usize::from(e.pins > 0);
                self.main.push_back(id);
            } else if main_evictable {
                let Some(id) = self.main.pop_front() else { break };
                let e = self.entries.item_mut(id).1;
                if e.pins == 0 && e.freq == 0 {
                    self.evict(id);
                    return true;
                }
                if e.pins == 0 {
                    e.freq -= 1;
                }
                self.main.push_back(id);
            } else {
                return false;
            }
        }
        debug_assert!(false, "eviction ran out of budget");
        false
    }

    /// Removes unpinned sealed entry `id` (just taken off its queue), frees its slot and remembers
    /// its key in the ghost queue.
    fn evict(&mut self, id: ItemId) {
        let (key, e) = self.entries.remove_id(id);
        debug_assert!(e.pins == 0 && e.state != State::Writing);
        let freed = self.slab.free(e.slot);
        debug_assert!(freed, "slot of {key:?} was not live");
        self.evictions += 1;
        if self.ghost_cap == 0 {
            return;
        }
        while self.ghost.len() >= self.ghost_cap {
            if let Some((old, seq)) = self.ghost.pop_front() {
                if self.ghost_seq.get(&old) == Some(&seq) {
                    self.ghost_seq.remove(&old);
                }
            }
        }
        let seq = self.next_ghost_seq;
        self.next_ghost_seq += 1;
        self.ghost.push_back((key, seq));
        self.ghost_seq.insert(key, seq);
    }

    /// Checks every counter and queue against the entries; panics on the first disagreement.
    #[cfg(test)]
    pub(crate) fn check(&self) {
        self.slab.check();
        let used: u64 = self.entries.values().map(|e| e.slot.reserved).sum();
        assert_eq!(
            used + self.stocked_bytes,
            self.slab.used_bytes(),
            "slab holds exactly the entries' and stock's slots"
        );
        assert!(self.entries.len() + self.stocked <= self.max_entries);
        let writing = self.entries.values().filter(|e| e.state == State::Writing).count();
        assert_eq!(writing, self.writing);
        assert_eq!(self.slices() + writing, self.entries.len(), "every sealed entry is queued once");
        for (q, state) in [(&self.small, State::Small), (&self.main, State::Main)] {
            for &id in q {
                let k = self.entries.key(id);
                assert_eq!(self.entries.id(k), Some(id));
                assert_eq!(self.entries.value(id).state, state, "{k:?} queued in the wrong FIFO");
            }
        }
        let mut pins: HashMap<SliceKey, u32> = HashMap::default();
        for (lease, lp) in &self.leases {
            assert!(!lp.pins.is_empty(), "lease {lease} holds no pin");
            assert!(self.expiry.contains(&(lp.expires_ms, *lease)));
            for &id in &lp.pins {
                *pins.entry(*self.entries.key(id)).or_default() += 1;
            }
        }
        assert_eq!(self.expiry.len(), self.leases.len());
        assert_eq!(pins.values().map(|&n| n as usize).sum::<usize>(), self.pin_records);
        for (k, e) in self.entries.iter() {
            assert_eq!(e.pins, pins.get(k).copied().unwrap_or(0), "pin count of {k:?}");
            assert!(e.freq <= FREQ_MAX);
            assert!(e.pins == 0 || e.state != State::Writing, "a writing slice is pinned");
        }
        assert_eq!(self.entries.values().filter(|e| e.pins > 0).count(), self.pinned_entries);
        assert_eq!(self.main.iter().filter(|&&id| self.entries.value(id).pins > 0).count(), self.pinned_main);
        assert!(self.ghost.len() <= self.ghost_cap && self.ghost_seq.len() <= self.ghost.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::tests::slice;
    use crate::limits::CHUNK_BYTES;
    use crate::rng::SplitMix64;
    use std::collections::BTreeMap;

    /// 64 KiB slices: 32 per chunk.
    const SZ: u64 = 64 << 10;
    const PER_CHUNK: u64 = CHUNK_BYTES / SZ;

    fn k(h: u64) -> SliceKey {
        slice(1, h, 0)
    }

    /// The namespace of every [`k`] key.
    const NS: NamespaceId = NamespaceId([1; 16]);

    /// Reserves and seals `key`, which must be new.
    fn put(ix: &mut ShardIndex, key: SliceKey) {
        assert!(matches!(ix.reserve(key, SZ), Ok(Reserved::Slot(_))), "{key:?}");
        assert!(ix.seal(key));
    }

    #[test]
    fn reserve_seal_abort_lifecycle() {
        let mut ix = ShardIndex::new(CHUNK_BYTES, 100);
        let Reserved::Slot(slot) = ix.reserve(k(1), 5000).unwrap() else { panic!("not reserved") };
        assert_eq!((slot.len, slot.reserved), (5000, 8192));
        assert_eq!(ix.reserve(k(1), 5000), Ok(Reserved::Present), "being written");
        assert!(!ix.contains_sealed(k(1)) && ix.slot(k(1)).is_none() && ix.pin(k(1), 9, 100).is_none());
        assert_eq!((ix.writing(), ix.slices(), ix.used_bytes()), (1, 0, 8192));
        assert!(ix.seal(k(1)));
        assert!(!ix.seal(k(1)), "sealed once");
        assert!(!ix.abort(k(1)), "a sealed slice is not aborted");
        assert_eq!(ix.reserve(k(1), 5000), Ok(Reserved::Present));
        assert!(ix.contains_sealed(k(1)));
        assert_eq!(ix.slot(k(1)), Some(slot));
        assert_eq!((ix.writing(), ix.slices()), (0, 1));
        ix.reserve(k(2), 5000).unwrap();
        assert!(ix.abort(k(2)));
        assert!(!ix.abort(k(2)) && !ix.seal(k(2)));
        assert_eq!(ix.used_bytes(), 8192);
        for bad in [0, CHUNK_BYTES + 1] {
            let e = ix.reserve(k(3), bad).unwrap_err();
            assert_eq!(e, IndexError::BadSize { bytes: bad, capacity_bytes: CHUNK_BYTES });
        }
        ix.check();
    }

    #[test]
    fn without_hits_eviction_is_fifo() {
        let mut ix = ShardIndex::new(CHUNK_BYTES, 1000);
        for h in 0..PER_CHUNK {
            put(&mut ix, k(h));
        }
        for h in PER_CHUNK..PER_CHUNK + 10 {
            put(&mut ix, k(h));
            assert!(!ix.contains_sealed(k(h - PER_CHUNK)), "oldest goes first");
            assert!(ix.contains_sealed(k(h - PER_CHUNK + 1)));
        }
        assert_eq!(ix.evictions(), 10);
        ix.check();
    }

    #[test]
    fn stocked_slots_are_adopted_freed_and_bounded() {
        let mut ix = ShardIndex::new(CHUNK_BYTES, 4);
        let a = ix.stock(SZ, 2 * SZ).unwrap();
        let b = ix.stock(SZ, 2 * SZ).unwrap();
        assert!(ix.stock(SZ, 2 * SZ).is_none(), "at most 2 * SZ set aside");
        assert_eq!((ix.stocked(), ix.used_bytes(), ix.slices()), ((2, 2 * SZ), 2 * SZ, 0));
        ix.check();
        put(&mut ix, k(1));
        put(&mut ix, k(3));
        ix.pin(k(1), 8, 100).unwrap();
        ix.pin(k(3), 8, 100).unwrap();
        let e = ix.reserve(k(4), SZ).unwrap_err();
        assert!(matches!(e, IndexError::TooManyEntries { max: 4, .. }), "stock counts as entries: {e:?}");
        ix.unpin_lease(8);
        assert!(ix.adopt(k(2), a), "a new key is filed");
        assert_eq!(ix.slot(k(2)), Some(a), "sealed in the stocked slot");
        assert!(!ix.adopt(k(1), b), "a key already stored: the slot is freed");
        assert_eq!(ix.slot(k(1)).map(|s| s.offset == b.offset), Some(false));
        assert_eq!((ix.stocked(), ix.slices(), ix.used_bytes()), ((0, 0), 3, 3 * SZ));
        ix.check();
        let c = ix.stock(SZ, SZ).unwrap();
        assert_eq!(ix.evictions(), 0);
        ix.unstock(c);
        assert_eq!((ix.stocked(), ix.used_bytes()), ((0, 0), 3 * SZ));
        // At the entry bound, stocking evicts an unpinned slice; with everything pinned it fails.
        put(&mut ix, k(4));
        assert!(ix.stock(SZ, SZ).is_some());
        assert_eq!(ix.evictions(), 1);
        for h in 1..=4 {
            let _ = ix.pin(k(h), 9, 100);
        }
        assert!(ix.stock(SZ, 2 * SZ).is_none(), "nothing evictable");
        ix.check();
    }

    #[test]
    fn eviction_spares_pinned_and_writing_slices() {
        let mut ix = ShardIndex::new(CHUNK_BYTES, 1000);
        for h in 0..PER_CHUNK {
            put(&mut ix, k(h));
        }
        for h in 0..10 {
            assert!(ix.pin(k(h), 7, 1_000).is_some());
        }
        for h in 10..15 {
            assert!(ix.abort(k(h)) || ix.contains_sealed(k(h)));
        }
        // Slots 10..15 still sealed; reserve five writers that stay open.
        for h in 100..105 {
            assert!(matches!(ix.reserve(k(h), SZ), Ok(Reserved::Slot(_))));
        }
        for h in 1_000..1_200 {
            put(&mut ix, k(h));
            ix.check();
        }
        assert!((0..10).all(|h| ix.contains_sealed(k(h))), "pinned slices survive");
        assert!((100..105).all(|h| ix.seal(k(h))), "writing slices survive");
        // Pin everything: nothing is evictable any more.
        let sealed: Vec<SliceKey> = ix.entries.keys().copied().collect();
        for key in sealed {
            assert!(ix.pin(key, 8, 1_000).is_some());
        }
        let e = ix.reserve(k(5_000), SZ).unwrap_err();
        assert_eq!(e, IndexError::Full { bytes: SZ, pinned: PER_CHUNK as usize, writing: 0 });
        assert!(e.to_string().contains("pool is too small"));
        assert_eq!(ix.unpin_lease(8), PER_CHUNK as usize);
        assert!(matches!(ix.reserve(k(5_000), SZ), Ok(Reserved::Slot(_))), "lease 7's pins remain, others go");
        assert!((0..10).all(|h| ix.contains_sealed(k(h))));
        ix.check();
    }

    /// With main all pinned, eviction falls back to the small queue even below its target size.
    #[test]
    fn pinned_main_falls_back_to_small() {
        let mut ix = ShardIndex::new(CHUNK_BYTES, 1000);
        for h in 0..PER_CHUNK {
            put(&mut ix, k(h));
        }
        for h in 0..PER_CHUNK - 2 {
            ix.pin(k(h), 1, 1_000).unwrap();
        }
        put(&mut ix, k(100)); // pinned slices move to main; the first unpinned one goes
        assert!(!ix.contains_sealed(k(PER_CHUNK - 2)));
        assert_eq!(
            (ix.main.len(), ix.pinned_main, ix.small.len()),
            (PER_CHUNK as usize - 2, PER_CHUNK as usize - 2, 2)
        );
        put(&mut ix, k(101)); // small holds 2 of 32, under its target, yet main has nothing to give
        assert!(!ix.contains_sealed(k(PER_CHUNK - 1)));
        assert!((0..PER_CHUNK - 2).all(|h| ix.contains_sealed(k(h))));
        assert_eq!(ix.evictions(), 2);
        ix.check();
    }

    #[test]
    fn entry_bound_evicts_or_refuses() {
        let mut ix = ShardIndex::new(8 * CHUNK_BYTES, 4);
        for h in 0..4 {
            ix.reserve(k(h), SZ).unwrap();
        }
        let e = ix.reserve(k(9), SZ).unwrap_err();
        assert_eq!(e, IndexError::TooManyEntries { max: 4, pinned: 0, writing: 4 });
        assert!(ix.seal(k(0)));
        assert!(matches!(ix.reserve(k(9), SZ), Ok(Reserved::Slot(_))), "a sealed slice makes room");
        assert!(!ix.contains_sealed(k(0)));
        assert_eq!(ix.evictions(), 1);
        ix.check();
    }

    #[test]
    fn pins_are_per_lease_and_counted() {
        let mut ix = ShardIndex::new(CHUNK_BYTES, 100);
        put(&mut ix, k(1));
        put(&mut ix, k(2));
        let slot = ix.slot(k(1)).unwrap();
        assert_eq!(ix.pin(k(1), 10, 100), Some(slot));
        assert_eq!(ix.pin(k(1), 10, 100), Some(slot), "same lease, same key: a second pin");
        assert_eq!(ix.pin(k(1), 11, 100), Some(slot));
        assert_eq!(ix.pin(k(2), 10, 100).map(|s| s.offset), ix.slot(k(2)).map(|s| s.offset));
        assert_eq!(ix.entries[&k(1)].pins, 3);
        assert_eq!((ix.leases(), ix.pinned()), (2, 2));
        assert_eq!(ix.pinned_slot(k(1), 11), Some(slot));
        assert_eq!(ix.pinned_slot(k(2), 11), None);
        let slot2 = ix.slot(k(2)).unwrap();
        assert_eq!(ix.pinned_slots(10, &[k(1), k(2)]), Some(vec![slot, slot2]), "in pin order");
        assert_eq!(ix.pinned_slots(10, &[k(2), k(1), k(1), k(2)]), Some(vec![slot2, slot, slot, slot2]), "any order");
        assert_eq!(ix.pinned_slots(11, &[k(1), k(2)]), None);
        assert_eq!(ix.pinned_slots(12, &[]), None, "unknown lease");
        assert_eq!(ix.unpin_lease(11), 1);
        assert_eq!(ix.leases(), 1, "a lease with no pins is forgotten");
        assert_eq!(ix.truncate_pins(10, 5), 0, "keeps all three");
        assert_eq!(ix.truncate_pins(10, 1), 2);
        assert_eq!(ix.entries[&k(1)].pins, 1);
        assert_eq!(ix.pinned(), 1);
        assert_eq!(ix.pinned_slots(10, &[k(2)]), None, "k(2) was past the first pin");
        assert_eq!(ix.unpin_lease(10), 1);
        assert_eq!(ix.unpin_lease(10), 0);
        assert_eq!((ix.leases(), ix.pinned()), (0, 0));
        assert_eq!(ix.pin(k(3), 10, 100), None, "a miss pins nothing");
        ix.check();
    }

    /// `pin_many` does what `pin` does key by key: same slots, same counts, same lease lists,
    /// writing slices and misses skipped, and the lease bound respected.
    #[test]
    fn pin_many_matches_pin_one_by_one() {
        let mut rng = SplitMix64::new(11);
        let (mut one, mut many) = (ShardIndex::new(4 * CHUNK_BYTES, 200), ShardIndex::new(4 * CHUNK_BYTES, 200));
        let mut split = ShardIndex::new(4 * CHUNK_BYTES, 200);
        for h in 0..60 {
            for ix in [&mut one, &mut many, &mut split] {
                assert!(matches!(ix.reserve(k(h), SZ), Ok(Reserved::Slot(_))));
                if h % 7 != 3 {
                    assert!(ix.seal(k(h)), "every 7th stays writing");
                }
            }
        }
        for lease in 1..40u64 {
            // Keys repeat (a multiset) and include misses (h >= 60) and writing slices.
            let keys: Vec<(u32, SliceKey)> = (0..rng.below(80)).map(|i| (i as u32, k(rng.below(70)))).collect();
            // `pin_many` stops at the first key it cannot pin.
            let expect: Vec<(usize, Slot)> = keys
                .iter()
                .enumerate()
                .map_while(|(i, (_, key))| one.pin(*key, lease, lease * 10).map(|s| (i, s)))
                .collect();
            let mut got = Vec::new();
            let at = |i: usize| (keys[i].1.block.hash, keys[i].1.rank);
            let n = many.pin_many(lease, lease * 10, NS, keys.len(), at, |i, slot| got.push((i, slot)));
            assert_eq!((n, &got), (expect.len(), &expect), "lease {lease}");
            assert_eq!(many.pin_many(lease, 0, NS, 0, |_| unreachable!(), |_, _| panic!()), 0);
            // Finding, then pinning what was found, does the same.
            let found = split.find_prefix(lease, NS, keys.len(), at);
            assert_eq!(found.len(), expect.len(), "lease {lease}");
            assert_eq!(split.pin_found(lease, lease * 10, found), expect.len());
            for (i, slot) in &expect {
                assert_eq!(split.pinned_slot(keys[*i].1, lease), Some(*slot));
            }
            if lease % 3 == 0 {
                let dropped = one.truncate_pins(lease, 2);
                assert_eq!(dropped, many.truncate_pins(lease, 2));
                assert_eq!(dropped, split.truncate_pins(lease, 2));
            }
            for ix in [&one, &many, &split] {
                ix.check();
            }
            for ix in [&many, &split] {
                assert_eq!(
                    (one.leases(), one.pinned(), one.next_expiry_ms()),
                    (ix.leases(), ix.pinned(), ix.next_expiry_ms())
                );
            }
        }
        // A full lease table refuses a new lease, not more pins for a known one.
        let mut ix = ShardIndex::new(CHUNK_BYTES, 100);
        put(&mut ix, k(1));
        for lease in 0..MAX_LEASES_PER_SHARD as u64 {
            assert!(ix.pin(k(1), lease, 100).is_some());
        }
        let keys: Vec<SliceKey> = (0..4).map(k).collect();
        let keys = &keys;
        let from = |first: usize| move |i: usize| (keys[first + i].block.hash, keys[first + i].rank);
        assert_eq!(ix.pin_many(u64::MAX, 100, NS, 1, from(1), |_, _| panic!("refused")), 0);
        assert_eq!(ix.pin_many(5, 100, NS, 2, from(1), |i, _| assert_eq!(i, 0)), 1);
        assert_eq!(ix.pin_many(6, 100, NS, 2, from(2), |_, _| panic!("k(2) misses")), 0, "stops at once");
        ix.check();
    }

    #[test]
    fn found_slices_are_not_pinned_after_an_eviction() {
        // Room for two slices: a third evicts one.
        let mut ix = ShardIndex::new(CHUNK_BYTES, 2);
        put(&mut ix, k(1));
        put(&mut ix, k(2));
        let keys = [k(1), k(2)];
        let found = ix.find_prefix(7, NS, 2, |i| (keys[i].block.hash, keys[i].rank));
        assert_eq!(found.len(), 2);
        assert_eq!(ix.pinned(), 0, "finding pins nothing");
        let slots = [ix.slot(k(1)).unwrap().offset, ix.slot(k(2)).unwrap().offset];
        assert_eq!(ix.found_offsets(&found), slots, "the slots found, in order");
        put(&mut ix, k(3));
        assert_eq!(ix.evictions(), 1);
        assert!(ix.found_offsets(&found).is_empty(), "no offsets once an id found may be stale");
        assert_eq!(ix.pin_found(7, 100, found), 0, "an id found may name another entry now");
        assert_eq!((ix.pinned(), ix.leases()), (0, 0));
        ix.check();
        // Found and pinned with nothing in between: pinned.
        let keys = [k(3)];
        let found = ix.find_prefix(8, NS, 1, |i| (keys[i].block.hash, keys[i].rank));
        assert_eq!(ix.found_offsets(&found), [ix.slot(k(3)).unwrap().offset]);
        assert_eq!(ix.pin_found(8, 100, found), 1);
        assert!(ix.pinned_slot(k(3), 8).is_some());
        ix.check();
    }

    #[test]
    fn unpin_rank_drops_one_ranks_pins() {
        let mut ix = ShardIndex::new(CHUNK_BYTES, 100);
        let keys: Vec<SliceKey> = (0..4).flat_map(|h| (0..3).map(move |r| slice(1, h, r))).collect();
        for &key in &keys {
            put(&mut ix, key);
            ix.pin(key, 7, 100).unwrap();
        }
        ix.pin(slice(1, 0, 1), 8, 100).unwrap();
        assert_eq!(ix.unpin_rank(7, 1), 4);
        assert_eq!(ix.unpin_rank(7, 1), 0);
        assert_eq!(ix.pinned(), 9, "rank 1 of block 0 is still pinned by lease 8");
        assert!(ix.pinned_slots(7, &[slice(1, 0, 0), slice(1, 3, 2)]).is_some());
        assert!(ix.pinned_slots(7, &[slice(1, 1, 1)]).is_none());
        assert_eq!(ix.unpin_rank(7, 0) + ix.unpin_rank(7, 2), 8);
        assert_eq!(ix.leases(), 1, "lease 7 is forgotten with its last pin");
        ix.check();
    }

    #[test]
    fn lease_bound_refuses_new_leases_only() {
        let mut ix = ShardIndex::new(CHUNK_BYTES, 100);
        put(&mut ix, k(1));
        put(&mut ix, k(2));
        for lease in 0..MAX_LEASES_PER_SHARD as u64 {
            assert!(ix.pin(k(1), lease, 100).is_some());
        }
        assert_eq!(ix.pin(k(1), u64::MAX, 100), None, "lease table full");
        assert!(ix.pin(k(2), 0, 100).is_some(), "a known lease may pin more");
        assert_eq!(ix.leases(), MAX_LEASES_PER_SHARD);
        assert_eq!(ix.expire(99), 0);
        let mut dropped = 0;
        while ix.next_expiry_ms().is_some_and(|at| at <= 100) {
            dropped += ix.expire(100);
        }
        assert_eq!(dropped, MAX_LEASES_PER_SHARD + 1);
        assert_eq!((ix.leases(), ix.pinned()), (0, 0));
        ix.check();
    }

    #[test]
    fn expiry_releases_pins() {
        let mut ix = ShardIndex::new(CHUNK_BYTES, 100);
        for h in 0..PER_CHUNK {
            put(&mut ix, k(h));
        }
        ix.pin(k(0), 1, 100).unwrap();
        ix.pin(k(1), 2, 200).unwrap();
        ix.pin(k(2), 2, 150).unwrap(); // an earlier expiry does not shorten lease 2
        ix.pin(k(3), 3, 300).unwrap();
        ix.pin(k(4), 3, 400).unwrap(); // a later one extends all of lease 3
        assert_eq!(ix.next_expiry_ms(), Some(100));
        assert_eq!(ix.expire(99), 0);
        assert_eq!(ix.expire(100), 1);
        assert_eq!(ix.next_expiry_ms(), Some(200));
        assert_eq!(ix.expire(300), 2);
        assert_eq!(ix.next_expiry_ms(), Some(400));
        assert_eq!(ix.expire(400), 2);
        assert_eq!((ix.leases(), ix.pinned(), ix.next_expiry_ms()), (0, 0, None));
        ix.check();
        // Unpinned, the slices are evictable again: a pool-sized slot takes their room.
        assert!(matches!(ix.reserve(k(100), CHUNK_BYTES), Ok(Reserved::Slot(_))));
        assert_eq!(ix.slices(), 0);
    }

    #[test]
    fn expire_does_bounded_work() {
        let mut ix = ShardIndex::new(CHUNK_BYTES, 100);
        put(&mut ix, k(1));
        let n = EXPIRE_BATCH_LEASES as u64 + 10;
        for lease in 0..n {
            ix.pin(k(1), lease, 50).unwrap();
        }
        assert_eq!(ix.expire(50), EXPIRE_BATCH_LEASES);
        assert_eq!(ix.next_expiry_ms(), Some(50));
        assert_eq!(ix.expire(50), 10);
        assert_eq!(ix.pinned(), 0);
    }

    #[test]
    fn a_ghost_hit_goes_to_main() {
        let mut ix = ShardIndex::new(CHUNK_BYTES, 1000);
        for h in 0..=PER_CHUNK {
            put(&mut ix, k(h));
        }
        assert!(!ix.contains_sealed(k(0)) && ix.ghost_seq.contains_key(&k(0)));
        put(&mut ix, k(0));
        assert_eq!(ix.entries[&k(0)].state, State::Main);
        assert!(!ix.ghost_seq.contains_key(&k(0)));
        // New keys now churn the small queue; the returning key stays.
        for h in 1_000..1_000 + 4 * PER_CHUNK {
            put(&mut ix, k(h));
        }
        assert!(ix.contains_sealed(k(0)));
        ix.check();
    }

    /// A working set that was hit survives scans of one-time keys ten times the pool under
    /// S3-FIFO, while an LRU of the same size keeps none of it.
    #[test]
    fn scan_resistance() {
        let cap = 2 * PER_CHUNK as usize;
        let working: Vec<SliceKey> = (0..40).map(k).collect();
        let mut ix = ShardIndex::new(2 * CHUNK_BYTES, cap);
        let mut lru: VecDeque<SliceKey> = VecDeque::new();
        let (mut s3_hits, mut lru_hits, mut next_scan) = (0, 0, 1_000_000u64);
        // One access: a lookup that pins and releases on a hit, a save on a miss.
        let mut access = |ix: &mut ShardIndex, lru: &mut VecDeque<SliceKey>, key: SliceKey, count: bool| {
            if ix.contains_sealed(key) {
                ix.pin(key, 1, 0).unwrap();
                ix.unpin_lease(1);
                s3_hits += usize::from(count);
            } else {
                put(ix, key);
            }
            if let Some(pos) = lru.iter().position(|&x| x == key) {
                lru.remove(pos);
                lru_hits += usize::from(count);
            } else if lru.len() == cap {
                lru.pop_front();
            }
            lru.push_back(key);
        };
        // Warm up: save the working set, then hit it twice.
        for _ in 0..3 {
            for &key in &working {
                access(&mut ix, &mut lru, key, false);
            }
        }
        let rounds = 20;
        for _ in 0..rounds {
            for _ in 0..10 * cap {
                access(&mut ix, &mut lru, k(next_scan), true);
                next_scan += 1;
            }
            for &key in &working {
                access(&mut ix, &mut lru, key, true);
            }
            ix.check();
        }
        assert_eq!(s3_hits, working.len() * rounds, "S3-FIFO keeps the whole working set");
        assert_eq!(lru_hits, 0, "the scan flushes an LRU");
    }

    #[test]
    fn accounting_returns_to_zero() {
        let mut ix = ShardIndex::new(4 * CHUNK_BYTES, 1000);
        let mut rng = SplitMix64::new(3);
        for h in 0..300 {
            let bytes = [4096, 12_000, SZ, 300_000][rng.below(4) as usize];
            if let Ok(Reserved::Slot(_)) = ix.reserve(k(h), bytes) {
                if rng.below(4) > 0 {
                    ix.seal(k(h));
                    ix.pin(k(h), rng.below(20), 1_000);
                }
            }
        }
        ix.check();
        assert!(ix.used_bytes() > 0);
        for lease in 0..20 {
            ix.unpin_lease(lease);
        }
        for h in 0..300 {
            ix.abort(k(h));
        }
        // One slot the size of the pool evicts everything.
        let Reserved::Slot(all) = ix.reserve(k(9_999), ix.capacity_bytes()).unwrap() else { panic!() };
        assert_eq!(all.offset, 0);
        assert!(ix.abort(k(9_999)));
        assert_eq!((ix.used_bytes(), ix.slices(), ix.writing(), ix.pinned(), ix.leases()), (0, 0, 0, 0, 0));
        assert_eq!(ix.slab.free_chunks(), 4);
        ix.check();
    }

    /// Random operations against a model of what must hold whatever the policy evicts: writing and
    /// pinned slices stay, a reserve fails only when every sealed slice is pinned, answers match
    /// the model's state, and all internal counters agree (`check`).
    #[test]
    fn randomized_against_a_model() {
        #[derive(Debug, Clone, Copy, PartialEq)]
        enum M {
            Writing,
            Sealed,
        }
        for seed in 0..6 {
            let mut rng = SplitMix64::new(seed);
            let max_entries = 20 + rng.below(200) as usize;
            let mut ix = ShardIndex::new((4 + rng.below(5)) * CHUNK_BYTES, max_entries);
            let mut model: BTreeMap<SliceKey, M> = BTreeMap::new();
            // lease -> (expiry, keys in pin order, one per pin)
            let mut pins: BTreeMap<u64, (u64, Vec<SliceKey>)> = BTreeMap::new();
            let mut now = 0u64;
            let sizes = [SZ, SZ, SZ, SZ, 4096, 200_000, CHUNK_BYTES / 2];
            for step in 0..4_000 {
                let op = rng.below(16);
                // Mostly keys in the state the operation acts on, sometimes any key.
                let want = match op {
                    3..=7 => Some(M::Writing),
                    8..=10 => Some(M::Sealed),
                    _ => None,
                };
                let candidates: Vec<SliceKey> =
                    model.iter().filter(|(_, m)| Some(**m) == want).map(|(k, _)| *k).collect();
                let key = if candidates.is_empty() || rng.below(5) == 0 {
                    slice(1 + rng.below(2) as u8, rng.below(400), rng.below(2) as u16)
                } else {
                    candidates[rng.below(candidates.len() as u64) as usize]
                };
                let lease = rng.below(12);
                match op {
                    0..=2 => {
                        let bytes = sizes[rng.below(sizes.len() as u64) as usize];
                        match ix.reserve(key, bytes) {
                            Ok(Reserved::Present) => assert!(model.contains_key(&key)),
                            Ok(Reserved::Slot(s)) => {
                                assert!(!model.contains_key(&key));
                                assert_eq!(s.len, bytes);
                                model.insert(key, M::Writing);
                            }
                            Err(IndexError::Full { .. } | IndexError::TooManyEntries { .. }) => {
                                assert!(!model.contains_key(&key));
                                assert_eq!(ix.pinned(), ix.slices(), "refused with an evictable slice");
                            }
                            Err(e) => panic!("{e}"),
                        }
                    }
                    3..=6 => assert_eq!(
                        ix.seal(key),
                        model.get(&key) == Some(&M::Writing) && {
                            model.insert(key, M::Sealed);
                            true
                        }
                    ),
                    7 => {
                        assert_eq!(ix.abort(key), model.get(&key) == Some(&M::Writing) && model.remove(&key).is_some())
                    }
                    8..=10 => {
                        let exp = now + rng.below(100);
                        let got = ix.pin(key, lease, exp).is_some();
                        assert_eq!(got, model.get(&key) == Some(&M::Sealed), "pin of {key:?}");
                        if got {
                            let e = pins.entry(lease).or_insert((exp, Vec::new()));
                            e.0 = e.0.max(exp);
                            e.1.push(key);
                        }
                    }
                    11 => {
                        let keep = rng.below(4) as usize;
                        let n = pins.get_mut(&lease).map_or(0, |(_, ks)| {
                            let n = ks.len().saturating_sub(keep);
                            ks.truncate(keep);
                            n
                        });
                        pins.retain(|_, (_, ks)| !ks.is_empty());
                        assert_eq!(ix.truncate_pins(lease, keep), n);
                    }
                    12 => {
                        let n = pins.remove(&lease).map_or(0, |(_, ks)| ks.len());
                        assert_eq!(ix.unpin_lease(lease), n);
                    }
                    13 => {
                        let rank = rng.below(2) as u16;
                        let n = pins.get_mut(&lease).map_or(0, |(_, ks)| {
                            let before = ks.len();
                            ks.retain(|k| k.rank != rank);
                            before - ks.len()
                        });
                        pins.retain(|_, (_, ks)| !ks.is_empty());
                        assert_eq!(ix.unpin_rank(lease, rank), n);
                    }
                    14 => {
                        // A load's check: a random selection of the lease's pins (in order or
                        // shuffled), sometimes with a key it does not pin.
                        let held = pins.get(&lease).map(|(_, ks)| ks.clone()).unwrap_or_default();
                        let mut ask: Vec<SliceKey> = held.iter().copied().filter(|_| rng.below(3) > 0).collect();
                        if rng.below(2) == 0 && ask.len() > 1 {
                            let i = rng.below(ask.len() as u64) as usize;
                            ask.swap(0, i);
                        }
                        if rng.below(4) == 0 {
                            ask.push(key);
                        }
                        let want = pins.contains_key(&lease) && ask.iter().all(|k| held.contains(k));
                        let got = ix.pinned_slots(lease, &ask);
                        assert_eq!(got.is_some(), want, "pinned_slots of lease {lease}: {ask:?}");
                        if let Some(slots) = got {
                            assert!(ask.iter().zip(&slots).all(|(k, s)| ix.slot(*k) == Some(*s)));
                        }
                    }
                    _ => {
                        now += rng.below(60);
                        let due: usize = pins.values().filter(|(e, _)| *e <= now).map(|(_, ks)| ks.len()).sum();
                        pins.retain(|_, (e, _)| *e > now);
                        assert_eq!(ix.expire(now), due);
                    }
                }
                // Reconcile evictions: only unpinned sealed slices may have gone.
                let pinned: BTreeSet<SliceKey> = pins.values().flat_map(|(_, ks)| ks.iter().copied()).collect();
                model.retain(|key, m| {
                    let present = ix.entries.contains_key(key);
                    assert!(
                        present || (*m == M::Sealed && !pinned.contains(key)),
                        "seed {seed} step {step}: {key:?} lost"
                    );
                    present
                });
                assert_eq!(ix.entries.len(), model.len());
                assert_eq!(ix.leases(), pins.len());
                for (lease, (_, ks)) in &pins {
                    assert!(ks.iter().all(|key| ix.pinned_slot(*key, *lease).is_some()));
                }
                ix.check();
            }
        }
    }
}
