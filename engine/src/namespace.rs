//! Namespace ids: the fingerprint of everything that changes the bytes of a block.
//!
//! The id is the first 16 bytes of SHA-256 over a canonical encoding of the [`NamespaceSpec`]:
//! the tag `kvloft-ns-v1`, then every field in a fixed order, each prefixed by its length as a
//! little-endian `u32` (strings as UTF-8, integers as 4 little-endian bytes), then the `variant`
//! string the same way when it is not empty. The id is therefore
//! the same in every process, on every host and after every restart, and it is part of every
//! stored block's key: **changing this encoding (or the tag) orphans every block already stored**
//! in pools, on SSD and at peers. A new encoding must take a new tag.

use crate::limits::{MAX_NAMESPACE_STR_BYTES, MAX_RANKS};
use crate::protocol::NamespaceSpec;
use sha2::{Digest, Sha256};
use std::fmt;

/// The tag that starts the hashed encoding; its version is bumped with any change of encoding.
const ENCODING_TAG: &[u8] = b"kvloft-ns-v1";

/// Attention layouts a namespace may declare, as on the wire.
pub const LAYOUTS: [&str; 4] = ["nhd", "hnd", "mla", "cross_layer"];

/// A namespace's 128-bit id. Equal ids mean equal specs (up to a SHA-256 collision).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct NamespaceId(pub [u8; 16]);

/// Two word writes instead of the byte-slice path: every index operation hashes this.
impl std::hash::Hash for NamespaceId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let [lo, hi] = self.words();
        state.write_u64(lo);
        state.write_u64(hi);
    }
}

/// Why a namespace spec was refused; each names the field and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NamespaceError {
    /// A required string is empty.
    #[error("namespace field `{field}` is empty; set it (for example from the engine's model config)")]
    Empty {
        /// The field.
        field: &'static str,
    },
    /// A string is longer than [`MAX_NAMESPACE_STR_BYTES`].
    #[error("namespace field `{field}` is {len} bytes long; shorten it to at most {max} bytes")]
    TooLong {
        /// The field.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// A count that must be at least 1 is 0.
    #[error("namespace field `{field}` is 0; it must be at least 1")]
    Zero {
        /// The field.
        field: &'static str,
    },
    /// `tp_size * pp_size` exceeds [`MAX_RANKS`].
    #[error(
        "tp_size {tp_size} x pp_size {pp_size} exceeds {max} ranks; kvloft serves at most {max} ranks per instance"
    )]
    TooManyRanks {
        /// Tensor-parallel size.
        tp_size: u32,
        /// Pipeline-parallel size.
        pp_size: u32,
        /// The bound.
        max: u32,
    },
    /// The layout is not one of [`LAYOUTS`].
    #[error("namespace layout `{found}` is unknown; use one of nhd, hnd, mla, cross_layer (lowercase)")]
    UnknownLayout {
        /// What was sent.
        found: String,
    },
}

impl NamespaceId {
    /// The id as two little-endian words, for hashing.
    #[inline]
    pub fn words(&self) -> [u64; 2] {
        let mut lo = [0u8; 8];
        let mut hi = [0u8; 8];
        lo.copy_from_slice(&self.0[..8]);
        hi.copy_from_slice(&self.0[8..]);
        [u64::from_le_bytes(lo), u64::from_le_bytes(hi)]
    }

    /// Validates `spec` and computes its id (see the module doc for the encoding; a non-empty
    /// `variant` is appended last).
    pub fn of(spec: &NamespaceSpec) -> Result<Self, NamespaceError> {
        validate(spec)?;
        let mut h = Sha256::new();
        h.update(ENCODING_TAG);
        // Fixed order; appending a field would change every id, so it needs a new tag.
        for s in [&spec.model, &spec.dtype, &spec.kv_dtype] {
            put(&mut h, s.as_bytes());
        }
        for n in [spec.num_layers, spec.num_kv_heads, spec.head_size, spec.block_size] {
            put(&mut h, &n.to_le_bytes());
        }
        put(&mut h, spec.layout.as_bytes());
        for n in [spec.tp_size, spec.pp_size, spec.group] {
            put(&mut h, &n.to_le_bytes());
        }
        // Added after v1 shipped: hashed only when set, so every id without a variant is unchanged.
        if !spec.variant.is_empty() {
            put(&mut h, spec.variant.as_bytes());
        }
        let digest = h.finalize();
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest[..16]);
        Ok(Self(id))
    }

    /// The id as 32 lowercase hex digits, as sent in `register_instance`'s reply.
    pub fn to_hex(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for NamespaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for NamespaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NamespaceId({self})")
    }
}

/// Slices per block of `spec`: one per rank, `tp_size * pp_size`. Meaningful for a spec that
/// [`NamespaceId::of`] accepted (at most [`MAX_RANKS`]); saturates otherwise.
pub fn slices_per_block(spec: &NamespaceSpec) -> u32 {
    spec.tp_size.saturating_mul(spec.pp_size)
}

/// Appends one length-prefixed field, so no two field sequences encode to the same bytes.
fn put(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u32).to_le_bytes());
    h.update(bytes);
}

/// Checks every field before hashing, so a typo is an error rather than a silent new namespace
/// with no hits.
fn validate(spec: &NamespaceSpec) -> Result<(), NamespaceError> {
    for (field, s) in
        [("model", &spec.model), ("dtype", &spec.dtype), ("kv_dtype", &spec.kv_dtype), ("layout", &spec.layout)]
    {
        if s.is_empty() {
            return Err(NamespaceError::Empty { field });
        }
        if s.len() > MAX_NAMESPACE_STR_BYTES {
            return Err(NamespaceError::TooLong { field, len: s.len(), max: MAX_NAMESPACE_STR_BYTES });
        }
    }
    let counts = [
        ("num_layers", spec.num_layers),
        ("num_kv_heads", spec.num_kv_heads),
        ("head_size", spec.head_size),
        ("block_size", spec.block_size),
        ("tp_size", spec.tp_size),
        ("pp_size", spec.pp_size),
    ];
    if let Some((field, _)) = counts.iter().find(|(_, n)| *n == 0) {
        return Err(NamespaceError::Zero { field });
    }
    if u64::from(spec.tp_size) * u64::from(spec.pp_size) > u64::from(MAX_RANKS) {
        return Err(NamespaceError::TooManyRanks { tp_size: spec.tp_size, pp_size: spec.pp_size, max: MAX_RANKS });
    }
    if !LAYOUTS.contains(&spec.layout.as_str()) {
        return Err(NamespaceError::UnknownLayout { found: spec.layout.clone() });
    }
    if spec.variant.len() > MAX_NAMESPACE_STR_BYTES {
        return Err(NamespaceError::TooLong {
            field: "variant",
            len: spec.variant.len(),
            max: MAX_NAMESPACE_STR_BYTES,
        });
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An edit of a spec, for table-driven tests.
    type Change = fn(&mut NamespaceSpec);

    /// A valid spec (Llama-3-8B-like, TP 2).
    pub(crate) fn spec() -> NamespaceSpec {
        NamespaceSpec {
            model: "meta-llama/Llama-3.1-8B".into(),
            dtype: "bfloat16".into(),
            kv_dtype: "auto".into(),
            num_layers: 32,
            num_kv_heads: 8,
            head_size: 128,
            block_size: 16,
            layout: "nhd".into(),
            tp_size: 2,
            pp_size: 1,
            group: 0,
            variant: String::new(),
        }
    }

    /// Pins the encoding: if this fails, every stored block would be orphaned. Only change it
    /// together with a new encoding tag.
    #[test]
    fn id_is_stable() {
        let id = NamespaceId::of(&spec()).unwrap();
        assert_eq!(id.to_hex(), GOLDEN_ID);
        assert_eq!(id.to_hex().len(), 32);
        assert_eq!(format!("{id:?}"), format!("NamespaceId({GOLDEN_ID})"));
    }

    /// Computed independently (Python hashlib over the documented encoding).
    const GOLDEN_ID: &str = "0f557f28522c95c7db800f638343d249";

    #[test]
    fn every_field_changes_the_id() {
        let base = NamespaceId::of(&spec()).unwrap();
        let variants: Vec<Change> = vec![
            |s| s.model.push('x'),
            |s| s.dtype = "float16".into(),
            |s| s.kv_dtype = "fp8_e4m3".into(),
            |s| s.num_layers += 1,
            |s| s.num_kv_heads += 1,
            |s| s.head_size += 1,
            |s| s.block_size += 1,
            |s| s.layout = "hnd".into(),
            |s| s.tp_size += 1,
            |s| s.pp_size += 1,
            |s| s.group += 1,
            |s| s.variant = "vllm:LBHNC".into(),
        ];
        let mut seen = std::collections::BTreeSet::from([base]);
        for change in variants {
            let mut s = spec();
            change(&mut s);
            assert!(seen.insert(NamespaceId::of(&s).unwrap()), "{s:?} collides");
        }
    }

    /// Length prefixes keep moved bytes between adjacent strings from colliding.
    #[test]
    fn field_boundaries_matter() {
        let mut a = spec();
        let mut b = spec();
        a.model = "ab".into();
        a.dtype = "c".into();
        b.model = "a".into();
        b.dtype = "bc".into();
        assert_ne!(NamespaceId::of(&a).unwrap(), NamespaceId::of(&b).unwrap());
    }

    #[test]
    fn invalid_specs_name_the_field() {
        let cases: Vec<(Change, NamespaceError)> = vec![
            (|s| s.model.clear(), NamespaceError::Empty { field: "model" }),
            (|s| s.dtype.clear(), NamespaceError::Empty { field: "dtype" }),
            (|s| s.kv_dtype.clear(), NamespaceError::Empty { field: "kv_dtype" }),
            (|s| s.model = "m".repeat(257), NamespaceError::TooLong { field: "model", len: 257, max: 256 }),
            (|s| s.num_layers = 0, NamespaceError::Zero { field: "num_layers" }),
            (|s| s.num_kv_heads = 0, NamespaceError::Zero { field: "num_kv_heads" }),
            (|s| s.head_size = 0, NamespaceError::Zero { field: "head_size" }),
            (|s| s.block_size = 0, NamespaceError::Zero { field: "block_size" }),
            (|s| s.tp_size = 0, NamespaceError::Zero { field: "tp_size" }),
            (|s| s.pp_size = 0, NamespaceError::Zero { field: "pp_size" }),
            (
                |s| (s.tp_size, s.pp_size) = (64, 32),
                NamespaceError::TooManyRanks { tp_size: 64, pp_size: 32, max: 1024 },
            ),
            (
                |s| (s.tp_size, s.pp_size) = (u32::MAX, u32::MAX),
                NamespaceError::TooManyRanks { tp_size: u32::MAX, pp_size: u32::MAX, max: 1024 },
            ),
            (|s| s.layout = "NHD".into(), NamespaceError::UnknownLayout { found: "NHD".into() }),
            (|s| s.variant = "v".repeat(257), NamespaceError::TooLong { field: "variant", len: 257, max: 256 }),
        ];
        for (change, want) in cases {
            let mut s = spec();
            change(&mut s);
            let e = NamespaceId::of(&s).unwrap_err();
            assert_eq!(e, want);
            let msg = e.to_string();
            if let NamespaceError::Empty { field } | NamespaceError::Zero { field } = want {
                assert!(msg.contains(field), "{msg}");
            }
        }
        let mut s = spec();
        (s.tp_size, s.pp_size) = (32, 32);
        s.model = "m".repeat(256);
        assert!(NamespaceId::of(&s).is_ok(), "bounds are inclusive");
        for layout in LAYOUTS {
            s.layout = layout.into();
            assert!(NamespaceId::of(&s).is_ok());
        }
    }

    #[test]
    fn slices_per_block_is_tp_times_pp() {
        let mut s = spec();
        (s.tp_size, s.pp_size) = (4, 2);
        assert_eq!(slices_per_block(&s), 8);
    }
}
