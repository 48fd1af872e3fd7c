//! The hash table under a shard's index: slice keys to entries, built so that a lookup of a
//! thousand keys can overlap its cache misses, and so that a stored entry has a stable handle.
//!
//! A general-purpose map (std's `HashMap`) takes one or two cache misses per lookup in a table
//! larger than the CPU's caches, and a loop of lookups waits for each in turn: with a million
//! slices, pinning a 1,024-hash lookup cost about 220 ns per key on our VM, nearly all of it
//! waiting on memory. This table is open addressing with linear probing over an array of
//! *buckets* (the key's 64-bit hash, 0 for an empty bucket, and the index of its item) beside an
//! array of *items* (key and value). A key's home bucket follows from its hash alone, so a batch
//! computes the hashes of keys further down the batch and [`SliceTable::prefetch`]es their home
//! buckets, then their items, while it works on the current key ([`SliceTable::get_prefix_mut`]);
//! with the load kept at most one half, almost every key sits in its home bucket or the next.
//!
//! Items never move while their key is stored: removal shifts the following run of *buckets* back
//! (no tombstones, so lookups never walk over deleted buckets) and puts the item on a free list.
//! An item's index is therefore a handle ([`ItemId`]) the caller may keep, for instance in a
//! lease's pin list, and use later without hashing or comparing the key again
//! ([`SliceTable::for_ids_mut`]); it stays valid until its key is removed.
//!
//! Both arrays ask for transparent huge pages once they are large (`huge_pages`): with 4 KiB
//! pages, a batch over a table of a few hundred thousand slices takes a TLB miss per key.
//!
//! Hashes are keyed with random words drawn per table, so clients cannot aim collisions at it; a
//! matching hash is always confirmed by comparing the whole key. The hash is three independent
//! folded multiplies of the key's words and one more to combine them (the construction of
//! foldhash and wyhash), written for this one key shape: a quarter of the cost of feeding the
//! key's fields to a general `Hasher` one by one.

use crate::huge_pages;
use crate::key::{BlockHash, SliceKey};
use crate::namespace::NamespaceId;
use crate::rng::fold_mul as fold;
use std::hash::BuildHasher;

/// Buckets of a new table.
const MIN_BUCKETS: usize = 16;
/// Keys looked ahead in [`SliceTable::get_prefix_mut`]: their home buckets are requested from
/// memory this many keys before their turn: enough misses in flight to cover memory latency, few
/// enough that the lines are still in L1 when their turn comes.
const PREFETCH_DISTANCE: usize = 16;
/// Keys whose items are requested this many keys before their turn (their buckets, requested
/// [`PREFETCH_DISTANCE`] keys before, have arrived by then and say where the item is).
const ITEM_PREFETCH_DISTANCE: usize = 8;
/// Equal strides in a row between the items of consecutive keys after which
/// [`SliceTable::get_prefix_mut`] looks for the next key one stride on before hashing it.
const RUN_AFTER: usize = 2;
/// Items requested this many strides ahead along a run.
const RUN_PREFETCH_DISTANCE: i64 = 16;

/// A stored key's item: valid from the insert that returned it until the key is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ItemId(u32);

/// One bucket: a key's hash (0: empty) and where its item is.
#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    hash: u64,
    item: u32,
}

/// Slice keys to `V`; see the module doc.
#[derive(Clone)]
pub struct SliceTable<V> {
    /// Power-of-two many buckets, at most half of them used.
    buckets: Vec<Bucket>,
    /// Items by [`ItemId`]: `Some` exactly for the ids some bucket points to.
    items: Vec<Option<(SliceKey, V)>>,
    /// Ids of the `None` items, reused before `items` grows.
    free: Vec<u32>,
    len: usize,
    /// Random words the hash is keyed with.
    seeds: [u64; 8],
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
        // std's `RandomState` is seeded from the OS per process and varied per instance.
        let state = std::collections::hash_map::RandomState::new();
        let seeds = std::array::from_fn(|i| state.hash_one(i as u64) | 1);
        Self { buckets: vec![Bucket::default(); MIN_BUCKETS], items: Vec::new(), free: Vec::new(), len: 0, seeds }
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
        keyed_hash(&self.seeds, key)
    }

    #[inline]
    fn mask(&self) -> usize {
        self.buckets.len() - 1
    }

    /// The bucket holding `key`, whose hash is `hash`.
    #[inline]
    fn find(&self, hash: u64, key: &SliceKey) -> Option<usize> {
        let mask = self.mask();
        let mut i = hash as usize & mask;
        loop {
            let b = self.buckets[i];
            match b.hash {
                0 => return None,
                h if h == hash && self.items[b.item as usize].as_ref().is_some_and(|(k, _)| k == key) => {
                    return Some(i)
                }
                _ => i = (i + 1) & mask,
            }
        }
    }

    /// Asks the CPU to start loading the home bucket of a key with hash `hash`, so that a lookup
    /// of it a little later finds the bucket in cache. Has no other effect.
    #[inline]
    pub fn prefetch(&self, hash: u64) {
        prefetch_read((&self.buckets[hash as usize & self.mask()] as *const Bucket).cast());
    }

    /// Asks the CPU to start loading item `id` (both cache lines it may span).
    #[inline]
    fn prefetch_id(&self, id: u32) {
        prefetch_item(&self.items, id);
    }

    /// The id of `key`'s item.
    pub fn id(&self, key: &SliceKey) -> Option<ItemId> {
        self.find(self.hash(key), key).map(|i| ItemId(self.buckets[i].item))
    }

    /// The value of `key`.
    pub fn get(&self, key: &SliceKey) -> Option<&V> {
        self.id(key).map(|id| self.value(id))
    }

    /// The value of `key`, to change.
    pub fn get_mut(&mut self, key: &SliceKey) -> Option<&mut V> {
        self.id(key).map(|id| self.item_mut(id).1)
    }

    /// Whether `key` is stored.
    pub fn contains_key(&self, key: &SliceKey) -> bool {
        self.find(self.hash(key), key).is_some()
    }

    /// The key of item `id`.
    ///
    /// # Panics
    /// When `id`'s key has been removed (a stale id is a bug in the caller).
    pub fn key(&self, id: ItemId) -> &SliceKey {
        &self.live(id).0
    }

    /// The value of item `id`. Panics as [`SliceTable::key`] does.
    pub fn value(&self, id: ItemId) -> &V {
        &self.live(id).1
    }

    /// The key and value of item `id`, the value to change. Panics as [`SliceTable::key`] does.
    pub fn item_mut(&mut self, id: ItemId) -> (&SliceKey, &mut V) {
        let (k, v) = self.items[id.0 as usize].as_mut().expect("an item id outlived its key");
        (k, v)
    }

    fn live(&self, id: ItemId) -> &(SliceKey, V) {
        self.items[id.0 as usize].as_ref().expect("an item id outlived its key")
    }

    /// Calls `each(i, id, value)` for `i` in `0..count`, in order, while the key of namespace
    /// `ns`, block hash and rank `key_at(i)` is stored and `each` returns true; returns how many
    /// calls returned true (the keys of `0..returned` were all stored and accepted). The buckets
    /// and items of the keys ahead are requested from memory before their turn, so the lookups'
    /// cache misses overlap instead of following one another.
    ///
    /// A batch shares one namespace, which is hashed once for the whole batch, and no key is
    /// built: each position's hash words are read where the caller keeps them.
    ///
    /// *Runs of ids.* Keys stored together usually hold items in arithmetic progression: a save
    /// inserts a prefix's keys in order, and ids come from the end of the item array (step 1),
    /// from the free list (often the reverse order of eviction) or interleaved with another
    /// writer's (a constant stride). Once [`RUN_AFTER`] steps between the items found had the
    /// same stride, each next key is first compared with the item one stride on, without hashing
    /// it or reading its bucket; the first key not there is probed as usual. A key is stored at
    /// most once, so an item holding it is its item whichever way it was found.
    pub fn get_prefix_mut(
        &mut self,
        ns: NamespaceId,
        count: usize,
        key_at: impl Fn(usize) -> (BlockHash, u16),
        mut each: impl FnMut(usize, ItemId, &mut V) -> bool,
    ) -> usize {
        // Borrowed apart, so that `each` changing an item cannot (to the compiler) change the
        // seeds or buckets, which then stay in registers; `buckets` is sliced to `mask + 1`, so
        // every `& mask` index is provably in bounds.
        let hasher = BatchHasher::new(&self.seeds, ns);
        let mask = self.mask();
        let buckets = &self.buckets[..=mask];
        let items = &mut self.items;
        let hash_at = |i: usize| {
            let (hash, rank) = key_at(i);
            hasher.hash(&hash, rank)
        };
        let holds = |item: &Option<(SliceKey, V)>, block: &BlockHash, rank: u16| {
            item.as_ref().is_some_and(|(k, _)| k.block.hash == *block && k.rank == rank && k.block.ns == ns)
        };
        // The last item found, the stride from the one before it, and how many strides in a row
        // were equal.
        let (mut last, mut stride, mut agreed) = (0i64, 0i64, 0usize);
        let mut i = 0;
        while i < count {
            if agreed >= RUN_AFTER {
                let guess = last + stride;
                let (block, rank) = key_at(i);
                if let Some(item) = usize::try_from(guess).ok().and_then(|g| items.get_mut(g)) {
                    if holds(item, &block, rank) {
                        if let Some((_, v)) = item.as_mut() {
                            if !each(i, ItemId(guess as u32), v) {
                                return i;
                            }
                        }
                        if let Ok(ahead) = u32::try_from(guess + RUN_PREFETCH_DISTANCE * stride) {
                            prefetch_item(items, ahead);
                        }
                        last = guess;
                        i += 1;
                        continue;
                    }
                }
                // Not one stride on: probe from here.
                agreed = 0;
            }
            // Probe keys from `from` on, hashes and buckets requested ahead, until a run starts.
            let from = i;
            // Hashes of the keys ahead, by `i % PREFETCH_DISTANCE`.
            let mut ahead = [0u64; PREFETCH_DISTANCE];
            for k in from..count.min(from + PREFETCH_DISTANCE) {
                let hash = hash_at(k);
                ahead[k % PREFETCH_DISTANCE] = hash;
                prefetch_read((&buckets[hash as usize & mask] as *const Bucket).cast());
            }
            while i < count {
                let hash = ahead[i % PREFETCH_DISTANCE];
                if i + PREFETCH_DISTANCE < count {
                    let h = hash_at(i + PREFETCH_DISTANCE);
                    ahead[i % PREFETCH_DISTANCE] = h;
                    prefetch_read((&buckets[h as usize & mask] as *const Bucket).cast());
                }
                if i + ITEM_PREFETCH_DISTANCE < count {
                    let h = ahead[(i + ITEM_PREFETCH_DISTANCE) % PREFETCH_DISTANCE];
                    let b = buckets[h as usize & mask];
                    if b.hash == h {
                        prefetch_item(items, b.item);
                    }
                }
                let (block, rank) = key_at(i);
                let mut j = hash as usize & mask;
                let (id, v) = loop {
                    let b = buckets[j];
                    if b.hash == hash {
                        if let Some(Some((k, v))) = items.get_mut(b.item as usize) {
                            if k.block.hash == block && k.rank == rank && k.block.ns == ns {
                                break (b.item, v);
                            }
                        }
                    } else if b.hash == 0 {
                        return i;
                    }
                    j = (j + 1) & mask;
                };
                if !each(i, ItemId(id), v) {
                    return i;
                }
                let step = i64::from(id) - last;
                (agreed, stride) = if i > 0 && step == stride { (agreed + 1, stride) } else { (0, step) };
                last = i64::from(id);
                i += 1;
                if agreed >= RUN_AFTER {
                    break;
                }
            }
        }
        count
    }

    /// Calls `each(&key, value)` for the item of every id in `ids`, in order (an id may repeat),
    /// with the items ahead already requested from memory. No hashing, no key comparison.
    ///
    /// # Panics
    /// When an id's key has been removed, as [`SliceTable::key`] does.
    pub fn for_ids_mut(&mut self, ids: &[ItemId], mut each: impl FnMut(&SliceKey, &mut V)) {
        for (i, id) in ids.iter().enumerate() {
            if let Some(ahead) = ids.get(i + PREFETCH_DISTANCE) {
                self.prefetch_id(ahead.0);
            }
            let (k, v) = self.item_mut(*id);
            each(k, v);
        }
    }

    /// Stores `value` under `key`; returns the key's item id and the value it replaces.
    ///
    /// # Panics
    /// When the table would hold more than `u32::MAX` keys (callers bound it far below).
    pub fn insert(&mut self, key: SliceKey, value: V) -> (ItemId, Option<V>) {
        let hash = self.hash(&key);
        if let Some(b) = self.find(hash, &key) {
            let id = self.buckets[b].item;
            let old = self.items[id as usize].replace((key, value)).map(|(_, v)| v);
            return (ItemId(id), old);
        }
        if 2 * (self.len + 1) > self.buckets.len() {
            self.grow();
        }
        let id = match self.free.pop() {
            Some(id) => {
                self.items[id as usize] = Some((key, value));
                id
            }
            None => {
                let id = u32::try_from(self.items.len()).expect("a slice table holds at most u32::MAX keys");
                if self.items.len() == self.items.capacity() {
                    self.grow_items();
                }
                self.items.push(Some((key, value)));
                id
            }
        };
        self.place(Bucket { hash, item: id });
        self.len += 1;
        (ItemId(id), None)
    }

    /// Puts a bucket whose key is absent into the first free bucket of its run.
    fn place(&mut self, bucket: Bucket) {
        let mask = self.mask();
        let mut i = bucket.hash as usize & mask;
        while self.buckets[i].hash != 0 {
            i = (i + 1) & mask;
        }
        self.buckets[i] = bucket;
    }

    /// Doubles the buckets and files every key again; items stay where they are.
    fn grow(&mut self) {
        let n = self.buckets.len() * 2;
        let old = std::mem::replace(&mut self.buckets, huge_vec(n));
        self.buckets.resize(n, Bucket::default());
        for b in old.into_iter().filter(|b| b.hash != 0) {
            self.place(b);
        }
    }

    /// Doubles the items' room, in a new array that asks for huge pages before it is written
    /// (a `Vec`'s own growth would copy into memory the hint then reaches too late).
    fn grow_items(&mut self) {
        let mut bigger = huge_vec((self.items.capacity() * 2).max(MIN_BUCKETS));
        bigger.append(&mut self.items);
        self.items = bigger;
    }

    /// Removes `key`; returns its value.
    pub fn remove(&mut self, key: &SliceKey) -> Option<V> {
        let b = self.find(self.hash(key), key)?;
        Some(self.remove_bucket(b).1)
    }

    /// Removes the key of item `id`; returns its key and value. Panics as [`SliceTable::key`]
    /// does.
    pub fn remove_id(&mut self, id: ItemId) -> (SliceKey, V) {
        let key = *self.key(id);
        let b = self.find(self.hash(&key), &key).expect("a stored key has a bucket");
        self.remove_bucket(b)
    }

    /// Empties bucket `hole` and frees its item.
    fn remove_bucket(&mut self, mut hole: usize) -> (SliceKey, V) {
        let mask = self.mask();
        let id = self.buckets[hole].item;
        let item = self.items[id as usize].take().expect("a used bucket points to a live item");
        self.free.push(id);
        self.buckets[hole] = Bucket::default();
        self.len -= 1;
        // Backward shift: a later bucket of the run moves into the hole unless its home lies
        // cyclically after the hole (then it is already as close to home as it can be).
        let mut j = (hole + 1) & mask;
        while self.buckets[j].hash != 0 {
            let home = self.buckets[j].hash as usize & mask;
            let dist_home = j.wrapping_sub(home) & mask;
            let dist_hole = j.wrapping_sub(hole) & mask;
            if dist_home >= dist_hole {
                self.buckets[hole] = std::mem::take(&mut self.buckets[j]);
                hole = j;
            }
            j = (j + 1) & mask;
        }
        item
    }

    /// Every key and value, in item order.
    pub fn iter(&self) -> impl Iterator<Item = (&SliceKey, &V)> {
        self.items.iter().filter_map(|item| item.as_ref().map(|(k, v)| (k, v)))
    }

    /// Every key, in item order.
    pub fn keys(&self) -> impl Iterator<Item = &SliceKey> {
        self.iter().map(|(k, _)| k)
    }

    /// Every value, in item order.
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

/// The hash a table with `seeds` files `key` under (never 0): three independent folded
/// multiplies of the key's words (block hash halves and namespace) and one to combine them.
#[inline(always)]
fn keyed_hash(seeds: &[u64; 8], key: &SliceKey) -> u64 {
    BatchHasher::new(seeds, key.block.ns).hash(&key.block.hash, key.rank)
}

/// [`keyed_hash`] for keys of one namespace: the namespace's multiply is done once.
#[derive(Clone, Copy)]
struct BatchHasher {
    seeds: [u64; 4],
    /// The namespace's part of the final multiply's first word.
    ns_part: u64,
    /// The seed of the final multiply's second word.
    tail_seed: u64,
}

impl BatchHasher {
    #[inline(always)]
    fn new(s: &[u64; 8], ns: NamespaceId) -> Self {
        let [n0, n1] = ns.words();
        Self { seeds: [s[0], s[1], s[2], s[3]], ns_part: fold(n0 ^ s[4], n1 ^ s[5]) ^ s[6], tail_seed: s[7] }
    }

    #[inline(always)]
    fn hash(&self, hash: &BlockHash, rank: u16) -> u64 {
        let s = &self.seeds;
        let [h0, h1, h2, h3] = hash.words();
        let tail = u64::from(hash.len_byte()) | u64::from(rank) << 8;
        let a = fold(h0 ^ s[0], h1 ^ s[1]);
        let b = fold(h2 ^ s[2], h3 ^ s[3]);
        fold(a ^ self.ns_part, b ^ tail ^ self.tail_seed).max(1)
    }
}

/// An empty vector with room for `n` elements, whose memory is asked to be backed by huge pages
/// when it is large ([`huge_pages`]); called before anything is written to it.
fn huge_vec<T>(n: usize) -> Vec<T> {
    let v: Vec<T> = Vec::with_capacity(n);
    huge_pages::advise(v.as_ptr().cast(), n * size_of::<T>());
    v
}

/// Asks the CPU to start loading item `id` of `items` (both cache lines it may span).
#[inline(always)]
fn prefetch_item<T>(items: &[T], id: u32) {
    if let Some(item) = items.get(id as usize) {
        let at = (item as *const T).cast::<u8>();
        prefetch_read(at);
        prefetch_read(at.wrapping_add(size_of::<T>() - 1));
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
        let (a, old) = t.insert(slice(1, 1, 0), 10);
        assert_eq!(old, None);
        assert_eq!(t.insert(slice(1, 1, 1), 11).1, None, "another rank is another key");
        assert_eq!(t.insert(slice(1, 1, 0), 12), (a, Some(10)), "replaced in the same item");
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
                0 | 1 => assert_eq!(t.insert(key, step).1, model.insert(key, step)),
                2 => assert_eq!(t.remove(&key), model.remove(&key)),
                _ => assert_eq!(t.get(&key), model.get(&key)),
            }
            assert_eq!(t.len(), model.len());
            if step % 20_000 == 0 {
                for (k, v) in &model {
                    assert_eq!(t.get(k), Some(v));
                }
                assert_eq!(t.iter().count(), model.len());
                assert!(2 * t.len() <= t.buckets.len(), "load stays at most one half");
                assert_eq!(t.items.len(), t.len() + t.free.len(), "every item is live or free");
            }
        }
    }

    #[test]
    fn prefix_lookup_stops_at_the_first_absent_or_refused_key() {
        let mut t = SliceTable::new();
        for h in 0..1000 {
            if h != 700 {
                t.insert(slice(1, h, 0), h);
            }
        }
        let keys: Vec<_> = (0..1000).map(|h| slice(1, h, 0)).collect();
        let ids: HashMap<SliceKey, ItemId> = t.iter().map(|(k, _)| (*k, t.id(k).unwrap())).collect();
        let mut seen = Vec::new();
        let ns = keys[0].block.ns;
        let at = |i: usize| (keys[i].block.hash, keys[i].rank);
        let n = t.get_prefix_mut(ns, keys.len(), at, |i, id, v| {
            assert_eq!(id, ids[&keys[i]]);
            *v += 1;
            seen.push(i);
            true
        });
        assert_eq!((n, seen), (700, (0..700).collect::<Vec<_>>()), "stops at the absent key 700");
        assert_eq!((t[&slice(1, 10, 0)], t[&slice(1, 800, 0)]), (11, 800), "values changed in place, up to it");
        let n = t.get_prefix_mut(ns, keys.len(), at, |i, _, _| i < 5);
        assert_eq!(n, 5, "stops where `each` refuses");
        assert_eq!(t.get_prefix_mut(ns, 0, |_| unreachable!(), |_, _, _| panic!("no keys, no calls")), 0);
        let other = slice(2, 10, 0).block.ns;
        assert_eq!(t.get_prefix_mut(other, 1, at, |_, _, _| panic!("another namespace")), 0, "namespace compared");
        let rank1 = |_: usize| (keys[10].block.hash, 1);
        assert_eq!(t.get_prefix_mut(ns, 1, rank1, |_, _, _| panic!("another rank")), 0, "rank compared");
    }

    /// Prefix lookups whose keys' items lie in runs (step 1, reversed, strided by an interleaved
    /// writer) and out of them, with a key missing or refused mid-run, and a run that leads past
    /// a free item or onto another key: every call gets the key's own id, and the count stops
    /// where the model says.
    #[test]
    fn prefix_lookup_along_runs_of_ids() {
        let mut rng = SplitMix64::new(23);
        let mut t = SliceTable::new();
        // Family 1 in order (ids 0..400), then families 2 and 3 interleaved (stride 2).
        for h in 0..400 {
            t.insert(slice(1, h, 0), ());
        }
        for h in 0..300 {
            t.insert(slice(2, h, 0), ());
            t.insert(slice(3, h, 1), ());
        }
        // Family 1's keys 100..200 leave in order and come back: free ids are reused last
        // freed first, so those keys now run backwards.
        for h in 100..200 {
            t.remove(&slice(1, h, 0));
        }
        for h in 100..200 {
            t.insert(slice(1, h, 0), ());
        }
        // Holes: key 1/250 gone (its id free), 2/150 gone and its id reused by a stranger.
        t.remove(&slice(1, 250, 0));
        t.remove(&slice(2, 150, 0));
        t.insert(slice(9, 0, 0), ());
        // The ids as `id` finds them (the lookups change nothing here).
        let ids: HashMap<SliceKey, ItemId> = t.keys().map(|k| (*k, t.id(k).unwrap())).collect();
        assert_eq!(ids[&slice(1, 101, 0)], ItemId(ids[&slice(1, 100, 0)].0 - 1), "a backward run");
        for round in 0..2_000 {
            let fam = 1 + (rng.next_u64() % 3) as u8;
            let rank = u16::from(fam == 3);
            let top = if fam == 1 { 400 } else { 300 };
            let a = rng.next_u64() % top;
            let b = a + rng.next_u64() % (top - a) + 1;
            let mut keys: Vec<SliceKey> = (a..b).map(|h| slice(fam, h, rank)).collect();
            if round % 5 == 0 {
                // Out of order: no runs.
                for k in (1..keys.len()).rev() {
                    keys.swap(k, (rng.next_u64() % (k as u64 + 1)) as usize);
                }
            }
            let refuse = if round % 7 == 0 { rng.next_u64() as usize % keys.len() } else { usize::MAX };
            let expect = keys.iter().position(|k| !t.contains_key(k)).unwrap_or(keys.len()).min(refuse);
            let ns = keys[0].block.ns;
            let mut calls = 0;
            let n = t.get_prefix_mut(
                ns,
                keys.len(),
                |i| (keys[i].block.hash, keys[i].rank),
                |i, id, _| {
                    assert_eq!((i, Some(id)), (calls, ids.get(&keys[i]).copied()), "round {round}");
                    calls += 1;
                    i != refuse
                },
            );
            assert_eq!(n, expect, "round {round}: {} keys from {a}", keys.len());
        }
    }

    /// An item id keeps naming its key while other keys come and go and the buckets grow, and a
    /// freed id is reused only for a new key.
    #[test]
    fn ids_are_stable_until_their_key_goes() {
        let mut rng = SplitMix64::new(11);
        let mut t = SliceTable::new();
        let mut ids: HashMap<SliceKey, ItemId> = HashMap::new();
        for step in 0..100_000u64 {
            let key = slice(1, rng.next_u64() % 5000, 0);
            if rng.next_u64() % 3 == 0 {
                if let Some(id) = ids.remove(&key) {
                    let value = *t.value(id);
                    assert_eq!(t.remove_id(id), (key, value));
                    assert_eq!(t.id(&key), None);
                }
            } else if let Some(&id) = ids.get(&key) {
                assert_eq!(t.insert(key, step).0, id);
            } else {
                let (id, old) = t.insert(key, step);
                assert_eq!(old, None);
                assert!(!ids.values().any(|&other| other == id), "a live id was handed out again");
                ids.insert(key, id);
            }
            if step % 10_000 == 0 {
                for (k, &id) in &ids {
                    assert_eq!((t.key(id), t.id(k)), (k, Some(id)));
                }
            }
        }
        // `for_ids_mut` reaches the same items, repeats included.
        let some: Vec<ItemId> = ids.values().copied().take(100).chain(ids.values().copied().take(3)).collect();
        let mut seen = Vec::new();
        t.for_ids_mut(&some, |k, v| {
            *v += 1;
            seen.push(*k);
        });
        assert_eq!(seen, some.iter().map(|&id| *t.key(id)).collect::<Vec<_>>());
    }
}
