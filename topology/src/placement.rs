//! Default placement: one shard per non-reserved physical core, each bound to a GPU, NIC and NVMe
//! drive on its own NUMA node, derived from a [`Machine`] alone.

use crate::machine::{CpuId, DiskKind, Machine, NicKind, NodeId};
use crate::model::ShardSpec;
use std::collections::BTreeSet;
use std::path::PathBuf;

/// A shard chosen by placement, with what placement found but did not switch on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedShard {
    /// The shard as it will run.
    pub spec: ShardSpec,
    /// An NVMe drive local to the shard's node: its name and the directory the NVMe tier would use
    /// (`<mount point>/kvloft`), when the drive is mounted. Placement never turns the NVMe tier on
    /// by itself, since that writes to the user's disk; the generated file shows the line to
    /// uncomment.
    pub nvme: Option<(String, Option<PathBuf>)>,
}

/// The outcome of placement: shards plus notes worth showing the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Shards in CPU order.
    pub shards: Vec<PlacedShard>,
    /// Facts the user should know (devices no shard drives, devices whose NUMA node is unknown).
    pub notes: Vec<String>,
}

impl Placement {
    /// The shard specs alone.
    pub fn specs(&self) -> Vec<ShardSpec> {
        self.shards.iter().map(|s| s.spec.clone()).collect()
    }
}

/// Places one shard on every physical core none of whose CPUs is in `reserved`, and binds each to
/// devices on its NUMA node. Devices whose node is unknown count as local to the first node.
/// Within a node, shards are split into contiguous runs, one run per device, so each device is
/// driven by a neighbouring group of cores.
pub fn place(machine: &Machine, reserved: &BTreeSet<CpuId>) -> Placement {
    let mut notes = Vec::new();
    let first_node = machine.nodes.first().map_or(0, |n| n.id);
    let local = |node: Option<NodeId>| node.unwrap_or(first_node);

    let cores: Vec<_> = machine.cores.iter().filter(|c| !c.cpus.iter().any(|cpu| reserved.contains(cpu))).collect();
    let nodes: BTreeSet<NodeId> = cores.iter().map(|c| c.node).collect();

    let mut shards = Vec::new();
    for node in nodes {
        let node_cores: Vec<_> = cores.iter().filter(|c| c.node == node).collect();
        let gpus: Vec<u32> = machine.gpus.iter().filter(|g| local(g.node) == node).map(|g| g.index).collect();
        let rdma: Vec<&str> = machine
            .nics
            .iter()
            .filter(|n| n.kind == NicKind::Rdma && local(n.node) == node)
            .map(|n| n.name.as_str())
            .collect();
        let nics: Vec<&str> = if rdma.is_empty() {
            machine
                .nics
                .iter()
                .filter(|n| n.kind == NicKind::Ethernet && n.pci_bus_id.is_some() && local(n.node) == node)
                .map(|n| n.name.as_str())
                .collect()
        } else {
            rdma
        };
        let drives: Vec<_> =
            machine.disks.iter().filter(|d| d.kind == DiskKind::Nvme && local(d.node) == node).collect();

        let n = node_cores.len();
        for (i, core) in node_cores.iter().enumerate() {
            let gpu = spread(i, n, &gpus).copied();
            let nic = spread(i, n, &nics).map(|s| s.to_string());
            let nvme =
                spread(i, n, &drives).map(|d| (d.name.clone(), d.mount_point.as_ref().map(|m| m.join("kvloft"))));
            shards.push(PlacedShard { spec: ShardSpec { cpu: core.first_cpu(), node, gpu, nic, ssd: None }, nvme });
        }
        if n < gpus.len() {
            notes.push(format!(
                "node {node} has {} GPUs but only {n} shard cores: GPUs {:?} are driven by no shard",
                gpus.len(),
                &gpus[n..]
            ));
        }
    }
    for g in machine.gpus.iter().filter(|g| g.node.is_none()) {
        notes.push(format!(
            "GPU {} ({}) reports no NUMA node; treated as local to node {first_node}",
            g.index, g.pci_bus_id
        ));
    }
    shards.sort_by_key(|s| s.spec.cpu);
    Placement { shards, notes }
}

/// The device for item `i` of `n` when `n` items are split into `devices.len()` contiguous runs.
fn spread<T>(i: usize, n: usize, devices: &[T]) -> Option<&T> {
    if devices.is_empty() || n == 0 {
        return None;
    }
    if n <= devices.len() {
        return devices.get(i);
    }
    devices.get(i * devices.len() / n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic;
    use std::collections::BTreeMap;

    #[test]
    fn two_sockets_bind_local_devices_evenly() {
        let m = synthetic::two_socket_eight_gpu();
        let p = place(&m, &BTreeSet::new());
        assert_eq!(p.shards.len(), 16, "one shard per physical core, not per hyperthread");
        let mut per_gpu: BTreeMap<u32, usize> = BTreeMap::new();
        for s in &p.shards {
            let spec = &s.spec;
            assert_eq!(m.core_of_cpu(spec.cpu).unwrap().node, spec.node);
            let gpu = m.gpu(spec.gpu.unwrap()).unwrap();
            assert_eq!(gpu.node, Some(spec.node), "GPU is NUMA-local");
            assert_eq!(m.nic(spec.nic.as_deref().unwrap()).unwrap().node, Some(spec.node));
            let (drive, dir) = s.nvme.clone().unwrap();
            assert!(m.disks.iter().any(|d| d.name == drive && d.node == Some(spec.node)));
            assert!(dir.unwrap().starts_with("/mnt"));
            assert_eq!(spec.ssd, None, "placement never enables the NVMe tier by itself");
            *per_gpu.entry(spec.gpu.unwrap()).or_default() += 1;
        }
        assert_eq!(per_gpu.len(), 8);
        assert!(per_gpu.values().all(|&n| n == 2), "{per_gpu:?}");
        assert!(p.notes.is_empty(), "{:?}", p.notes);
    }

    #[test]
    fn shards_pin_to_first_hyperthread() {
        let m = synthetic::two_socket_eight_gpu();
        let p = place(&m, &BTreeSet::new());
        let cpus: Vec<u32> = p.shards.iter().map(|s| s.spec.cpu).collect();
        assert_eq!(cpus, (0..16).collect::<Vec<_>>());
    }

    #[test]
    fn small_vm_gets_one_shard_per_core_and_no_devices() {
        let p = place(&synthetic::small_vm(), &BTreeSet::new());
        assert_eq!(p.shards.len(), 2);
        for (i, s) in p.shards.iter().enumerate() {
            assert_eq!(s.spec, ShardSpec { cpu: i as u32, node: 0, gpu: None, nic: None, ssd: None });
            assert_eq!(s.nvme, None);
        }
    }

    #[test]
    fn reserved_cores_get_no_shard() {
        let m = synthetic::two_socket_eight_gpu();
        // CPU 17 is the hyperthread sibling of CPU 1: reserving it takes the whole core.
        let p = place(&m, &BTreeSet::from([0, 17]));
        let cpus: Vec<u32> = p.shards.iter().map(|s| s.spec.cpu).collect();
        assert_eq!(cpus, (2..16).collect::<Vec<_>>());
    }

    #[test]
    fn uneven_nodes_bind_only_local_devices() {
        let m = synthetic::uneven_numa();
        let p = place(&m, &BTreeSet::new());
        assert_eq!(p.shards.len(), 8, "the memory-only node gets no shard");
        for s in &p.shards {
            if s.spec.node == 0 {
                assert!(s.spec.gpu.is_some() && s.spec.nic.is_some() && s.nvme.is_some());
            } else {
                assert_eq!(s.spec.node, 1);
                assert_eq!((s.spec.gpu, &s.spec.nic, &s.nvme), (None, &None, &None));
            }
        }
        let gpus: Vec<_> = p.shards.iter().filter_map(|s| s.spec.gpu).collect();
        assert_eq!(gpus, vec![0, 0, 0, 1, 1, 1]);
    }

    #[test]
    fn fewer_cores_than_gpus_is_reported() {
        let m = synthetic::two_socket_eight_gpu();
        let reserved: BTreeSet<u32> = (0..6).collect();
        let p = place(&m, &reserved);
        assert!(p.notes.iter().any(|n| n.contains("node 0 has 4 GPUs but only 2 shard cores")), "{:?}", p.notes);
    }

    #[test]
    fn gpu_without_node_counts_as_local_to_first_node() {
        let mut m = synthetic::small_vm();
        m.gpus.push(crate::machine::Gpu { index: 0, pci_bus_id: "0000:00:05.0".into(), name: None, node: None });
        let p = place(&m, &BTreeSet::new());
        assert!(p.shards.iter().all(|s| s.spec.gpu == Some(0)));
        assert!(p.notes[0].contains("reports no NUMA node"));
    }

    #[test]
    fn spread_makes_contiguous_runs() {
        let d = [10, 20];
        let got: Vec<_> = (0..5).map(|i| *spread(i, 5, &d).unwrap()).collect();
        assert_eq!(got, vec![10, 10, 10, 20, 20]);
        assert_eq!(spread::<u32>(0, 3, &[]), None);
    }
}
