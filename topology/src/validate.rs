//! Turns a topology file into a [`Topology`] for this machine, or into diagnostics that name the
//! file, line, key and fix for everything wrong with it.

use crate::diagnostic::{Diagnostic, Diagnostics, Severity, Source};
use crate::file::{self, TopologyFile};
use crate::machine::{compact_list, CpuId, Machine, NodeId};
use crate::model::{
    default_socket, CopyCurvePoint, CopyDirection, CopyMethod, CopySpec, MemorySpec, PoolSize, ServerSpec, ShardSpec,
    Topology, DEFAULT_METRICS_ADDR, DEFAULT_SM_BUDGET, DEFAULT_SPIN_US, DEFAULT_STAGING_BYTES, MAX_SPIN_US,
};
use crate::placement;
use bytesize::ByteSize;
use serde_spanned::Spanned;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;

/// A usable topology and the warnings found on the way.
#[derive(Debug, Clone)]
pub struct Checked {
    /// What the server runs with.
    pub topology: Topology,
    /// Findings that do not stop the server.
    pub warnings: Vec<Diagnostic>,
    /// Placement notes, when shards were placed from discovery.
    pub notes: Vec<String>,
}

/// Reads and validates the topology file at `path` against `machine`.
pub fn load(path: &Path, machine: &Machine) -> Result<Checked, Diagnostics> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        let src = Source { path, text: "" };
        Diagnostics(vec![Diagnostic::at(
            Severity::Error,
            &src,
            None,
            "(file)",
            format!("cannot read the topology file: {e}"),
            "pass an existing, readable file to --config; `kvloft topology > kvloft.toml` writes one",
        )])
    })?;
    check(&Source { path, text: &text }, machine)
}

/// The topology used when no file is given: discovery and default placement, default endpoints.
pub fn embedded_default(machine: &Machine) -> Result<Checked, Diagnostics> {
    check(&Source { path: Path::new("<embedded default>"), text: "" }, machine)
}

/// Validates the TOML text in `source` against `machine`.
pub fn check(source: &Source<'_>, machine: &Machine) -> Result<Checked, Diagnostics> {
    let file = file::parse(source)?;
    let mut v = Validator { source, machine, found: Vec::new() };
    let topology = v.topology(&file);
    let notes = if file.shards.is_empty() {
        placement::place(machine, &topology.reserved_cores.iter().copied().collect()).notes
    } else {
        Vec::new()
    };
    if v.found.iter().any(Diagnostic::is_error) {
        v.found.sort_by_key(|d| (std::cmp::Reverse(d.severity), d.line));
        return Err(Diagnostics(v.found));
    }
    Ok(Checked { topology, warnings: v.found, notes })
}

/// Checks that every node's pool share fits in its memory; used after command-line overrides too.
pub fn pool_fits(topology: &Topology, machine: &Machine) -> Result<(), String> {
    for (node, bytes) in topology.node_pool_bytes() {
        let have = machine.node(node).map_or(0, |n| n.memory_bytes);
        if bytes > have {
            return Err(format!(
                "the pool share of NUMA node {node} is {} but the node has {} of memory",
                ByteSize(bytes).display().iec(),
                ByteSize(have).display().iec()
            ));
        }
    }
    if topology.pool_bytes() == 0 {
        return Err("the pool is empty: every shard needs pool memory".into());
    }
    Ok(())
}

/// Default pool when none is configured: an eighth of the machine's memory, at least 256 MiB,
/// rounded down to a multiple of 256 MiB.
pub fn default_pool_bytes(machine: &Machine) -> u64 {
    const STEP: u64 = 256 << 20;
    (machine.memory_bytes() / 8 / STEP * STEP).max(STEP)
}

struct Validator<'a> {
    source: &'a Source<'a>,
    machine: &'a Machine,
    found: Vec<Diagnostic>,
}

impl Validator<'_> {
    fn report(&mut self, severity: Severity, span: Option<Range<usize>>, key: String, message: String, fix: String) {
        self.found.push(Diagnostic::at(severity, self.source, span, key, message, fix));
    }

    fn error(
        &mut self,
        span: Range<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.report(Severity::Error, Some(span), key.into(), message.into(), fix.into());
    }

    fn warn(&mut self, span: Range<usize>, key: impl Into<String>, message: impl Into<String>, fix: impl Into<String>) {
        self.report(Severity::Warning, Some(span), key.into(), message.into(), fix.into());
    }

    fn topology(&mut self, file: &TopologyFile) -> Topology {
        let reserved = self.reserved(file);
        let server = self.server(file);
        let shards = if file.shards.is_empty() {
            placement::place(self.machine, &reserved.iter().copied().collect()).specs()
        } else {
            self.shards(file, &reserved)
        };
        if shards.is_empty() && file.shards.is_empty() {
            let span = file.reserved_cores.as_ref().map(|r| r.span());
            self.report(
                Severity::Error,
                span,
                "reserved-cores".into(),
                format!("no core is left for a shard (online CPUs: {})", self.machine.cpu_list()),
                "reserve fewer cores, or list [[shard]] tables on CPUs that are not reserved".into(),
            );
        }
        let memory = MemorySpec {
            pool: PoolSize::Total(default_pool_bytes(self.machine)),
            hugepages: file.memory.as_ref().and_then(|m| m.hugepages.as_ref()).is_some_and(|h| *h.get_ref()),
        };
        let copy = CopySpec {
            sm_budget: file
                .copy
                .as_ref()
                .and_then(|c| c.sm_budget.as_ref())
                .map_or(DEFAULT_SM_BUDGET, |v| *v.get_ref()),
            staging_bytes: file
                .copy
                .as_ref()
                .and_then(|c| c.staging.as_ref())
                .map_or(DEFAULT_STAGING_BYTES, |v| v.get_ref().as_u64()),
        };
        let mut topology = Topology { server, memory, reserved_cores: reserved, shards, calibration: Vec::new(), copy };
        self.memory(file, &mut topology);
        topology.calibration = self.calibration(file);
        topology
    }

    /// The `[[calibration.copy]]` points: known method and direction, a positive block size, a
    /// finite positive GB/s figure, one point per (method, direction, block size). Sorted by those.
    fn calibration(&mut self, file: &TopologyFile) -> Vec<CopyCurvePoint> {
        let Some(section) = &file.calibration else { return Vec::new() };
        let mut out: Vec<CopyCurvePoint> = Vec::new();
        let mut seen: BTreeMap<(CopyMethod, CopyDirection, u64), usize> = BTreeMap::new();
        for (i, table) in section.copy.iter().enumerate() {
            let p = table.get_ref();
            let key = |k: &str| format!("calibration.copy[{i}].{k}");
            let mut ok = true;
            let method = CopyMethod::parse(p.method.get_ref());
            if method.is_none() {
                ok = false;
                let names: Vec<&str> = CopyMethod::ALL.iter().map(|m| m.as_str()).collect();
                let fix = match file::closest(p.method.get_ref(), &names) {
                    Some(best) => format!("did you mean \"{best}\"? Methods: {}", names.join(", ")),
                    None => format!("use one of: {}", names.join(", ")),
                };
                self.error(
                    p.method.span(),
                    key("method"),
                    format!("unknown copy method {:?}", p.method.get_ref()),
                    fix,
                );
            }
            let direction = CopyDirection::parse(p.direction.get_ref());
            if direction.is_none() {
                ok = false;
                self.error(
                    p.direction.span(),
                    key("direction"),
                    format!("unknown copy direction {:?}", p.direction.get_ref()),
                    "write \"d2h\" (save: engine memory to pool) or \"h2d\" (load: pool to engine memory)",
                );
            }
            let block_bytes = p.block_bytes.get_ref().as_u64();
            if block_bytes == 0 {
                ok = false;
                self.error(
                    p.block_bytes.span(),
                    key("block-bytes"),
                    "block-bytes is 0",
                    "give the size of one copied piece in bytes, such as 16384",
                );
            }
            let gbps = *p.gbps.get_ref();
            if !gbps.is_finite() || gbps <= 0.0 {
                ok = false;
                self.error(
                    p.gbps.span(),
                    key("gbps"),
                    format!("gbps is {gbps}; a measured throughput is a positive number"),
                    "rerun `kvloft bench calibrate --config FILE --write`, or remove this table",
                );
            }
            let measured_at = p.measured_at.as_ref().map(|t| {
                if !looks_like_rfc3339(t.get_ref()) {
                    self.warn(
                        t.span(),
                        key("measured-at"),
                        format!("measured-at {:?} is not an RFC 3339 UTC time", t.get_ref()),
                        "write it like \"2026-11-24T05:12:09Z\"",
                    );
                }
                t.get_ref().clone()
            });
            let (Some(method), Some(direction), true) = (method, direction, ok) else { continue };
            if let Some(first) = seen.insert((method, direction, block_bytes), i) {
                let line = self.source.line_col(section.copy[first].get_ref().method.span().start).0;
                self.error(
                    p.block_bytes.span(),
                    key("block-bytes"),
                    format!(
                        "calibration.copy[{first}] (line {line}) already gives {} {} at {block_bytes} bytes",
                        method.as_str(),
                        direction.as_str()
                    ),
                    "keep one table per method, direction and block size",
                );
                continue;
            }
            out.push(CopyCurvePoint { method, direction, block_bytes, gbps, measured_at });
        }
        out.sort_by_key(|p| (p.method, p.direction, p.block_bytes));
        out
    }

    fn reserved(&mut self, file: &TopologyFile) -> Vec<CpuId> {
        let mut out = Vec::new();
        for cpu in file.reserved_cores.iter().flat_map(|r| r.get_ref()) {
            if self.machine.core_of_cpu(*cpu.get_ref()).is_none() {
                self.error(
                    cpu.span(),
                    "reserved-cores",
                    format!("no CPU {} on this machine (online CPUs: {})", cpu.get_ref(), self.machine.cpu_list()),
                    "list only online CPUs",
                );
            }
            out.push(*cpu.get_ref());
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    fn server(&mut self, file: &TopologyFile) -> ServerSpec {
        let section = file.server.as_ref();
        let socket = section.and_then(|s| s.socket.as_ref()).map_or_else(default_socket, |s| s.get_ref().clone());
        let metrics_addr = match section.and_then(|s| s.metrics_addr.as_ref()) {
            None => DEFAULT_METRICS_ADDR.parse().ok(),
            Some(text) => match parse_metrics_addr(text.get_ref()) {
                Ok(addr) => addr,
                Err(message) => {
                    self.error(
                        text.span(),
                        "server.metrics-addr",
                        message,
                        "write host:port, for example \"127.0.0.1:9477\", or \"off\"",
                    );
                    None
                }
            },
        };
        let spin_us = match section.and_then(|s| s.spin_us.as_ref()) {
            None => DEFAULT_SPIN_US,
            Some(us) if *us.get_ref() > MAX_SPIN_US => {
                self.error(
                    us.span(),
                    "server.spin-us",
                    format!(
                        "{} microseconds of polling before sleeping is more than the {MAX_SPIN_US} allowed",
                        us.get_ref()
                    ),
                    "write 0 (sleep at once) up to 100000; the default is 100",
                );
                DEFAULT_SPIN_US
            }
            Some(us) => *us.get_ref(),
        };
        ServerSpec { socket, metrics_addr, spin_us }
    }

    fn shards(&mut self, file: &TopologyFile, reserved: &[CpuId]) -> Vec<ShardSpec> {
        let mut seen: BTreeMap<CpuId, usize> = BTreeMap::new();
        let mut seen_core: BTreeMap<CpuId, (CpuId, usize)> = BTreeMap::new();
        let mut out = Vec::new();
        for (i, table) in file.shards.iter().enumerate() {
            let s = table.get_ref();
            let key = |k: &str| format!("shard[{i}].{k}");
            let cpu = *s.core.get_ref();
            let line_of = |idx: usize| self.source.line_col(file.shards[idx].get_ref().core.span().start).0;
            let Some(core) = self.machine.core_of_cpu(cpu) else {
                self.error(
                    s.core.span(),
                    key("core"),
                    format!("no CPU {cpu} on this machine (online CPUs: {})", self.machine.cpu_list()),
                    format!("use one of the online CPUs ({}) or remove this [[shard]] table", self.machine.cpu_list()),
                );
                continue;
            };
            if let Some(first) = seen.insert(cpu, i) {
                self.error(
                    s.core.span(),
                    key("core"),
                    format!(
                        "CPU {cpu} already runs shard[{first}] (line {}); two shards cannot share a core",
                        line_of(first)
                    ),
                    "give each [[shard]] its own core, or remove one of the two tables",
                );
                continue;
            }
            if let Some((other, first)) = seen_core.insert(core.first_cpu(), (cpu, i)) {
                self.warn(
                    s.core.span(),
                    key("core"),
                    format!("CPU {cpu} is a hyperthread sibling of CPU {other} (shard[{first}]): both shards share one physical core"),
                    format!("move this shard to another physical core; siblings of CPU {cpu}: {}", compact_list(core.cpus.iter().copied())),
                );
            }
            if reserved.contains(&cpu) {
                self.error(
                    s.core.span(),
                    key("core"),
                    format!("CPU {cpu} is listed in reserved-cores, which are left to the inference engine"),
                    "remove the CPU from reserved-cores or move this shard to another core",
                );
            }
            let node = core.node;
            if let Some(given) = &s.numa_node {
                if *given.get_ref() != node {
                    self.error(
                        given.span(),
                        key("numa-node"),
                        format!("CPU {cpu} is on NUMA node {node}, not {}", given.get_ref()),
                        format!("write numa-node = {node}, or remove the key (it is derived from the core)"),
                    );
                }
            }
            let gpu = s.gpu.as_ref().map(|g| self.gpu(g, node, &key("gpu")));
            let nic = s.nic.as_ref().map(|n| self.nic(n, node, &key("nic")));
            let ssd = s.ssd.as_ref().map(|p| {
                self.ssd(p, &key("ssd"));
                p.get_ref().clone()
            });
            out.push(ShardSpec { cpu, node, gpu, nic, ssd });
        }
        out
    }

    fn gpu(&mut self, gpu: &Spanned<u32>, node: NodeId, key: &str) -> u32 {
        let index = *gpu.get_ref();
        match self.machine.gpu(index) {
            None => {
                let have = if self.machine.gpus.is_empty() {
                    "this machine has no NVIDIA GPU".to_string()
                } else {
                    format!("GPUs on this machine: {}", compact_list(self.machine.gpus.iter().map(|g| g.index)))
                };
                self.error(
                    gpu.span(),
                    key,
                    format!("no GPU {index} ({have})"),
                    "use an existing GPU index or remove the key",
                );
            }
            Some(g) if g.node.is_some_and(|n| n != node) => {
                self.warn(
                    gpu.span(),
                    key,
                    format!(
                        "GPU {index} ({}) is on NUMA node {}, the shard's core on node {node}: copies cross the socket link",
                        g.pci_bus_id,
                        g.node.unwrap_or_default()
                    ),
                    "bind the GPU to a shard whose core is on the GPU's node",
                );
            }
            Some(_) => {}
        }
        index
    }

    fn nic(&mut self, nic: &Spanned<String>, node: NodeId, key: &str) -> String {
        let name = nic.get_ref();
        match self.machine.nic(name) {
            None => {
                let names: Vec<&str> = self.machine.nics.iter().map(|n| n.name.as_str()).collect();
                self.error(
                    nic.span(),
                    key,
                    format!(
                        "no network device named {name:?} (found: {})",
                        if names.is_empty() { "none".to_string() } else { names.join(", ") }
                    ),
                    "use a device name from `kvloft topology` or remove the key",
                );
            }
            Some(n) if n.node.is_some_and(|n| n != node) => self.warn(
                nic.span(),
                key,
                format!("{name} is on NUMA node {}, the shard's core on node {node}", n.node.unwrap_or_default()),
                "bind the NIC to a shard whose core is on the NIC's node",
            ),
            Some(_) => {}
        }
        name.clone()
    }

    fn ssd(&mut self, path: &Spanned<std::path::PathBuf>, key: &str) {
        let p = path.get_ref();
        match std::fs::metadata(p) {
            Err(e) => self.error(
                path.span(),
                key,
                format!("SSD path {} cannot be used: {e}", p.display()),
                format!(
                    "create it (mkdir -p {}) on the NVMe drive, or remove the key to run without the NVMe tier",
                    p.display()
                ),
            ),
            Ok(m) if !m.is_dir() && !is_block_device(&m) => self.error(
                path.span(),
                key,
                format!("SSD path {} is neither a directory nor a block device", p.display()),
                "point it at a directory on the NVMe drive",
            ),
            Ok(_) => {}
        }
    }

    fn memory(&mut self, file: &TopologyFile, topology: &mut Topology) {
        let Some(section) = &file.memory else {
            self.check_pool(topology, None);
            return;
        };
        let mut span = None;
        match (&section.pool_size, &section.pool_size_per_node) {
            (Some(total), Some(per_node)) => {
                self.error(
                    per_node.span(),
                    "memory.pool-size-per-node",
                    "both pool-size and pool-size-per-node are set",
                    "keep one: pool-size for the whole machine, or pool-size-per-node per NUMA node",
                );
                span = Some(total.span());
            }
            (Some(total), None) => {
                topology.memory.pool = PoolSize::Total(total.get_ref().as_u64());
                span = Some(total.span());
            }
            (None, Some(per_node)) => {
                let mut sizes = BTreeMap::new();
                let shard_nodes: BTreeSet<NodeId> = topology.shards.iter().map(|s| s.node).collect();
                for (name, size) in per_node.get_ref() {
                    match name.parse::<NodeId>().ok().filter(|n| self.machine.node(*n).is_some()) {
                        None => self.error(
                            size.span(),
                            format!("memory.pool-size-per-node.{name}"),
                            format!(
                                "no NUMA node {name:?} on this machine (nodes: {})",
                                compact_list(self.machine.nodes.iter().map(|n| n.id))
                            ),
                            "key the table by NUMA node ids",
                        ),
                        Some(node) => {
                            if !shard_nodes.contains(&node) {
                                self.warn(
                                    size.span(),
                                    format!("memory.pool-size-per-node.{name}"),
                                    format!("NUMA node {node} runs no shard, so this memory is never used"),
                                    "remove the entry, or place a shard on a core of that node",
                                );
                            }
                            sizes.insert(node, size.get_ref().as_u64());
                        }
                    }
                }
                for node in shard_nodes.iter().filter(|n| !sizes.contains_key(n)) {
                    self.error(
                        per_node.span(),
                        "memory.pool-size-per-node",
                        format!("NUMA node {node} runs shards but has no pool size"),
                        format!("add {node} = \"<size>\" to the table"),
                    );
                }
                topology.memory.pool = PoolSize::PerNode(sizes);
                span = Some(per_node.span());
            }
            (None, None) => {}
        }
        self.check_pool(topology, span);
        if topology.memory.hugepages {
            for (node, bytes) in topology.node_pool_bytes() {
                let free = self.machine.node(node).map_or(0, |n| n.free_hugepage_bytes());
                if free < bytes {
                    let span = section.hugepages.as_ref().map(|h| h.span()).unwrap_or_default();
                    self.warn(
                        span,
                        "memory.hugepages",
                        format!(
                            "NUMA node {node} has {} of free hugepages for a {} pool share: the rest uses 4 KiB pages",
                            ByteSize(free).display().iec(),
                            ByteSize(bytes).display().iec()
                        ),
                        format!("reserve hugepages on node {node} (/sys/devices/system/node/node{node}/hugepages/*/nr_hugepages) before starting"),
                    );
                }
            }
        }
    }

    fn check_pool(&mut self, topology: &Topology, span: Option<Range<usize>>) {
        if topology.shards.is_empty() {
            return; // already reported: no core is left for a shard
        }
        if let Err(message) = pool_fits(topology, self.machine) {
            let fix = if topology.pool_bytes() == 0 {
                "give memory.pool-size (or pool-size-per-node) a size of at least a few MiB per shard"
            } else {
                "lower memory.pool-size (or the node's entry in pool-size-per-node), or move shards to nodes with more memory"
            };
            self.report(Severity::Error, span, "memory.pool-size".into(), message, fix.into());
        }
    }
}

/// Parses a metrics address: `host:port`, or `off` for no endpoint.
pub fn parse_metrics_addr(text: &str) -> Result<Option<SocketAddr>, String> {
    if text.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    text.parse::<SocketAddr>().map(Some).map_err(|e| format!("{text:?} is not a socket address: {e}"))
}

/// `YYYY-MM-DDTHH:MM:SS` followed by `Z`, fractional seconds or an offset.
fn looks_like_rfc3339(t: &str) -> bool {
    let b = t.as_bytes();
    let digits = |r: std::ops::Range<usize>| r.into_iter().all(|i| b.get(i).is_some_and(u8::is_ascii_digit));
    b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && matches!(b[10], b'T' | b't')
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && matches!(b[19], b'Z' | b'z' | b'.' | b'+' | b'-')
}

fn is_block_device(m: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::FileTypeExt;
    m.file_type().is_block_device()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic;

    fn run(text: &str, machine: &Machine) -> Result<Checked, Diagnostics> {
        check(&Source { path: Path::new("t.toml"), text }, machine)
    }

    fn errors(text: &str, machine: &Machine) -> Vec<Diagnostic> {
        run(text, machine).unwrap_err().0
    }

    #[test]
    fn empty_file_places_from_discovery() {
        let c = run("", &synthetic::small_vm()).unwrap();
        assert_eq!(c.topology.shards.len(), 2);
        assert_eq!(c.topology.memory.pool, PoolSize::Total(3 << 30));
        assert_eq!(c.topology.server.metrics_addr, Some(DEFAULT_METRICS_ADDR.parse().unwrap()));
    }

    #[test]
    fn core_that_does_not_exist_names_line_and_fix() {
        let e = errors("[[shard]]\ncore = 0\n\n[[shard]]\ncore = 7\n", &synthetic::small_vm());
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].line, e[0].key.as_str()), (Some(5), "shard[1].core"));
        assert!(e[0].message.contains("no CPU 7"), "{}", e[0].message);
        assert!(e[0].fix.contains("0-1"), "{}", e[0].fix);
    }

    #[test]
    fn duplicate_core_names_both_lines() {
        let e = errors("[[shard]]\ncore = 1\n[[shard]]\ncore = 1\n", &synthetic::small_vm());
        assert_eq!(e[0].line, Some(4));
        assert!(e[0].message.contains("shard[0] (line 2)"), "{}", e[0].message);
        assert!(e[0].fix.contains("its own core"));
    }

    #[test]
    fn hyperthread_siblings_warn() {
        let m = synthetic::two_socket_eight_gpu();
        let c = run("[[shard]]\ncore = 0\n[[shard]]\ncore = 16\n", &m).unwrap();
        assert_eq!(c.warnings.len(), 1);
        assert!(c.warnings[0].message.contains("hyperthread sibling"));
    }

    #[test]
    fn reserved_core_cannot_run_a_shard() {
        let e = errors("reserved-cores = [0]\n[[shard]]\ncore = 0\n", &synthetic::small_vm());
        assert!(e[0].message.contains("reserved-cores"), "{}", e[0].message);
    }

    #[test]
    fn reserving_every_core_is_an_error() {
        let e = errors("reserved-cores = [0, 1]\n", &synthetic::small_vm());
        assert!(e[0].message.contains("no core is left"), "{}", e[0].message);
        assert_eq!(e[0].line, Some(1));
    }

    #[test]
    fn pool_larger_than_node_memory() {
        let e = errors("[memory]\npool-size = \"100GiB\"\n", &synthetic::small_vm());
        assert_eq!((e[0].line, e[0].key.as_str()), (Some(2), "memory.pool-size"));
        assert!(e[0].message.contains("NUMA node 0"), "{}", e[0].message);
    }

    #[test]
    fn per_node_pool_checks_each_node() {
        let m = synthetic::uneven_numa();
        let text = "[memory]\npool-size-per-node = { 0 = \"16GiB\", 1 = \"100GiB\" }\n";
        let e = errors(text, &m);
        assert!(e[0].message.contains("NUMA node 1"), "{}", e[0].message);
        let ok = run("[memory]\npool-size-per-node = { 0 = \"16GiB\", 1 = \"8GiB\", 2 = \"1GiB\" }\n", &m).unwrap();
        assert!(ok.warnings[0].message.contains("NUMA node 2 runs no shard"));
        assert_eq!(ok.topology.node_pool_bytes()[&1], 8 << 30);
        let e = errors("[memory]\npool-size-per-node = { 0 = \"16GiB\" }\n", &m);
        assert!(e[0].message.contains("node 1 runs shards but has no pool size"), "{}", e[0].message);
    }

    #[test]
    fn missing_ssd_path_is_an_error() {
        let e = errors("[[shard]]\ncore = 0\nssd = \"/nonexistent/kvloft\"\n", &synthetic::small_vm());
        assert_eq!(e[0].key, "shard[0].ssd");
        assert!(e[0].fix.contains("mkdir -p /nonexistent/kvloft"));
        let dir = tempfile::tempdir().unwrap();
        let text = format!("[[shard]]\ncore = 0\nssd = {:?}\n", dir.path());
        assert_eq!(run(&text, &synthetic::small_vm()).unwrap().topology.shards[0].ssd.as_deref(), Some(dir.path()));
    }

    #[test]
    fn gpu_on_other_node_is_a_warning() {
        let m = synthetic::two_socket_eight_gpu();
        let c = run("[[shard]]\ncore = 0\ngpu = 5\n", &m).unwrap();
        assert!(c.warnings[0].message.contains("GPU 5"), "{}", c.warnings[0].message);
        assert_eq!(c.warnings[0].severity, Severity::Warning);
        let e = errors("[[shard]]\ncore = 0\ngpu = 9\n", &m);
        assert!(e[0].message.contains("no GPU 9"));
    }

    #[test]
    fn wrong_numa_node_and_unknown_nic() {
        let m = synthetic::two_socket_eight_gpu();
        let e = errors("[[shard]]\ncore = 9\nnuma-node = 0\nnic = \"mlx5_9\"\n", &m);
        assert_eq!(e.len(), 2);
        assert!(e[0].message.contains("CPU 9 is on NUMA node 1"));
        assert!(e[1].message.contains("no network device named \"mlx5_9\""));
    }

    #[test]
    fn metrics_addr_must_parse() {
        let e = errors("[server]\nmetrics-addr = \"localhost\"\n", &synthetic::small_vm());
        assert_eq!(e[0].key, "server.metrics-addr");
        let c = run("[server]\nmetrics-addr = \"off\"\nsocket = \"/tmp/x.sock\"\n", &synthetic::small_vm()).unwrap();
        assert_eq!(c.topology.server.metrics_addr, None);
        assert_eq!(c.topology.server.socket, Path::new("/tmp/x.sock"));
    }

    #[test]
    fn spin_defaults_and_is_bounded() {
        let c = run("[memory]\npool-size = \"1GiB\"\n", &synthetic::small_vm()).unwrap();
        assert_eq!(c.topology.server.spin_us, DEFAULT_SPIN_US);
        let c = run("[server]\nspin-us = 0\n", &synthetic::small_vm()).unwrap();
        assert_eq!(c.topology.server.spin_us, 0, "0: sleep at once");
        let e = errors("[server]\nspin-us = 1000000\n", &synthetic::small_vm());
        assert_eq!(e[0].key, "server.spin-us");
    }

    const POINT: &str = "[[calibration.copy]]\nmethod = \"process_vm\"\ndirection = \"d2h\"\nblock-bytes = 16384\n\
                         gbps = 3.5\nmeasured-at = \"2026-11-24T05:00:00Z\"\n";

    #[test]
    fn calibration_points_are_checked_and_sorted() {
        let text = format!(
            "{POINT}[[calibration.copy]]\nmethod = \"memcpy\"\ndirection = \"h2d\"\nblock-bytes = \"4KiB\"\ngbps = 5\n"
        );
        let c = run(&text, &synthetic::small_vm()).unwrap();
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let cal = &c.topology.calibration;
        assert_eq!(cal.len(), 2);
        assert_eq!(
            (cal[0].method, cal[0].direction, cal[0].block_bytes),
            (CopyMethod::ProcessVm, CopyDirection::D2h, 16384)
        );
        assert_eq!(cal[0].measured_at.as_deref(), Some("2026-11-24T05:00:00Z"));
        assert_eq!((cal[1].method, cal[1].block_bytes, cal[1].gbps), (CopyMethod::Memcpy, 4096, 5.0));
        assert!(run("", &synthetic::small_vm()).unwrap().topology.calibration.is_empty());
        assert!(run("[calibration]\n", &synthetic::small_vm()).unwrap().topology.calibration.is_empty());
    }

    #[test]
    fn bad_calibration_points_name_key_and_fix() {
        let m = synthetic::small_vm();
        let e = errors(&POINT.replace("process_vm", "process-vm"), &m);
        assert_eq!((e[0].line, e[0].key.as_str()), (Some(2), "calibration.copy[0].method"));
        assert!(e[0].fix.starts_with("did you mean \"process_vm\"?"), "{}", e[0].fix);
        let e = errors(&POINT.replace("\"d2h\"", "\"up\""), &m);
        assert_eq!(e[0].key, "calibration.copy[0].direction");
        let e = errors(&POINT.replace("3.5", "-1.0"), &m);
        assert_eq!((e[0].line, e[0].key.as_str()), (Some(5), "calibration.copy[0].gbps"));
        assert!(e[0].message.contains("positive"), "{}", e[0].message);
        assert_eq!(errors(&POINT.replace("3.5", "0"), &m)[0].key, "calibration.copy[0].gbps");
        assert_eq!(errors(&POINT.replace("3.5", "nan"), &m)[0].key, "calibration.copy[0].gbps");
        assert_eq!(errors(&POINT.replace("16384", "0"), &m)[0].key, "calibration.copy[0].block-bytes");
        let e = errors(&format!("{POINT}{POINT}"), &m);
        assert_eq!((e.len(), e[0].key.as_str()), (1, "calibration.copy[1].block-bytes"));
        assert!(e[0].message.contains("calibration.copy[0] (line 2)"), "{}", e[0].message);
        let w = run(&POINT.replace("2026-11-24T05:00:00Z", "yesterday"), &m).unwrap().warnings;
        assert_eq!(w[0].key, "calibration.copy[0].measured-at");
    }

    #[test]
    fn rfc3339_shapes() {
        assert!(looks_like_rfc3339("2026-11-24T05:12:09Z"));
        assert!(looks_like_rfc3339("2026-11-24T05:12:09.5+01:00"));
        assert!(!looks_like_rfc3339("2026-11-24 05:12"));
        assert!(!looks_like_rfc3339(""));
    }

    #[test]
    fn copy_sm_budget_defaults_and_parses() {
        let c = run("[memory]\npool-size = \"1GiB\"\n", &synthetic::small_vm()).unwrap();
        assert_eq!(c.topology.copy.sm_budget, DEFAULT_SM_BUDGET);
        let c = run("[memory]\npool-size = \"1GiB\"\n[copy]\nsm-budget = 0\n", &synthetic::small_vm()).unwrap();
        assert_eq!(c.topology.copy.sm_budget, 0, "0: copy engines only");
        assert!(run("[copy]\nsm-budgets = 4\n", &synthetic::small_vm()).is_err(), "unknown keys are refused");
        assert_eq!(c.topology.copy.staging_bytes, DEFAULT_STAGING_BYTES);
        let c = run("[copy]\nstaging = \"64MiB\"\n", &synthetic::small_vm()).unwrap();
        assert_eq!(c.topology.copy.staging_bytes, 64 << 20);
        let c = run("[copy]\nstaging = 0\n", &synthetic::small_vm()).unwrap();
        assert_eq!(c.topology.copy.staging_bytes, 0, "0: no staging");
    }

    #[test]
    fn hugepages_shortfall_warns() {
        let c = run("[memory]\npool-size = \"1GiB\"\nhugepages = true\n", &synthetic::small_vm()).unwrap();
        assert!(c.warnings[0].message.contains("free hugepages"), "{:?}", c.warnings);
        assert!(c.topology.memory.hugepages);
    }
}
