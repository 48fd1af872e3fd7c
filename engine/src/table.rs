//! The hash table under a shard's index: slice keys to entries, built so that a lookup of a
//! thousand keys can overlap its cache misses.
//!
//! A general-purpose map (std's `HashMap`) takes one or two cache misses per lookup in a table
//! larger than the CPU's caches, and a loop of lookups waits for each in turn: with a million
//! slices, pinning a 1,024-hash lookup cost about 220 ns per key on our VM, nearly all of it
//! waiting on memory. This table is open addressing with linear probing over two parallel arrays:
//! `hashes` (the key's full 64-bit hash, 0 for an empty slot) and `items` (key and value). A key's
//! home slot follows from its hash alone, so a batch computes the hashes of keys further down the
//! batch and [`SliceTable::prefetch`]es their home slots while it works on the current one
//! ([`SliceTable::get_many_mut`]); with the load kept at most one half, almost every key sits in its
//! home slot or the next.
//!
//! Removal shifts the following run of keys back (no tombstones), so lookups never walk over
//! deleted slots. Hashes are foldhash, seeded per process, so clients cannot aim collisions at it;
//! a matching hash is always confirmed by comparing the whole key.

use crate::key::SliceKey;
use std::hash::BuildHasher;

/// Slots of a new table.
const MIN_SLOTS: usize = 16;
/// Keys looked ahead in [`SliceTable::get_many_mut`]: enough misses in flight to cover memory
/// latency, few enough that the prefetched lines are still in L1 when their turn comes.
const PREFETCH_DISTANCE: usize = 16;

/// Slice keys to `V`; see the module doc.
#[derive(Clone)]
pub struct SliceTable<V> {
    /// Per slot: the key's hash (never 0), or 0 when the slot is empty.
    hashes: Vec<u64>,
    /// Per slot: the key and its value, `Some` exactly where `hashes` is not 0.
    items: Vec<Option<(SliceKey, V)>>,
    len: usize,
    hasher: foldhash::fast::RandomState,
}

impl<V: std::fmt::Debug> std::fmt::Debug for SliceTable<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<V> Default for SliceTable<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V> SliceTable<V> {
    /// An empty table.
    pub fn new() -> Self {
        Self {
            hashes: vec![0; MIN_SLOTS],
            items: (0..MIN_SLOTS).map(|_| None).collect(),
            len: 0,
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    /// Keys stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no key is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The hash the table files `key` under (never 0).
    #[inline]
    pub fn hash(&self, key: &SliceKey) -> u64 {
        self.hasher.hash_one(key).max(1)
    }

    #[inline]
    fn mask(&self) -> usize {
        self.hashes.len() - 1
    }

    /// The slot holding `key`, whose hash is `hash`.
    #[inline]
    fn find(&self, hash: u64, key: &SliceKey) -> Option<usize> {
        let mask = self.mask();
        let mut i = hash as usize & mask;
        loop {
            match self.hashes[i] {
                0 => return None,
                h if h == hash && self.items[i].as_ref().is_some_and(|(k, _)| k == key) => return Some(i),
                _ => i = (i + 1) & mask,
            }
        }
    }

    /// Asks the CPU to start loading the home slot of a key with hash `hash`, so that a lookup of
    /// it a little later finds the slot in cache. Has no other effect.
    #[inline]
    pub fn prefetch(&self, hash: u64) {
        let i = hash as usize & self.mask();
        prefetch_read((&self.hashes[i] as *const u64).cast());
        // An item may span two cache lines; ask for both.
        let item = (&self.items[i] as *const Option<(SliceKey, V)>).cast::<u8>();
        prefetch_read(item);
        prefetch_read(item.wrapping_add(size_of::<Option<(SliceKey, V)>>() - 1));
    }

    /// The value of `key`.
    pub fn get(&self, key: &SliceKey) -> Option<&V> {
        let i = self.find(self.hash(key), key)?;
        self.items[i].as_ref().map(|(_, v)| v)
    }

    /// The value of `key`, to change.
    pub fn get_mut(&mut self, key: &SliceKey) -> Option<&mut V> {
        self.get_mut_hashed(self.hash(key), key)
    }

    /// The value of `key`, whose hash ([`SliceTable::hash`]) is `hash`, to change.
    #[inline]
    pub fn get_mut_hashed(&mut self, hash: u64, key: &SliceKey) -> Option<&mut V> {
        let i = self.find(hash, key)?;
        self.items[i].as_mut().map(|(_, v)| v)
    }

    /// Whether `key` is stored.
    pub fn contains_key(&self, key: &SliceKey) -> bool {
        self.find(self.hash(key), key).is_some()
    }

    /// Calls `each(i, &key, value)` for every `i` in `0..count` whose key `key_at(i)` is stored,
    /// in order, with the home slots of the keys [`PREFETCH_DISTANCE`] ahead already requested
    /// from memory, so the lookups' cache misses overlap instead of following one another.
    pub fn get_many_mut(
        &mut self,
        count: usize,
        key_at: impl Fn(usize) -> SliceKey,
        mut each: impl FnMut(usize, &SliceKey, &mut V),
    ) {
        // Hashes of the keys ahead, by `i % PREFETCH_DISTANCE`; a key is built again when its turn
        // comes (a copy, cheaper than keeping it).
        let mut ahead = [0u64; PREFETCH_DISTANCE];
        for (i, hash) in ahead.iter_mut().enumerate().take(count) {
            *hash = self.hash(&key_at(i));
            self.prefetch(*hash);
        }
        for i in 0..count {
            let hash = ahead[i % PREFETCH_DISTANCE];
            if i + PREFETCH_DISTANCE < count {
                let h = self.hash(&key_at(i + PREFETCH_DISTANCE));
                ahead[i % PREFETCH_DISTANCE] = h;
                self.prefetch(h);
            }
            let key = key_at(i);
            if let Some(v) = self.get_mut_hashed(hash, &key) {
                each(i, &key, v);
            }
        }
    }

    /// Stores `value` under `key`; returns the value it replaces.
    pub fn insert(&mut self, key: SliceKey, value: V) -> Option<V> {
        let hash = self.hash(&key);
        if let Some(i) = self.find(hash, &key) {
            return self.items[i].replace((key, value)).map(|(_, v)| v);
        }
        if 2 * (self.len + 1) > self.hashes.len() {
            self.grow();
        }
        self.place(hash, key, value);
        self.len += 1;
        None
    }

    /// Puts a key known to be absent into the first free slot of its run.
    fn place(&mut self, hash: u64, key: SliceKey, value: V) {
        let mask = self.mask();
        let mut i = hash as usize & mask;
        while self.hashes[i] != 0 {
            i = (i + 1) & mask;
        }
        self.hashes[i] = hash;
        self.items[i] = Some((key, value));
    }

    /// Doubles the slots and files every key again.
    fn grow(&mut self) {
        let slots = self.hashes.len() * 2;
        let hashes = std::mem::replace(&mut self.hashes, vec![0; slots]);
        let items = std::mem::replace(&mut self.items, (0..slots).map(|_| None).collect());
        for (hash, item) in hashes.into_iter().zip(items) {
            if let Some((key, value)) = item {
                self.place(hash, key, value);
            }
        }
    }

    /// Removes `key`; returns its value.
    pub fn remove(&mut self, key: &SliceKey) -> Option<V> {
        let mask = self.mask();
        let mut hole = self.find(self.hash(key), key)?;
        let (_, value) = self.items[hole].take()?;
        self.hashes[hole] = 0;
        self.len -= 1;
        // Backward shift: a later key of the run moves into the hole unless its home lies
        // cyclically after the hole (then it is already as close to home as it can be).
        let mut j = (hole + 1) & mask;
        while self.hashes[j] != 0 {
            let home = self.hashes[j] as usize & mask;
            let dist_home = j.wrapping_sub(home) & mask;
            let dist_hole = j.wrapping_sub(hole) & mask;
            if dist_home >= dist_hole {
                self.hashes[hole] = std::mem::take(&mut self.hashes[j]);
                self.items[hole] = self.items[j].take();
                hole = j;
            }
            j = (j + 1) & mask;
        }
        Some(value)
    }

    /// Every key and value, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (&SliceKey, &V)> {
        self.items.iter().filter_map(|item| item.as_ref().map(|(k, v)| (k, v)))
    }

    /// Every key, in slot order.
    pub fn keys(&self) -> impl Iterator<Item = &SliceKey> {
        self.iter().map(|(k, _)| k)
    }

    /// Every value, in slot order.
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }
}

impl<V> std::ops::Index<&SliceKey> for SliceTable<V> {
    type Output = V;

    fn index(&self, key: &SliceKey) -> &V {
        self.get(key).expect("key not in the table")
    }
}

/// A hint to load the cache line holding `at`; no effect on the program's results, whatever `at`.
#[inline(always)]
fn prefetch_read(at: *const u8) {
    // The crate's one `unsafe`: the intrinsic takes a raw pointer, though a prefetch only hints.
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    // SAFETY: a prefetch never faults (not even on an invalid address), reads nothing into the
    // program and writes nothing; x86-64 always has the SSE feature it needs.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(at.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::tests::slice;
    use crate::rng::SplitMix64;
    use std::collections::HashMap;

    #[test]
    fn insert_get_remove() {
        let mut t = SliceTable::new();
        assert!(t.is_empty() && t.get(&slice(1, 1, 0)).is_none());
        assert_eq!(t.insert(slice(1, 1, 0), 10), None);
        assert_eq!(t.insert(slice(1, 1, 1), 11), None, "another rank is another key");
        assert_eq!(t.insert(slice(1, 1, 0), 12), Some(10), "replaced");
        assert_eq!((t.len(), t[&slice(1, 1, 0)], t[&slice(1, 1, 1)]), (2, 12, 11));
        *t.get_mut(&slice(1, 1, 1)).unwrap() += 1;
        assert_eq!(t.remove(&slice(1, 1, 1)), Some(12));
        assert_eq!(t.remove(&slice(1, 1, 1)), None);
        assert!(!t.contains_key(&slice(1, 1, 1)) && t.contains_key(&slice(1, 1, 0)));
        assert_eq!(t.len(), 1);
    }

    /// Random inserts and removals against std's map, with colliding home slots forced by a
    /// small table, including removals inside runs that wrap around the end of the slots.
    #[test]
    fn randomized_against_a_model() {
        let mut rng = SplitMix64::new(7);
        let mut t = SliceTable::new();
        let mut model = HashMap::new();
        for step in 0..200_000u64 {
            let key = slice((rng.next_u64() % 3) as u8, rng.next_u64() % 3000, (rng.next_u64() % 2) as u16);
            match rng.next_u64() % 4 {
                0 | 1 => assert_eq!(t.insert(key, step), model.insert(key, step)),
                2 => assert_eq!(t.remove(&key), model.remove(&key)),
                _ => assert_eq!(t.get(&key), model.get(&key)),
            }
            assert_eq!(t.len(), model.len());
            if step % 20_000 == 0 {
                for (k, v) in &model {
                    assert_eq!(t.get(k), Some(v));
                }
                assert_eq!(t.iter().count(), model.len());
                assert!(2 * t.len() <= t.hashes.len(), "load stays at most one half");
            }
        }
    }

    #[test]
    fn batch_lookup_finds_exactly_the_stored_keys_in_order() {
        let mut t = SliceTable::new();
        for h in (0..1000).step_by(2) {
            t.insert(slice(1, h, 0), h);
        }
        let keys: Vec<_> = (0..1000).map(|h| slice(1, h, 0)).collect();
        let mut seen = Vec::new();
        t.get_many_mut(
            keys.len(),
            |i| keys[i],
            |i, key, v| {
                assert_eq!(*key, keys[i]);
                *v += 1;
                seen.push(i as u64);
            },
        );
        assert_eq!(seen, (0..1000).step_by(2).collect::<Vec<_>>());
        assert_eq!(t[&slice(1, 10, 0)], 11, "values changed in place");
        t.get_many_mut(0, |_| unreachable!(), |_, _, _| panic!("no keys, no calls"));
    }
}
