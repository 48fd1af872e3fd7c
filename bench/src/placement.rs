//! Where a measurement runs: the CPU its thread is pinned to and the NUMA node of its buffers.
//!
//! A suite resolves `--node` and `--cpu` once with [`resolve`] against the discovered machine, runs
//! its measuring code on a thread pinned by [`run_on`] (so the caller's own thread keeps its
//! affinity), allocates buffers it first touches on that thread (the kernel places them on the
//! thread's node), and binds pool arenas to [`ThreadPlacement::node`] through
//! `kvloft_gpu::Arena::new(bytes, node, hugepages)`.

use kvloft_topology::{CpuId, Machine, NodeId};

/// Why a placement cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlacementError {
    /// The CPU is not online on this machine.
    #[error("no CPU {cpu} on this machine (online CPUs: {online})")]
    NoCpu {
        /// The CPU asked for.
        cpu: CpuId,
        /// The online CPUs, as a list such as `0-7`.
        online: String,
    },
    /// The NUMA node does not exist or has no CPU.
    #[error("NUMA node {node} has no online CPU on this machine (nodes with CPUs: {nodes})")]
    NoNode {
        /// The node asked for.
        node: NodeId,
        /// Nodes that have CPUs.
        nodes: String,
    },
    /// The kernel refused to pin the thread.
    #[error("cannot pin the measuring thread to CPU {cpu} (sched_setaffinity failed)")]
    Pin {
        /// The CPU.
        cpu: CpuId,
    },
    /// The measuring thread panicked.
    #[error("the measuring thread panicked: {0}")]
    Panicked(String),
}

/// Where a measurement runs, resolved against the machine.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ThreadPlacement {
    /// CPU the measuring thread is pinned to; `None` leaves it to the scheduler.
    pub cpu: Option<CpuId>,
    /// NUMA node of the buffers: pool arenas are bound there, and memory the pinned thread first
    /// touches lands on the thread's node. `None`: the kernel's default policy.
    pub node: Option<NodeId>,
    /// NUMA nodes of the machine.
    pub nodes: usize,
    /// What the placement means on this machine (single node, remote buffers), for the output.
    pub notes: Vec<String>,
}

impl ThreadPlacement {
    /// The placement as JSON parameters: `cpu`, `node` (null when unset) and `numa_nodes`.
    pub fn params(&self) -> Vec<(&'static str, serde_json::Value)> {
        vec![
            ("cpu", self.cpu.map_or(serde_json::Value::Null, Into::into)),
            ("node", self.node.map_or(serde_json::Value::Null, Into::into)),
            ("numa_nodes", self.nodes.into()),
        ]
    }
}

/// CPUs of NUMA node `node`: the first CPU of each physical core, then the hyperthread siblings,
/// each group in CPU order.
pub fn node_cpus(machine: &Machine, node: NodeId) -> Vec<CpuId> {
    let cores: Vec<_> = machine.cores.iter().filter(|c| c.node == node).collect();
    let mut first: Vec<CpuId> = cores.iter().map(|c| c.first_cpu()).collect();
    let mut siblings: Vec<CpuId> = cores.iter().flat_map(|c| c.cpus.iter().skip(1).copied()).collect();
    first.sort_unstable();
    siblings.sort_unstable();
    first.extend(siblings);
    first
}

/// The NUMA node of `cpu`, when it is online.
pub fn node_of_cpu(machine: &Machine, cpu: CpuId) -> Option<NodeId> {
    machine.core_of_cpu(cpu).map(|c| c.node)
}

/// Resolves `--node` and `--cpu`:
///
/// - both: the thread on `cpu`, buffers on `node` (a note says when they differ: remote memory);
/// - `node` only: the thread on the node's first CPU ([`node_cpus`]), buffers on the node;
/// - `cpu` only: the thread on `cpu`, buffers on its node;
/// - neither: no pinning, default memory policy.
///
/// On a single-node machine a note says that node placement changes nothing.
pub fn resolve(machine: &Machine, node: Option<NodeId>, cpu: Option<CpuId>) -> Result<ThreadPlacement, PlacementError> {
    let nodes_with_cpus = || {
        kvloft_topology::machine::compact_list(
            machine.cores.iter().map(|c| c.node).collect::<std::collections::BTreeSet<_>>(),
        )
    };
    let mut notes = Vec::new();
    let cpu_node = match cpu {
        Some(c) => {
            Some(node_of_cpu(machine, c).ok_or_else(|| PlacementError::NoCpu { cpu: c, online: machine.cpu_list() })?)
        }
        None => None,
    };
    let cpu = match (cpu, node) {
        (Some(c), _) => Some(c),
        (None, Some(n)) => Some(
            *node_cpus(machine, n)
                .first()
                .ok_or_else(|| PlacementError::NoNode { node: n, nodes: nodes_with_cpus() })?,
        ),
        (None, None) => None,
    };
    if let Some(n) = node {
        if !machine.cores.iter().any(|c| c.node == n) {
            return Err(PlacementError::NoNode { node: n, nodes: nodes_with_cpus() });
        }
    }
    let node = node.or(cpu_node);
    if let (Some(c), Some(cn), Some(n)) = (cpu, cpu_node, node) {
        if cn != n {
            notes.push(format!(
                "the thread runs on CPU {c} of NUMA node {cn}, its buffers are on node {n}: remote memory"
            ));
        }
    }
    let nodes = machine.nodes.len().max(1);
    if nodes == 1 && node.is_some() {
        notes.push("this machine has a single NUMA node: node placement changes nothing".into());
    }
    Ok(ThreadPlacement { cpu, node, nodes, notes })
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: CpuId) -> Result<(), PlacementError> {
    if core_affinity::set_for_current(core_affinity::CoreId { id: cpu as usize }) {
        Ok(())
    } else {
        Err(PlacementError::Pin { cpu })
    }
}

/// Runs `f` on a new thread, pinned to `cpu` when given, and returns its result. The caller's
/// thread keeps its own affinity.
pub fn run_on<T: Send>(cpu: Option<CpuId>, f: impl FnOnce() -> T + Send) -> Result<T, PlacementError> {
    std::thread::scope(|s| {
        let handle = s.spawn(move || -> Result<T, PlacementError> {
            if let Some(c) = cpu {
                pin_current_thread(c)?;
            }
            Ok(f())
        });
        handle.join().map_err(|e| {
            let message = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            PlacementError::Panicked(message)
        })?
    })
}

/// The CPUs the calling thread may run on (`/proc/thread-self/status`, `Cpus_allowed_list`).
pub fn allowed_cpus() -> Option<Vec<CpuId>> {
    let status = std::fs::read_to_string("/proc/thread-self/status").ok()?;
    let list = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?.trim().to_string();
    let mut out = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((lo, hi)) => out.extend(lo.trim().parse::<CpuId>().ok()?..=hi.trim().parse::<CpuId>().ok()?),
            None => out.push(part.trim().parse().ok()?),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvloft_topology::synthetic;

    #[test]
    fn node_cpus_lists_physical_cores_first() {
        let m = synthetic::two_socket_eight_gpu();
        let cpus = node_cpus(&m, 1);
        assert!(!cpus.is_empty());
        let firsts: Vec<_> = m.cores.iter().filter(|c| c.node == 1).map(|c| c.first_cpu()).collect();
        assert_eq!(&cpus[..firsts.len()], firsts.as_slice());
        assert!(cpus.iter().all(|&c| node_of_cpu(&m, c) == Some(1)));
    }

    #[test]
    fn resolve_fills_the_missing_half() {
        let m = synthetic::two_socket_eight_gpu();
        let none = resolve(&m, None, None).unwrap();
        assert_eq!((none.cpu, none.node, none.nodes), (None, None, 2));
        let by_node = resolve(&m, Some(1), None).unwrap();
        assert_eq!(by_node.cpu, node_cpus(&m, 1).first().copied());
        assert_eq!(by_node.node, Some(1));
        assert!(by_node.notes.is_empty(), "{:?}", by_node.notes);
        let c0 = node_cpus(&m, 0)[0];
        let by_cpu = resolve(&m, None, Some(c0)).unwrap();
        assert_eq!((by_cpu.cpu, by_cpu.node), (Some(c0), Some(0)));
        let remote = resolve(&m, Some(1), Some(c0)).unwrap();
        assert_eq!((remote.cpu, remote.node), (Some(c0), Some(1)));
        assert!(remote.notes[0].contains("remote memory"), "{:?}", remote.notes);
        assert!(matches!(resolve(&m, Some(7), None), Err(PlacementError::NoNode { node: 7, .. })));
        assert!(matches!(resolve(&m, None, Some(9999)), Err(PlacementError::NoCpu { cpu: 9999, .. })));
    }

    #[test]
    fn single_node_placement_says_so() {
        let m = synthetic::small_vm();
        let p = resolve(&m, Some(0), None).unwrap();
        assert_eq!(p.nodes, 1);
        assert!(p.notes[0].contains("single NUMA node"), "{:?}", p.notes);
    }

    #[test]
    fn run_on_pins_only_the_measuring_thread() {
        let before = allowed_cpus().unwrap();
        let cpu = before[0];
        let inside = run_on(Some(cpu), allowed_cpus).unwrap().unwrap();
        assert_eq!(inside, vec![cpu]);
        assert_eq!(allowed_cpus().unwrap(), before);
        assert_eq!(run_on(None, || 7).unwrap(), 7);
    }
}
