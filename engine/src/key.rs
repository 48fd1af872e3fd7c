//! Block and slice keys.
//!
//! A block is named by its namespace and the hash the inference engine computed for it; each of
//! its slices (one per rank) is a separate entry of some shard's index. Keys are small `Copy`
//! values (no heap) so indexes and queues hold them inline.

use crate::limits::MAX_HASH_BYTES;
use crate::namespace::NamespaceId;
use crate::rng::{fold_mul, mix64};
use std::fmt;

/// A block hash as the inference engine computed it, 1 to [`MAX_HASH_BYTES`] bytes, stored inline.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(C)]
pub struct BlockHash {
    // Bytes past `len` are always zero, so derived equality and hashing see only the hash.
    bytes: [u8; MAX_HASH_BYTES],
    len: u8,
}

/// Why bytes are not a block hash.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Empty or longer than [`MAX_HASH_BYTES`].
    #[error("block hash of {len} bytes; send 1 to {MAX_HASH_BYTES} bytes (vLLM's SHA-256 block hashes are 32)")]
    HashLength {
        /// The length received.
        len: usize,
    },
    /// Packed hashes whose bytes are not a whole number of hashes.
    #[error("{bytes} packed bytes are not a whole number of {hash_bytes}-byte hashes; send count x hash_bytes bytes")]
    PackedLength {
        /// Bytes received.
        bytes: usize,
        /// The length each hash was said to have.
        hash_bytes: usize,
    },
}

impl BlockHash {
    /// The hash bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// How many bytes the hash has (1 to [`MAX_HASH_BYTES`]).
    #[inline]
    pub(crate) fn len_byte(&self) -> u8 {
        self.len
    }
}

impl TryFrom<&[u8]> for BlockHash {
    type Error = KeyError;

    fn try_from(b: &[u8]) -> Result<Self, KeyError> {
        if b.is_empty() || b.len() > MAX_HASH_BYTES {
            return Err(KeyError::HashLength { len: b.len() });
        }
        // A full-length hash (vLLM's SHA-256) is one fixed-size copy; shorter ones are padded.
        if let Ok(bytes) = <[u8; MAX_HASH_BYTES]>::try_from(b) {
            return Ok(Self { bytes, len: MAX_HASH_BYTES as u8 });
        }
        let mut bytes = [0u8; MAX_HASH_BYTES];
        bytes[..b.len()].copy_from_slice(b);
        Ok(Self { bytes, len: b.len() as u8 })
    }
}

impl BlockHash {
    /// The hash of `bytes`, which [`PackedKeys::new`] checked to be 1 to [`MAX_HASH_BYTES`]
    /// long (longer input is cut, which never happens there).
    #[inline(always)]
    fn from_checked(bytes: &[u8]) -> Self {
        if let Ok(full) = <[u8; MAX_HASH_BYTES]>::try_from(bytes) {
            return Self { bytes: full, len: MAX_HASH_BYTES as u8 };
        }
        let len = bytes.len().min(MAX_HASH_BYTES);
        let mut padded = [0u8; MAX_HASH_BYTES];
        padded[..len].copy_from_slice(&bytes[..len]);
        Self { bytes: padded, len: len as u8 }
    }
}

/// Block hashes of one length packed end to end, as a packed lookup carries them. A lookup
/// probes the index with keys read from here one at a time, instead of first building a list of
/// [`BlockHash`]es (which cost the H100 box about 5 us per 1,024 hashes), and a lease keeps the
/// hits as one copy of these bytes ([`crate::lease::LeaseHashes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedKeys<'a> {
    bytes: &'a [u8],
    hash_bytes: usize,
}

impl<'a> PackedKeys<'a> {
    /// `bytes` read as hashes of `hash_bytes` each; fails unless `hash_bytes` is 1 to
    /// [`MAX_HASH_BYTES`] and `bytes` holds a whole number of hashes.
    pub fn new(bytes: &'a [u8], hash_bytes: usize) -> Result<Self, KeyError> {
        if !(1..=MAX_HASH_BYTES).contains(&hash_bytes) {
            return Err(KeyError::HashLength { len: hash_bytes });
        }
        if bytes.len() % hash_bytes != 0 {
            return Err(KeyError::PackedLength { bytes: bytes.len(), hash_bytes });
        }
        Ok(Self { bytes, hash_bytes })
    }

    /// Hashes held.
    pub fn len(&self) -> usize {
        self.bytes.len() / self.hash_bytes
    }

    /// Whether no hash is held.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Bytes per hash.
    pub fn hash_bytes(&self) -> usize {
        self.hash_bytes
    }

    /// The packed bytes of the first `n` hashes (all of them when `n` is larger).
    pub fn prefix_bytes(&self, n: usize) -> &'a [u8] {
        &self.bytes[..n.min(self.len()) * self.hash_bytes]
    }

    /// Hash `i`.
    ///
    /// # Panics
    /// When `i` is not below [`PackedKeys::len`].
    #[inline(always)]
    pub fn get(&self, i: usize) -> BlockHash {
        BlockHash::from_checked(&self.bytes[i * self.hash_bytes..(i + 1) * self.hash_bytes])
    }

    /// Every hash, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = BlockHash> + 'a {
        self.bytes.chunks_exact(self.hash_bytes).map(BlockHash::from_checked)
    }
}

/// A full-length hash (vLLM's SHA-256): no check needed.
impl From<[u8; MAX_HASH_BYTES]> for BlockHash {
    fn from(bytes: [u8; MAX_HASH_BYTES]) -> Self {
        Self { bytes, len: MAX_HASH_BYTES as u8 }
    }
}

impl BlockHash {
    /// The stored bytes as four little-endian words (bytes past `len` are zero).
    #[inline]
    pub(crate) fn words(&self) -> [u64; 4] {
        let mut w = [0u64; 4];
        for (i, chunk) in self.bytes.chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            w[i] = u64::from_le_bytes(b);
        }
        w
    }
}

/// Hashes whole words rather than a byte slice: four word writes are several times cheaper than
/// the byte-slice path for these 32-byte keys, which every index and lease operation hashes.
impl std::hash::Hash for BlockHash {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        for w in self.words() {
            state.write_u64(w);
        }
        state.write_u8(self.len);
    }
}

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BlockHash(")?;
        self.as_bytes().iter().try_for_each(|b| write!(f, "{b:02x}"))?;
        f.write_str(")")
    }
}

/// A block: its namespace and its hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(C)]
pub struct BlockKey {
    /// The namespace the block's bytes belong to.
    pub ns: NamespaceId,
    /// The engine's hash of the block.
    pub hash: BlockHash,
}

/// Starting value of [`BlockKey::route_hash`]'s keys; part of the routing definition.
const ROUTE_SEED: u64 = 0x6b76_6c6f_6674_0001;

/// The words [`BlockKey::route_hash`] mixes in: the first eight splitmix64 outputs seeded with
/// `ROUTE_SEED`.
const ROUTE_KEYS: [u64; 8] = {
    let mut keys = [0u64; 8];
    let mut i = 0;
    while i < 8 {
        keys[i] = mix64(ROUTE_SEED.wrapping_add((i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)));
        i += 1;
    }
    keys
};

impl BlockKey {
    /// A 64-bit hash of the key for routing to a shard. With `K` = `ROUTE_KEYS`, `h0..h3` the
    /// little-endian words of the zero-padded hash, `n0, n1` those of the namespace id and
    /// `fold(a, b)` the 128-bit product `a * b` with its halves xored:
    /// `mix64(fold(fold(h0^K0, h1^K1) ^ fold(n0^K4, n1^K5) ^ K6, fold(h2^K2, h3^K3) ^ len ^ K7))`,
    /// where `len` is the hash's length and `mix64` the splitmix64 finalizer. The three inner
    /// products are independent, so they overlap in the CPU (this runs for every block of every
    /// request on a multi-shard server); the finalizer spreads short or patterned client hashes
    /// (counters in tests, truncated hashes) over the high bits jump hashing uses.
    /// Stable across processes and hosts: changing it moves every block to another shard, which
    /// costs a restart's worth of misses.
    #[inline]
    pub fn route_hash(&self) -> u64 {
        let k = &ROUTE_KEYS;
        let [n0, n1] = self.ns.words();
        let [h0, h1, h2, h3] = self.hash.words();
        let a = fold_mul(h0 ^ k[0], h1 ^ k[1]);
        let b = fold_mul(h2 ^ k[2], h3 ^ k[3]);
        let c = fold_mul(n0 ^ k[4], n1 ^ k[5]);
        mix64(fold_mul(a ^ c ^ k[6], b ^ u64::from(self.hash.len) ^ k[7]))
    }
}

/// One rank's slice of a block: the unit a shard's index stores.
///
/// `repr(C)` here and on [`BlockKey`] and [`BlockHash`]: the fields stay in declaration order,
/// so the namespace and hash words sit at 8-byte offsets. With Rust's own layout the rank came
/// first and every word the index's hash read straddled the stores that had just built the key,
/// which stalled on store forwarding (a third of the cost of probing an in-cache table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(C)]
pub struct SliceKey {
    /// The block.
    pub block: BlockKey,
    /// The rank (`pp_rank * tp_size + tp_rank`), below [`crate::limits::MAX_RANKS`].
    pub rank: u16,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashSet;

    /// A test key: namespace byte `ns`, hash = the 8 little-endian bytes of `h`, rank `rank`.
    pub(crate) fn slice(ns: u8, h: u64, rank: u16) -> SliceKey {
        let hash = BlockHash::try_from(&h.to_le_bytes()[..]).unwrap();
        SliceKey { block: BlockKey { ns: NamespaceId([ns; 16]), hash }, rank }
    }

    #[test]
    fn hash_length_is_checked() {
        assert_eq!(BlockHash::try_from(&[][..]), Err(KeyError::HashLength { len: 0 }));
        let e = BlockHash::try_from(&[0u8; 33][..]).unwrap_err();
        assert_eq!(e, KeyError::HashLength { len: 33 });
        assert!(e.to_string().contains("33 bytes"));
        for len in [1, 8, 32] {
            let b: Vec<u8> = (1..=len as u8).collect();
            let h = BlockHash::try_from(&b[..]).unwrap();
            assert_eq!(h.as_bytes(), &b[..]);
        }
    }

    /// A short hash is not equal to its zero-padded longer form.
    #[test]
    fn length_is_part_of_identity() {
        let a = BlockHash::try_from(&[1u8, 2][..]).unwrap();
        let packed = [1u8, 2, 3, 4, 5, 6];
        let keys = PackedKeys::new(&packed, 2).unwrap();
        assert_eq!((keys.len(), keys.hash_bytes(), keys.is_empty()), (3, 2, false));
        assert_eq!(keys.get(0), a);
        assert_eq!(keys.iter().map(|h| h.as_bytes().to_vec()).collect::<Vec<_>>(), [[1, 2], [3, 4], [5, 6]]);
        assert_eq!(keys.prefix_bytes(2), &packed[..4]);
        assert_eq!(keys.prefix_bytes(9), &packed[..]);
        let full = [7u8; 64];
        assert_eq!(PackedKeys::new(&full, 32).unwrap().get(1), BlockHash::from([7u8; 32]));
        assert_eq!(PackedKeys::new(&packed, 4), Err(KeyError::PackedLength { bytes: 6, hash_bytes: 4 }));
        assert_eq!(PackedKeys::new(&packed, 0), Err(KeyError::HashLength { len: 0 }));
        assert_eq!(PackedKeys::new(&full, 64), Err(KeyError::HashLength { len: 64 }));
        assert!(PackedKeys::new(&[], 32).unwrap().is_empty());
        let b = BlockHash::try_from(&[1u8, 2, 0][..]).unwrap();
        assert_ne!(a, b);
        assert_eq!(format!("{a:?}"), "BlockHash(0102)");
    }

    /// Pins the routing function: a change moves every stored block to another shard.
    #[test]
    fn route_hash_is_stable() {
        let k = slice(7, 42, 0).block;
        assert_eq!(k.route_hash(), ROUTE_GOLDEN);
    }

    /// Computed independently (Python) from the documented definition.
    const ROUTE_GOLDEN: u64 = 0xeb56_16fa_3737_1806;

    /// Counter-valued hashes (the worst case for FNV alone) spread evenly over the top bits.
    #[test]
    fn route_hash_spreads_low_entropy_keys() {
        let buckets = 16usize;
        let mut counts = vec![0u32; buckets];
        let n = 32_000u64;
        for i in 0..n {
            counts[(slice(1, i, 0).block.route_hash() >> 60) as usize] += 1;
        }
        let expect = (n / buckets as u64) as f64;
        for c in counts {
            assert!((f64::from(c) - expect).abs() / expect < 0.06, "bucket of {c}, expected {expect}");
        }
        let distinct: HashSet<u64> = (0..n).map(|i| slice(1, i, 0).block.route_hash()).collect();
        assert_eq!(distinct.len(), n as usize);
        assert_ne!(slice(1, 5, 0).block.route_hash(), slice(2, 5, 0).block.route_hash(), "namespace counts");
    }
}
