//! The GPU data path on the server: a worker whose KV cache is in GPU memory (registered with
//! CUDA IPC handles) saves and loads through the `cuda` backend.
//!
//! Block metadata stays with the owner shards, but the bytes of one request move as **one batch
//! on the connection's shard**, whichever shards own the pool slots (every shard's arena is
//! registered with the GPU, so all slots are addressable from one stream):
//!
//! - save: owners reserve slots (*writing*, invisible to lookups) and return their device
//!   addresses; the connection's shard plans and runs the copy (kernel or DMA, see
//!   `kvloft_gpu::plan`); owners then seal the slices, or abort them if the copy failed. Owners
//!   also keep a bounded stock of slots set aside for each saving shard: a save whose every
//!   owner's share fits in the stock copies at once and tells the owners its keys afterwards
//!   (decision 54).
//! - load: the lease's owners return the device addresses of the pinned slots; the copy runs;
//!   owners drop the pins. A load is reported done only after its copy has completed on the GPU.
//!   When the lookup recorded the slots' pool offsets in the lease and this shard knows where
//!   each owner's arena sits on the GPU, the load asks no owner (decision 53).
//!
//! An owner registers its arena with a GPU the first time a request for that GPU reaches it.

use crate::route::ShardId;
use crate::shard::{MeshMsg, ShardCtx};
use crate::store::{by_owner, Loaded, OwnerOp, Saved};
use crate::trace::{self, Trace};
use kvloft_engine::index::Reserved;
use kvloft_engine::key::{BlockHash, BlockKey, SliceKey};
use kvloft_engine::namespace::NamespaceId;
use kvloft_engine::slab::Slot;
use kvloft_gpu::blocks::{BlockPair, BlockTemplate, LayerTemplate};
use kvloft_gpu::cuda::{
    BlockJob, Copier, CudaError, CudaMemory, Device, HostRegistration, IpcEvent, LayerJob, SharedEvent,
};
use kvloft_gpu::plan::{CurveMethod, Planner};
use kvloft_gpu::plan::{Method, Plan};
use kvloft_topology::model::{CopyDirection, CopyMethod, Topology};
use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Ranges one queued batch holds. A request is cut into batches of whole blocks of at most this
/// many ranges; the copier queues up to `kvloft_gpu::cuda::copier::SLOTS` of them, so the next
/// batch is planned while the GPU moves the previous ones.
const COPIER_RANGES: usize = 1 << 14;
/// How often a copy in flight is polled.
const POLL: Duration = Duration::from_micros(5);
/// The longest a shard checks one copy's end back to back, from just before its expected end,
/// without letting its other tasks run (decision 58); past it, the copy is polled every
/// [`POLL`] again.
const FINISH_SPIN: Duration = Duration::from_micros(50);
/// The rate a shard expects of its first copies, in bytes per second: no host link of a GPU
/// today beats it (PCIe 5.0 x16 carries 64 GB/s at most), so the first copy's end is looked for
/// no later than it can come.
const FASTEST_LINK: f64 = 64e9;
/// Copies smaller than this teach [`CopySlot::rate`] nothing: their time is mostly latency.
const LEARN_BYTES: u64 = 4 << 20;

/// Pool memory a saving shard keeps in stock, per GPU and slice size, over all owners: each
/// owner sets aside up to this divided by the shard count for it (decision 54).
const STOCK_BYTES_PER_SAVER: u64 = 128 << 20;
/// Most slots one saving shard keeps in stock per owner, GPU and slice size.
const MAX_STOCK_SLOTS: usize = 256;
/// An owner sets aside at most this share of its pool (1 / divisor) for all saving shards.
const STOCK_POOL_DIVISOR: u64 = 16;

/// Slots an owner reserved for a GPU save.
#[derive(Debug, Default)]
pub(crate) struct GpuReserved {
    /// `(key, engine block, device address of the slot)`.
    pub slots: Vec<(SliceKey, u32, u64)>,
    pub present: u32,
    pub failed: u32,
    pub error: Option<String>,
    /// Slots set aside for the saving shard's next saves.
    pub stock: Vec<Stocked>,
}

/// A slot an owner set aside for a saving shard, and its device address on the stock's GPU.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stocked {
    slot: Slot,
    addr: u64,
}

/// Slots owner `owner` set aside for the receiving shard's saves of `slice_bytes` slices on the
/// GPU `uuid`.
#[derive(Debug)]
pub(crate) struct StockGift {
    owner: ShardId,
    uuid: [u8; 16],
    slice_bytes: u64,
    slots: Vec<Stocked>,
}

/// Which stock: (owner shard, GPU UUID, slice bytes).
type StockKey = (ShardId, [u8; 16], u64);

/// Slots a saving shard keeps per owner, GPU and slice size.
fn stock_target(shards: usize, slice_bytes: u64) -> usize {
    let per_owner = STOCK_BYTES_PER_SAVER / shards.max(1) as u64;
    ((per_owner / slice_bytes.max(1)) as usize).clamp(1, MAX_STOCK_SLOTS)
}

/// An owner's answer to a GPU load: the device address of its arena's start, and `(engine
/// block, slot device address)` per slice; or why the lease's slices are gone.
pub(crate) type Resolved = Result<(u64, Vec<(u32, u64)>), String>;

/// What a load knows of its lease's pins from the lease's home.
#[derive(Debug)]
pub(crate) struct LeasePins {
    /// The pool offsets of the slices' slots on their owners, in the load's order, if the lookup
    /// recorded them.
    pub slots: Option<Vec<u64>>,
    /// Until when (server milliseconds) the owners keep the pins: a copy that ends later may
    /// have read slots already reused.
    pub until_ms: u64,
}

/// A shard's GPU state: its arena's registrations and its copiers, per GPU (by UUID).
#[derive(Default)]
pub(crate) struct GpuState {
    regs: RefCell<HashMap<[u8; 16], HostRegistration>>,
    copiers: RefCell<HashMap<[u8; 16], Rc<CopySlot>>>,
    /// Per owner shard and GPU, the device address of the owner's arena start, as the owner
    /// answered it to a load: fixed for the server's life (an owner keeps its registration).
    bases: RefCell<HashMap<(ShardId, [u8; 16]), u64>>,
    /// Slots owners set aside for this shard's saves, per (owner, GPU, slice bytes); at most
    /// [`stock_target`] each.
    stock: RefCell<HashMap<StockKey, Vec<Stocked>>>,
}

impl std::fmt::Debug for GpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuState {{ gpus: {} }}", self.regs.borrow().len())
    }
}

struct CopySlot {
    copier: RefCell<Copier>,
    /// The copy planner for this GPU: the SM budget, the GPU's SMs, batching, and the bound
    /// between kernel and copy engines from the topology's copy curves where it has them.
    planner: Planner,
    /// Held by a run while it queues its copy: one request's batches go onto the stream
    /// together. A whole-request copy gives it back once queued, so the next request queues its
    /// copy behind it on the stream while it runs (decision 59); a layer-wise one keeps it until
    /// its copy has finished.
    turn: glommio::sync::Semaphore,
    /// Bytes per second the last whole-request copies took from their push to their end (a
    /// moving average), for [`CopyRun::finish`] to know when to look for the next one's end.
    rate: std::cell::Cell<f64>,
    /// When the last whole-request copy queued is expected to end: a copy queued behind it
    /// starts then, not when it was queued.
    busy_until: std::cell::Cell<Instant>,
}

/// A run's queued copy, for [`CopyRun::finish`]: its last batch on the copier, its bytes, and
/// when it is expected to start.
#[derive(Debug, Clone, Copy)]
struct Queued {
    /// [`Copier::submitted`] right after the run's last batch.
    through: u64,
    bytes: u64,
    /// When the copy is expected to start: when it was pushed, or the expected end of the copy
    /// queued before it on the stream.
    start: Instant,
    /// Whether its time teaches [`CopySlot::rate`]: a whole-request copy that found the stream
    /// idle.
    learn: bool,
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

    /// Owner side: sets up to `n` slots of `slice_bytes` aside for a saving shard, within this
    /// shard's bound on stock ([`STOCK_POOL_DIVISOR`]).
    pub(crate) fn stock_slots(&self, dev: &Arc<Device>, slice_bytes: u64, n: usize) -> Vec<Stocked> {
        let mut index = self.index.borrow_mut();
        let max = index.capacity_bytes() / STOCK_POOL_DIVISOR;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let Some(slot) = index.stock(slice_bytes, max) else { break };
            match self.slot_addr(dev, slot.offset) {
                Ok(addr) => out.push(Stocked { slot, addr }),
                Err(_) => {
                    index.unstock(slot);
                    break;
                }
            }
        }
        out
    }

    /// Owner side after a GPU save copied into slots set aside for `saver`: files them under
    /// their keys (or frees them, when the copy failed or a key is already stored), then, in a
    /// task of its own (so that a saver that is also the owner writes its `save_done` first),
    /// sets as many new slots aside for `saver` and sends them to it.
    pub(crate) fn gpu_adopt(
        self: &Rc<Self>,
        dev: &Arc<Device>,
        slice_bytes: u64,
        items: Vec<(SliceKey, Slot)>,
        ok: bool,
        saver: ShardId,
    ) {
        let n = items.len();
        {
            let mut index = self.index.borrow_mut();
            let mut adopted = 0;
            for (key, slot) in items {
                if !ok {
                    index.unstock(slot);
                } else if index.adopt(key, slot) {
                    adopted += 1;
                }
            }
            self.counters.saves.set(self.counters.saves.get() + adopted);
        }
        let (ctx, dev) = (self.clone(), dev.clone());
        glommio::spawn_local(async move {
            let slots = ctx.stock_slots(&dev, slice_bytes, n);
            if !slots.is_empty() {
                let gift = StockGift { owner: ctx.id, uuid: dev.uuid(), slice_bytes, slots };
                ctx.tell(saver, MeshMsg::Stock(gift)).await;
            }
        })
        .detach();
    }

    /// Saver side: keeps slots an owner set aside for this shard, up to [`stock_target`], and
    /// gives any beyond it back.
    pub(crate) fn take_stock(self: &Rc<Self>, gift: StockGift) {
        let StockGift { owner, uuid, slice_bytes, mut slots } = gift;
        let target = stock_target(self.shard_count(), slice_bytes);
        let extra = {
            let mut stock = self.gpu.stock.borrow_mut();
            let kept = stock.entry((owner, uuid, slice_bytes)).or_default();
            let room = target.saturating_sub(kept.len()).min(slots.len());
            kept.extend(slots.drain(..room));
            slots
        };
        if !extra.is_empty() {
            let slots = extra.into_iter().map(|s| s.slot).collect();
            let ctx = self.clone();
            glommio::spawn_local(async move { ctx.tell(owner, MeshMsg::Owner(OwnerOp::Unstock { slots })).await })
                .detach();
        }
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
    pub(crate) fn gpu_resolve(&self, dev: &Arc<Device>, lease: u64, items: Vec<(SliceKey, u32)>) -> Resolved {
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
        Ok((self.slot_addr(dev, 0)?, out))
    }

    /// The device addresses of the slots of `keys` (in order) at the pool offsets `slots`, if
    /// this shard knows where every owner's arena sits on `dev`.
    fn known_slot_addrs(&self, uuid: [u8; 16], keys: &[(SliceKey, u32)], slots: &[u64]) -> Option<Vec<(u32, u64)>> {
        if slots.len() != keys.len() {
            return None;
        }
        let bases = self.gpu.bases.borrow();
        keys.iter()
            .zip(slots)
            .map(|((key, block), &off)| Some((*block, bases.get(&(self.owner(key), uuid))? + off)))
            .collect()
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
        let batch = copier.has_batch();
        let topology = &self.shared.topology;
        let mut copier = copier;
        let staging = topology.copy.staging_bytes;
        if staging > 0 && topology.copy.sm_budget > 0 && copier.has_kernel() {
            if let Err(e) = copier.set_staging(staging) {
                eprintln!(
                    "kvloft: shard {}: no staging buffer of {staging} bytes on the GPU ({e}); the copy kernel moves \
                     blocks over PCIe itself (lower [copy] staging, or set it to 0 to silence this)",
                    self.id
                );
            }
        }
        let (planner, note) = Planner {
            sm_budget: topology.copy.sm_budget,
            sm_count: dev.sm_count(),
            dma_batch: batch,
            ..Planner::default()
        }
        .calibrated(|method, d2h, piece| calibrated_rate(topology, method, d2h, piece));
        if let Some(note) = note {
            eprintln!("kvloft: shard {}: {note}", self.id);
        }
        let slot = Rc::new(CopySlot {
            copier: RefCell::new(copier),
            planner,
            turn: glommio::sync::Semaphore::new(1),
            rate: std::cell::Cell::new(FASTEST_LINK),
            busy_until: std::cell::Cell::new(Instant::now()),
        });
        self.gpu.copiers.borrow_mut().insert(uuid, slot.clone());
        Ok(slot)
    }
}

/// The GB/s `topology`'s copy curves give GPU copy `method` for pieces of `piece` bytes, saving
/// (`d2h`) or loading; `None` where that method and direction were not measured.
pub fn calibrated_rate(topology: &Topology, method: CurveMethod, d2h: bool, piece: u64) -> Option<f64> {
    let method = match method {
        CurveMethod::Dma => CopyMethod::CudaMemcpy,
        CurveMethod::DmaBatch => CopyMethod::CudaMemcpyBatch,
        CurveMethod::Kernel => CopyMethod::CudaKernel,
    };
    let direction = if d2h { CopyDirection::D2h } else { CopyDirection::H2d };
    topology.copy_gbps(method, direction, piece)
}

/// One request's copy on this shard's copier for a GPU. Blocks are planned and queued as they are
/// [pushed](CopyRun::push), in batches of whole blocks, while the GPU moves the ones before; the
/// caller holds the copier's turn while it queues them (and, for a layer-wise copy, until the
/// copy ends).
struct CopyRun<'a> {
    slot: &'a CopySlot,
    mem: &'a CudaMemory,
    planner: Planner,
    /// Blocks per queued batch, so that a batch fits the copier's range table.
    chunk_blocks: usize,
    d2h: bool,
    /// Every block's shape, for the block kernel (`kvloft_gpu::blocks`).
    template: BlockTemplate,
}

impl<'a> CopyRun<'a> {
    fn new(slot: &'a CopySlot, mem: &'a CudaMemory, d2h: bool) -> Self {
        let planner = slot.planner;
        // Ranges one block becomes once the planner splits long segments for the kernel.
        let chunk = planner.chunk_bytes.max(1);
        let per_block: usize = mem
            .layers()
            .iter()
            .map(|l| l.segments as usize * l.segment_bytes.div_ceil(chunk) as usize)
            .sum::<usize>()
            .max(1);
        let template = BlockTemplate::new(mem.layers(), chunk);
        Self { slot, mem, planner, chunk_blocks: (COPIER_RANGES / per_block).max(1), d2h, template }
    }

    /// Plans and queues `items` (`(engine block, slot device address)`), waiting (without
    /// blocking the shard) while every batch slot of the copier is busy. Where the planner picks
    /// the kernel, the GPU expands the blocks itself (one pair per block uploaded, no range
    /// building or planning here), staged through device memory when the copier has room.
    async fn push(&self, items: &[(u32, u64)]) -> Result<(), String> {
        let kernel = self.slot.copier.borrow().has_kernel();
        if let (true, Some(Method::Kernel { ctas, threads })) =
            (kernel, self.planner.block_kernel(&self.template, items.len()))
        {
            let mut pairs: Vec<BlockPair> = items.iter().map(|&(block, slot)| BlockPair::new(block, slot)).collect();
            // Neighbouring slots in a row make longer copy-engine runs when staged.
            pairs.sort_unstable_by_key(|p| p.slot);
            let (part, per_batch) = {
                let c = self.slot.copier.borrow();
                (c.staging_part_bytes(), c.block_capacity(self.template.pieces.len()))
            };
            let staged = self.template.slice_bytes > 0 && part >= self.template.slice_bytes;
            if per_batch > 0 {
                for chunk in pairs.chunks(per_batch) {
                    let job = BlockJob {
                        pieces: &self.template.pieces,
                        pairs: chunk,
                        slice_bytes: self.template.slice_bytes,
                        d2h: self.d2h,
                        ctas,
                        threads,
                        staged,
                    };
                    submit_blocks(self.slot, &job).await?;
                }
                return Ok(());
            }
        }
        for chunk in items.chunks(self.chunk_blocks) {
            let plan = self.planner.plan(&self.mem.ranges(chunk, self.d2h), self.d2h);
            if plan.ranges.len() > COPIER_RANGES {
                // Splitting made more ranges than a batch holds (blocks of long segments): move
                // this part on the copy engines instead (batched unless the driver cannot or the
                // curves measured single calls faster for such runs).
                let average = plan.bytes() / plan.ranges.len().max(1) as u64;
                let method = self.planner.dma_method(plan.ranges.len(), average, self.d2h);
                let dma = kvloft_gpu::plan::Plan { method, ranges: plan.ranges };
                submit(self.slot, &dma).await?;
            } else {
                submit(self.slot, &plan).await?;
            }
        }
        Ok(())
    }

    /// Plans and queues `items` layer by layer (layer 0 of every block first); layer `i` is
    /// queued once the worker's `waits[i]` has fired (a layer-wise save). While it waits for an
    /// event that has not fired, it gives the copier's `turn` back, so that other requests copy
    /// meanwhile and a worker that dies mid-save holds up no one (decision 48).
    async fn push_layers_after(
        &self,
        items: &[(u32, u64)],
        waits: &[Arc<IpcEvent>],
        turn: &mut Option<glommio::sync::Permit<'a>>,
    ) -> Result<(), String> {
        let staged = self.layer_staged(items);
        for (layer, event) in waits.iter().enumerate() {
            if !event.fired().unwrap_or(false) {
                *turn = None;
                fired(event, &format!("layer {layer}'s event")).await?;
                let permit = self.slot.turn.acquire_permit(1).await.map_err(|e| format!("copier closed: {e}"))?;
                *turn = Some(permit);
            }
            if let Some(staged) = &staged {
                submit_layers(self.slot, &staged.job(layer..layer + 1, &[], self.d2h)).await?;
                continue;
            }
            let plan = self.planner.plan(&self.mem.layer_ranges(items, layer, self.d2h), self.d2h);
            for part in plan.ranges.chunks(COPIER_RANGES) {
                submit_marked(self.slot, &Plan { method: plan.method, ranges: part.to_vec() }, &[]).await?;
            }
        }
        Ok(())
    }

    /// How this run moves `items` layer by layer through the staging buffer
    /// ([`Copier::submit_layers`]: copy engines over PCIe, the kernel within device memory), or
    /// `None` where it cannot: no SM budget, no staging buffer or one too small for a block's
    /// layer, or more blocks than one batch's table holds. Then layer-wise copies take the
    /// planner's ranges as before.
    fn layer_staged(&self, items: &[(u32, u64)]) -> Option<LayerStaged> {
        let template = LayerTemplate::new(self.mem.layers(), self.planner.chunk_bytes.max(1));
        let copier = self.slot.copier.borrow();
        if !copier.stages_layers(&template.bands) || items.len() > copier.block_capacity(template.pieces.len()) {
            return None;
        }
        let widest = template.bands.iter().map(|b| b.pieces.len()).max().unwrap_or(0);
        let Some(Method::Kernel { ctas, threads }) = self.planner.layer_kernel(widest, items.len()) else {
            return None;
        };
        let mut pairs: Vec<BlockPair> = items.iter().map(|&(block, slot)| BlockPair::new(block, slot)).collect();
        // Following slots make one pitched copy per run.
        pairs.sort_unstable_by_key(|p| p.slot);
        Some(LayerStaged { template, pairs, ctas, threads })
    }

    /// Plans and queues `items` layer by layer, recording `marks[i]` behind layer `i`'s copy
    /// (a layer-wise load). Consecutive layers share a batch while they fit, so a load of a
    /// step's blocks is queued at once and the worker can wait on every layer's event soon.
    async fn push_layers_marked(&self, items: &[(u32, u64)], marks: &[Arc<SharedEvent>]) -> Result<(), String> {
        if let Some(staged) = self.layer_staged(items) {
            let marks: Vec<(usize, &SharedEvent)> = marks.iter().enumerate().map(|(i, e)| (i, &**e)).collect();
            // Every layer moves; the caller checked there is one mark per layer.
            let layers = 0..staged.template.bands.len();
            return submit_layers(self.slot, &staged.job(layers, &marks, self.d2h)).await;
        }
        let mut batch: Option<Plan> = None;
        let mut cuts: Vec<(usize, &SharedEvent)> = Vec::new();
        for (layer, event) in marks.iter().enumerate() {
            let plan = self.planner.plan(&self.mem.layer_ranges(items, layer, self.d2h), self.d2h);
            let fits = batch
                .as_ref()
                .is_some_and(|b| b.method == plan.method && b.ranges.len() + plan.ranges.len() <= COPIER_RANGES);
            if !fits {
                if let Some(b) = batch.take() {
                    submit_marked(self.slot, &b, &cuts).await?;
                    cuts.clear();
                }
            }
            if plan.ranges.len() > COPIER_RANGES {
                // One layer fills more than a batch: its parts go alone, the event behind the last.
                let parts: Vec<&[kvloft_gpu::plan::Range]> = plan.ranges.chunks(COPIER_RANGES).collect();
                for (n, part) in parts.iter().enumerate() {
                    let mark: &[(usize, &SharedEvent)] =
                        if n + 1 == parts.len() { &[(part.len(), event)] } else { &[] };
                    submit_marked(self.slot, &Plan { method: plan.method, ranges: part.to_vec() }, mark).await?;
                }
                continue;
            }
            let b = batch.get_or_insert_with(|| Plan { method: plan.method, ranges: Vec::new() });
            b.ranges.extend_from_slice(&plan.ranges);
            cuts.push((b.ranges.len(), event));
        }
        if let Some(b) = batch {
            submit_marked(self.slot, &b, &cuts).await?;
        }
        Ok(())
    }

    /// What this run pushed, once its last batch is queued: `bytes` pushed from `since` on.
    /// A whole-request copy (`whole`) queued behind another is expected to start at that one's
    /// expected end, and moves [`CopySlot::busy_until`] on; a layer-wise one, which waits on the
    /// worker's compute, neither expects nor teaches a rate.
    fn queued(&self, bytes: u64, since: Instant, whole: bool) -> Queued {
        let through = self.slot.copier.borrow().submitted();
        if !whole {
            return Queued { through, bytes, start: since, learn: false };
        }
        let ahead = self.slot.busy_until.get();
        let start = since.max(ahead);
        let expected = Duration::from_secs_f64(bytes as f64 / self.slot.rate.get());
        self.slot.busy_until.set(start + expected);
        Queued { through, bytes, start, learn: ahead <= since }
    }

    /// Waits until the GPU has finished the run's copy (`q`), and every copy queued before it.
    /// Checks every [`POLL`] (a wake of the shard's executor, 12-15 us apart on the H100 box)
    /// until the copy is near its expected end (its bytes at the rate the last whole-request
    /// copies took, [`CopySlot::rate`], from its expected start), then back to back for up to
    /// [`FINISH_SPIN`], so that the end of a copy is seen within about a microsecond instead of
    /// half a wake's period (decision 58). Copies queued behind it on the stream meanwhile are
    /// not waited for (decision 59).
    async fn finish(&self, q: Queued) -> Result<(), String> {
        let Queued { through, bytes, start: since, learn } = q;
        let rate = self.slot.rate.get();
        let expected = Duration::from_secs_f64(bytes as f64 / rate);
        let look = since + expected.mul_f64(0.97);
        let mut spun = Duration::ZERO;
        loop {
            let now = Instant::now();
            if self.slot.copier.borrow_mut().done_through(through).map_err(|e| e.to_string())? {
                let took = since.elapsed();
                if learn && bytes >= LEARN_BYTES && !took.is_zero() {
                    let seen = (bytes as f64 / took.as_secs_f64()).min(FASTEST_LINK);
                    self.slot.rate.set(0.75 * rate + 0.25 * seen);
                }
                return Ok(());
            }
            if now >= look && spun < FINISH_SPIN {
                let step = Instant::now();
                std::hint::spin_loop();
                spun += step.elapsed();
                continue;
            }
            glommio::timer::sleep(POLL).await;
        }
    }
}

/// How long a save waits for one of the worker's events to fire before it fails.
pub(crate) const SAVE_EVENT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest pause between two checks of a worker's event.
const EVENT_POLL_MAX: Duration = Duration::from_millis(1);

/// Waits (without blocking the shard) until the worker's `event` has fired: checked at once,
/// then at pauses growing from [`POLL`] to [`EVENT_POLL_MAX`]. Fails after
/// [`SAVE_EVENT_TIMEOUT`], or at once when the driver reports the event broken; `what` names the
/// event in the error.
async fn fired(event: &IpcEvent, what: &str) -> Result<(), String> {
    let start = Instant::now();
    let mut pause = POLL;
    loop {
        match event.fired() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => return Err(format!("the worker's {what} is unusable: {e}")),
        }
        if start.elapsed() >= SAVE_EVENT_TIMEOUT {
            return Err(format!(
                "the worker's {what} did not fire within {SAVE_EVENT_TIMEOUT:?} (did the worker stop?); nothing was saved"
            ));
        }
        glommio::timer::sleep(pause).await;
        pause = (pause * 2).min(EVENT_POLL_MAX);
    }
}

/// Queues `plan` once the copier has a free batch slot (waiting without blocking the shard).
async fn submit(slot: &CopySlot, plan: &Plan) -> Result<(), String> {
    submit_marked(slot, plan, &[]).await
}

/// [`submit`], recording each event of `marks` behind the ranges before its position.
async fn submit_marked(slot: &CopySlot, plan: &Plan, marks: &[(usize, &SharedEvent)]) -> Result<(), String> {
    while !slot.copier.borrow_mut().ready().map_err(|e| e.to_string())? {
        glommio::timer::sleep(POLL).await;
    }
    let mut copier = slot.copier.borrow_mut();
    // SAFETY: sources and destinations are the engine's IPC-mapped KV cache (held open by the
    // caller's `CudaMemory` until the copy is done) and pool slots registered with this GPU that
    // the owners keep reserved (save) or pinned (load) until the run has finished.
    unsafe { copier.submit_marked(plan, marks) }.map_err(|e| e.to_string())
}

/// A layer-wise copy through the staging buffer: its template, its blocks (sorted by slot) and
/// the kernel's launch.
struct LayerStaged {
    template: LayerTemplate,
    pairs: Vec<BlockPair>,
    ctas: u32,
    threads: u32,
}

impl LayerStaged {
    /// The copier's job for `layers`, recording `marks`.
    fn job<'j>(
        &'j self,
        layers: std::ops::Range<usize>,
        marks: &'j [(usize, &'j SharedEvent)],
        d2h: bool,
    ) -> LayerJob<'j> {
        LayerJob {
            pieces: &self.template.pieces,
            bands: &self.template.bands,
            pairs: &self.pairs,
            slice_bytes: self.template.slice_bytes,
            layers,
            marks,
            d2h,
            ctas: self.ctas,
            threads: self.threads,
        }
    }
}

/// Queues layer-wise copy `job` once the copier has a free batch slot (waiting without blocking
/// the shard).
async fn submit_layers(slot: &CopySlot, job: &LayerJob<'_>) -> Result<(), String> {
    while !slot.copier.borrow_mut().ready().map_err(|e| e.to_string())? {
        glommio::timer::sleep(POLL).await;
    }
    let mut copier = slot.copier.borrow_mut();
    // SAFETY: as in `submit_blocks`: the pieces address the engine's IPC-mapped KV cache within
    // its registered layers (every block id was checked against them), and the slots are pool
    // slots registered with this GPU that the owners keep reserved or pinned until the run ends.
    unsafe { copier.submit_layers(job) }.map_err(|e| e.to_string())
}

/// Queues block copy `job` once the copier has a free batch slot (waiting without blocking the
/// shard).
async fn submit_blocks(slot: &CopySlot, job: &BlockJob<'_>) -> Result<(), String> {
    while !slot.copier.borrow_mut().ready().map_err(|e| e.to_string())? {
        glommio::timer::sleep(POLL).await;
    }
    let mut copier = slot.copier.borrow_mut();
    // SAFETY: as in `submit_marked`: the pieces address the engine's IPC-mapped KV cache within
    // its registered layers (every block id was checked against them), and the slots are pool
    // slots registered with this GPU that the owners keep reserved or pinned until the run ends.
    unsafe { copier.submit_blocks(job) }.map_err(|e| e.to_string())
}

/// What a GPU save's copy waits for on the GPU before it reads the worker's blocks.
#[derive(Debug, Default)]
pub(crate) enum SaveAfter {
    /// Nothing: the worker synchronized before it asked.
    #[default]
    Nothing,
    /// One event recorded after every kernel that wrote the blocks.
    Event(Arc<IpcEvent>),
    /// One event per layer, each recorded after the kernels that wrote that layer: layer `i`
    /// is copied as soon as event `i` fires (a layer-wise save).
    Layers(Vec<Arc<IpcEvent>>),
}

/// A layer-wise load's own part: the events kvloft records behind each layer's copy, and the
/// `load_layers` announcement to send once every layer's copy is queued.
pub(crate) struct Layerwise {
    /// One event per layer.
    pub events: Vec<Arc<SharedEvent>>,
    /// Sends `load_layers` to the worker.
    pub announce: Pin<Box<dyn Future<Output = ()>>>,
}

impl std::fmt::Debug for Layerwise {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Layerwise {{ layers: {} }}", self.events.len())
    }
}

/// Sends each owner its share of `groups` (built by `make` around one reply channel for all
/// owners, this shard last) and returns the channel: owners answer in any order, tagged with their
/// id. The channel closes once every owner has answered or dropped the request (a stopped shard).
async fn ask_owners<I, T>(
    ctx: &Rc<ShardCtx>,
    groups: impl IntoIterator<Item = (ShardId, I)>,
    make: impl Fn(I, flume::Sender<(ShardId, T)>) -> MeshMsg,
) -> flume::Receiver<(ShardId, T)> {
    let mut order: Vec<(ShardId, I)> = groups.into_iter().collect();
    order.sort_by_key(|(shard, _)| *shard == ctx.id);
    let (tx, rx) = flume::bounded(order.len().max(1));
    for (shard, items) in order {
        ctx.tell(shard, make(items, tx.clone())).await;
    }
    rx
}

/// Receives the next answer of `rx` and every answer already waiting behind it; empty once every
/// owner has answered.
async fn next_answers<T>(rx: &flume::Receiver<(ShardId, T)>) -> Vec<(ShardId, T)> {
    let Ok(first) = rx.recv_async().await else { return Vec::new() };
    let mut out = vec![first];
    out.extend(rx.try_iter());
    out
}

/// Messages to owners that can wait until the client has its answer: a GPU save's seals (or
/// aborts) and a load's unpins. Sent right after the answer, before the connection reads its
/// next request, so a request that follows on the same connection reaches each owner after them
/// (every pair of shards has one ordered channel); another connection may find a just-saved block
/// still being written for those few microseconds, which is a miss, never wrong bytes.
#[derive(Debug, Default)]
pub(crate) struct Followup(Vec<(ShardId, MeshMsg)>);

impl Followup {
    /// Adds a message for `shard`.
    pub(crate) fn push(&mut self, shard: ShardId, msg: MeshMsg) {
        self.0.push((shard, msg));
    }

    /// Sends every message, in order.
    pub(crate) async fn send(self, ctx: &Rc<ShardCtx>) {
        for (shard, msg) in self.0 {
            ctx.tell(shard, msg).await;
        }
    }
}

/// Saves this rank's slices of `blocks` from GPU memory: every owner reserves its share's slots,
/// then one copy moves them all (decision 45). An owner whose whole share fits in the slots it
/// set aside for this shard is not asked: the copy goes there, and the owner learns the keys
/// afterwards (decision 54). Returns the outcome and the owners' seal (or abort) messages, for
/// the caller to send before the client's `save_done` (decision 51).
pub(crate) async fn save(
    ctx: &Rc<ShardCtx>,
    mem: Arc<CudaMemory>,
    ns: NamespaceId,
    rank: u32,
    blocks: Vec<(BlockHash, u32)>,
    after: SaveAfter,
    trace: &Trace,
) -> (Saved, Followup) {
    let slice_bytes = mem.slice_bytes();
    let keys = blocks.into_iter().map(|(hash, id)| (SliceKey { block: BlockKey { ns, hash }, rank: rank as u16 }, id));
    let groups = by_owner(ctx, keys);
    let dev = mem.device().clone();
    let uuid = dev.uuid();
    let mut total = Saved::default();
    let slot = match ctx.copy_slot(&dev) {
        Ok(slot) => slot,
        Err(e) => {
            total.failed = groups.values().map(|items| items.len() as u32).sum();
            total.error = Some(e.to_string());
            return (total, Followup::default());
        }
    };
    // Owners whose whole share the stock covers are not asked; the others reserve, and top the
    // stock up to its target.
    let target = stock_target(ctx.shard_count(), slice_bytes);
    let mut stocked: Vec<(ShardId, Vec<(SliceKey, Slot)>)> = Vec::new();
    let mut all_items: Vec<(u32, u64)> = Vec::new();
    // (owner, (its share, slots to add to the stock)).
    type Ask = (ShardId, (Vec<(SliceKey, u32)>, usize));
    let mut ask: Vec<Ask> = Vec::new();
    {
        let mut stock = ctx.gpu.stock.borrow_mut();
        for (owner, items) in groups {
            let kept = stock.entry((owner, uuid, slice_bytes)).or_default();
            if kept.len() >= items.len() {
                let taken = kept.split_off(kept.len() - items.len());
                all_items.extend(items.iter().zip(&taken).map(|((_, block), s)| (*block, s.addr)));
                stocked.push((owner, items.into_iter().zip(taken).map(|((key, _), s)| (key, s.slot)).collect()));
            } else {
                let want = target.saturating_sub(kept.len());
                ask.push((owner, (items, want)));
            }
        }
    }
    let mut unanswered: HashMap<ShardId, u32> = ask.iter().map(|(s, (items, _))| (*s, items.len() as u32)).collect();
    let answers = ask_owners(ctx, ask, |(items, stock), reply| {
        MeshMsg::Owner(OwnerOp::GpuReserve { dev: dev.clone(), slice_bytes, items, stock, reply })
    })
    .await;
    let mut reserved: Vec<(ShardId, Vec<SliceKey>)> = Vec::new();
    let mut copy_error: Option<String> = None;
    {
        // The worker's event is awaited here, before this save takes the copier: a copy stream
        // never waits on the GPU for an event a client controls, so a client that dies before
        // its event fires fails only its own save.
        if let SaveAfter::Event(event) = &after {
            copy_error = fired(event, "after_event").await.err();
        }
        let mut turn = match slot.turn.acquire_permit(1).await {
            Ok(permit) => Some(permit),
            Err(e) => {
                copy_error.get_or_insert(format!("copier closed: {e}"));
                None
            }
        };
        let run = CopyRun::new(&slot, &mem, true);
        let mut pushed = false;
        // Every owner's slots first, then one copy: owners answer within microseconds of each
        // other, and one staged copy keeps the copy engines busier than one per answer
        // (decision 45). A layer-wise save copies layer-major, which needs them all anyway.
        loop {
            let batch = next_answers(&answers).await;
            if batch.is_empty() {
                break;
            }
            for (shard, mut r) in batch {
                unanswered.remove(&shard);
                let slots = std::mem::take(&mut r.stock);
                if !slots.is_empty() {
                    ctx.take_stock(StockGift { owner: shard, uuid, slice_bytes, slots });
                }
                total.present += r.present;
                total.failed += r.failed;
                if total.error.is_none() {
                    total.error = r.error;
                }
                all_items.extend(r.slots.iter().map(|(_, b, a)| (*b, *a)));
                reserved.push((shard, r.slots.into_iter().map(|(k, _, _)| k).collect()));
            }
        }
        let since = Instant::now();
        trace::mark(trace, "slots");
        let whole = !matches!(after, SaveAfter::Layers(_));
        if copy_error.is_none() && !all_items.is_empty() {
            copy_error = match &after {
                SaveAfter::Layers(waits) => run.push_layers_after(&all_items, waits, &mut turn).await.err(),
                _ => run.push(&all_items).await.err(),
            };
            pushed = true;
        }
        let queued = pushed.then(|| run.queued(all_items.len() as u64 * slice_bytes, since, whole));
        if whole {
            // Queued: the next request's copy may go onto the stream behind this one (decision 59).
            drop(turn.take());
        }
        trace::mark(trace, "pushed");
        // Batches already queued must land before the slots are sealed or freed, even when a
        // later one failed.
        if let Some(queued) = queued {
            if let Err(e) = run.finish(queued).await {
                copy_error.get_or_insert(e);
            }
            trace::mark(trace, "seen");
        }
        drop(turn);
    }
    for (shard, n) in unanswered {
        total.failed += n;
        total.error.get_or_insert_with(|| format!("shard {shard} has stopped; retry later"));
    }
    let ok = copy_error.is_none();
    let copied: u32 = reserved.iter().map(|(_, k)| k.len() as u32).sum::<u32>()
        + stocked.iter().map(|(_, items)| items.len() as u32).sum::<u32>();
    if ok {
        total.saved += copied;
    } else {
        total.failed += copied;
        total.error = copy_error;
    }
    let mut followup = Followup::default();
    for (shard, keys) in reserved {
        if !keys.is_empty() {
            followup.push(shard, MeshMsg::Owner(OwnerOp::GpuFinish { keys, ok }));
        }
    }
    for (shard, items) in stocked {
        let adopt = OwnerOp::GpuAdopt { dev: dev.clone(), slice_bytes, items, ok, saver: ctx.id };
        followup.push(shard, MeshMsg::Owner(adopt));
    }
    (total, followup)
}

/// Copies a checked lease's slices into this rank's engine blocks in GPU memory. Like a save,
/// every owner answers first and one copy moves them all; any failure fails the load. Where the
/// lease carries the slots' offsets (`pins`) and every owner's arena address on this GPU is
/// known, no owner is asked. Returns the outcome and the owners' unpin messages, for the caller
/// to send once the client has its answer.
///
/// A layer-wise load (`layerwise`) queues the copy layer by layer with kvloft's event behind each
/// layer, and announces the events before the copy completes.
pub(crate) async fn load(
    ctx: &Rc<ShardCtx>,
    mem: Arc<CudaMemory>,
    lease: u64,
    keys: Vec<(SliceKey, u32)>,
    pins: LeasePins,
    layerwise: Option<Layerwise>,
    trace: &Trace,
) -> (Loaded, Followup) {
    let rank = keys.first().map_or(0, |(k, _)| k.rank);
    let dev = mem.device().clone();
    let known = pins.slots.as_deref().and_then(|slots| ctx.known_slot_addrs(dev.uuid(), &keys, slots));
    let groups = by_owner(ctx, keys);
    let owners: Vec<ShardId> = groups.keys().copied().collect();
    let mut unanswered = if known.is_some() { 0 } else { owners.len() };
    let mut error = None;
    let mut loaded = 0u32;
    match ctx.copy_slot(&dev) {
        Err(e) => error = Some(e.to_string()),
        Ok(slot) => {
            let answers = match &known {
                // Nobody to ask: a closed channel reads as every owner having answered.
                Some(_) => flume::bounded(1).1,
                None => {
                    ask_owners(ctx, groups, |items, reply| {
                        MeshMsg::Owner(OwnerOp::GpuResolve { dev: dev.clone(), lease, items, reply })
                    })
                    .await
                }
            };
            let mut turn = match slot.turn.acquire_permit(1).await {
                Ok(permit) => Some(permit),
                Err(e) => {
                    error = Some(format!("copier closed: {e}"));
                    None
                }
            };
            let run = CopyRun::new(&slot, &mem, false);
            let mut pushed = false;
            // Every owner's slots first, then one copy, as for a save.
            let mut all_items: Vec<(u32, u64)> = Vec::new();
            if let Some(items) = known {
                ctx.counters.loads.set(ctx.counters.loads.get() + items.len() as u64);
                all_items = items;
            }
            loop {
                let batch = next_answers(&answers).await;
                if batch.is_empty() {
                    break;
                }
                for (shard, r) in batch {
                    unanswered -= 1;
                    match r {
                        Ok((base, v)) => {
                            ctx.gpu.bases.borrow_mut().insert((shard, dev.uuid()), base);
                            all_items.extend(v);
                        }
                        Err(e) => {
                            error.get_or_insert(e);
                        }
                    }
                }
            }
            loaded = all_items.len() as u32;
            if unanswered > 0 {
                error.get_or_insert_with(|| "a shard holding the lease has stopped; recompute".to_string());
            }
            let since = Instant::now();
            trace::mark(trace, "slots");
            if error.is_none() && !all_items.is_empty() {
                pushed = true;
                error = match &layerwise {
                    Some(lw) => run.push_layers_marked(&all_items, &lw.events).await.err(),
                    None => run.push(&all_items).await.err(),
                };
            }
            let whole = layerwise.is_none();
            let queued = pushed.then(|| run.queued(all_items.len() as u64 * mem.slice_bytes(), since, whole));
            if whole {
                // Queued: the next request's copy may go onto the stream behind this one (decision 59).
                drop(turn.take());
            }
            trace::mark(trace, "pushed");
            if let (Some(lw), None) = (layerwise, &error) {
                lw.announce.await;
            }
            // Blocks already queued must land before the pins go, even when the load failed.
            if let Some(queued) = queued {
                if let Err(e) = run.finish(queued).await {
                    error.get_or_insert(e);
                }
                trace::mark(trace, "seen");
                if ctx.now_ms() >= pins.until_ms {
                    error.get_or_insert_with(|| {
                        "the load's copy ended after its lease's pins lapsed (the GPU or server is overloaded); \
                         recompute"
                            .to_string()
                    });
                }
            }
            // A layer-wise load held the copier until its copy ended.
            drop(turn);
        }
    }
    let mut followup = Followup::default();
    for shard in owners {
        followup.push(shard, MeshMsg::Owner(OwnerOp::UnpinRank { lease, rank }));
    }
    let loaded = match error {
        None => Loaded { loaded, error: None },
        Some(e) => Loaded { loaded: 0, error: Some(e) },
    };
    (loaded, followup)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stock_target_splits_a_savers_budget_over_owners() {
        let slice = (32 * 16) << 10; // 32 layers of 16 KiB
        assert_eq!(stock_target(8, slice), 32, "128 MiB over 8 owners, 512 KiB slices");
        assert_eq!(stock_target(1, slice), MAX_STOCK_SLOTS, "bounded per owner");
        assert_eq!(stock_target(8, (32 * 256) << 10), 2);
        assert_eq!(stock_target(8, 1 << 30), 1, "at least one slot");
        assert_eq!(stock_target(0, 0), MAX_STOCK_SLOTS, "no division by zero");
    }
}
