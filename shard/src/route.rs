//! Which shard owns a block: a pure function of the block's hash and the shard set.
//!
//! Ownership uses jump consistent hashing (Lamping and Veach, 2014) over [`ROUTE_SLOTS`] fixed
//! *route slots*: a block's slot is the top bits of its route hash, and each slot is jump-hashed
//! to a shard once, when the router is built. The spread stays uniform (each shard gets
//! 65,536 / n slots, give or take a few percent) and adding a shard moves only about 1/n of the
//! slots, and so of the blocks, as plain jump hashing would; but routing a block is one load from
//! a 128 KiB table instead of a loop of floating-point divisions (about 20 ns per block with two
//! shards and 35 with eight on the H100 box, which a 1,024-hash lookup paid before any owner heard
//! of it). When the block belongs to a TP rank whose GPU sits on a known NUMA node, the candidates
//! are that node's shards only, so the pool pages the GPU copies into are node-local.

use kvloft_topology::{NodeId, ShardSpec};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A shard's index in the topology's shard list.
pub type ShardId = usize;

/// Route slots: a block's slot is the top [`ROUTE_SLOT_BITS`] bits of its route hash.
pub const ROUTE_SLOT_BITS: u32 = 16;
/// Number of route slots.
pub const ROUTE_SLOTS: usize = 1 << ROUTE_SLOT_BITS;

/// Jump consistent hash: maps `key` to a bucket in `0..buckets` (`buckets >= 1`).
pub fn jump_hash(mut key: u64, buckets: usize) -> usize {
    debug_assert!(buckets > 0);
    let (mut b, mut j): (i64, i64) = (-1, 0);
    while j < buckets as i64 {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as usize
}

/// The key a route slot is jump-hashed with: the splitmix64 finalizer of its number, so that
/// neighbouring slots are independent.
fn slot_key(slot: usize) -> u64 {
    kvloft_engine::rng::mix64(slot as u64)
}

/// Candidate shards and, per route slot, the position of the slot's owner among them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Candidates {
    shards: Vec<ShardId>,
    /// `ROUTE_SLOTS` positions in `shards`; shared by every candidate set of the same size.
    slots: Arc<[u16]>,
}

impl Candidates {
    fn route(&self, key_hash: u64) -> ShardId {
        let slot = (key_hash >> (64 - ROUTE_SLOT_BITS)) as usize;
        self.shards[usize::from(self.slots[slot])]
    }
}

/// The shard set, grouped by NUMA node, for routing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Router {
    all: Candidates,
    by_node: BTreeMap<NodeId, Candidates>,
}

impl Router {
    /// Builds the router for `shards` (shard id = position).
    ///
    /// # Panics
    /// With more than 65,536 shards (a topology has one per core).
    pub fn new(shards: &[ShardSpec]) -> Self {
        assert!(shards.len() <= usize::from(u16::MAX) + 1, "{} shards cannot be routed", shards.len());
        let mut by_node: BTreeMap<NodeId, Vec<ShardId>> = BTreeMap::new();
        for (id, s) in shards.iter().enumerate() {
            by_node.entry(s.node).or_default().push(id);
        }
        // One slot table per candidate count.
        let mut tables: BTreeMap<usize, Arc<[u16]>> = BTreeMap::new();
        let mut candidates = |shards: Vec<ShardId>| {
            let n = shards.len().max(1);
            let slots = tables
                .entry(n)
                .or_insert_with(|| (0..ROUTE_SLOTS).map(|slot| jump_hash(slot_key(slot), n) as u16).collect())
                .clone();
            Candidates { shards, slots }
        };
        let all = candidates((0..shards.len()).collect());
        let by_node = by_node.into_iter().map(|(node, ids)| (node, candidates(ids))).collect();
        Self { all, by_node }
    }

    /// Number of shards.
    pub fn len(&self) -> usize {
        self.all.shards.len()
    }

    /// Whether there are no shards.
    pub fn is_empty(&self) -> bool {
        self.all.shards.is_empty()
    }

    /// The owner of the block with hash `key_hash`: the owner of its route slot among the
    /// candidates. With `node`, the candidates are that node's shards; a node that runs no shard
    /// (or `None`) falls back to every shard.
    ///
    /// # Panics
    /// When the router has no shard; a validated topology always has one.
    #[inline]
    pub fn route(&self, key_hash: u64, node: Option<NodeId>) -> ShardId {
        node.and_then(|n| self.by_node.get(&n)).unwrap_or(&self.all).route(key_hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvloft_topology::placement::place;
    use kvloft_topology::synthetic;
    use std::collections::BTreeSet;

    /// splitmix64, to make well-spread test keys from a counter.
    fn mix(mut x: u64) -> u64 {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }

    #[test]
    fn spread_is_uniform() {
        let shards = place(&synthetic::two_socket_eight_gpu(), &BTreeSet::new()).specs();
        let r = Router::new(&shards);
        let n = 160_000u64;
        let mut counts = vec![0u64; r.len()];
        for i in 0..n {
            counts[r.route(mix(i), None)] += 1;
        }
        let expect = n / r.len() as u64;
        for (shard, c) in counts.iter().enumerate() {
            let dev = (*c as f64 - expect as f64).abs() / expect as f64;
            assert!(dev < 0.05, "shard {shard} got {c}, expected about {expect}");
        }
    }

    #[test]
    fn node_restriction_keeps_keys_on_the_node() {
        let shards = place(&synthetic::two_socket_eight_gpu(), &BTreeSet::new()).specs();
        let r = Router::new(&shards);
        let mut seen = BTreeSet::new();
        for i in 0..10_000 {
            let s = r.route(mix(i), Some(1));
            assert_eq!(shards[s].node, 1);
            seen.insert(s);
        }
        assert_eq!(seen.len(), 8, "every shard of node 1 gets keys");
        // A node without shards falls back to all of them.
        let uneven = place(&synthetic::uneven_numa(), &BTreeSet::new()).specs();
        let r = Router::new(&uneven);
        let all: BTreeSet<_> = (0..2000).map(|i| r.route(mix(i), Some(2))).collect();
        assert_eq!(all.len(), uneven.len());
    }

    #[test]
    fn a_slot_routes_as_jump_hashing_its_key() {
        let shards = place(&synthetic::two_socket_eight_gpu(), &BTreeSet::new()).specs();
        let r = Router::new(&shards);
        for i in 0..10_000u64 {
            let h = mix(i);
            let slot = (h >> (64 - ROUTE_SLOT_BITS)) as usize;
            assert_eq!(r.route(h, None), jump_hash(slot_key(slot), shards.len()));
        }
        // Growing the shard set moves about 1/n of the slots, all of them to the new shard.
        let specs = |n: usize| shards[..n].to_vec();
        let (ten, eleven) = (Router::new(&specs(10)), Router::new(&specs(11)));
        let moved: Vec<usize> = (0..ROUTE_SLOTS)
            .filter(|&slot| {
                let h = (slot as u64) << (64 - ROUTE_SLOT_BITS);
                ten.route(h, None) != eleven.route(h, None)
            })
            .collect();
        assert!((5_000..7_000).contains(&moved.len()), "{} slots moved", moved.len());
        assert!(moved.iter().all(|&slot| eleven.route((slot as u64) << (64 - ROUTE_SLOT_BITS), None) == 10));
    }

    #[test]
    fn routing_is_stable_and_moves_little_when_growing() {
        assert_eq!(jump_hash(0, 1), 0);
        let moved = (0..10_000u64).filter(|&i| jump_hash(mix(i), 10) != jump_hash(mix(i), 11)).count();
        // About 1/11 of the keys move to the new bucket, none between old buckets.
        assert!((700..1100).contains(&moved), "{moved} keys moved");
        for i in 0..10_000u64 {
            let (a, b) = (jump_hash(mix(i), 10), jump_hash(mix(i), 11));
            assert!(a == b || b == 10);
        }
    }
}
