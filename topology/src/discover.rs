//! Discovery of the real machine: hwloc (through hwlocality) for cores, NUMA nodes and PCI/OS
//! devices, sysfs and `/proc/mounts` for what hwloc does not report (free hugepages, disk sizes,
//! mount points).

use crate::machine::{Core, Disk, DiskKind, Gpu, Hugepages, Machine, Nic, NicKind, NodeId, NumaNode};
use hwlocality::object::attributes::ObjectAttributes;
use hwlocality::object::types::{OSDeviceType, ObjectType};
use hwlocality::object::TopologyObject;
use hwlocality::topology::builder::TypeFilter;
use hwlocality::Topology as Hwloc;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// Why discovery failed. Every variant means the server cannot know where to place shards;
/// a topology file with explicit `[[shard]]` tables still needs discovery to validate them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoverError {
    /// hwloc could not build the machine topology; usually a sandbox hides `/sys` or `/proc`.
    #[error("hwloc could not read this machine's topology ({0}); check that /sys and /proc are mounted and readable")]
    Hwloc(String),
    /// hwloc reported no core at all.
    #[error("hwloc found no online core on this machine")]
    NoCores,
}

/// hwloc plugins that load vendor libraries (CUDA, NVML, OpenCL, ROCm, Level Zero, X/GL). They
/// start driver threads and install signal handlers in the server process, and add nothing we
/// need: GPUs are found as PCI devices by hwloc's own Linux component.
const VENDOR_PLUGINS: [&str; 6] = ["cuda", "nvml", "opencl", "rsmi", "levelzero", "gl"];

const NVIDIA_VENDOR: u16 = 0x10de;
const PCI_CLASS_VGA: u16 = 0x0300;
const PCI_CLASS_3D: u16 = 0x0302;

/// Discovers the machine kvloft runs on.
pub fn discover() -> Result<Machine, DiscoverError> {
    let hwloc_err = |e: &dyn std::fmt::Display| DiscoverError::Hwloc(e.to_string());
    let new_builder = || Hwloc::builder().with_io_type_filter(TypeFilter::KeepImportant).map_err(|e| hwloc_err(&e));
    // hwloc refuses to blacklist a plugin it does not have (EINVAL), and a refused call consumes
    // the builder: probe each name on its own builder, then blacklist the ones hwloc knows.
    let known: Vec<&str> =
        VENDOR_PLUGINS.into_iter().filter(|p| new_builder().is_ok_and(|b| b.without_component(p).is_ok())).collect();
    let mut builder = new_builder()?;
    for plugin in known {
        builder = builder.without_component(plugin).map_err(|e| hwloc_err(&e))?;
    }
    let topo = builder.build().map_err(|e| hwloc_err(&e))?;
    let node_count = topo.objects_with_type(ObjectType::NUMANode).count();

    let mut machine = Machine {
        hostname: fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default(),
        ..Machine::default()
    };
    for node in topo.objects_with_type(ObjectType::NUMANode) {
        let id = node.os_index().unwrap_or(0) as NodeId;
        let memory_bytes = match node.attributes() {
            Some(ObjectAttributes::NUMANode(attrs)) => attrs.local_memory().map_or(0, |m| m.get()),
            _ => 0,
        };
        machine.nodes.push(NumaNode { id, memory_bytes, hugepages: hugepages(id) });
    }
    if machine.nodes.is_empty() {
        machine.nodes.push(NumaNode { id: 0, memory_bytes: meminfo_total(), hugepages: hugepages(0) });
    }
    machine.nodes.sort_by_key(|n| n.id);
    if let [only] = machine.nodes.as_mut_slice() {
        // Some VMs hot-plug memory that the node's meminfo does not count; on one node all of
        // MemTotal is local.
        only.memory_bytes = only.memory_bytes.max(meminfo_total());
    }

    for core in topo.objects_with_type(ObjectType::Core) {
        let Some(cpuset) = core.cpuset() else { continue };
        let cpus: Vec<u32> = cpuset.iter_set().map(|i| usize::from(i) as u32).collect();
        if cpus.is_empty() {
            continue;
        }
        machine.cores.push(Core { cpus, node: node_of(core, node_count).unwrap_or(0) });
    }
    if machine.cores.is_empty() {
        return Err(DiscoverError::NoCores);
    }
    machine.cores.sort_by_key(Core::first_cpu);

    let mut gpus = Vec::new();
    for pci in topo.pci_devices() {
        let Some(ObjectAttributes::PCIDevice(attrs)) = pci.attributes() else { continue };
        if attrs.vendor_id() != NVIDIA_VENDOR || !matches!(attrs.class_id(), PCI_CLASS_VGA | PCI_CLASS_3D) {
            continue;
        }
        let bus_id =
            format!("{:04x}:{:02x}:{:02x}.{:x}", attrs.domain(), attrs.bus_id(), attrs.bus_device(), attrs.function());
        let name = pci.name().map(|n| n.to_string_lossy().into_owned()).filter(|n| !n.is_empty());
        gpus.push((bus_id, name, node_of(pci, node_count)));
    }
    gpus.sort();
    machine.gpus = gpus
        .into_iter()
        .enumerate()
        .map(|(i, (pci_bus_id, name, node))| Gpu { index: i as u32, pci_bus_id, name, node })
        .collect();

    let mounts = mounts();
    for osdev in topo.os_devices() {
        let Some(ObjectAttributes::OSDevice(attrs)) = osdev.attributes() else { continue };
        let Some(name) = osdev.name().map(|n| n.to_string_lossy().into_owned()) else { continue };
        let node = node_of(osdev, node_count);
        let pci_bus_id = pci_parent(osdev);
        match attrs.device_type() {
            OSDeviceType::OpenFabrics => machine.nics.push(Nic { name, kind: NicKind::Rdma, pci_bus_id, node }),
            OSDeviceType::Network => machine.nics.push(Nic { name, kind: NicKind::Ethernet, pci_bus_id, node }),
            OSDeviceType::Storage => {
                let kind = if name.starts_with("nvme") { DiskKind::Nvme } else { DiskKind::Other };
                let size_bytes = fs::read_to_string(format!("/sys/block/{name}/size"))
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .map(|sectors| sectors * 512);
                let mount_point = mount_of(&mounts, &name);
                machine.disks.push(Disk { name, kind, size_bytes, node, mount_point });
            }
            _ => {}
        }
    }
    add_sysfs_rdma(&mut machine);
    machine.nics.sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));
    machine.nics.dedup_by(|a, b| a.name == b.name);
    machine.disks.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(machine)
}

/// NUMA node of an object: the node set of its first non-I/O ancestor (or its own), when that
/// names exactly one node. `None` on multi-node machines when the object hangs off the root.
fn node_of(obj: &TopologyObject, node_count: usize) -> Option<NodeId> {
    let anchor = if obj.object_type().is_io() { obj.first_non_io_ancestor()? } else { obj };
    let nodeset = anchor.nodeset()?;
    match nodeset.weight() {
        Some(1) => nodeset.first_set().map(|i| usize::from(i) as NodeId),
        _ if node_count <= 1 => Some(0),
        _ => None,
    }
}

fn pci_parent(obj: &TopologyObject) -> Option<String> {
    let parent = obj.ancestors().find(|a| a.object_type() == ObjectType::PCIDevice)?;
    match parent.attributes() {
        Some(ObjectAttributes::PCIDevice(a)) => {
            Some(format!("{:04x}:{:02x}:{:02x}.{:x}", a.domain(), a.bus_id(), a.bus_device(), a.function()))
        }
        _ => None,
    }
}

/// RDMA devices listed by the kernel that hwloc missed (hwloc's OpenFabrics objects need its
/// PCI backend).
fn add_sysfs_rdma(machine: &mut Machine) {
    let Ok(entries) = fs::read_dir("/sys/class/infiniband") else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if machine.nic(&name).is_some() {
            continue;
        }
        let dev = entry.path().join("device");
        let node = fs::read_to_string(dev.join("numa_node"))
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .and_then(|n| u32::try_from(n).ok());
        let pci_bus_id =
            fs::canonicalize(&dev).ok().and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()));
        machine.nics.push(Nic { name, kind: NicKind::Rdma, pci_bus_id, node });
    }
}

/// Hugepage pools of node `node` from sysfs (`nr_hugepages`, `free_hugepages` per size).
fn hugepages(node: NodeId) -> Vec<Hugepages> {
    let dir = PathBuf::from(format!("/sys/devices/system/node/node{node}/hugepages"));
    let Ok(entries) = fs::read_dir(&dir) else { return Vec::new() };
    let read = |p: &Path| fs::read_to_string(p).ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0);
    let mut out: Vec<Hugepages> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let kib: u64 = name.strip_prefix("hugepages-")?.strip_suffix("kB")?.parse().ok()?;
            Some(Hugepages {
                page_bytes: kib << 10,
                total: read(&e.path().join("nr_hugepages")),
                free: read(&e.path().join("free_hugepages")),
            })
        })
        .collect();
    out.sort_by_key(|h| h.page_bytes);
    out
}

fn meminfo_total() -> u64 {
    fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib << 10)
}

/// Device path -> mount point, from `/proc/mounts`.
fn mounts() -> BTreeMap<String, PathBuf> {
    let text = fs::read_to_string("/proc/mounts").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let dev = f.next()?.strip_prefix("/dev/")?.to_string();
            Some((dev, PathBuf::from(f.next()?.replace("\\040", " "))))
        })
        .collect()
}

/// The mount point of disk `name` or of one of its partitions (`nvme0n1p1`, `sda1`).
fn mount_of(mounts: &BTreeMap<String, PathBuf>, name: &str) -> Option<PathBuf> {
    mounts.get(name).cloned().or_else(|| {
        mounts
            .iter()
            .find(|(dev, _)| {
                dev.strip_prefix(name).is_some_and(|rest| {
                    rest.trim_start_matches('p').chars().all(|c| c.is_ascii_digit()) && !rest.is_empty()
                })
            })
            .map(|(_, m)| m.clone())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovers_this_machine() {
        let m = discover().expect("hwloc discovery works on the test machine");
        assert!(!m.cores.is_empty());
        assert!(!m.nodes.is_empty());
        assert!(m.memory_bytes() > 0, "{m:?}");
        let online = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        assert!(m.cpus().len() >= online.min(1));
        for c in &m.cores {
            assert!(m.node(c.node).is_some(), "core on unknown node {c:?}");
        }
    }

    #[test]
    fn partitions_map_to_their_disk() {
        let mounts = BTreeMap::from([
            ("nvme0n1p2".to_string(), PathBuf::from("/mnt/fast")),
            ("sda1".to_string(), PathBuf::from("/")),
        ]);
        assert_eq!(mount_of(&mounts, "nvme0n1"), Some(PathBuf::from("/mnt/fast")));
        assert_eq!(mount_of(&mounts, "sda"), Some(PathBuf::from("/")));
        assert_eq!(mount_of(&mounts, "nvme1n1"), None);
    }
}
