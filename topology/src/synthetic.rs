//! Hand-built machines for tests: placement, validation and routing are exercised on shapes this
//! host does not have (two sockets, eight GPUs, uneven NUMA nodes) without touching hwloc.

use crate::machine::{Core, Disk, DiskKind, Gpu, Hugepages, Machine, Nic, NicKind, NodeId, NumaNode};
use std::path::PathBuf;

/// What one synthetic NUMA node carries.
#[derive(Debug, Clone, Copy)]
pub struct NodeShape {
    /// Physical cores on the node (0 for a memory-only node).
    pub cores: u32,
    /// Memory in GiB.
    pub memory_gib: u64,
    /// NVIDIA GPUs attached to the node.
    pub gpus: u32,
    /// RDMA NICs attached to the node.
    pub rdma_nics: u32,
    /// NVMe namespaces attached to the node; each is mounted at `/mnt/nvmeN`.
    pub nvme: u32,
}

/// Builds a machine from per-node shapes. Nodes are numbered from 0 in order; cores get
/// consecutive CPU numbers node by node; with `smt` each core has a sibling CPU numbered after
/// all first threads, as Linux numbers them on x86.
pub fn machine(nodes: &[NodeShape], smt: bool) -> Machine {
    let total_cores: u32 = nodes.iter().map(|n| n.cores).sum();
    let mut m = Machine { hostname: "synthetic".into(), ..Machine::default() };
    let (mut cpu, mut gpu, mut nic, mut nvme, mut bus) = (0u32, 0u32, 0u32, 0u32, 0x10u32);
    for (id, shape) in nodes.iter().enumerate() {
        let node = id as NodeId;
        m.nodes.push(NumaNode {
            id: node,
            memory_bytes: shape.memory_gib << 30,
            hugepages: vec![Hugepages { page_bytes: 2 << 20, total: 0, free: 0 }],
        });
        for _ in 0..shape.cores {
            let mut cpus = vec![cpu];
            if smt {
                cpus.push(cpu + total_cores);
            }
            m.cores.push(Core { cpus, node });
            cpu += 1;
        }
        for _ in 0..shape.gpus {
            m.gpus.push(Gpu {
                index: gpu,
                pci_bus_id: format!("0000:{bus:02x}:00.0"),
                name: Some("NVIDIA H100 80GB HBM3".into()),
                node: Some(node),
            });
            gpu += 1;
            bus += 1;
        }
        for _ in 0..shape.rdma_nics {
            m.nics.push(Nic {
                name: format!("mlx5_{nic}"),
                kind: NicKind::Rdma,
                pci_bus_id: Some(format!("0000:{bus:02x}:00.0")),
                node: Some(node),
            });
            nic += 1;
            bus += 1;
        }
        for _ in 0..shape.nvme {
            m.disks.push(Disk {
                name: format!("nvme{nvme}n1"),
                kind: DiskKind::Nvme,
                size_bytes: Some(3840 << 30),
                node: Some(node),
                mount_point: Some(PathBuf::from(format!("/mnt/nvme{nvme}"))),
            });
            nvme += 1;
            bus += 1;
        }
    }
    m.cores.sort_by_key(|c| c.first_cpu());
    m
}

/// Two sockets, each with 8 cores (SMT), 4 GPUs, 2 RDMA NICs and 2 NVMe drives, 512 GiB per node.
pub fn two_socket_eight_gpu() -> Machine {
    let socket = NodeShape { cores: 8, memory_gib: 512, gpus: 4, rdma_nics: 2, nvme: 2 };
    machine(&[socket, socket], true)
}

/// One socket with 2 cores, 24 GiB and no GPU, NIC or NVMe: the CI machine.
pub fn small_vm() -> Machine {
    machine(&[NodeShape { cores: 2, memory_gib: 24, gpus: 0, rdma_nics: 0, nvme: 0 }], false)
}

/// Uneven NUMA nodes: node 0 has 6 cores, 2 GPUs, one NIC and one NVMe; node 1 has 2 cores and no
/// devices; node 2 is memory only (CXL-style) with no cores.
pub fn uneven_numa() -> Machine {
    machine(
        &[
            NodeShape { cores: 6, memory_gib: 256, gpus: 2, rdma_nics: 1, nvme: 1 },
            NodeShape { cores: 2, memory_gib: 64, gpus: 0, rdma_nics: 0, nvme: 0 },
            NodeShape { cores: 0, memory_gib: 128, gpus: 0, rdma_nics: 0, nvme: 0 },
        ],
        false,
    )
}
