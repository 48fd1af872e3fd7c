//! An inference engine's KV cache on a GPU, opened from its CUDA IPC handles.

use super::device::{format_uuid, Device};
use super::memory::IpcMapping;
use super::{check, CudaError};
use crate::host::validate_layers;
use crate::plan::Range;
use cudarc::driver::sys;
use kvloft_engine::protocol::LayerMemory;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// The process's open GPUs by UUID: each is opened once and shared (only registrations take
/// the lock, never a copy).
pub fn device_by_uuid(uuid: &[u8; 16]) -> Result<Arc<Device>, CudaError> {
    static DEVICES: OnceLock<Mutex<HashMap<[u8; 16], Arc<Device>>>> = OnceLock::new();
    let mut map = DEVICES.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(d) = map.get(uuid) {
        return Ok(d.clone());
    }
    let d = Arc::new(Device::by_uuid(uuid)?);
    map.insert(*uuid, d.clone());
    Ok(d)
}

/// One rank's KV cache in GPU memory: the allocations it lives in, opened by CUDA IPC (each
/// distinct handle once), and its layers with `base` as a device address in this process. The
/// mappings close when the value is dropped: holders keep an `Arc` while copies run.
#[derive(Debug)]
pub struct CudaMemory {
    dev: Arc<Device>,
    _mappings: Vec<IpcMapping>,
    layers: Vec<LayerMemory>,
    slice_bytes: u64,
    /// Blocks every layer has (the smallest `num_blocks`).
    blocks: u32,
}

impl CudaMemory {
    /// Opens the KV cache whose `layers` (with `base` an offset into the allocation) live in the
    /// allocations `ipc` names, one `(handle, offset)` per layer, on the GPU with `uuid`. Checks
    /// every layer lies inside its allocation.
    pub fn open(uuid: &[u8; 16], mut layers: Vec<LayerMemory>, ipc: &[(Vec<u8>, u64)]) -> Result<Self, CudaError> {
        let slice_bytes = validate_layers(&layers).map_err(|e| CudaError::Invalid(e.to_string()))?;
        if ipc.len() != layers.len() {
            return Err(CudaError::Invalid(format!(
                "{} layers but {} IPC regions: send one `ipc` entry per layer",
                layers.len(),
                ipc.len()
            )));
        }
        let dev = device_by_uuid(uuid)?;
        dev.bind()?;
        let mut mappings: Vec<IpcMapping> = Vec::new();
        let mut by_handle: HashMap<[u8; 64], (u64, u64)> = HashMap::new();
        for (i, ((handle, offset), layer)) in ipc.iter().zip(layers.iter_mut()).enumerate() {
            let handle: [u8; 64] = handle.as_slice().try_into().map_err(|_| {
                CudaError::Invalid(format!("layer {i}: an IPC handle is 64 bytes, got {}", handle.len()))
            })?;
            let (start, size) = match by_handle.get(&handle) {
                Some(r) => *r,
                None => {
                    let m = IpcMapping::open(dev.clone(), &handle)?;
                    let (mut base, mut size) = (0u64, 0usize);
                    // SAFETY: `m.ptr()` is a live mapping in the current context; out-pointers valid.
                    check("cuMemGetAddressRange", unsafe {
                        sys::cuMemGetAddressRange_v2(&mut base, &mut size, m.ptr())
                    })?;
                    let r = (m.ptr(), (base + size as u64).saturating_sub(m.ptr()));
                    by_handle.insert(handle, r);
                    mappings.push(m);
                    r
                }
            };
            let end = layer_extent(layer).and_then(|e| e.checked_add(*offset));
            if end.is_none_or(|e| e > size) {
                return Err(CudaError::Invalid(format!(
                    "layer {i}: its blocks end {} bytes into an allocation of {size} bytes (offset {offset}); \
                     describe the tensor the handle belongs to",
                    end.map_or("beyond 2^64".to_string(), |e| e.to_string())
                )));
            }
            layer.base = start + offset;
        }
        let blocks = layers.iter().map(|l| l.num_blocks).min().unwrap_or(0);
        Ok(CudaMemory { dev, _mappings: mappings, layers, slice_bytes, blocks })
    }

    /// The GPU.
    pub fn device(&self) -> &Arc<Device> {
        &self.dev
    }

    /// The layers, `base` being device addresses in this process.
    pub fn layers(&self) -> &[LayerMemory] {
        &self.layers
    }

    /// Bytes of one block's slice in the pool: every segment of every layer.
    pub fn slice_bytes(&self) -> u64 {
        self.slice_bytes
    }

    /// Whether engine block `block_id` exists in every layer.
    pub fn has_block(&self, block_id: u32) -> bool {
        block_id < self.blocks
    }

    /// The ranges moving layer `layer` of each `(block_id, slot)` pair: the part of
    /// [`CudaMemory::ranges`] that belongs to that layer (empty past the last layer).
    pub fn layer_ranges(&self, items: &[(u32, u64)], layer: usize, d2h: bool) -> Vec<Range> {
        layer_ranges(&self.layers, items, layer, d2h)
    }

    /// The ranges moving each `(block_id, slot)` pair: a slot (a pool slice's device address)
    /// holds the block's layers one after another, each layer's segments in order — the layout
    /// of the host backend too. `d2h` copies engine to pool, else pool to engine.
    pub fn ranges(&self, items: &[(u32, u64)], d2h: bool) -> Vec<Range> {
        let per_block: usize = self.layers.iter().map(|l| l.segments as usize).sum();
        let mut out = Vec::with_capacity(items.len() * per_block);
        for &(block, slot) in items {
            let mut offset = 0;
            for l in &self.layers {
                for s in 0..u64::from(l.segments) {
                    out.push(segment_range(l, block, s, slot + offset, d2h));
                    offset += l.segment_bytes;
                }
            }
        }
        out
    }

    /// The GPU's UUID as nvidia-smi prints it.
    pub fn gpu_name(&self) -> String {
        format_uuid(&self.dev.uuid())
    }
}

/// The range of segment `s` of `block` in layer `l`, whose copy in the pool is at `pool`.
fn segment_range(l: &LayerMemory, block: u32, s: u64, pool: u64, d2h: bool) -> Range {
    let engine = l.base + u64::from(block) * l.block_stride + s * l.segment_stride;
    let len = l.segment_bytes;
    if d2h {
        Range { src: engine, dst: pool, len }
    } else {
        Range { src: pool, dst: engine, len }
    }
}

/// The ranges of layer `layer` of each `(block_id, slot)` pair, laid out as
/// [`CudaMemory::ranges`] lays out whole slices.
fn layer_ranges(layers: &[LayerMemory], items: &[(u32, u64)], layer: usize, d2h: bool) -> Vec<Range> {
    let Some(l) = layers.get(layer) else { return Vec::new() };
    // Where the layer starts in a slot: every segment of the layers before it.
    let offset: u64 = layers[..layer].iter().map(|l| u64::from(l.segments) * l.segment_bytes).sum();
    let mut out = Vec::with_capacity(items.len() * l.segments as usize);
    for &(block, slot) in items {
        for s in 0..u64::from(l.segments) {
            out.push(segment_range(l, block, s, slot + offset + s * l.segment_bytes, d2h));
        }
    }
    out
}

/// Bytes from a layer's block 0, segment 0 to the end of its last segment of its last block.
fn layer_extent(l: &LayerMemory) -> Option<u64> {
    let last_block = u64::from(l.num_blocks.checked_sub(1)?).checked_mul(l.block_stride)?;
    let last_segment = u64::from(l.segments.checked_sub(1)?).checked_mul(l.segment_stride)?;
    last_block.checked_add(last_segment)?.checked_add(l.segment_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extent_covers_the_last_segment() {
        let l = LayerMemory {
            base: 0,
            num_blocks: 10,
            block_stride: 100,
            segments: 2,
            segment_stride: 1000,
            segment_bytes: 100,
        };
        assert_eq!(layer_extent(&l), Some(900 + 1000 + 100));
        let one = LayerMemory { segments: 1, segment_stride: 0, ..l };
        assert_eq!(layer_extent(&one), Some(1000));
    }

    /// Layer by layer, the ranges are exactly those of whole slices: same pool offsets, same
    /// engine addresses, nothing missing or repeated.
    #[test]
    fn layer_ranges_partition_the_slice_ranges() {
        let layers: Vec<LayerMemory> = (0..3u64)
            .map(|i| LayerMemory {
                base: 1 << 40 | i << 32,
                num_blocks: 50,
                block_stride: 4096,
                segments: 2 - (i as u32 % 2),
                segment_stride: 50 * 4096,
                segment_bytes: 1024 + 512 * i,
            })
            .collect();
        let items = [(3u32, 0x10_0000u64), (41, 0x20_0000), (0, 0x30_0000)];
        for d2h in [true, false] {
            let mut whole: Vec<(u64, u64, u64)> = Vec::new();
            for &(block, slot) in &items {
                let mut offset = 0;
                for l in &layers {
                    for s in 0..u64::from(l.segments) {
                        let r = segment_range(l, block, s, slot + offset, d2h);
                        whole.push((r.src, r.dst, r.len));
                        offset += l.segment_bytes;
                    }
                }
            }
            let mut by_layer: Vec<(u64, u64, u64)> = (0..layers.len() + 1)
                .flat_map(|layer| layer_ranges(&layers, &items, layer, d2h))
                .map(|r| (r.src, r.dst, r.len))
                .collect();
            whole.sort_unstable();
            by_layer.sort_unstable();
            assert_eq!(whole, by_layer);
        }
    }
}
