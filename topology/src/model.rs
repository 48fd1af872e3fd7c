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
}

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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(cpu: CpuId, node: NodeId) -> ShardSpec {
        ShardSpec { cpu, node, gpu: None, nic: None, ssd: None }
    }

    fn topo(pool: PoolSize, shards: Vec<ShardSpec>) -> Topology {
        Topology {
            server: ServerSpec { socket: DEFAULT_SOCKET.into(), metrics_addr: None },
            memory: MemorySpec { pool, hugepages: false },
            reserved_cores: vec![],
            shards,
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
}
