//! The example topology files in `config/` validate cleanly against the machines they describe,
//! and the complete TOML examples in `docs/src/configuration.md` parse.
//!
//! `ssd` paths must exist when a file is checked, so each `ssd = "/mnt/nvmeX/kvloft"` is rewritten
//! to a fresh temporary directory (one per distinct path) before checking.

use kvloft_topology::machine::{Hugepages, Machine};
use kvloft_topology::synthetic::{self, NodeShape};
use kvloft_topology::validate::{self, Checked};
use kvloft_topology::{placement, PoolSize, Source};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const GIB: u64 = 1 << 30;

fn repo_file(relative: &str) -> (PathBuf, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(relative);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    (path, text)
}

/// Reserves `gib` GiB of free 2 MiB hugepages on every node, as the example files ask the user to.
fn with_hugepages(mut m: Machine, gib: u64) -> Machine {
    for node in &mut m.nodes {
        let pages = gib * GIB / (2 << 20);
        node.hugepages = vec![Hugepages { page_bytes: 2 << 20, total: pages, free: pages }];
    }
    m
}

/// The file with every `ssd = "..."` value pointing at a temporary directory, and the map from
/// each temporary directory back to the path written in the file.
struct Rewritten {
    text: String,
    original: BTreeMap<PathBuf, PathBuf>,
    _dirs: Vec<tempfile::TempDir>,
}

fn rewrite_ssd_paths(text: &str) -> Rewritten {
    let mut by_path: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut dirs = Vec::new();
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let value = line.strip_prefix("ssd = \"").and_then(|rest| rest.split('"').next());
        match value {
            Some(path) => {
                assert!(path.starts_with("/mnt/nvme") && path.ends_with("/kvloft"), "unexpected ssd path {path}");
                let dir = by_path.entry(path.to_string()).or_insert_with(|| {
                    let d = tempfile::tempdir().unwrap();
                    let p = d.path().to_path_buf();
                    dirs.push(d);
                    p
                });
                let dir = dir.to_str().expect("temporary paths are UTF-8");
                assert!(!dir.contains(['"', '\\']), "{dir}");
                out.push_str(&format!("ssd = \"{dir}\"\n"));
            }
            None => out.push_str(line),
        }
    }
    let original = by_path.into_iter().map(|(written, tmp)| (tmp, PathBuf::from(written))).collect();
    Rewritten { text: out, original, _dirs: dirs }
}

/// Checks `relative` (a path from the repository root) against `machine`; panics with the
/// diagnostics on any error or warning.
fn check_example(relative: &str, machine: &Machine) -> (Checked, Rewritten) {
    let (path, text) = repo_file(relative);
    let rewritten = rewrite_ssd_paths(&text);
    let checked = validate::check(&Source { path: &path, text: &rewritten.text }, machine)
        .unwrap_or_else(|d| panic!("{relative} does not validate:\n{d}"));
    let warnings: Vec<String> = checked.warnings.iter().map(ToString::to_string).collect();
    assert!(warnings.is_empty(), "{relative} gives warnings:\n{}", warnings.join("\n"));
    (checked, rewritten)
}

/// Every shard's GPU, NIC and NVMe drive sit on the shard's own NUMA node.
fn assert_devices_local(machine: &Machine, checked: &Checked, rewritten: &Rewritten) {
    for (i, s) in checked.topology.shards.iter().enumerate() {
        assert_eq!(machine.core_of_cpu(s.cpu).unwrap().node, s.node, "shard {i}");
        let gpu = machine.gpu(s.gpu.expect("every example shard has a GPU")).unwrap();
        assert_eq!(gpu.node, Some(s.node), "shard {i} (CPU {}): GPU {}", s.cpu, gpu.index);
        let nic = machine.nic(s.nic.as_deref().expect("every example shard has a NIC")).unwrap();
        assert_eq!(nic.node, Some(s.node), "shard {i} (CPU {}): {}", s.cpu, nic.name);
        let written = &rewritten.original[s.ssd.as_ref().expect("every example shard has an ssd")];
        let drive = machine
            .disks
            .iter()
            .find(|d| d.mount_point.as_ref().is_some_and(|m| written.starts_with(m)))
            .unwrap_or_else(|| panic!("shard {i}: {} is on no drive of the machine", written.display()));
        assert_eq!(drive.node, Some(s.node), "shard {i} (CPU {}): {}", s.cpu, drive.name);
    }
}

#[test]
fn single_gpu_example_is_clean() {
    let shape = NodeShape { cores: 8, memory_gib: 128, gpus: 1, rdma_nics: 1, nvme: 1 };
    let machine = with_hugepages(synthetic::machine(&[shape], false), 32);
    assert_eq!(machine.nics[0].name, "mlx5_0");
    assert_eq!(machine.disks[0].mount_point.as_deref(), Some(Path::new("/mnt/nvme0")));

    let (checked, rewritten) = check_example("config/single-gpu.toml", &machine);
    let t = &checked.topology;
    assert_eq!(t.reserved_cores, vec![0, 1]);
    assert_eq!(t.shards.iter().map(|s| s.cpu).collect::<Vec<_>>(), (2..8).collect::<Vec<_>>());
    assert_devices_local(&machine, &checked, &rewritten);
    assert_eq!(rewritten.original.len(), 1, "all shards share the one drive's directory");

    assert_eq!(t.memory.pool, PoolSize::Total(32 * GIB));
    assert!(t.memory.hugepages);
    for i in 0..t.shards.len() {
        assert_eq!(t.shard_pool_bytes(i), 32 * GIB / 6, "shard {i}");
    }
    // 32 GiB does not divide by 6: the remainder (a few bytes) belongs to no shard.
    assert!(32 * GIB - t.pool_bytes() < 6);

    // Without hugepages reserved, the same file warns about the shortfall and nothing else.
    let bare = synthetic::machine(&[shape], false);
    let (_, text) = repo_file("config/single-gpu.toml");
    let r = rewrite_ssd_paths(&text);
    let c = validate::check(&Source { path: Path::new("single-gpu.toml"), text: &r.text }, &bare).unwrap();
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert_eq!(c.warnings[0].key, "memory.hugepages");
}

#[test]
fn two_socket_example_is_clean() {
    let machine = with_hugepages(synthetic::two_socket_eight_gpu(), 96);
    // The device names the file uses: RDMA NICs and NVMe drives numbered node by node.
    let names = |node: u32| {
        let nics: Vec<&str> = machine.nics.iter().filter(|n| n.node == Some(node)).map(|n| n.name.as_str()).collect();
        let disks: Vec<String> = machine
            .disks
            .iter()
            .filter(|d| d.node == Some(node))
            .map(|d| format!("{} {}", d.name, d.mount_point.as_ref().unwrap().display()))
            .collect();
        let gpus: Vec<u32> = machine.gpus.iter().filter(|g| g.node == Some(node)).map(|g| g.index).collect();
        (nics, disks, gpus)
    };
    assert_eq!(
        names(0),
        (vec!["mlx5_0", "mlx5_1"], vec!["nvme0n1 /mnt/nvme0".into(), "nvme1n1 /mnt/nvme1".into()], vec![0, 1, 2, 3])
    );
    assert_eq!(
        names(1),
        (vec!["mlx5_2", "mlx5_3"], vec!["nvme2n1 /mnt/nvme2".into(), "nvme3n1 /mnt/nvme3".into()], vec![4, 5, 6, 7])
    );
    assert_eq!(machine.core_of_cpu(16).unwrap().first_cpu(), 0, "CPUs 16-31 are the siblings of 0-15");

    let (checked, rewritten) = check_example("config/two-socket-8gpu.toml", &machine);
    let t = &checked.topology;
    assert_eq!(t.reserved_cores, vec![0, 1, 8, 9]);
    let cpus: Vec<u32> = t.shards.iter().map(|s| s.cpu).collect();
    assert_eq!(cpus, (2..8).chain(10..16).collect::<Vec<_>>(), "one shard per remaining physical core");
    assert_devices_local(&machine, &checked, &rewritten);
    assert_eq!(rewritten.original.len(), 4, "every NVMe drive is used");
    let gpus: BTreeSet<u32> = t.shards.iter().filter_map(|s| s.gpu).collect();
    assert_eq!(gpus, (0..8).collect(), "every GPU is driven by a shard");

    // The file binds the same devices as placement does for the same reserved cores.
    let placed = placement::place(&machine, &BTreeSet::from([0, 1, 8, 9]));
    for (s, p) in t.shards.iter().zip(&placed.shards) {
        assert_eq!((s.cpu, s.node, s.gpu, &s.nic), (p.spec.cpu, p.spec.node, p.spec.gpu, &p.spec.nic));
        let (_, dir) = p.nvme.clone().unwrap();
        assert_eq!(Some(&rewritten.original[s.ssd.as_ref().unwrap()]), dir.as_ref(), "CPU {}", s.cpu);
    }

    assert_eq!(t.memory.pool, PoolSize::PerNode(BTreeMap::from([(0, 96 * GIB), (1, 96 * GIB)])));
    assert!(t.memory.hugepages);
    assert_eq!(t.node_pool_bytes(), BTreeMap::from([(0, 96 * GIB), (1, 96 * GIB)]));
    for i in 0..t.shards.len() {
        assert_eq!(t.shard_pool_bytes(i), 16 * GIB, "shard {i}");
    }
    assert_eq!(t.pool_bytes(), 192 * GIB);
}

/// TOML blocks in the configuration reference preceded by `<!-- complete example -->` are whole
/// topology files: they must parse (schema included).
#[test]
fn configuration_reference_examples_parse() {
    let (path, text) = repo_file("docs/src/configuration.md");
    let mut found = 0;
    let mut lines = text.lines().enumerate();
    while let Some((_, line)) = lines.next() {
        if line.trim() != "<!-- complete example -->" {
            continue;
        }
        let (fence_line, fence) = lines.next().expect("a code block follows the marker");
        assert_eq!(
            fence.trim(),
            "```toml",
            "{}:{}: the marker must precede a ```toml block",
            path.display(),
            fence_line + 1
        );
        let block: Vec<&str> = lines.by_ref().map(|(_, l)| l).take_while(|l| l.trim() != "```").collect();
        let block = block.join("\n");
        kvloft_topology::file::parse(&Source { path: &path, text: &block })
            .unwrap_or_else(|d| panic!("the example at {}:{} does not parse:\n{d}", path.display(), fence_line + 1));
        found += 1;
    }
    assert!(found >= 2, "expected complete examples in {}, found {found}", path.display());
}
