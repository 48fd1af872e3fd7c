//! Which shard owns a block: a pure function of the block's hash and the shard set.
//!
//! Ownership uses jump consistent hashing (Lamping and Veach, 2014): uniform over the candidate
//! shards, no table, and when a shard is added only about 1/n of the keys move. When the block
//! belongs to a TP rank whose GPU sits on a known NUMA node, the candidates are that node's
//! shards only, so the pool pages the GPU copies into are node-local.

use kvloft_topology::{NodeId, ShardSpec};
use std::collections::BTreeMap;

/// A shard's index in the topology's shard list.
pub type ShardId = usize;

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

/// The shard set, grouped by NUMA node, for routing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Router {
    all: Vec<ShardId>,
    by_node: BTreeMap<NodeId, Vec<ShardId>>,
}

impl Router {
    /// Builds the router for `shards` (shard id = position).
    pub fn new(shards: &[ShardSpec]) -> Self {
        let mut by_node: BTreeMap<NodeId, Vec<ShardId>> = BTreeMap::new();
        for (id, s) in shards.iter().enumerate() {
            by_node.entry(s.node).or_default().push(id);
        }
        Self { all: (0..shards.len()).collect(), by_node }
    }

    /// Number of shards.
    pub fn len(&self) -> usize {
        self.all.len()
    }

    /// Whether there are no shards.
    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    /// The owner of the block with hash `key_hash`. With `node`, the owner is one of that node's
    /// shards; a node that runs no shard (or `None`) falls back to every shard.
    ///
    /// # Panics
    /// When the router has no shard; a validated topology always has one.
    pub fn route(&self, key_hash: u64, node: Option<NodeId>) -> ShardId {
        let candidates = node.and_then(|n| self.by_node.get(&n)).unwrap_or(&self.all);
        candidates[jump_hash(key_hash, candidates.len())]
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
