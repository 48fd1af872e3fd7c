//! The GPU data path on the server: a worker whose KV cache is in GPU memory (registered with
//! CUDA IPC handles) saves and loads through the `cuda` backend.
//!
//! Block metadata stays with the owner shards, but the bytes of one request move as **one batch
//! on the connection's shard**, whichever shards own the pool slots (every shard's arena is
//! registered with the GPU, so all slots are addressable from one stream):
//!
//! - save: owners reserve slots (*writing*, invisible to lookups) and return their device
//!   addresses; the connection's shard plans and runs the copy (kernel or DMA, see
//!   `kvloft_gpu::plan`); owners then seal the slices, or abort them if the copy failed.
//! - load: the lease's owners return the device addresses of the pinned slots; the copy runs;
//!   owners drop the pins. A load is reported done only after its copy has completed on the GPU.
//!
//! An owner registers its arena with a GPU the first time a request for that GPU reaches it.

use crate::route::ShardId;
use crate::shard::{MeshMsg, ShardCtx};
use crate::store::{by_owner, fan_out, Loaded, OwnerOp, Saved, StoreError};
use kvloft_engine::index::Reserved;
use kvloft_engine::key::{BlockHash, BlockKey, SliceKey};
use kvloft_engine::namespace::NamespaceId;
use kvloft_gpu::cuda::{Copier, CudaError, CudaMemory, Device, HostRegistration, IpcEvent};
use kvloft_gpu::plan::Planner;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// Ranges one queued batch holds. A request is cut into batches of whole blocks of at most this
/// many ranges; the copier queues up to `kvloft_gpu::cuda::copier::SLOTS` of them, so the next
/// batch is planned while the GPU moves the previous ones.
const COPIER_RANGES: usize = 1 << 14;
/// How often a copy in flight is polled.
const POLL: Duration = Duration::from_micros(20);

/// Slots an owner reserved for a GPU save.
#[derive(Debug, Default)]
pub(crate) struct GpuReserved {
    /// `(key, engine block, device address of the slot)`.
    pub slots: Vec<(SliceKey, u32, u64)>,
    pub present: u32,
    pub failed: u32,
    pub error: Option<String>,
}

/// A shard's GPU state: its arena's registrations and its copiers, per GPU (by UUID).
#[derive(Default)]
pub(crate) struct GpuState {
    regs: RefCell<HashMap<[u8; 16], HostRegistration>>,
    copiers: RefCell<HashMap<[u8; 16], Rc<CopySlot>>>,
}

impl std::fmt::Debug for GpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuState {{ gpus: {} }}", self.regs.borrow().len())
    }
}

struct CopySlot {
    copier: RefCell<Copier>,
    turn: glommio::sync::Semaphore,
}

impl ShardCtx {
    /// The device address of this shard's arena offset `offset` on `dev`, registering the arena
    /// with `dev` first if needed.
    fn slot_addr(&self, dev: &Arc<Device>, offset: u64) -> Result<u64, String> {
        let uuid = dev.uuid();
        let mut regs = self.gpu.regs.borrow_mut();
        let reg = match regs.entry(uuid) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let arena = self.arena.borrow();
                // SAFETY: the arena lives as long as this ShardCtx, and `gpu` is declared before
                // `arena` in ShardCtx, so the registration is dropped first.
                let reg = unsafe { HostRegistration::register(dev.clone(), arena.as_ptr(), arena.len() as usize) }
                    .map_err(|e| format!("registering shard {}'s pool with the GPU: {e}", self.id))?;
                v.insert(reg)
            }
        };
        let p = self.arena.borrow().as_ptr().wrapping_add(offset as usize);
        reg.device_addr(p).ok_or_else(|| format!("slot offset {offset} is outside shard {}'s pool", self.id))
    }

    /// Owner side of a GPU save: reserves a slot per slice and returns their device addresses.
    pub(crate) fn gpu_reserve(&self, dev: &Arc<Device>, slice_bytes: u64, items: Vec<(SliceKey, u32)>) -> GpuReserved {
        let mut out = GpuReserved::default();
        let mut index = self.index.borrow_mut();
        for (key, block_id) in items {
            match index.reserve(key, slice_bytes) {
                Ok(Reserved::Slot(slot)) => match self.slot_addr(dev, slot.offset) {
                    Ok(addr) => out.slots.push((key, block_id, addr)),
                    Err(e) => {
                        index.abort(key);
                        out.failed += 1;
                        out.error.get_or_insert(e);
                    }
                },
                Ok(Reserved::Present) => out.present += 1,
                Err(e) => {
                    out.failed += 1;
                    out.error.get_or_insert_with(|| e.to_string());
                }
            }
        }
        out
    }

    /// Owner side after a GPU save's copy: publishes the slices, or frees them if it failed.
    pub(crate) fn gpu_finish(&self, keys: Vec<SliceKey>, ok: bool) {
        let mut index = self.index.borrow_mut();
        for key in &keys {
            if ok {
                index.seal(*key);
            } else {
                index.abort(*key);
            }
        }
        if ok {
            self.counters.saves.set(self.counters.saves.get() + keys.len() as u64);
        }
    }

    /// Owner side of a GPU load: the device addresses of the slices `lease` pins.
    pub(crate) fn gpu_resolve(
        &self,
        dev: &Arc<Device>,
        lease: u64,
        items: Vec<(SliceKey, u32)>,
    ) -> Result<Vec<(u32, u64)>, String> {
        let keys: Vec<SliceKey> = items.iter().map(|(k, _)| *k).collect();
        let slots = self
            .index
            .borrow()
            .pinned_slots(lease, &keys)
            .ok_or_else(|| "a leased block is no longer held (the lease expired); recompute".to_string())?;
        let mut out = Vec::with_capacity(items.len());
        for ((_, block_id), slot) in items.into_iter().zip(slots) {
            out.push((block_id, self.slot_addr(dev, slot.offset)?));
        }
        self.counters.loads.set(self.counters.loads.get() + out.len() as u64);
        Ok(out)
    }

    fn copy_slot(&self, dev: &Arc<Device>) -> Result<Rc<CopySlot>, CudaError> {
        let uuid = dev.uuid();
        if let Some(s) = self.gpu.copiers.borrow().get(&uuid) {
            return Ok(s.clone());
        }
        let copier = Copier::new(dev.clone(), COPIER_RANGES, true)?;
        if let Some(note) = copier.kernel_note() {
            eprintln!("kvloft: shard {}: GPU copies use DMA only: {note}", self.id);
        }
        let slot = Rc::new(CopySlot { copier: RefCell::new(copier), turn: glommio::sync::Semaphore::new(1) });
        self.gpu.copiers.borrow_mut().insert(uuid, slot.clone());
        Ok(slot)
    }
}

/// Moves `items` (`(engine block, slot device address)`) between `mem` and the pool on this
/// shard's copier for `mem`'s GPU; returns once the GPU finished. The request is cut into batches
/// of whole blocks, each planned while the GPU moves the ones before it.
async fn copy(
    ctx: &Rc<ShardCtx>,
    mem: &CudaMemory,
    items: &[(u32, u64)],
    d2h: bool,
    after: Option<&IpcEvent>,
) -> Result<(), String> {
    let slot = ctx.copy_slot(mem.device()).map_err(|e| e.to_string())?;
    let _turn = slot.turn.acquire_permit(1).await.map_err(|e| format!("copier closed: {e}"))?;
    if let Some(event) = after {
        slot.copier.borrow_mut().wait_for(event).map_err(|e| e.to_string())?;
    }
    let planner = Planner {
        sm_budget: ctx.shared.topology.copy.sm_budget,
        sm_count: mem.device().sm_count(),
        ..Planner::default()
    };
    // Ranges one block becomes once the planner splits long segments for the kernel.
    let chunk = planner.chunk_bytes.max(1);
    let per_block: usize = mem
        .layers()
        .iter()
        .map(|l| l.segments as usize * l.segment_bytes.div_ceil(chunk) as usize)
        .sum::<usize>()
        .max(1);
    let chunk_blocks = (COPIER_RANGES / per_block).max(1);
    for chunk in items.chunks(chunk_blocks) {
        let plan = planner.plan(&mem.ranges(chunk, d2h));
        if plan.ranges.len() > COPIER_RANGES {
            // Splitting made more ranges than a batch holds (blocks of long segments): move this
            // part on the copy engines instead.
            let dma = kvloft_gpu::plan::Plan { method: kvloft_gpu::plan::Method::Dma, ranges: plan.ranges };
            submit(&slot, &dma).await?;
        } else {
            submit(&slot, &plan).await?;
        }
    }
    loop {
        if slot.copier.borrow_mut().done().map_err(|e| e.to_string())? {
            return Ok(());
        }
        glommio::timer::sleep(POLL).await;
    }
}

/// Queues `plan` once the copier has a free batch slot (waiting without blocking the shard).
async fn submit(slot: &CopySlot, plan: &kvloft_gpu::plan::Plan) -> Result<(), String> {
    while !slot.copier.borrow_mut().ready().map_err(|e| e.to_string())? {
        glommio::timer::sleep(POLL).await;
    }
    let mut copier = slot.copier.borrow_mut();
    // SAFETY: sources and destinations are the engine's IPC-mapped KV cache (held open by the
    // caller's `CudaMemory` until the copy is done) and pool slots registered with this GPU that
    // the owners keep reserved (save) or pinned (load) until `copy` returns, after completion.
    unsafe { copier.submit(plan) }.map_err(|e| e.to_string())
}

/// Saves this rank's slices of `blocks` from GPU memory.
pub(crate) async fn save(
    ctx: &Rc<ShardCtx>,
    mem: Arc<CudaMemory>,
    ns: NamespaceId,
    rank: u32,
    blocks: Vec<(BlockHash, u32)>,
    after: Option<Arc<IpcEvent>>,
) -> Saved {
    let slice_bytes = mem.slice_bytes();
    let keys = blocks.into_iter().map(|(hash, id)| (SliceKey { block: BlockKey { ns, hash }, rank: rank as u16 }, id));
    let groups = by_owner(ctx, keys);
    let sizes: HashMap<ShardId, u32> = groups.iter().map(|(s, items)| (*s, items.len() as u32)).collect();
    let dev = mem.device().clone();
    let replies = fan_out(ctx, groups, |items, reply| {
        MeshMsg::Owner(OwnerOp::GpuReserve { dev: dev.clone(), slice_bytes, items, reply })
    })
    .await;
    let mut total = Saved::default();
    let mut reserved: Vec<(ShardId, Vec<SliceKey>)> = Vec::new();
    let mut items: Vec<(u32, u64)> = Vec::new();
    for (shard, reply) in replies {
        match reply {
            Ok(r) => {
                total.present += r.present;
                total.failed += r.failed;
                if total.error.is_none() {
                    total.error = r.error;
                }
                items.extend(r.slots.iter().map(|(_, b, a)| (*b, *a)));
                reserved.push((shard, r.slots.into_iter().map(|(k, _, _)| k).collect()));
            }
            Err(StoreError(_, message)) => {
                total.failed += sizes.get(&shard).copied().unwrap_or(0);
                total.error.get_or_insert(message);
            }
        }
    }
    let result = if items.is_empty() { Ok(()) } else { copy(ctx, &mem, &items, true, after.as_deref()).await };
    let ok = result.is_ok();
    let copied: u32 = reserved.iter().map(|(_, k)| k.len() as u32).sum();
    if ok {
        total.saved += copied;
    } else {
        total.failed += copied;
        total.error = result.err();
    }
    for (shard, keys) in reserved {
        if !keys.is_empty() {
            ctx.tell(shard, MeshMsg::Owner(OwnerOp::GpuFinish { keys, ok })).await;
        }
    }
    total
}

/// Copies a checked lease's slices into this rank's engine blocks in GPU memory; unpins them.
pub(crate) async fn load(ctx: &Rc<ShardCtx>, mem: Arc<CudaMemory>, lease: u64, keys: Vec<(SliceKey, u32)>) -> Loaded {
    let rank = keys.first().map_or(0, |(k, _)| k.rank);
    let groups = by_owner(ctx, keys);
    let owners: Vec<ShardId> = groups.keys().copied().collect();
    let dev = mem.device().clone();
    let replies = fan_out(ctx, groups, |items, reply| {
        MeshMsg::Owner(OwnerOp::GpuResolve { dev: dev.clone(), lease, items, reply })
    })
    .await;
    let mut items = Vec::new();
    let mut error = None;
    for (_, reply) in replies {
        match reply {
            Ok(Ok(v)) => items.extend(v),
            Ok(Err(e)) | Err(StoreError(_, e)) => {
                error.get_or_insert(e);
            }
        }
    }
    if error.is_none() && !items.is_empty() {
        if let Err(e) = copy(ctx, &mem, &items, false, None).await {
            error = Some(e);
        }
    }
    for shard in owners {
        ctx.tell(shard, MeshMsg::Owner(OwnerOp::UnpinRank { lease, rank })).await;
    }
    match error {
        None => Loaded { loaded: items.len() as u32, error: None },
        Some(e) => Loaded { loaded: 0, error: Some(e) },
    }
}
