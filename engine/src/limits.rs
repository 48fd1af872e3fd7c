//! Every bound of the engine's state, in one place. Wire-level bounds (frame size, batch size,
//! hash length) are defined with the protocol and re-exported here so this page lists them all.

pub use crate::protocol::{MAX_BATCH_BLOCKS, MAX_FRAME_BYTES, MAX_HASH_BYTES, MAX_LAYERS};

/// Most ranks (`tp_size * pp_size`) one namespace may have: a lease keeps per-rank load state and
/// a block is sealed per rank, so this bounds both. 1024 is far beyond any deployed TP x PP.
pub const MAX_RANKS: u32 = 1024;

/// Longest string field of a namespace (model, dtypes, layout), in bytes. Model paths with a
/// revision fit; anything longer is a mistake, and the bound keeps registrations small.
pub const MAX_NAMESPACE_STR_BYTES: usize = 256;

/// A lease lives at most this long after `lookup` unless loaded or released first. Long enough
/// for a scheduled request to reach its load, short enough that a vanished client's pins are
/// soon returned to eviction.
pub const DEFAULT_LEASE_TTL_MS: u64 = 60_000;

/// A lease's pins outlive the lease by this long on the shards that own its slices. A load may
/// begin until the lease expires, and a GPU load's copy reads the pinned slots after it began,
/// from another shard than theirs: the pins must not lapse under it. A load whose copy finishes
/// later than this after the lease's expiry is failed (the engine recomputes), since its slots
/// may have been reused.
pub const PIN_GRACE_MS: u64 = 10_000;

/// Most leases one shard tracks: leases recorded at their home shard ([`crate::lease::LeaseTable`])
/// and leases holding pins on an owner shard ([`crate::index::ShardIndex`]). One lease per
/// in-flight request; 16 Ki is far above any engine's concurrent batch.
pub const MAX_LEASES_PER_SHARD: usize = 16_384;

/// Most (lease, slice) pin records one shard keeps over all its leases. A pin record costs about
/// 64 bytes, so the bound caps pin bookkeeping near 128 MiB per shard. A pin refused at the bound
/// is reported as a miss, which only costs recomputation.
pub const MAX_PINS_PER_SHARD: usize = 1 << 21;

/// Most leases one `expire` call drops, so a burst of expiries cannot stall the shard's executor;
/// the caller runs `expire` again while `next_expiry_ms` is due.
pub const EXPIRE_BATCH_LEASES: usize = 256;

/// Alignment and rounding unit of pool slots, in bytes: O_DIRECT writes and DMA need 4 KiB
/// alignment of both address and length.
pub const SLOT_ALIGN_BYTES: u64 = 4096;

/// The pool arena is cut into chunks of this size, each serving one slot size. 2 MiB is one huge
/// page, so a chunk never straddles two.
pub const CHUNK_BYTES: u64 = 2 << 20;

/// Target share of the small (probationary) FIFO of S3-FIFO, in percent of resident slices, as in
/// the S3-FIFO paper (Yang et al., SOSP 2023).
pub const SMALL_QUEUE_PERCENT: usize = 10;

/// Ghost queue length (keys of recently evicted slices, no data), in percent of the index's
/// `max_entries`. The paper sizes it like the main queue; 90% of entries does that.
pub const GHOST_PERCENT: usize = 90;

/// Largest access frequency S3-FIFO counts per slice (two bits).
pub const FREQ_MAX: u8 = 3;

// The slab keeps a 512-bit live map per chunk, so a chunk holds at most 512 slots.
const _: () = assert!(CHUNK_BYTES / SLOT_ALIGN_BYTES <= 512);
const _: () = assert!(CHUNK_BYTES % SLOT_ALIGN_BYTES == 0);
const _: () = assert!(MAX_RANKS <= u16::MAX as u32 + 1);
