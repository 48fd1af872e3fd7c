//! The resolved topology: what the server runs with, after a file was validated or placement was
//! derived from discovery. Plain data with no spans; [`crate::file`] holds the file's own form.

use crate::machine::{CpuId, NodeId};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Socket path used when neither the file, the command line nor `KVLOFT_SOCKET` names one.
pub const DEFAULT_SOCKET: &str = "/tmp/kvloft.sock";

/// Environment variable that overrides the default socket path for the server and every client.
pub const SOCKET_ENV: &str = "KVLOFT_SOCKET";

/// Prometheus endpoint used when neither the file nor the command line names one.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9477";
/// Microseconds a shard polls for work after its last task before it sleeps (`[server] spin-us`).
pub const DEFAULT_SPIN_US: u64 = 100;
/// The largest `[server] spin-us` accepted.
pub const MAX_SPIN_US: u64 = 100_000;

/// The socket path a server or client uses when it was given none: `$KVLOFT_SOCKET`, else
/// [`DEFAULT_SOCKET`].
pub fn default_socket() -> PathBuf {
    std::env::var_os(SOCKET_ENV).map_or_else(|| PathBuf::from(DEFAULT_SOCKET), PathBuf::from)
}

/// Server endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSpec {
    /// The Unix socket inference processes connect to.
    pub socket: PathBuf,
    /// Where `/metrics` is served over HTTP; `None` turns the endpoint off.
    pub metrics_addr: Option<SocketAddr>,
    /// Microseconds a shard keeps polling its socket, mesh and timers after its last task
    /// before it sleeps in the kernel. Waking a sleeping core costs microseconds per message (tens
    /// on a virtual machine), which polling avoids at the price of CPU time on the shard's own
    /// core; 0 sleeps at once.
    pub spin_us: u64,
}

/// How large the pinned host pool is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolSize {
    /// One figure for the whole machine, split over NUMA nodes by how many shards each has.
    Total(u64),
    /// A figure per NUMA node, split evenly over that node's shards.
    PerNode(BTreeMap<NodeId, u64>),
}

/// The pinned host pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemorySpec {
    /// Pool size.
    pub pool: PoolSize,
    /// Back the pool with hugepages where the node has enough free; fall back to 4 KiB pages with
    /// a warning otherwise.
    pub hugepages: bool,
}

/// One shard: a pinned executor and the devices it drives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSpec {
    /// OS CPU the executor thread is pinned to.
    pub cpu: CpuId,
    /// NUMA node of that CPU; the shard's pool slice is allocated there.
    pub node: NodeId,
    /// Index of the GPU whose copies this shard issues.
    pub gpu: Option<u32>,
    /// Network device (RDMA device or interface name) this shard uses.
    pub nic: Option<String>,
    /// Directory (or block device) for this shard's NVMe tier; `None` disables the tier.
    pub ssd: Option<PathBuf>,
}

/// Everything the server needs to start its shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Endpoints.
    pub server: ServerSpec,
    /// Host pool.
    pub memory: MemorySpec,
    /// CPUs left to the inference engine: no shard runs there.
    pub reserved_cores: Vec<CpuId>,
    /// The shards, shard id = position.
    pub shards: Vec<ShardSpec>,
    /// This machine's measured copy curves (`[[calibration.copy]]`, written by
    /// `kvloft bench calibrate`), sorted by method, direction and block size; empty when the file
    /// has none.
    pub calibration: Vec<CopyCurvePoint>,
    /// How GPU copies are made (`[copy]`).
    pub copy: CopySpec,
}

/// `[copy]`: how GPU copies are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopySpec {
    /// Most SMs a copy kernel may occupy (two CTAs of 512 threads per SM); 0: copy engines only.
    pub sm_budget: u32,
    /// Bytes of GPU memory each shard's copier for a GPU takes for staged block copies
    /// (`kvloft_gpu::blocks`); 0: the kernel copies over PCIe itself.
    pub staging_bytes: u64,
}

/// Staging memory per copier by default: four parts of 32 MiB. A part holds 64 slots of 32 layers
/// of 16 KiB blocks; a layer-wise load of a 1 GiB prefix (32 layers) puts one layer in a part, so
/// its copy engines can run up to three layers ahead of the engine's forward pass (decision 57).
pub const DEFAULT_STAGING_BYTES: u64 = 128 << 20;

/// SMs a copy kernel may use by default: on the H100 test machine 16 SMs already reach 0.89-0.95
/// of the PCIe ceiling with 16 KiB blocks (bench/results/2026-11-24-h100-gpu-inprocess.json).
pub const DEFAULT_SM_BUDGET: u32 = 16;

impl Default for CopySpec {
    fn default() -> Self {
        CopySpec { sm_budget: DEFAULT_SM_BUDGET, staging_bytes: DEFAULT_STAGING_BYTES }
    }
}

/// How a copy between inference-engine memory and pool pages is done: the methods a copy planner
/// chooses among, and whose speed `kvloft bench calibrate` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CopyMethod {
    /// `host` backend: `process_vm_readv`/`process_vm_writev` with one range per block segment.
    ProcessVm,
    /// A CPU `memcpy` per block (shared memory between the engine and the pool).
    Memcpy,
    /// `cuda` backend: one `cuMemcpyAsync` per block segment.
    CudaMemcpy,
    /// `cuda` backend: `cuMemcpyBatchAsync` over the whole batch.
    CudaMemcpyBatch,
    /// `cuda` backend: a gather/scatter kernel over mapped pinned memory.
    CudaKernel,
}

impl CopyMethod {
    /// Every method, in the order the file lists them.
    pub const ALL: [CopyMethod; 5] = [
        CopyMethod::ProcessVm,
        CopyMethod::Memcpy,
        CopyMethod::CudaMemcpy,
        CopyMethod::CudaMemcpyBatch,
        CopyMethod::CudaKernel,
    ];

    /// The name used in the topology file.
    pub fn as_str(self) -> &'static str {
        match self {
            CopyMethod::ProcessVm => "process_vm",
            CopyMethod::Memcpy => "memcpy",
            CopyMethod::CudaMemcpy => "cuda_memcpy",
            CopyMethod::CudaMemcpyBatch => "cuda_memcpy_batch",
            CopyMethod::CudaKernel => "cuda_kernel",
        }
    }

    /// The method named `name` in the file.
    pub fn parse(name: &str) -> Option<CopyMethod> {
        CopyMethod::ALL.into_iter().find(|m| m.as_str() == name)
    }
}

/// Which way a copy goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CopyDirection {
    /// Save: inference-engine memory (device, or the CPU engine's memory) to pool pages.
    D2h,
    /// Load: pool pages to inference-engine memory.
    H2d,
}

impl CopyDirection {
    /// The name used in the topology file.
    pub fn as_str(self) -> &'static str {
        match self {
            CopyDirection::D2h => "d2h",
            CopyDirection::H2d => "h2d",
        }
    }

    /// The direction named `name` in the file.
    pub fn parse(name: &str) -> Option<CopyDirection> {
        [CopyDirection::D2h, CopyDirection::H2d].into_iter().find(|d| d.as_str() == name)
    }
}

/// One measured point of a copy curve: scattered blocks of `block_bytes` moved by `method` in
/// `direction` ran at `gbps`.
///
/// Equality compares `gbps` bit for bit, so that it is an equivalence (validation rejects NaN).
#[derive(Debug, Clone)]
pub struct CopyCurvePoint {
    /// The copy method.
    pub method: CopyMethod,
    /// Save or load.
    pub direction: CopyDirection,
    /// Bytes of one contiguous piece (one block segment) moved.
    pub block_bytes: u64,
    /// Throughput, 10^9 bytes per second; finite and positive.
    pub gbps: f64,
    /// When it was measured, RFC 3339 UTC (`2026-11-24T05:12:09Z`), when known.
    pub measured_at: Option<String>,
}

impl PartialEq for CopyCurvePoint {
    fn eq(&self, other: &Self) -> bool {
        self.method == other.method
            && self.direction == other.direction
            && self.block_bytes == other.block_bytes
            && self.gbps.to_bits() == other.gbps.to_bits()
            && self.measured_at == other.measured_at
    }
}

impl Eq for CopyCurvePoint {}

impl Topology {
    /// Pool bytes per NUMA node that carries at least one shard.
    pub fn node_pool_bytes(&self) -> BTreeMap<NodeId, u64> {
        let mut shards_per_node: BTreeMap<NodeId, u64> = BTreeMap::new();
        for s in &self.shards {
            *shards_per_node.entry(s.node).or_default() += 1;
        }
        match &self.memory.pool {
            PoolSize::Total(total) => {
                let n = self.shards.len().max(1) as u64;
                shards_per_node.into_iter().map(|(node, count)| (node, total / n * count)).collect()
            }
            PoolSize::PerNode(per_node) => {
                shards_per_node.into_keys().map(|node| (node, per_node.get(&node).copied().unwrap_or(0))).collect()
            }
        }
    }

    /// Pool bytes owned by shard `shard` (its node's share divided by the node's shard count).
    pub fn shard_pool_bytes(&self, shard: usize) -> u64 {
        let Some(spec) = self.shards.get(shard) else { return 0 };
        let on_node = self.shards.iter().filter(|s| s.node == spec.node).count().max(1) as u64;
        self.node_pool_bytes().get(&spec.node).copied().unwrap_or(0) / on_node
    }

    /// Total pool bytes over all shards.
    pub fn pool_bytes(&self) -> u64 {
        (0..self.shards.len()).map(|i| self.shard_pool_bytes(i)).sum()
    }

    /// The calibrated throughput of `method` in `direction` for pieces of `block_bytes`, GB/s:
    /// interpolated linearly in log2(block size) between the two nearest measured sizes, and the
    /// nearest measured figure outside the measured range. `None` when the method was not
    /// calibrated in that direction.
    pub fn copy_gbps(&self, method: CopyMethod, direction: CopyDirection, block_bytes: u64) -> Option<f64> {
        let mut curve: Vec<(u64, f64)> = self
            .calibration
            .iter()
            .filter(|p| p.method == method && p.direction == direction && p.block_bytes > 0)
            .map(|p| (p.block_bytes, p.gbps))
            .collect();
        curve.sort_by_key(|&(b, _)| b);
        let (first, last) = (*curve.first()?, *curve.last()?);
        if block_bytes <= first.0 {
            return Some(first.1);
        }
        if block_bytes >= last.0 {
            return Some(last.1);
        }
        let hi = curve.iter().position(|&(b, _)| b >= block_bytes)?;
        let ((b0, g0), (b1, g1)) = (curve[hi - 1], curve[hi]);
        if b1 == block_bytes {
            return Some(g1);
        }
        let x = ((block_bytes as f64).log2() - (b0 as f64).log2()) / ((b1 as f64).log2() - (b0 as f64).log2());
        Some(g0 + (g1 - g0) * x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(cpu: CpuId, node: NodeId) -> ShardSpec {
        ShardSpec { cpu, node, gpu: None, nic: None, ssd: None }
    }

    fn topo(pool: PoolSize, shards: Vec<ShardSpec>) -> Topology {
        Topology {
            server: ServerSpec { socket: DEFAULT_SOCKET.into(), metrics_addr: None, spin_us: DEFAULT_SPIN_US },
            memory: MemorySpec { pool, hugepages: false },
            reserved_cores: vec![],
            shards,
            calibration: vec![],
            copy: CopySpec::default(),
        }
    }

    #[test]
    fn total_pool_splits_by_shard_count() {
        let t = topo(PoolSize::Total(12 << 30), vec![shard(0, 0), shard(1, 0), shard(2, 1)]);
        assert_eq!(t.node_pool_bytes(), BTreeMap::from([(0, 8 << 30), (1, 4 << 30)]));
        assert_eq!(t.shard_pool_bytes(0), 4 << 30);
        assert_eq!(t.shard_pool_bytes(2), 4 << 30);
        assert_eq!(t.pool_bytes(), 12 << 30);
    }

    #[test]
    fn per_node_pool_splits_within_node() {
        let per = BTreeMap::from([(0, 6 << 30), (1, 1 << 30)]);
        let t = topo(PoolSize::PerNode(per), vec![shard(0, 0), shard(1, 0), shard(2, 0), shard(3, 1)]);
        assert_eq!(t.shard_pool_bytes(1), 2 << 30);
        assert_eq!(t.shard_pool_bytes(3), 1 << 30);
    }

    fn point(method: CopyMethod, direction: CopyDirection, block_bytes: u64, gbps: f64) -> CopyCurvePoint {
        CopyCurvePoint { method, direction, block_bytes, gbps, measured_at: None }
    }

    #[test]
    fn copy_curve_interpolates_in_log_block_size() {
        let mut t = topo(PoolSize::Total(1 << 30), vec![shard(0, 0)]);
        t.calibration = vec![
            point(CopyMethod::ProcessVm, CopyDirection::D2h, 64 << 10, 6.0),
            point(CopyMethod::ProcessVm, CopyDirection::D2h, 4 << 10, 2.0),
            point(CopyMethod::ProcessVm, CopyDirection::H2d, 4 << 10, 1.0),
        ];
        let g = |b| t.copy_gbps(CopyMethod::ProcessVm, CopyDirection::D2h, b).unwrap();
        assert_eq!(g(1024), 2.0);
        assert_eq!(g(4 << 10), 2.0);
        assert!((g(16 << 10) - 4.0).abs() < 1e-9, "{}", g(16 << 10));
        assert_eq!(g(64 << 10), 6.0);
        assert_eq!(g(1 << 30), 6.0);
        assert_eq!(t.copy_gbps(CopyMethod::ProcessVm, CopyDirection::H2d, 1 << 20), Some(1.0));
        assert_eq!(t.copy_gbps(CopyMethod::Memcpy, CopyDirection::D2h, 4096), None);
    }

    #[test]
    fn copy_method_names_round_trip() {
        for m in CopyMethod::ALL {
            assert_eq!(CopyMethod::parse(m.as_str()), Some(m));
        }
        assert_eq!(CopyDirection::parse("h2d"), Some(CopyDirection::H2d));
        assert_eq!(CopyMethod::parse("dma"), None);
    }
}
