//! The block store across shards: what a connection's shard asks owner shards to do, and what an
//! owner shard does with its own index, pool arena and leases.
//!
//! Ownership: the slice of block `k` for rank `r` belongs to shard `route(k.route_hash(), node)`,
//! where `node` is the NUMA node of rank `r`'s GPU (none for the host backend, so every slice of a
//! block lands on the same shard). A lease record lives on the shard that created it (its *home*,
//! written in the lease id); the pins it stands for live on the owners of the slices.
//!
//! Every owner-side handler is synchronous: it touches only its own shard's state, so nothing is
//! borrowed across an await and no lock exists.

use crate::gpu_path::Followup;
use crate::route::ShardId;
use crate::shard::{MeshMsg, ShardCtx};
use kvloft_engine::index::{FoundPrefix, Reserved};
use kvloft_engine::key::{BlockHash, BlockKey, PackedKeys, SliceKey};
use kvloft_engine::lease::{lease_home, Lease, LeaseError, LeaseHashes};
use kvloft_engine::limits::PIN_GRACE_MS;
use kvloft_engine::namespace::NamespaceId;
use kvloft_engine::protocol::ErrorCode;
use kvloft_engine::slab::Slot;
use kvloft_gpu::host::HostMemory;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;

/// A failed store operation: the code and message sent to the client.
#[derive(Debug)]
pub(crate) struct StoreError(pub ErrorCode, pub String);

/// What an owner found for a lookup: the request positions whose slices it had, all pinned,
/// and the pool offsets of their slots (same order; empty if they could not be read).
#[derive(Debug, Default)]
pub(crate) struct Probed {
    pub found: Vec<(u32, u16)>,
    pub slots: Vec<u64>,
}

/// What a lease's home answers a rank that begins loading it.
#[derive(Debug)]
pub(crate) struct BegunLoad {
    ns: NamespaceId,
    hashes: Vec<BlockHash>,
    /// The pool offsets of the rank's slots, if the lookup recorded them.
    slots: Option<Vec<u64>>,
    /// Until when (server milliseconds) the owners keep the lease's pins.
    pins_until_ms: u64,
}

/// A lookup's hashes, as the request carried them.
#[derive(Debug)]
pub(crate) enum LookupKeys<'a> {
    /// A list (each hash already a key).
    List(Vec<BlockHash>),
    /// Packed in the request's frame: a one-shard lookup probes them where they lie, and its
    /// lease keeps one copy of their bytes (decision 49).
    Packed(PackedKeys<'a>),
}

impl LookupKeys<'_> {
    fn len(&self) -> usize {
        match self {
            LookupKeys::List(list) => list.len(),
            LookupKeys::Packed(keys) => keys.len(),
        }
    }

    fn into_list(self) -> Vec<BlockHash> {
        match self {
            LookupKeys::List(list) => list,
            LookupKeys::Packed(keys) => keys.iter().collect(),
        }
    }
}

/// A lookup's answer: `hits` leading hits under `lease` (0 and 0 for none).
#[derive(Debug)]
pub(crate) struct LookupAnswer {
    pub hits: u32,
    pub lease: u64,
    /// Pins still to take: the caller answers the client first and then passes this to
    /// [`ShardCtx::pin_found`] with no await in between (see [`ShardIndex::find_prefix`]).
    ///
    /// [`ShardIndex::find_prefix`]: kvloft_engine::index::ShardIndex::find_prefix
    pub pending: Option<PendingPins>,
}

/// Slices a lookup found on this shard and answered with, not yet pinned.
#[derive(Debug)]
pub(crate) struct PendingPins {
    lease: u64,
    expires_ms: u64,
    found: FoundPrefix,
}

/// What an owner did with a batch of saves.
#[derive(Debug, Default, Clone)]
pub(crate) struct Saved {
    pub saved: u32,
    pub present: u32,
    pub failed: u32,
    pub error: Option<String>,
}

/// What an owner did with a batch of loads.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    pub loaded: u32,
    pub error: Option<String>,
}

/// A request to an owner shard.
#[derive(Debug)]
pub(crate) enum OwnerOp {
    /// Pin the sealed slices of namespace `ns` among `keys` (request position, block hash, rank)
    /// under `lease` until `expires_ms`, in order, up to the first miss; report which.
    Probe {
        lease: u64,
        expires_ms: u64,
        ns: NamespaceId,
        keys: Vec<(u32, BlockHash, u16)>,
        reply: flume::Sender<Probed>,
    },
    /// Keep the first `keep` pins of `lease` (the hits in the leading prefix) and drop the rest;
    /// `keep` 0 drops them all.
    Unpin { lease: u64, keep: usize },
    /// Copy these engine blocks of `mem` into new slices.
    Save { mem: Arc<HostMemory>, slice_bytes: u64, items: Vec<(SliceKey, u32)>, reply: flume::Sender<Saved> },
    /// Copy the slices pinned by `lease` into these engine blocks of `mem`, then unpin them.
    Load { mem: Arc<HostMemory>, lease: u64, items: Vec<(SliceKey, u32)>, reply: flume::Sender<Loaded> },
    /// GPU save, step 1: reserve slots for these slices and report their device addresses on
    /// `dev`; also set up to `stock` more slots aside for the saving shard (decision 54).
    GpuReserve {
        dev: Arc<kvloft_gpu::cuda::Device>,
        slice_bytes: u64,
        items: Vec<(SliceKey, u32)>,
        stock: usize,
        reply: flume::Sender<(ShardId, crate::gpu_path::GpuReserved)>,
    },
    /// A GPU save copied into slots this shard set aside for shard `saver` (`ok`), or its copy
    /// failed: file the slots under their keys, or free them; then set as many new slots aside
    /// for `saver`.
    GpuAdopt {
        dev: Arc<kvloft_gpu::cuda::Device>,
        slice_bytes: u64,
        items: Vec<(SliceKey, Slot)>,
        ok: bool,
        saver: ShardId,
    },
    /// Slots set aside for a shard that had enough of them: free them.
    Unstock { slots: Vec<Slot> },
    /// GPU save, step 2: the copy is done (`ok`) or failed: seal or abort the reserved slices.
    GpuFinish { keys: Vec<SliceKey>, ok: bool },
    /// GPU load, after the copy: drop `lease`'s pins of `rank`'s slices (a rank loads once).
    UnpinRank { lease: u64, rank: u16 },
    /// GPU load: the device addresses on `dev` of the slices `lease` pins (the pins stay until
    /// an `Unpin` after the copy).
    GpuResolve {
        dev: Arc<kvloft_gpu::cuda::Device>,
        lease: u64,
        items: Vec<(SliceKey, u32)>,
        reply: flume::Sender<(ShardId, crate::gpu_path::Resolved)>,
    },
}

/// Instances one home shard tracks at most.
pub(crate) const MAX_INSTANCES_PER_SHARD: usize = 4096;

/// A request to an instance's home shard: every connection of an instance must agree on its
/// namespace.
#[derive(Debug)]
pub(crate) enum InstanceOp {
    /// A connection registers `name` with namespace `ns`.
    Join { name: String, ns: NamespaceId, reply: flume::Sender<Result<(), StoreError>> },
    /// A connection of `name` closed.
    Leave { name: String },
}

/// A request to a lease's home shard.
#[derive(Debug)]
pub(crate) enum LeaseOp {
    /// Rank `rank` of `instance` starts loading the first `blocks` hits of lease `id`: answer its
    /// namespace and hashes. A request for more blocks than hits is refused before the rank's one
    /// load is used up.
    BeginLoad {
        id: u64,
        instance: String,
        rank: u32,
        blocks: usize,
        reply: flume::Sender<Result<BegunLoad, StoreError>>,
    },
    /// Rank `rank` finished loading lease `id`.
    FinishLoad { id: u64, rank: u32 },
    /// Give up lease `id` (`instance` None: the creating connection closed).
    Release { id: u64, instance: Option<String>, reply: Option<flume::Sender<Result<(), StoreError>>> },
}

impl ShardCtx {
    /// Milliseconds since the server started: the clock of leases and pins.
    pub fn now_ms(&self) -> u64 {
        self.shared.started.elapsed().as_millis() as u64
    }

    /// Handles a store operation addressed to this shard as owner.
    pub(crate) fn owner_op(self: &Rc<Self>, op: OwnerOp) {
        match op {
            OwnerOp::Probe { lease, expires_ms, ns, keys, reply } => {
                // Answer first, pin after: this handler is synchronous, so nothing can evict in
                // between, and the lookup's shard hears back without waiting for the pin records.
                let found = self.find_prefix(lease, ns, keys.len(), |i| (keys[i].1, keys[i].2));
                let slots = self.index.borrow().found_offsets(&found);
                let out = Probed { found: keys[..found.len()].iter().map(|k| (k.0, k.2)).collect(), slots };
                let _ = reply.try_send(out);
                self.pin_found(PendingPins { lease, expires_ms, found });
            }
            OwnerOp::Unpin { lease, keep } => {
                self.index.borrow_mut().truncate_pins(lease, keep);
            }
            OwnerOp::Save { mem, slice_bytes, items, reply } => {
                let _ = reply.try_send(self.save_slices(&mem, slice_bytes, items));
            }
            OwnerOp::Load { mem, lease, items, reply } => {
                let _ = reply.try_send(self.load_slices(&mem, lease, items));
            }
            OwnerOp::GpuReserve { dev, slice_bytes, items, stock, reply } => {
                let mut reserved = self.gpu_reserve(&dev, slice_bytes, items);
                reserved.stock = self.stock_slots(&dev, slice_bytes, stock);
                let _ = reply.try_send((self.id, reserved));
            }
            OwnerOp::GpuAdopt { dev, slice_bytes, items, ok, saver } => {
                self.gpu_adopt(&dev, slice_bytes, items, ok, saver);
            }
            OwnerOp::Unstock { slots } => {
                let mut index = self.index.borrow_mut();
                for slot in slots {
                    index.unstock(slot);
                }
            }
            OwnerOp::GpuFinish { keys, ok } => self.gpu_finish(keys, ok),
            OwnerOp::UnpinRank { lease, rank } => {
                self.index.borrow_mut().unpin_rank(lease, rank);
            }
            OwnerOp::GpuResolve { dev, lease, items, reply } => {
                let _ = reply.try_send((self.id, self.gpu_resolve(&dev, lease, items)));
            }
        }
    }

    /// Pins the sealed slices of `ns` named by `key_at(0..count)` (block hash, rank) under
    /// `lease`, in order, up to the first it cannot pin (the rest cannot be in the lookup's
    /// leading hits), calls `found(i, slot offset)` for each one pinned, and counts hits and
    /// misses (the slices not pinned); returns how many it pinned.
    fn probe(
        &self,
        lease: u64,
        expires_ms: u64,
        ns: NamespaceId,
        count: usize,
        key_at: impl Fn(usize) -> (BlockHash, u16),
        mut found: impl FnMut(usize, u64),
    ) -> usize {
        let hits = self.index.borrow_mut().pin_many(lease, expires_ms, ns, count, key_at, |i, s| found(i, s.offset));
        self.counters.hits.set(self.counters.hits.get() + hits as u64);
        self.counters.misses.set(self.counters.misses.get() + (count - hits) as u64);
        hits
    }

    /// Finds, without pinning, the leading sealed slices of `ns` named by `key_at(0..count)` for
    /// `lease` (see [`kvloft_engine::index::ShardIndex::find_prefix`]) and counts hits and misses.
    fn find_prefix(
        &self,
        lease: u64,
        ns: NamespaceId,
        count: usize,
        key_at: impl Fn(usize) -> (BlockHash, u16),
    ) -> FoundPrefix {
        let found = self.index.borrow_mut().find_prefix(lease, ns, count, key_at);
        self.counters.hits.set(self.counters.hits.get() + found.len() as u64);
        self.counters.misses.set(self.counters.misses.get() + (count - found.len()) as u64);
        found
    }

    /// Takes a lookup's pending pins. Must follow the lookup with no await in between, so that no
    /// eviction falls between finding the slices and pinning them; if one did, nothing is pinned
    /// and the lease's loads miss (the engine recomputes), which the warning below reports.
    pub(crate) fn pin_found(&self, pending: PendingPins) {
        let want = pending.found.len();
        let pinned = self.index.borrow_mut().pin_found(pending.lease, pending.expires_ms, pending.found);
        if pinned != want {
            eprintln!(
                "kvloft: shard {}: lease {:x}: {want} slices changed between lookup and pinning; its loads will miss",
                self.id, pending.lease
            );
        }
    }

    fn save_slices(&self, mem: &HostMemory, slice_bytes: u64, items: Vec<(SliceKey, u32)>) -> Saved {
        let mut out = Saved::default();
        let mut to_copy: Vec<(SliceKey, u32, u64)> = Vec::with_capacity(items.len());
        {
            let mut index = self.index.borrow_mut();
            for (key, block_id) in items {
                match index.reserve(key, slice_bytes) {
                    Ok(Reserved::Slot(slot)) => to_copy.push((key, block_id, slot.offset)),
                    Ok(Reserved::Present) => out.present += 1,
                    Err(e) => {
                        out.failed += 1;
                        out.error.get_or_insert_with(|| e.to_string());
                    }
                }
            }
        }
        if to_copy.is_empty() {
            return out;
        }
        let copies: Vec<(u32, u64)> = to_copy.iter().map(|(_, b, off)| (*b, *off)).collect();
        let result = mem.save_into(&mut self.arena.borrow_mut(), &copies);
        let mut index = self.index.borrow_mut();
        match result {
            Ok(()) => {
                for (key, _, _) in &to_copy {
                    index.seal(*key);
                }
                out.saved += to_copy.len() as u32;
                self.counters.saves.set(self.counters.saves.get() + to_copy.len() as u64);
            }
            Err(e) => {
                // A copy that failed may have written part of a slot: none of them is published.
                for (key, _, _) in &to_copy {
                    index.abort(*key);
                }
                out.failed += to_copy.len() as u32;
                out.error = Some(e.to_string());
            }
        }
        out
    }

    fn load_slices(&self, mem: &HostMemory, lease: u64, items: Vec<(SliceKey, u32)>) -> Loaded {
        let Some(rank) = items.first().map(|(key, _)| key.rank) else { return Loaded::default() };
        let keys: Vec<SliceKey> = items.iter().map(|(key, _)| *key).collect();
        // The lease pinned the slices at lookup; a slice no longer pinned has expired.
        let Some(slots) = self.index.borrow().pinned_slots(lease, &keys) else {
            return Loaded {
                loaded: 0,
                error: Some("a leased block is no longer held (the lease expired); recompute".into()),
            };
        };
        let copies: Vec<(u32, u64)> =
            items.iter().zip(&slots).map(|((_, block_id), slot)| (*block_id, slot.offset)).collect();
        let result = mem.load_from(&self.arena.borrow(), &copies);
        // A rank loads a lease once: none of its pins here is needed any more.
        self.index.borrow_mut().unpin_rank(lease, rank);
        match result {
            Ok(()) => {
                self.counters.loads.set(self.counters.loads.get() + copies.len() as u64);
                Loaded { loaded: copies.len() as u32, error: None }
            }
            Err(e) => Loaded { loaded: 0, error: Some(e.to_string()) },
        }
    }

    /// Handles an instance registration on this shard as the instance's home.
    pub(crate) fn instance_op(&self, op: InstanceOp) {
        let mut instances = self.instances.borrow_mut();
        match op {
            InstanceOp::Join { name, ns, reply } => {
                let full = instances.len() >= MAX_INSTANCES_PER_SHARD;
                let result = match instances.get_mut(&name) {
                    Some((known, _)) if *known != ns => Err(StoreError(
                        ErrorCode::Mismatch,
                        format!(
                            "instance {name:?} is registered with namespace {known} by another connection, not {ns}; \
                             every process of one engine must describe the same model and cache"
                        ),
                    )),
                    Some((_, connections)) => {
                        *connections += 1;
                        Ok(())
                    }
                    None if full => Err(StoreError(
                        ErrorCode::TooLarge,
                        format!("more than {MAX_INSTANCES_PER_SHARD} instances on one shard; close idle engines"),
                    )),
                    None => {
                        instances.insert(name, (ns, 1));
                        Ok(())
                    }
                };
                let _ = reply.try_send(result);
            }
            InstanceOp::Leave { name } => {
                if let Some((_, connections)) = instances.get_mut(&name) {
                    *connections -= 1;
                    if *connections == 0 {
                        instances.remove(&name);
                    }
                }
            }
        }
    }

    /// The home shard of instance `name`.
    pub(crate) fn instance_home(&self, name: &str) -> ShardId {
        // FNV-1a then a finaliser: stable, and spreads similar names.
        let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        self.router.route(kvloft_engine::rng::mix64(h), None)
    }

    /// Handles a lease operation on this shard as the lease's home.
    pub(crate) fn lease_op(self: &Rc<Self>, op: LeaseOp) {
        match op {
            LeaseOp::BeginLoad { id, instance, rank, blocks, reply } => {
                let now = self.now_ms();
                let mut leases = self.leases.borrow_mut();
                let hits = leases.get(id).filter(|l| l.instance == instance).map(|l| l.hashes.len());
                let answer = match hits {
                    Some(hits) if blocks > hits => Err(StoreError(
                        ErrorCode::BadRequest,
                        format!("{blocks} block ids for a lease of {hits} hits; send at most one per hit"),
                    )),
                    _ => match leases.begin_load(id, &instance, rank, now) {
                        Ok(lease) => Ok(BegunLoad {
                            ns: lease.ns,
                            hashes: lease.hashes.to_vec(),
                            slots: lease.rank_slots(rank, blocks),
                            pins_until_ms: lease.expires_ms + PIN_GRACE_MS,
                        }),
                        Err(e) => Err(lease_error(e)),
                    },
                };
                let _ = reply.try_send(answer);
            }
            LeaseOp::FinishLoad { id, rank } => {
                if self.leases.borrow_mut().finish_load(id, rank) {
                    // Every rank loaded (each load unpinned its slices): the lease is gone.
                    self.lease_owners.borrow_mut().remove(&id);
                }
            }
            LeaseOp::Release { id, instance, reply } => {
                let result = {
                    let mut leases = self.leases.borrow_mut();
                    match (leases.get(id), &instance) {
                        (None, _) => Err(StoreError(
                            ErrorCode::UnknownLease,
                            format!("lease {id:#x} does not exist (expired, released or fully loaded)"),
                        )),
                        (Some(l), Some(i)) if &l.instance != i => Err(StoreError(
                            ErrorCode::LeaseNotOwned,
                            format!("lease {id:#x} belongs to another instance"),
                        )),
                        _ => {
                            leases.remove(id);
                            Ok(())
                        }
                    }
                };
                if result.is_ok() {
                    self.broadcast_unpin(id);
                }
                if let Some(reply) = reply {
                    let _ = reply.try_send(result);
                }
            }
        }
    }

    /// Drops every pin of `lease` on the shards that hold some (all shards when this home does
    /// not know them): this shard's at once, the others' through the mesh.
    pub(crate) fn broadcast_unpin(self: &Rc<Self>, lease: u64) {
        let mut owners =
            self.lease_owners.borrow_mut().remove(&lease).unwrap_or_else(|| (0..self.shard_count()).collect());
        if let Some(i) = owners.iter().position(|&s| s == self.id) {
            owners.swap_remove(i);
            self.index.borrow_mut().unpin_lease(lease);
        }
        if owners.is_empty() {
            return;
        }
        let ctx = self.clone();
        glommio::spawn_local(async move {
            for shard in owners {
                ctx.tell(shard, MeshMsg::Owner(OwnerOp::Unpin { lease, keep: 0 })).await;
            }
        })
        .detach();
    }

    /// Expires leases and pins past their time; runs every second.
    pub(crate) fn expire(&self) {
        let now = self.now_ms();
        // Each call drops a bounded batch; repeat while more are due (the batch bound keeps one
        // call short, the loop keeps a burst of expiries from lingering past their time).
        let mut index = self.index.borrow_mut();
        while index.next_expiry_ms().is_some_and(|t| t <= now) {
            index.expire(now);
        }
        let mut leases = self.leases.borrow_mut();
        while leases.next_expiry_ms().is_some_and(|t| t <= now) {
            let expired = leases.expire(now);
            if expired.is_empty() {
                break; // due leases with loads in flight are held back until those finish
            }
            // Their pins expire on the owners at the same time; only the owner lists go here.
            let mut owners = self.lease_owners.borrow_mut();
            for lease in expired {
                owners.remove(&lease.id);
            }
        }
    }

    /// Number of shards.
    pub fn shard_count(&self) -> usize {
        self.shared.topology.shards.len()
    }

    /// Delivers `msg` to `shard` (this one included); a stopped shard drops it.
    pub(crate) async fn tell(self: &Rc<Self>, shard: ShardId, msg: MeshMsg) {
        if shard == self.id {
            self.handle(msg);
        } else {
            let _ = self.mesh.send_to(shard, msg).await;
        }
    }

    /// Sends an operation built around a reply channel and waits for the answer.
    pub(crate) async fn ask<T>(
        self: &Rc<Self>,
        shard: ShardId,
        make: impl FnOnce(flume::Sender<T>) -> MeshMsg,
    ) -> Result<T, StoreError> {
        let (tx, rx) = flume::bounded(1);
        self.tell(shard, make(tx)).await;
        rx.recv_async()
            .await
            .map_err(|_| StoreError(ErrorCode::ShuttingDown, format!("shard {shard} has stopped; retry later")))
    }

    /// The owner shard of `key`.
    pub(crate) fn owner(&self, key: &SliceKey) -> ShardId {
        self.block_owner(&key.block)
    }

    /// The owner shard of every slice of `block` (the host backend keeps a block on one shard).
    pub(crate) fn block_owner(&self, block: &BlockKey) -> ShardId {
        if self.router.len() == 1 {
            return 0; // one shard owns everything: no need to hash
        }
        self.router.route(block.route_hash(), None)
    }
}

fn lease_error(e: LeaseError) -> StoreError {
    let code = match e {
        LeaseError::NotOwned { .. } => ErrorCode::LeaseNotOwned,
        LeaseError::RankOutOfRange { .. } => ErrorCode::Mismatch,
        _ => ErrorCode::UnknownLease,
    };
    StoreError(code, e.to_string())
}

/// Sends one operation per owner shard and collects the answers. Every request is sent before
/// any answer is awaited, so the owners work at the same time; this shard's own share is handled
/// last, after the others have their messages.
pub(crate) async fn fan_out<I, T>(
    ctx: &Rc<ShardCtx>,
    groups: BTreeMap<ShardId, I>,
    make: impl Fn(I, flume::Sender<T>) -> MeshMsg,
) -> Vec<(ShardId, Result<T, StoreError>)> {
    let mut order: Vec<(ShardId, I)> = groups.into_iter().collect();
    order.sort_by_key(|(shard, _)| *shard == ctx.id);
    let mut pending = Vec::with_capacity(order.len());
    for (shard, items) in order {
        let (tx, rx) = flume::bounded(1);
        ctx.tell(shard, make(items, tx)).await;
        pending.push((shard, rx));
    }
    let mut out = Vec::with_capacity(pending.len());
    for (shard, rx) in pending {
        let answer = rx
            .recv_async()
            .await
            .map_err(|_| StoreError(ErrorCode::ShuttingDown, format!("shard {shard} has stopped; retry later")));
        out.push((shard, answer));
    }
    out
}

/// Groups `(position, key)` pairs by owner shard.
pub(crate) fn by_owner<T>(
    ctx: &ShardCtx,
    items: impl IntoIterator<Item = (SliceKey, T)>,
) -> BTreeMap<ShardId, Vec<(SliceKey, T)>> {
    // A vector per shard, not a map probe per key: this runs for every block of a request.
    let items = items.into_iter();
    let shards = ctx.shard_count().max(1);
    let guess = items.size_hint().0 / shards + items.size_hint().0 / (4 * shards) + 1;
    let mut per: Vec<Vec<(SliceKey, T)>> = (0..shards).map(|_| Vec::new()).collect();
    for (key, v) in items {
        let owner = &mut per[ctx.owner(&key)];
        if owner.capacity() == 0 {
            owner.reserve(guess);
        }
        owner.push((key, v));
    }
    per.into_iter().enumerate().filter(|(_, v)| !v.is_empty()).collect()
}

/// Looks up `hashes` for every rank of the namespace, pins the leading hits under a new lease and
/// records the lease at this shard. Returns `(hits, lease)`.
///
/// The probes of other owners go out first; this shard's share is then pinned in place (no
/// message, no task, no copy of its keys) while they work. Every slice of a block has one owner
/// (decision 15), so each owner's pins are whole blocks, taken in request order.
pub(crate) async fn lookup(
    ctx: &Rc<ShardCtx>,
    instance: &str,
    ns: NamespaceId,
    ranks: u32,
    keys: LookupKeys<'_>,
    ttl_ms: u64,
) -> Result<LookupAnswer, StoreError> {
    let lease = ctx.leases.borrow_mut().next_id();
    let expires_ms = ctx.now_ms() + ttl_ms;
    // The owners' pins outlast the lease, so that a load begun before it expired keeps its slots
    // until its copy is done.
    let pins_expire_ms = expires_ms + PIN_GRACE_MS;
    let n = keys.len();
    let single = ctx.shard_count() == 1;
    if single && ranks.max(1) == 1 {
        // The common case: the search stops at the first miss, so what it found is the leading
        // hits, and no per-position tally is needed. The pins are taken after the answer leaves.
        let (found, hashes) = match keys {
            LookupKeys::Packed(packed) => {
                let found = ctx.find_prefix(lease, ns, n, |i| (packed.get(i), 0));
                let hits = found.len();
                (found, LeaseHashes::packed_prefix(&packed, hits))
            }
            LookupKeys::List(mut list) => {
                let found = ctx.find_prefix(lease, ns, n, |i| (list[i], 0));
                list.truncate(found.len());
                (found, LeaseHashes::List(list))
            }
        };
        let (hits, lease) =
            finish_lookup(ctx, instance, ns, ranks, hashes, Vec::new(), expires_ms, lease, vec![ctx.id]);
        let pending = (hits > 0).then_some(PendingPins { lease, expires_ms: pins_expire_ms, found });
        return Ok(LookupAnswer { hits, lease, pending });
    }
    let hashes = keys.into_list();
    let owners: Vec<ShardId> =
        if single { Vec::new() } else { hashes.iter().map(|&hash| ctx.block_owner(&BlockKey { ns, hash })).collect() };

    // A vector per shard, not a map probe per hash.
    let mut remote: Vec<Vec<(u32, BlockHash, u16)>> = (0..ctx.shard_count()).map(|_| Vec::new()).collect();
    for (pos, &shard) in owners.iter().enumerate().filter(|(_, &shard)| shard != ctx.id) {
        remote[shard].extend((0..ranks).map(|rank| (pos as u32, hashes[pos], rank as u16)));
    }
    let mut pending = Vec::new();
    for (shard, keys) in remote.into_iter().enumerate().filter(|(_, keys)| !keys.is_empty()) {
        let (reply, rx) = flume::bounded(1);
        ctx.tell(shard, MeshMsg::Owner(OwnerOp::Probe { lease, expires_ms: pins_expire_ms, ns, keys, reply })).await;
        pending.push((shard, rx));
    }
    // This shard's own share, pinned in place: every position when it is the only shard, else
    // the positions it owns; `ranks` slices per position.
    let per = ranks.max(1) as usize;
    let mut found = vec![0u32; n];
    // The pool offset of each (position, rank)'s slot, for loads to read without asking the
    // owners again (decision 53).
    let mut slots = vec![0u64; n * per];
    if single {
        ctx.probe(
            lease,
            pins_expire_ms,
            ns,
            n * per,
            |i| (hashes[i / per], (i % per) as u16),
            |i, slot| {
                found[i / per] += 1;
                slots[i] = slot;
            },
        );
    } else if per == 1 {
        let mine: Vec<u32> = (0..n as u32).filter(|&pos| owners[pos as usize] == ctx.id).collect();
        ctx.probe(
            lease,
            pins_expire_ms,
            ns,
            mine.len(),
            |i| (hashes[mine[i] as usize], 0),
            |i, slot| {
                found[mine[i] as usize] += 1;
                slots[mine[i] as usize] = slot;
            },
        );
    } else {
        let mine: Vec<u32> = (0..n as u32).filter(|&pos| owners[pos as usize] == ctx.id).collect();
        ctx.probe(
            lease,
            pins_expire_ms,
            ns,
            mine.len() * per,
            |i| (hashes[mine[i / per] as usize], (i % per) as u16),
            |i, slot| {
                found[mine[i / per] as usize] += 1;
                slots[mine[i / per] as usize * per + i % per] = slot;
            },
        );
    }
    // Whether every found slice's offset is known (an owner whose finding went stale sends none).
    let mut offsets_known = true;
    for (shard, rx) in pending {
        let probed = rx
            .recv_async()
            .await
            .map_err(|_| StoreError(ErrorCode::ShuttingDown, format!("shard {shard} has stopped; retry later")))?;
        offsets_known &= probed.slots.len() == probed.found.len();
        for (i, &(pos, rank)) in probed.found.iter().enumerate() {
            found[pos as usize] += 1;
            if let (Some(&slot), Some(at)) = (probed.slots.get(i), slots.get_mut(pos as usize * per + rank as usize)) {
                *at = slot;
            }
        }
    }
    let hits = found.iter().take_while(|&&n| n == ranks).count();
    slots.truncate(if offsets_known { hits * per } else { 0 });

    // Pins beyond the prefix protect nothing the client can load: drop them now. Each owner
    // pinned in request order, so its pins in the prefix are its first ones.
    let tally = if single {
        let mut tally = vec![(0, 0); ctx.shard_count()];
        tally[ctx.id] = (hits * ranks as usize, found.iter().map(|&n| n as usize).sum());
        tally
    } else {
        tally_pins(&found, hits, ctx.shard_count(), |pos| owners[pos])
    };
    let mut kept_owners = Vec::new();
    for (shard, &(keep, taken)) in tally.iter().enumerate() {
        if keep > 0 {
            kept_owners.push(shard);
        }
        if taken > keep {
            if shard == ctx.id {
                ctx.index.borrow_mut().truncate_pins(lease, keep);
            } else {
                ctx.tell(shard, MeshMsg::Owner(OwnerOp::Unpin { lease, keep })).await;
            }
        }
    }
    let mut hashes = hashes;
    hashes.truncate(hits);
    let (hits, lease) =
        finish_lookup(ctx, instance, ns, ranks, LeaseHashes::List(hashes), slots, expires_ms, lease, kept_owners);
    Ok(LookupAnswer { hits, lease, pending: None })
}

/// Records the lease of a lookup whose leading hits are `hashes` (pinned by `owners`, and only
/// those; their slots' offsets `slots`, see [`Lease::with_slots`]), and returns the lookup's
/// answer. A full lease table serves the lookup as a miss: a
/// lease nobody could load would only hold pins until expiry.
#[allow(clippy::too_many_arguments)]
fn finish_lookup(
    ctx: &Rc<ShardCtx>,
    instance: &str,
    ns: NamespaceId,
    ranks: u32,
    hashes: LeaseHashes,
    slots: Vec<u64>,
    expires_ms: u64,
    lease: u64,
    owners: Vec<ShardId>,
) -> (u32, u64) {
    let hits = hashes.len();
    if hits == 0 {
        return (0, 0);
    }
    let record = Lease::new(lease, instance.to_string(), ns, hashes, ranks, expires_ms).with_slots(slots);
    // The lease's home is this shard (its id says so).
    let refused = ctx.leases.borrow_mut().insert(record).is_err();
    ctx.lease_owners.borrow_mut().insert(lease, owners);
    if refused {
        ctx.broadcast_unpin(lease);
        return (0, 0);
    }
    (hits as u32, lease)
}

/// Per owner shard, the pins a lookup keeps (those of positions before `hits`) and the pins it
/// took, from the pins taken per position (`found`) and each position's owner. A plain function
/// rather than a loop in the async lookup, so its counters stay in registers.
fn tally_pins(found: &[u32], hits: usize, shards: usize, owner: impl Fn(usize) -> ShardId) -> Vec<(usize, usize)> {
    let mut tally = vec![(0usize, 0usize); shards];
    for (pos, &count) in found.iter().enumerate().filter(|(_, &count)| count > 0) {
        let t = &mut tally[owner(pos)];
        t.1 += count as usize;
        if pos < hits {
            t.0 += count as usize;
        }
    }
    tally
}

/// An inference process's registered KV memory.
#[derive(Debug, Clone)]
pub(crate) enum EngineMemory {
    /// CPU memory reached by the host backend.
    Host(Arc<HostMemory>),
    /// GPU memory opened from CUDA IPC handles.
    Cuda(Arc<kvloft_gpu::cuda::CudaMemory>),
}

impl EngineMemory {
    /// Bytes of one block's slice.
    pub(crate) fn slice_bytes(&self) -> u64 {
        match self {
            Self::Host(m) => m.slice_bytes(),
            Self::Cuda(m) => m.slice_bytes(),
        }
    }

    /// Checks that engine block `block_id` exists in every layer.
    pub(crate) fn check_block(&self, block_id: u32) -> Result<(), String> {
        match self {
            Self::Host(m) => m.check_block(block_id).map_err(|e| e.to_string()),
            Self::Cuda(m) if m.has_block(block_id) => Ok(()),
            Self::Cuda(m) => Err(format!(
                "block id {block_id} is not below num_blocks of every layer ({})",
                m.layers().iter().map(|l| l.num_blocks).min().unwrap_or(0)
            )),
        }
    }
}

/// Saves this rank's slices of `blocks` through their owners. The returned [`Followup`] (on GPUs,
/// the owners' seals) is for the caller to send right before the client's completion event, so
/// that the client's next lookup finds the blocks (decision 51).
pub(crate) async fn save(
    ctx: &Rc<ShardCtx>,
    mem: EngineMemory,
    ns: NamespaceId,
    rank: u32,
    blocks: Vec<(BlockHash, u32)>,
    after: crate::gpu_path::SaveAfter,
    trace: &crate::trace::Trace,
) -> (Saved, Followup) {
    match mem {
        EngineMemory::Host(mem) => (save_host(ctx, mem, ns, rank, blocks).await, Followup::default()),
        EngineMemory::Cuda(mem) => crate::gpu_path::save(ctx, mem, ns, rank, blocks, after, trace).await,
    }
}

async fn save_host(
    ctx: &Rc<ShardCtx>,
    mem: Arc<HostMemory>,
    ns: NamespaceId,
    rank: u32,
    blocks: Vec<(BlockHash, u32)>,
) -> Saved {
    let slice_bytes = mem.slice_bytes();
    let keys = blocks.into_iter().map(|(hash, id)| (SliceKey { block: BlockKey { ns, hash }, rank: rank as u16 }, id));
    let mut total = Saved::default();
    let groups = by_owner(ctx, keys);
    let sizes: BTreeMap<ShardId, u32> = groups.iter().map(|(s, items)| (*s, items.len() as u32)).collect();
    let replies = fan_out(ctx, groups, |items, reply| {
        MeshMsg::Owner(OwnerOp::Save { mem: mem.clone(), slice_bytes, items, reply })
    })
    .await;
    for (shard, reply) in replies {
        let n = sizes.get(&shard).copied().unwrap_or(0);
        match reply {
            Ok(s) => {
                total.saved += s.saved;
                total.present += s.present;
                total.failed += s.failed;
                if total.error.is_none() {
                    total.error = s.error;
                }
            }
            Err(StoreError(_, message)) => {
                total.failed += n;
                total.error.get_or_insert(message);
            }
        }
    }
    total
}

/// A load whose lease checked out: what [`load_copy`] needs.
#[derive(Debug)]
pub(crate) struct LoadPlan {
    lease: u64,
    rank: u32,
    begun: BegunLoad,
}

/// Checks lease `lease` for this instance and rank at its home and marks the rank as loading.
pub(crate) async fn load_prepare(
    ctx: &Rc<ShardCtx>,
    instance: &str,
    rank: u32,
    lease: u64,
    block_count: usize,
) -> Result<LoadPlan, StoreError> {
    let home = lease_home(lease) as ShardId;
    if home >= ctx.shard_count() {
        return Err(StoreError(ErrorCode::UnknownLease, format!("lease {lease:#x} was not issued by this server")));
    }
    let instance = instance.to_string();
    let begun = ctx
        .ask(home, |reply| MeshMsg::Lease(LeaseOp::BeginLoad { id: lease, instance, rank, blocks: block_count, reply }))
        .await??;
    Ok(LoadPlan { lease, rank, begun })
}

/// Copies the planned slices into this rank's engine blocks `block_ids` (one per hit, in order).
/// Any failure fails the whole load: `loaded` is then 0 and the engine recomputes every block.
/// The returned [`Followup`] (the lease's load count, and on GPUs the unpins) is for the caller
/// to send right after the client's completion event.
pub(crate) async fn load_copy(
    ctx: &Rc<ShardCtx>,
    mem: EngineMemory,
    plan: LoadPlan,
    block_ids: Vec<u32>,
    layerwise: Option<crate::gpu_path::Layerwise>,
    trace: &crate::trace::Trace,
) -> (Loaded, Followup) {
    let LoadPlan { lease, rank, begun: BegunLoad { ns, hashes, slots, pins_until_ms } } = plan;
    let keys = hashes
        .iter()
        .zip(&block_ids)
        .map(|(hash, id)| (SliceKey { block: BlockKey { ns, hash: *hash }, rank: rank as u16 }, *id));
    let mut total = Loaded::default();
    let mut followup = Followup::default();
    match mem {
        EngineMemory::Host(mem) => {
            let replies = fan_out(ctx, by_owner(ctx, keys), |items, reply| {
                MeshMsg::Owner(OwnerOp::Load { mem: mem.clone(), lease, items, reply })
            })
            .await;
            for (_, reply) in replies {
                match reply {
                    Ok(l) if l.error.is_none() => total.loaded += l.loaded,
                    Ok(l) => {
                        total.error = total.error.or(l.error);
                    }
                    Err(StoreError(_, message)) => {
                        total.error = total.error.or(Some(message));
                    }
                }
            }
        }
        EngineMemory::Cuda(mem) => {
            let pins = crate::gpu_path::LeasePins { slots, until_ms: pins_until_ms };
            (total, followup) = crate::gpu_path::load(ctx, mem, lease, keys.collect(), pins, layerwise, trace).await;
        }
    }
    let home = lease_home(lease) as ShardId;
    followup.push(home, MeshMsg::Lease(LeaseOp::FinishLoad { id: lease, rank }));
    if total.error.is_some() {
        total.loaded = 0;
    }
    (total, followup)
}

/// Releases lease `lease` for `instance`.
pub(crate) async fn release(ctx: &Rc<ShardCtx>, instance: &str, lease: u64) -> Result<(), StoreError> {
    let home = lease_home(lease) as ShardId;
    if home >= ctx.shard_count() {
        return Err(StoreError(ErrorCode::UnknownLease, format!("lease {lease:#x} was not issued by this server")));
    }
    let instance = Some(instance.to_string());
    ctx.ask(home, |reply| MeshMsg::Lease(LeaseOp::Release { id: lease, instance, reply: Some(reply) })).await?
}
