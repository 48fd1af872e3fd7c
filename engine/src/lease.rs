//! Lease records, kept on the shard that created them (the lease's *home*).
//!
//! A `lookup` pins its hits on the shards that own them and records a [`Lease`] at its home shard;
//! each rank's `load` asks the home for the lease ([`LeaseTable::begin_load`]), copies its slices,
//! and reports back ([`LeaseTable::finish_load`]). When every rank has loaded, when the client
//! releases it, when it expires or when its instance goes away, the lease ends and the caller
//! drops its pins on the owner shards.
//!
//! Lease ids carry the home shard in their low 16 bits ([`lease_home`]), so any shard can forward
//! a `load` or `release` to the home without a shared table. The other 48 bits come from a
//! splitmix64 sequence seeded per shard and start: ids do not collide by accident and are not
//! guessable by counting, but they are not secrets (the sequence can be predicted from earlier
//! ids). Their job is to be unique and to name their home, not to authenticate: the socket is
//! local and every process allowed on it is trusted alike, and a lease is still checked against
//! the instance that created it ([`LeaseError::NotOwned`]).

use crate::key::{BlockHash, PackedKeys};
use crate::limits::{EXPIRE_BATCH_LEASES, MAX_BATCH_BLOCKS, MAX_RANKS};
use crate::namespace::NamespaceId;
use crate::protocol::ErrorCode;
use crate::rng::SplitMix64;
use std::collections::{BTreeMap, BTreeSet};

/// The home shard of lease `id`: its low 16 bits.
pub fn lease_home(id: u64) -> u16 {
    id as u16
}

/// A lease's hits, in prefix order: one copy of the bytes a packed lookup sent, or a list of
/// hashes (a lookup in list form, whose hashes may differ in length). Kept packed so that a
/// lookup's reply does not wait for a key to be built per hit; a `load` builds them
/// ([`LeaseHashes::to_vec`]), next to a copy of megabytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseHashes {
    /// Hashes of one length, end to end.
    Packed {
        /// The hashes' bytes.
        bytes: Vec<u8>,
        /// Bytes per hash (1 to [`crate::limits::MAX_HASH_BYTES`]).
        hash_bytes: usize,
    },
    /// Hashes one by one.
    List(Vec<BlockHash>),
}

impl LeaseHashes {
    /// The first `n` hashes of `keys`, copied.
    pub fn packed_prefix(keys: &PackedKeys<'_>, n: usize) -> Self {
        LeaseHashes::Packed { bytes: keys.prefix_bytes(n).to_vec(), hash_bytes: keys.hash_bytes() }
    }

    /// Hashes held.
    pub fn len(&self) -> usize {
        match self {
            LeaseHashes::Packed { bytes, hash_bytes } => bytes.len() / (*hash_bytes).max(1),
            LeaseHashes::List(list) => list.len(),
        }
    }

    /// Whether no hash is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The hashes as a list.
    pub fn to_vec(&self) -> Vec<BlockHash> {
        match self {
            LeaseHashes::Packed { bytes, hash_bytes } => match PackedKeys::new(bytes, *hash_bytes) {
                Ok(keys) => keys.iter().collect(),
                // Built only by `packed_prefix`, from keys already checked.
                Err(_) => Vec::new(),
            },
            LeaseHashes::List(list) => list.clone(),
        }
    }
}

impl From<Vec<BlockHash>> for LeaseHashes {
    fn from(list: Vec<BlockHash>) -> Self {
        LeaseHashes::List(list)
    }
}

/// Where one rank stands with a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RankLoad {
    /// Has not begun loading.
    Pending,
    /// Began loading; its copies may still read the pinned slices.
    Loading,
    /// Finished loading (successfully or not): the lease is consumed for this rank.
    Loaded,
}

/// One lease: the leading hits of a lookup, pinned for one instance until every rank loaded
/// them, the client released them, or `expires_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The id (never 0; home shard in the low 16 bits).
    pub id: u64,
    /// The instance that looked up, the only one allowed to load or release it.
    pub instance: String,
    /// The namespace of the hashes.
    pub ns: NamespaceId,
    /// The hits, in prefix order.
    pub hashes: LeaseHashes,
    /// Ranks that must load it: the namespace's slices per block.
    pub ranks: u32,
    /// Time (server milliseconds) at which the lease ends unless consumed first.
    pub expires_ms: u64,
    /// Pool offsets of the pinned slots, `ranks` per hit (hit-major), on each slice's owner
    /// shard; empty when the lookup did not record them.
    slots: Vec<u64>,
    loads: Vec<RankLoad>,
    loading: u32,
    loaded: u32,
    expired: bool,
}

impl Lease {
    /// A lease no rank has loaded yet.
    pub fn new(
        id: u64,
        instance: String,
        ns: NamespaceId,
        hashes: impl Into<LeaseHashes>,
        ranks: u32,
        expires_ms: u64,
    ) -> Self {
        let hashes = hashes.into();
        let loads = vec![RankLoad::Pending; ranks.min(MAX_RANKS) as usize];
        Self {
            id,
            instance,
            ns,
            hashes,
            ranks,
            expires_ms,
            slots: Vec::new(),
            loads,
            loading: 0,
            loaded: 0,
            expired: false,
        }
    }

    /// The lease with the pool offsets of its pinned slots: `ranks` per hit, hit-major, each on
    /// its slice's owner shard. Offsets of any other count are not kept.
    pub fn with_slots(mut self, slots: Vec<u64>) -> Self {
        if slots.len() == self.hashes.len() * self.ranks as usize {
            self.slots = slots;
        }
        self
    }

    /// The pool offsets of rank `rank`'s slots of the first `blocks` hits, when the lookup
    /// recorded them: a load can then read its slices without asking their owners where they are.
    pub fn rank_slots(&self, rank: u32, blocks: usize) -> Option<Vec<u64>> {
        let ranks = self.ranks as usize;
        if self.slots.is_empty() || rank as usize >= ranks || blocks > self.hashes.len() {
            return None;
        }
        Some(self.slots.iter().skip(rank as usize).step_by(ranks).take(blocks).copied().collect())
    }

    /// Where rank `rank` stands (`None` for a rank out of range).
    pub fn rank_load(&self, rank: u32) -> Option<RankLoad> {
        self.loads.get(rank as usize).copied()
    }

    /// Ranks that finished loading.
    pub fn loaded_ranks(&self) -> u32 {
        self.loaded
    }

    /// Ranks that began loading and have not finished: while non-zero, the lease's pins must
    /// stay, because copies may be reading the slices.
    pub fn loads_in_flight(&self) -> u32 {
        self.loading
    }
}

/// Why a lease operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LeaseError {
    /// The table holds its maximum of leases; the lookup's pins must be dropped and the request
    /// served as a miss.
    #[error("this shard holds {max} leases; release or load leases sooner, or retry the lookup later")]
    Full {
        /// The bound.
        max: usize,
    },
    /// The id is 0, in use, or not from this table's [`LeaseTable::next_id`]: a caller bug.
    #[error("lease id {id:#x} is in use or was not issued by this shard; take ids from next_id")]
    BadId {
        /// The id.
        id: u64,
    },
    /// More ranks or hashes than the bounds allow.
    #[error("lease of {hashes} hashes over {ranks} ranks is out of bounds (1 to {MAX_RANKS} ranks, at most {MAX_BATCH_BLOCKS} hashes); split the lookup")]
    BadShape {
        /// Ranks asked for.
        ranks: u32,
        /// Hashes in the lease.
        hashes: usize,
    },
    /// No such lease: it expired, was released or fully loaded. Look up again.
    #[error("lease {id:#x} does not exist (expired, released or fully loaded); look the blocks up again")]
    Unknown {
        /// The id.
        id: u64,
    },
    /// The lease belongs to another instance; use the lease from this instance's own lookup.
    #[error("lease {id:#x} belongs to another instance; load only leases from your own lookups")]
    NotOwned {
        /// The id.
        id: u64,
    },
    /// The rank is not below the namespace's slices per block.
    #[error("rank {rank} is out of range: the lease's namespace has {ranks} ranks; check register_memory's rank")]
    RankOutOfRange {
        /// The rank given.
        rank: u32,
        /// Ranks of the lease.
        ranks: u32,
    },
    /// This rank already began loading the lease; a lease is loaded once per rank. Look up again.
    #[error("rank {rank} already loaded lease {id:#x}; a lease is loaded once per rank, look up again")]
    AlreadyLoaded {
        /// The id.
        id: u64,
        /// The rank.
        rank: u32,
    },
}

impl LeaseError {
    /// The protocol error code to answer a client with.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Full { .. } | Self::BadShape { .. } => ErrorCode::TooLarge,
            Self::BadId { .. } => ErrorCode::Internal,
            Self::Unknown { .. } | Self::AlreadyLoaded { .. } => ErrorCode::UnknownLease,
            Self::NotOwned { .. } => ErrorCode::LeaseNotOwned,
            Self::RankOutOfRange { .. } => ErrorCode::Mismatch,
        }
    }
}

/// The leases whose home is one shard, bounded by `max_leases`.
#[derive(Debug)]
pub struct LeaseTable {
    max_leases: usize,
    home_shard: u16,
    ids: SplitMix64,
    // Ordered maps: every output (expiry, removal by instance) comes in a deterministic order.
    leases: BTreeMap<u64, Lease>,
    /// (expires_ms, id) of every lease not yet expired.
    expiry: BTreeSet<(u64, u64)>,
}

impl LeaseTable {
    /// An empty table for shard `home_shard`, holding at most `max_leases` (normally
    /// [`crate::limits::MAX_LEASES_PER_SHARD`]), with ids drawn from a sequence fixed by `seed`
    /// (the runtime seeds it per shard and start).
    pub fn new(max_leases: usize, seed: u64, home_shard: u16) -> Self {
        Self { max_leases, home_shard, ids: SplitMix64::new(seed), leases: BTreeMap::new(), expiry: BTreeSet::new() }
    }

    /// Leases held.
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    /// Whether no lease is held.
    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    /// A fresh id: never 0, never one a live lease holds, home shard in the low 16 bits. Taken
    /// before pinning, so the pins and the record carry the same id.
    pub fn next_id(&mut self) -> u64 {
        // The table holds at most max_leases of 2^48 values: a retry is rare and a second one
        // rarer still, so the loop ends after a few rounds.
        loop {
            let id = (self.ids.next_u64() << 16) | u64::from(self.home_shard);
            if id != 0 && !self.leases.contains_key(&id) {
                return id;
            }
        }
    }

    /// Records `lease`.
    pub fn insert(&mut self, lease: Lease) -> Result<(), LeaseError> {
        if lease.id == 0 || lease_home(lease.id) != self.home_shard || self.leases.contains_key(&lease.id) {
            return Err(LeaseError::BadId { id: lease.id });
        }
        if lease.ranks == 0 || lease.ranks > MAX_RANKS || lease.hashes.len() > MAX_BATCH_BLOCKS {
            return Err(LeaseError::BadShape { ranks: lease.ranks, hashes: lease.hashes.len() });
        }
        if self.leases.len() >= self.max_leases {
            return Err(LeaseError::Full { max: self.max_leases });
        }
        self.expiry.insert((lease.expires_ms, lease.id));
        self.leases.insert(lease.id, lease);
        Ok(())
    }

    /// The lease `id`, expired or not.
    pub fn get(&self, id: u64) -> Option<&Lease> {
        self.leases.get(&id)
    }

    /// Rank `rank` of `instance` starts loading lease `id` at `now_ms`; its slices are the
    /// lease's hashes. Each rank may begin once: a second `load` of the same lease by the same
    /// rank would read pins that the first one's completion may already have dropped.
    pub fn begin_load(&mut self, id: u64, instance: &str, rank: u32, now_ms: u64) -> Result<&Lease, LeaseError> {
        let lease = match self.leases.get_mut(&id) {
            Some(l) if !l.expired && now_ms < l.expires_ms => l,
            _ => return Err(LeaseError::Unknown { id }),
        };
        if lease.instance != instance {
            return Err(LeaseError::NotOwned { id });
        }
        let ranks = lease.ranks;
        let Some(state) = lease.loads.get_mut(rank as usize) else {
            return Err(LeaseError::RankOutOfRange { rank, ranks });
        };
        if *state != RankLoad::Pending {
            return Err(LeaseError::AlreadyLoaded { id, rank });
        }
        *state = RankLoad::Loading;
        lease.loading += 1;
        Ok(lease)
    }

    /// Rank `rank` finished loading lease `id` (whether its copies succeeded or not). Returns true
    /// when the lease is over and has been removed: every rank has loaded, or it expired while
    /// this was its last load in flight. The caller then drops the lease's pins everywhere.
    pub fn finish_load(&mut self, id: u64, rank: u32) -> bool {
        let Some(lease) = self.leases.get_mut(&id) else { return false };
        match lease.loads.get_mut(rank as usize) {
            Some(state @ RankLoad::Loading) => *state = RankLoad::Loaded,
            _ => return false,
        }
        lease.loading -= 1;
        lease.loaded += 1;
        let over = lease.loaded == lease.ranks || (lease.expired && lease.loading == 0);
        if over {
            self.remove(id);
        }
        over
    }

    /// Removes lease `id` (released, or its pins are being dropped). The caller drops its pins;
    /// a release while [`Lease::loads_in_flight`] is non-zero lets those copies read slices that
    /// may be evicted, so the runtime should refuse or defer it.
    pub fn remove(&mut self, id: u64) -> Option<Lease> {
        let lease = self.leases.remove(&id)?;
        self.expiry.remove(&(lease.expires_ms, id));
        Some(lease)
    }

    /// Ends up to [`EXPIRE_BATCH_LEASES`] leases whose time is up at `now_ms` and returns them;
    /// the caller drops their pins. A lease with loads in flight is marked expired instead (no
    /// new load may begin) and ends at its last [`LeaseTable::finish_load`], which returns true.
    pub fn expire(&mut self, now_ms: u64) -> Vec<Lease> {
        let mut out = Vec::new();
        for _ in 0..EXPIRE_BATCH_LEASES {
            let Some(&(at, id)) = self.expiry.first() else { break };
            if at > now_ms {
                break;
            }
            self.expiry.pop_first();
            let Some(lease) = self.leases.get_mut(&id) else { continue };
            if lease.loading > 0 {
                lease.expired = true;
            } else if let Some(lease) = self.leases.remove(&id) {
                out.push(lease);
            }
        }
        out
    }

    /// When the next lease expires, if any: the runtime's timer, and whether another
    /// [`LeaseTable::expire`] call is due at once.
    pub fn next_expiry_ms(&self) -> Option<u64> {
        self.expiry.first().map(|&(at, _)| at)
    }

    /// Removes and returns every lease of `instance` (its client went away), loads in flight or
    /// not: their destination is gone, so copies still reading the slices no longer matter.
    pub fn remove_instance(&mut self, instance: &str) -> Vec<Lease> {
        let ids: Vec<u64> = self.leases.values().filter(|l| l.instance == instance).map(|l| l.id).collect();
        ids.into_iter().filter_map(|id| self.remove(id)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn hashes(n: u64) -> Vec<BlockHash> {
        (0..n).map(|i| BlockHash::try_from(&i.to_le_bytes()[..]).unwrap()).collect()
    }

    #[test]
    fn packed_hashes_read_back_as_the_list() {
        let bytes: Vec<u8> = (0..5u64).flat_map(|i| i.to_le_bytes()).collect();
        let keys = PackedKeys::new(&bytes, 8).unwrap();
        let kept = LeaseHashes::packed_prefix(&keys, 3);
        assert_eq!((kept.len(), kept.is_empty()), (3, false));
        assert_eq!(kept.to_vec(), hashes(3));
        assert_eq!(LeaseHashes::packed_prefix(&keys, 0).to_vec(), vec![]);
        assert_eq!(LeaseHashes::from(hashes(2)).to_vec(), hashes(2));
    }

    #[test]
    fn recorded_slots_are_read_per_rank() {
        let ns = NamespaceId([1; 16]);
        // 3 hits x 2 ranks, hit-major: hit h, rank r at offset 100 * h + r.
        let slots = vec![0, 1, 100, 101, 200, 201];
        let l = Lease::new(9, "a".into(), ns, hashes(3), 2, 50).with_slots(slots);
        assert_eq!(l.rank_slots(0, 3), Some(vec![0, 100, 200]));
        assert_eq!(l.rank_slots(1, 2), Some(vec![1, 101]), "a load of a prefix of the hits");
        assert_eq!(l.rank_slots(2, 1), None, "rank out of range");
        assert_eq!(l.rank_slots(0, 4), None, "more blocks than hits");
        let short = Lease::new(9, "a".into(), ns, hashes(3), 2, 50).with_slots(vec![0, 1]);
        assert_eq!(short.rank_slots(0, 1), None, "offsets of the wrong count are not kept");
        assert_eq!(Lease::new(9, "a".into(), ns, hashes(3), 1, 50).rank_slots(0, 1), None, "none recorded");
    }

    fn lease(t: &mut LeaseTable, instance: &str, ranks: u32, expires_ms: u64) -> u64 {
        let id = t.next_id();
        t.insert(Lease::new(id, instance.into(), NamespaceId([1; 16]), hashes(3), ranks, expires_ms)).unwrap();
        id
    }

    #[test]
    fn ids_are_nonzero_unique_and_carry_the_home() {
        let mut t = LeaseTable::new(16, 99, 7);
        let mut seen = BTreeSet::new();
        for _ in 0..10_000 {
            let id = t.next_id();
            assert!(id != 0 && lease_home(id) == 7 && seen.insert(id));
        }
        // Same seed, same sequence; another seed, another one.
        let (mut a, mut b, mut c) = (LeaseTable::new(1, 5, 0), LeaseTable::new(1, 5, 0), LeaseTable::new(1, 6, 0));
        let (x, y, z) = (a.next_id(), b.next_id(), c.next_id());
        assert_eq!(x, y);
        assert_ne!(x, z);
        assert_eq!(lease_home(u64::MAX), u16::MAX);
    }

    #[test]
    fn insert_checks_ids_shape_and_bound() {
        let mut t = LeaseTable::new(2, 1, 3);
        let ns = NamespaceId([0; 16]);
        let id = lease(&mut t, "a", 2, 100);
        let dup = Lease::new(id, "a".into(), ns, hashes(1), 2, 100);
        assert_eq!(t.insert(dup), Err(LeaseError::BadId { id }));
        assert_eq!(t.insert(Lease::new(0, "a".into(), ns, hashes(1), 2, 100)), Err(LeaseError::BadId { id: 0 }));
        let foreign = (5 << 16) | 4;
        assert_eq!(
            t.insert(Lease::new(foreign, "a".into(), ns, hashes(1), 2, 9)),
            Err(LeaseError::BadId { id: foreign })
        );
        let zero_ranks = Lease::new(t.next_id(), "a".into(), ns, hashes(1), 0, 9);
        assert_eq!(t.insert(zero_ranks), Err(LeaseError::BadShape { ranks: 0, hashes: 1 }));
        let too_many = Lease::new(t.next_id(), "a".into(), ns, hashes(1), MAX_RANKS + 1, 9);
        assert!(matches!(t.insert(too_many), Err(LeaseError::BadShape { .. })));
        lease(&mut t, "a", 1, 100);
        let id = t.next_id();
        let e = t.insert(Lease::new(id, "a".into(), ns, hashes(1), 1, 100)).unwrap_err();
        assert_eq!(e, LeaseError::Full { max: 2 });
        assert_eq!(e.code(), ErrorCode::TooLarge);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn every_rank_loads_once_then_the_lease_ends() {
        let mut t = LeaseTable::new(8, 1, 0);
        let id = lease(&mut t, "eng", 2, 1_000);
        let got = t.begin_load(id, "eng", 1, 10).unwrap();
        assert_eq!((got.hashes.len(), got.loads_in_flight()), (3, 1));
        assert_eq!(t.begin_load(id, "eng", 1, 10).unwrap_err(), LeaseError::AlreadyLoaded { id, rank: 1 });
        assert!(!t.finish_load(id, 1), "rank 0 has not loaded");
        assert_eq!(t.get(id).unwrap().rank_load(1), Some(RankLoad::Loaded));
        assert!(!t.finish_load(id, 1), "finishing twice changes nothing");
        assert_eq!(t.begin_load(id, "eng", 1, 11).unwrap_err(), LeaseError::AlreadyLoaded { id, rank: 1 });
        assert!(!t.finish_load(id, 0), "rank 0 never began");
        t.begin_load(id, "eng", 0, 12).unwrap();
        assert!(t.finish_load(id, 0));
        assert!(t.get(id).is_none() && t.is_empty());
        assert_eq!(t.begin_load(id, "eng", 0, 13).unwrap_err(), LeaseError::Unknown { id });
    }

    #[test]
    fn load_errors_say_what_is_wrong() {
        let mut t = LeaseTable::new(8, 1, 0);
        let id = lease(&mut t, "eng", 2, 1_000);
        assert_eq!(t.begin_load(id, "other", 0, 0).unwrap_err(), LeaseError::NotOwned { id });
        assert_eq!(t.begin_load(id, "eng", 2, 0).unwrap_err(), LeaseError::RankOutOfRange { rank: 2, ranks: 2 });
        assert_eq!(t.begin_load(id + (1 << 16), "eng", 0, 0).unwrap_err().code(), ErrorCode::UnknownLease);
        assert_eq!(t.begin_load(id, "eng", 0, 1_000).unwrap_err(), LeaseError::Unknown { id }, "expired at 1000");
        assert_eq!(LeaseError::NotOwned { id }.code(), ErrorCode::LeaseNotOwned);
        assert!(LeaseError::Unknown { id }.to_string().contains("look the blocks up again"));
    }

    #[test]
    fn expiry_waits_for_loads_in_flight() {
        let mut t = LeaseTable::new(8, 1, 0);
        let quiet = lease(&mut t, "eng", 2, 100);
        let busy = lease(&mut t, "eng", 2, 100);
        let later = lease(&mut t, "eng", 2, 500);
        t.begin_load(busy, "eng", 0, 50).unwrap();
        assert_eq!(t.next_expiry_ms(), Some(100));
        assert!(t.expire(99).is_empty());
        let gone: Vec<u64> = t.expire(100).iter().map(|l| l.id).collect();
        assert_eq!(gone, vec![quiet]);
        // The busy lease admits no new load, and ends when its load in flight finishes.
        assert_eq!(t.begin_load(busy, "eng", 1, 60).unwrap_err(), LeaseError::Unknown { id: busy });
        assert_eq!(t.next_expiry_ms(), Some(500));
        assert!(t.finish_load(busy, 0));
        assert!(t.get(busy).is_none());
        assert_eq!(t.expire(10_000).len(), 1);
        assert!(t.get(later).is_none() && t.next_expiry_ms().is_none());
    }

    #[test]
    fn expire_does_bounded_work() {
        let mut t = LeaseTable::new(EXPIRE_BATCH_LEASES * 3, 1, 0);
        for _ in 0..EXPIRE_BATCH_LEASES * 2 + 5 {
            lease(&mut t, "eng", 1, 10);
        }
        assert_eq!(t.expire(10).len(), EXPIRE_BATCH_LEASES);
        assert_eq!(t.next_expiry_ms(), Some(10), "more are due");
        assert_eq!(t.expire(10).len(), EXPIRE_BATCH_LEASES);
        assert_eq!(t.expire(10).len(), 5);
        assert!(t.is_empty());
    }

    #[test]
    fn remove_instance_and_release() {
        let mut t = LeaseTable::new(8, 1, 0);
        let a1 = lease(&mut t, "a", 1, 100);
        let b = lease(&mut t, "b", 1, 100);
        let a2 = lease(&mut t, "a", 1, 100);
        t.begin_load(a2, "a", 0, 0).unwrap();
        let mut gone: Vec<u64> = t.remove_instance("a").iter().map(|l| l.id).collect();
        gone.sort_unstable();
        let mut want = vec![a1, a2];
        want.sort_unstable();
        assert_eq!(gone, want);
        assert!(!t.finish_load(a2, 0), "a removed lease cannot finish");
        assert_eq!(t.remove(b).map(|l| l.instance), Some("b".to_string()));
        assert!(t.remove(b).is_none());
        assert!(t.is_empty() && t.next_expiry_ms().is_none());
    }

    /// Random operations against a model: a map of live leases with per-rank states.
    #[test]
    fn randomized_against_a_model() {
        for seed in 0..6 {
            let mut rng = SplitMix64::new(seed);
            let mut t = LeaseTable::new(20, seed, 2);
            // id -> (instance, ranks, expires_ms, per-rank 0 pending / 1 loading / 2 loaded, expired)
            let mut model: BTreeMap<u64, (String, u32, u64, Vec<u8>, bool)> = BTreeMap::new();
            let mut ids: Vec<u64> = Vec::new();
            let mut now = 0u64;
            for _ in 0..5_000 {
                now += rng.below(5);
                let pick = |rng: &mut SplitMix64, ids: &[u64]| {
                    if ids.is_empty() || rng.below(10) == 0 {
                        rng.next_u64()
                    } else {
                        ids[rng.below(ids.len() as u64) as usize]
                    }
                };
                match rng.below(6) {
                    0 => {
                        let (inst, ranks, exp) =
                            (format!("i{}", rng.below(3)), 1 + rng.below(4) as u32, now + rng.below(200));
                        let id = t.next_id();
                        let r = t.insert(Lease::new(id, inst.clone(), NamespaceId([0; 16]), hashes(2), ranks, exp));
                        if model.len() >= 20 {
                            assert_eq!(r, Err(LeaseError::Full { max: 20 }));
                        } else {
                            r.unwrap();
                            model.insert(id, (inst, ranks, exp, vec![0; ranks as usize], false));
                            ids.push(id);
                        }
                    }
                    1 => {
                        let id = pick(&mut rng, &ids);
                        let inst = format!("i{}", rng.below(3));
                        let rank = rng.below(5) as u32;
                        let r = t.begin_load(id, &inst, rank, now).map(|l| l.id);
                        let want = match model.get_mut(&id) {
                            Some(m) if !m.4 && now < m.2 => {
                                if m.0 != inst {
                                    Err(LeaseError::NotOwned { id })
                                } else if rank >= m.1 {
                                    Err(LeaseError::RankOutOfRange { rank, ranks: m.1 })
                                } else if m.3[rank as usize] != 0 {
                                    Err(LeaseError::AlreadyLoaded { id, rank })
                                } else {
                                    m.3[rank as usize] = 1;
                                    Ok(id)
                                }
                            }
                            _ => Err(LeaseError::Unknown { id }),
                        };
                        assert_eq!(r, want);
                    }
                    2 => {
                        let id = pick(&mut rng, &ids);
                        let rank = rng.below(5) as u32;
                        let mut want = false;
                        if let Some(m) = model.get_mut(&id) {
                            if m.3.get(rank as usize) == Some(&1) {
                                m.3[rank as usize] = 2;
                                want = m.3.iter().all(|&s| s == 2) || (m.4 && !m.3.contains(&1));
                            }
                        }
                        if want {
                            model.remove(&id);
                        }
                        assert_eq!(t.finish_load(id, rank), want);
                    }
                    3 => {
                        let id = pick(&mut rng, &ids);
                        assert_eq!(t.remove(id).is_some(), model.remove(&id).is_some());
                    }
                    4 => {
                        let gone = t.expire(now);
                        for l in &gone {
                            let m = model.remove(&l.id).expect("expired lease was live");
                            assert!(m.2 <= now && !m.3.contains(&1));
                        }
                        for m in model.values_mut() {
                            if m.2 <= now && m.3.contains(&1) {
                                m.4 = true;
                            }
                        }
                        // Batches are far above this table's size: nothing due is left.
                        assert!(model.values().all(|m| m.2 > now || m.4));
                    }
                    _ => {
                        let inst = format!("i{}", rng.below(3));
                        let mut gone: Vec<u64> = t.remove_instance(&inst).iter().map(|l| l.id).collect();
                        let mut want: Vec<u64> = model.iter().filter(|(_, m)| m.0 == inst).map(|(&id, _)| id).collect();
                        model.retain(|_, m| m.0 != inst);
                        gone.sort_unstable();
                        want.sort_unstable();
                        assert_eq!(gone, want);
                    }
                }
                ids.retain(|id| model.contains_key(id));
                assert_eq!(t.len(), model.len());
            }
        }
    }
}
