//! Writes a topology as a commented, ready-to-edit TOML file (`kvloft topology`).

use crate::machine::{compact_list, DiskKind, Machine, NicKind};
use crate::model::{default_socket, PoolSize, Topology, DEFAULT_SOCKET};
use crate::placement::Placement;
use bytesize::ByteSize;
use std::fmt::Write;

/// Renders `topology` for `machine` as TOML with comments. `placement`, when the shards came from
/// discovery, adds its notes and the NVMe lines it did not switch on.
pub fn render(machine: &Machine, topology: &Topology, placement: Option<&Placement>) -> String {
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(
        w,
        "# kvloft topology for host {}, written by `kvloft topology` from discovery.",
        quote(&machine.hostname)
    );
    let _ = writeln!(
        w,
        "# Check an edited copy with `kvloft topology --check FILE`; run it with `kvloft serve --config FILE`."
    );
    let _ = writeln!(w, "#");
    let _ = writeln!(w, "# Machine:");
    for node in &machine.nodes {
        let cores: Vec<_> = machine.cores.iter().filter(|c| c.node == node.id).collect();
        let cpus =
            compact_list(cores.iter().flat_map(|c| c.cpus.iter().copied()).collect::<std::collections::BTreeSet<_>>());
        let _ = writeln!(
            w,
            "#   NUMA node {}: {} of memory, {} free in hugepages, {} cores (CPUs {})",
            node.id,
            ByteSize(node.memory_bytes).display().iec(),
            ByteSize(node.free_hugepage_bytes()).display().iec(),
            cores.len(),
            if cpus.is_empty() { "none".into() } else { cpus }
        );
    }
    for g in &machine.gpus {
        let name = g.name.as_deref().unwrap_or("NVIDIA GPU");
        let _ = writeln!(w, "#   GPU {}: {name} at {}, {}", g.index, g.pci_bus_id, node_text(g.node));
    }
    for n in &machine.nics {
        let kind = if n.kind == NicKind::Rdma { "RDMA device" } else { "network interface" };
        let _ = writeln!(w, "#   {kind} {}{}, {}", n.name, at_pci(&n.pci_bus_id), node_text(n.node));
    }
    for d in &machine.disks {
        let kind = if d.kind == DiskKind::Nvme { "NVMe drive" } else { "disk" };
        let size = d.size_bytes.map(|b| format!(" ({})", ByteSize(b).display().iec())).unwrap_or_default();
        let mount = d.mount_point.as_ref().map(|m| format!(", mounted at {}", m.display())).unwrap_or_default();
        let _ = writeln!(w, "#   {kind} {}{size}, {}{mount}", d.name, node_text(d.node));
    }
    if machine.gpus.is_empty() {
        let _ = writeln!(w, "#   no NVIDIA GPU");
    }
    for note in placement.map(|p| p.notes.as_slice()).unwrap_or_default() {
        let _ = writeln!(w, "# Note: {note}");
    }

    let _ = writeln!(w);
    let _ = writeln!(w, "# CPUs left to the inference engine; no shard runs on them. Example: reserved-cores = [0, 1]");
    let reserved: Vec<String> = topology.reserved_cores.iter().map(u32::to_string).collect();
    let _ = writeln!(w, "reserved-cores = [{}]", reserved.join(", "));

    let _ = writeln!(w);
    let _ = writeln!(w, "[server]");
    let _ = writeln!(w, "# Unix socket that inference processes connect to; without this key the server uses");
    let _ = writeln!(w, "# $KVLOFT_SOCKET, else {DEFAULT_SOCKET}.");
    let socket = quote(&topology.server.socket.to_string_lossy());
    if topology.server.socket == default_socket() {
        let _ = writeln!(w, "# socket = {socket}");
    } else {
        let _ = writeln!(w, "socket = {socket}");
    }
    let _ = writeln!(w, "# Prometheus endpoint (GET /metrics) as host:port, or \"off\".");
    let metrics = topology.server.metrics_addr.map_or_else(|| "off".to_string(), |a| a.to_string());
    let _ = writeln!(w, "metrics-addr = {}", quote(&metrics));

    let _ = writeln!(w);
    let _ = writeln!(w, "[memory]");
    match &topology.memory.pool {
        PoolSize::Total(bytes) => {
            let _ = writeln!(
                w,
                "# Pinned host pool for the whole machine, split over NUMA nodes by how many shards each runs."
            );
            let _ = writeln!(w, "# Per node instead: pool-size-per-node = {{ 0 = \"8GiB\", 1 = \"8GiB\" }}");
            let _ = writeln!(w, "pool-size = {}", quote(&size_text(*bytes)));
        }
        PoolSize::PerNode(sizes) => {
            let _ = writeln!(w, "# Pinned host pool per NUMA node, split evenly over the node's shards.");
            let entries: Vec<String> = sizes.iter().map(|(n, b)| format!("{n} = {}", quote(&size_text(*b)))).collect();
            let _ = writeln!(w, "pool-size-per-node = {{ {} }}", entries.join(", "));
        }
    }
    let _ = writeln!(w, "# Back the pool with hugepages where enough are reserved and free; 4 KiB pages otherwise.");
    let _ = writeln!(w, "hugepages = {}", topology.memory.hugepages);

    let _ = writeln!(w);
    let _ =
        writeln!(w, "# One [[shard]] per core. core: OS CPU number (as in taskset -c); numa-node: checked against the");
    let _ =
        writeln!(w, "# core; gpu: GPU index in PCI order; nic: RDMA device or interface; ssd: directory on an NVMe");
    let _ = writeln!(w, "# drive for the NVMe tier (without it the shard keeps blocks in host memory only).");
    for (i, shard) in topology.shards.iter().enumerate() {
        let _ = writeln!(w, "[[shard]]");
        let _ = writeln!(w, "core = {}", shard.cpu);
        let _ = writeln!(w, "numa-node = {}", shard.node);
        match shard.gpu {
            Some(g) => {
                let _ = writeln!(w, "gpu = {g}");
            }
            None => {
                let _ = writeln!(w, "# gpu: none on NUMA node {}", shard.node);
            }
        }
        match &shard.nic {
            Some(n) => {
                let _ = writeln!(w, "nic = {}", quote(n));
            }
            None => {
                let _ = writeln!(w, "# nic: none on NUMA node {}", shard.node);
            }
        }
        let placed_nvme = placement.and_then(|p| p.shards.get(i)).and_then(|p| p.nvme.clone());
        match (&shard.ssd, placed_nvme) {
            (Some(path), _) => {
                let _ = writeln!(w, "ssd = {}", quote(&path.to_string_lossy()));
            }
            (None, Some((drive, Some(dir)))) => {
                let _ = writeln!(
                    w,
                    "# ssd = {}   # on {drive}: create the directory and uncomment to enable the NVMe tier",
                    quote(&dir.to_string_lossy())
                );
            }
            (None, Some((drive, None))) => {
                let _ =
                    writeln!(w, "# ssd: {drive} is local but not mounted; mount it and name a directory on it here");
            }
            (None, None) => {
                let _ = writeln!(w, "# ssd: no NVMe drive on NUMA node {}", shard.node);
            }
        }
        let _ = writeln!(w);
    }
    out
}

/// A size as the shortest exact TOML string: `"8GiB"`, `"512MiB"`, or a byte count.
pub fn size_text(bytes: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift && bytes % (1 << shift) == 0 {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn node_text(node: Option<u32>) -> String {
    node.map_or_else(|| "NUMA node unknown".into(), |n| format!("NUMA node {n}"))
}

fn at_pci(bus: &Option<String>) -> String {
    bus.as_ref().map(|b| format!(" at {b}")).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnostic::Source;
    use crate::{placement, synthetic, validate};
    use std::collections::BTreeSet;
    use std::path::Path;

    fn roundtrip(machine: &Machine) {
        let checked = validate::embedded_default(machine).unwrap();
        let p = placement::place(machine, &BTreeSet::new());
        let text = render(machine, &checked.topology, Some(&p));
        let again = validate::check(&Source { path: Path::new("gen.toml"), text: &text }, machine)
            .unwrap_or_else(|e| panic!("{e}\n---\n{text}"));
        assert_eq!(again.topology, checked.topology, "{text}");
        assert!(again.warnings.is_empty(), "{:?}", again.warnings);
    }

    #[test]
    fn generated_files_check_and_round_trip() {
        roundtrip(&synthetic::small_vm());
        roundtrip(&synthetic::two_socket_eight_gpu());
        roundtrip(&synthetic::uneven_numa());
    }

    #[test]
    fn generated_file_shows_nvme_lines_to_uncomment() {
        let m = synthetic::two_socket_eight_gpu();
        let checked = validate::embedded_default(&m).unwrap();
        let text = render(&m, &checked.topology, Some(&placement::place(&m, &BTreeSet::new())));
        assert!(text.contains("# ssd = \"/mnt/nvme0/kvloft\"   # on nvme0n1"), "{text}");
        assert!(text.contains("#   GPU 7: NVIDIA H100 80GB HBM3 at"), "{text}");
    }

    #[test]
    fn sizes_render_exactly() {
        assert_eq!(size_text(8 << 30), "8GiB");
        assert_eq!(size_text(1536 << 20), "1536MiB");
        assert_eq!(size_text(1000), "1000");
    }
}
