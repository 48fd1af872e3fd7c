//! Writes a topology as a commented, ready-to-edit TOML file (`kvloft topology`).

use crate::machine::{compact_list, DiskKind, Machine, NicKind};
use crate::model::{default_socket, CopyCurvePoint, PoolSize, Topology, DEFAULT_SOCKET};
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
    let _ = writeln!(w, "# Microseconds a shard polls for work before it sleeps; 0 sleeps at once.");
    let _ = writeln!(w, "spin-us = {}", topology.server.spin_us);

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
    let _ = writeln!(w, "[copy]");
    let _ = writeln!(w, "# Most SMs a GPU copy kernel may take from the inference engine (0: copy engines only).");
    let _ = writeln!(w, "sm-budget = {}", topology.copy.sm_budget);
    let _ = writeln!(w, "# GPU memory per shard and GPU for copies staged through the GPU (0: none).");
    let _ = writeln!(w, "staging = {}", quote(&size_text(topology.copy.staging_bytes)));

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
    if !topology.calibration.is_empty() {
        out.push_str(&calibration_section(&topology.calibration));
    }
    out
}

/// First line of the section [`calibration_section`] writes.
pub const CALIBRATION_HEADER: &str =
    "# Copy curves of this machine, measured by `kvloft bench calibrate` (GB/s = 10^9 bytes/s, by";

/// The `[calibration]` section for `points`: a comment, `[calibration]`, and one
/// `[[calibration.copy]]` table per point, in the order given.
pub fn calibration_section(points: &[CopyCurvePoint]) -> String {
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "{CALIBRATION_HEADER}");
    let _ = writeln!(w, "# method, direction and block size); the copy planner reads them. Measure again and rewrite");
    let _ = writeln!(w, "# this section with `kvloft bench calibrate --config FILE --write`.");
    let _ = writeln!(w, "[calibration]");
    for p in points {
        let _ = writeln!(w);
        let _ = writeln!(w, "[[calibration.copy]]");
        let _ = writeln!(w, "method = {}", quote(p.method.as_str()));
        let _ = writeln!(w, "direction = {}", quote(p.direction.as_str()));
        let _ = writeln!(w, "block-bytes = {}", p.block_bytes);
        let _ = writeln!(w, "gbps = {}", toml::Value::Float(p.gbps));
        if let Some(t) = &p.measured_at {
            let _ = writeln!(w, "measured-at = {}", quote(t));
        }
    }
    out
}

/// `text` (a topology file) with its calibration tables (`[calibration]`, `[calibration.*]`,
/// `[[calibration.*]]`, each with its key lines and the comment lines right above its header)
/// removed wherever they are, and `section` appended after one blank line. Everything else is
/// kept byte for byte. Callers parse the result to make sure it is still a valid file.
pub fn replace_calibration(text: &str, section: &str) -> String {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let mut keep = vec![true; lines.len()];
    let mut inside = false;
    for (i, line) in lines.iter().enumerate() {
        if let Some(name) = table_header(line) {
            inside = name == "calibration" || name.starts_with("calibration.");
            if inside {
                // The comment block directly above the header belongs to it.
                let mut j = i;
                while j > 0 && keep[j - 1] && lines[j - 1].trim_start().starts_with('#') {
                    j -= 1;
                    keep[j] = false;
                }
            }
        }
        if inside {
            keep[i] = false;
        }
    }
    let mut out: String = lines.iter().zip(&keep).filter(|(_, k)| **k).map(|(l, _)| *l).collect();
    let trimmed = out.trim_end().len();
    out.truncate(trimmed);
    if !out.is_empty() {
        out.push_str("\n\n");
    }
    out.push_str(section);
    out
}

/// The table name of a `[name]` or `[[name]]` header line (spaces around the name and a trailing
/// comment allowed), `None` for any other line.
fn table_header(line: &str) -> Option<String> {
    let t = line.trim();
    let inner = t.strip_prefix("[[").map(|r| (r, "]]")).or_else(|| t.strip_prefix('[').map(|r| (r, "]")));
    let (rest, close) = inner?;
    let end = rest.find(close)?;
    let after = rest[end + close.len()..].trim_start();
    if !(after.is_empty() || after.starts_with('#')) {
        return None;
    }
    let name: String = rest[..end].split('.').map(|part| part.trim().trim_matches('"')).collect::<Vec<_>>().join(".");
    Some(name)
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

    fn calibrated(machine: &Machine) -> Topology {
        use crate::model::{CopyDirection, CopyMethod};
        let mut t = validate::embedded_default(machine).unwrap().topology;
        let at = Some("2026-11-24T05:00:00Z".to_string());
        t.calibration = vec![
            CopyCurvePoint {
                method: CopyMethod::ProcessVm,
                direction: CopyDirection::D2h,
                block_bytes: 4096,
                gbps: 1.0,
                measured_at: at.clone(),
            },
            CopyCurvePoint {
                method: CopyMethod::ProcessVm,
                direction: CopyDirection::D2h,
                block_bytes: 16384,
                gbps: 3.217,
                measured_at: at,
            },
            CopyCurvePoint {
                method: CopyMethod::Memcpy,
                direction: CopyDirection::H2d,
                block_bytes: 1 << 20,
                gbps: 0.1 + 0.2,
                measured_at: None,
            },
        ];
        t
    }

    #[test]
    fn calibration_round_trips() {
        let m = synthetic::small_vm();
        let t = calibrated(&m);
        let text = render(&m, &t, None);
        let table = "[[calibration.copy]]\nmethod = \"process_vm\"\ndirection = \"d2h\"\nblock-bytes = 16384\n\
                     gbps = 3.217\nmeasured-at = \"2026-11-24T05:00:00Z\"\n";
        assert!(text.contains(table), "{text}");
        let again = validate::check(&Source { path: Path::new("gen.toml"), text: &text }, &m)
            .unwrap_or_else(|e| panic!("{e}\n---\n{text}"));
        assert_eq!(again.topology, t, "{text}");
    }

    #[test]
    fn replacing_calibration_keeps_the_rest() {
        let m = synthetic::small_vm();
        let t = calibrated(&m);
        let section = calibration_section(&t.calibration);
        let user =
            "# my notes\nreserved-cores = [] # keep\n\n[memory]\npool-size = \"1GiB\"\n# about memory\nhugepages = false\n";
        // Appended to a file without a section, then replaced in place: the rest stays byte for byte.
        let once = replace_calibration(user, &section);
        assert_eq!(once, format!("{}\n\n{section}", user.trim_end()));
        let twice = replace_calibration(&once, &section);
        assert_eq!(twice, once);
        // A section in the middle, with its own comments and a sub-table, is moved to the end.
        let middle = "reserved-cores = []\n\n# old curves\n[calibration]\n[[calibration.copy]]\nmethod = \"memcpy\"\n\
                      direction = \"d2h\"\nblock-bytes = 1\ngbps = 1.0\n\n[[ \"calibration\" . copy ]]\n\n\
                      [memory] # the pool\npool-size = \"1GiB\"\n";
        let out = replace_calibration(middle, &section);
        assert_eq!(out, format!("reserved-cores = []\n\n[memory] # the pool\npool-size = \"1GiB\"\n\n{section}"));
        let checked = validate::check(&Source { path: Path::new("r.toml"), text: &out }, &m).unwrap();
        assert_eq!(checked.topology.calibration, t.calibration);
        assert_eq!(replace_calibration("", &section), section);
    }

    #[test]
    fn table_headers_are_recognised() {
        assert_eq!(table_header("[calibration]\n").as_deref(), Some("calibration"));
        assert_eq!(table_header("  [[ calibration.copy ]] # x").as_deref(), Some("calibration.copy"));
        assert_eq!(table_header("reserved-cores = [0]"), None);
        assert_eq!(table_header("[0, 1]"), Some("0, 1".into()));
    }

    #[test]
    fn sizes_render_exactly() {
        assert_eq!(size_text(8 << 30), "8GiB");
        assert_eq!(size_text(1536 << 20), "1536MiB");
        assert_eq!(size_text(1000), "1000");
    }
}
