//! The discovered machine as plain data.
//!
//! Everything placement and validation need to know about the hardware lives in [`Machine`]. It is
//! filled by [`crate::discover`] on a real host and built by hand in tests (see [`crate::synthetic`]),
//! so the logic that reads it never touches hwloc or sysfs.

use std::collections::BTreeSet;
use std::path::PathBuf;

/// A NUMA node id as the kernel numbers it (`/sys/devices/system/node/nodeN`).
pub type NodeId = u32;

/// An OS CPU number: what `taskset -c`, `/proc/cpuinfo` and `sched_setaffinity` call a CPU.
pub type CpuId = u32;

/// One physical core and the logical processors (hyperthreads) it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Core {
    /// OS CPU numbers of the core's processing units, lowest first. A shard pins to the first.
    pub cpus: Vec<CpuId>,
    /// The NUMA node whose memory is local to this core.
    pub node: NodeId,
}

impl Core {
    /// The CPU a shard placed on this core pins to.
    pub fn first_cpu(&self) -> CpuId {
        self.cpus[0]
    }
}

/// Free and total count of one hugepage size on one NUMA node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hugepages {
    /// Page size in bytes (2 MiB, 1 GiB).
    pub page_bytes: u64,
    /// Pages reserved on the node.
    pub total: u64,
    /// Pages reserved and not yet used.
    pub free: u64,
}

/// One NUMA node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumaNode {
    /// Kernel node id.
    pub id: NodeId,
    /// Memory local to the node, in bytes.
    pub memory_bytes: u64,
    /// Hugepage pools reserved on the node, one entry per page size.
    pub hugepages: Vec<Hugepages>,
}

impl NumaNode {
    /// Bytes of hugepages reserved and free on this node, all page sizes together.
    pub fn free_hugepage_bytes(&self) -> u64 {
        self.hugepages.iter().map(|h| h.free * h.page_bytes).sum()
    }
}

/// An NVIDIA GPU found on the PCI bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    /// Index among the machine's NVIDIA GPUs in PCI bus order: CUDA's numbering with
    /// `CUDA_DEVICE_ORDER=PCI_BUS_ID` and no `CUDA_VISIBLE_DEVICES`.
    pub index: u32,
    /// PCI address, `domain:bus:device.function` (`0000:17:00.0`).
    pub pci_bus_id: String,
    /// Model name where the system reports one.
    pub name: Option<String>,
    /// NUMA node the device is attached to; `None` where the platform does not say.
    pub node: Option<NodeId>,
}

/// What kind of network device a [`Nic`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum NicKind {
    /// An RDMA device the kernel exposes through ibverbs (`/sys/class/infiniband`).
    Rdma,
    /// A plain network interface (TCP only).
    Ethernet,
}

/// A network device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// Device name: the ibverbs name (`mlx5_0`) for RDMA devices, the interface name (`eth0`)
    /// otherwise.
    pub name: String,
    /// RDMA or plain interface.
    pub kind: NicKind,
    /// PCI address where the device is a PCI function.
    pub pci_bus_id: Option<String>,
    /// NUMA node the device is attached to.
    pub node: Option<NodeId>,
}

/// What kind of block device a [`Disk`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DiskKind {
    /// An NVMe namespace (`nvme0n1`).
    Nvme,
    /// Any other block device (SATA, virtio, ...).
    Other,
}

/// A block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// Kernel name (`nvme0n1`, `vda`).
    pub name: String,
    /// NVMe or other.
    pub kind: DiskKind,
    /// Capacity in bytes where known.
    pub size_bytes: Option<u64>,
    /// NUMA node the controller is attached to.
    pub node: Option<NodeId>,
    /// Where the device (or one of its partitions) is mounted, if it is.
    pub mount_point: Option<PathBuf>,
}

/// Everything kvloft needs to know about the host it runs on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Machine {
    /// Host name, for reports.
    pub hostname: String,
    /// Online physical cores, ordered by first CPU number.
    pub cores: Vec<Core>,
    /// NUMA nodes, ordered by id. A machine without NUMA support reports one node, 0.
    pub nodes: Vec<NumaNode>,
    /// NVIDIA GPUs in PCI order.
    pub gpus: Vec<Gpu>,
    /// RDMA devices first, then plain interfaces, each group by name.
    pub nics: Vec<Nic>,
    /// Block devices by name.
    pub disks: Vec<Disk>,
}

impl Machine {
    /// The core that carries OS CPU `cpu`, if that CPU is online.
    pub fn core_of_cpu(&self, cpu: CpuId) -> Option<&Core> {
        self.cores.iter().find(|c| c.cpus.contains(&cpu))
    }

    /// All online OS CPU numbers.
    pub fn cpus(&self) -> BTreeSet<CpuId> {
        self.cores.iter().flat_map(|c| c.cpus.iter().copied()).collect()
    }

    /// The NUMA node with id `id`.
    pub fn node(&self, id: NodeId) -> Option<&NumaNode> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// The GPU with index `index`.
    pub fn gpu(&self, index: u32) -> Option<&Gpu> {
        self.gpus.iter().find(|g| g.index == index)
    }

    /// The network device named `name`.
    pub fn nic(&self, name: &str) -> Option<&Nic> {
        self.nics.iter().find(|n| n.name == name)
    }

    /// Total memory of all NUMA nodes.
    pub fn memory_bytes(&self) -> u64 {
        self.nodes.iter().map(|n| n.memory_bytes).sum()
    }

    /// A compact list of CPU numbers, `0-3,8,10-11`, for messages.
    pub fn cpu_list(&self) -> String {
        compact_list(self.cpus())
    }
}

/// Formats ascending integers as ranges: `0-3,8,10-11`.
pub fn compact_list(values: impl IntoIterator<Item = u32>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut run: Option<(u32, u32)> = None;
    for v in values {
        run = match run {
            Some((start, end)) if v == end + 1 => Some((start, v)),
            Some((start, end)) => {
                out.push(range_text(start, end));
                Some((v, v))
            }
            None => Some((v, v)),
        };
    }
    if let Some((start, end)) = run {
        out.push(range_text(start, end));
    }
    out.join(",")
}

fn range_text(start: u32, end: u32) -> String {
    if start == end {
        start.to_string()
    } else {
        format!("{start}-{end}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_list_merges_runs() {
        assert_eq!(compact_list([0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(compact_list([5]), "5");
        assert_eq!(compact_list([]), "");
    }
}
