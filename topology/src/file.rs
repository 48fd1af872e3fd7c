//! The topology file as written: serde structs over TOML with kebab-case keys, unknown keys
//! rejected, and the byte span of every value kept so that [`crate::validate`] can point at it.

use crate::diagnostic::{Diagnostic, Diagnostics, Severity, Source};
use bytesize::ByteSize;
use serde::Deserialize;
use serde_spanned::Spanned;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The whole file.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TopologyFile {
    /// CPUs left to the inference engine.
    #[serde(default)]
    pub reserved_cores: Option<Spanned<Vec<Spanned<u32>>>>,
    /// `[server]`.
    #[serde(default)]
    pub server: Option<ServerSection>,
    /// `[memory]`.
    #[serde(default)]
    pub memory: Option<MemorySection>,
    /// `[[shard]]` tables, in file order; empty means "place shards from discovery".
    #[serde(default, rename = "shard")]
    pub shards: Vec<Spanned<ShardSection>>,
    /// `[calibration]`: copy curves measured by `kvloft bench calibrate`.
    #[serde(default)]
    pub calibration: Option<CalibrationSection>,
    /// `[copy]`: how GPU copies are made.
    #[serde(default)]
    pub copy: Option<CopySection>,
}

/// `[copy]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CopySection {
    /// Most SMs a GPU copy kernel may occupy; 0 means copy engines (DMA) only.
    pub sm_budget: Option<Spanned<u32>>,
    /// Device memory per copier for staged block copies (a size such as `"128MiB"`); 0: none.
    pub staging: Option<Spanned<ByteSize>>,
}

/// `[calibration]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CalibrationSection {
    /// `[[calibration.copy]]` tables, in file order.
    #[serde(default)]
    pub copy: Vec<Spanned<CopyPointSection>>,
}

/// One `[[calibration.copy]]` table: a measured point of a copy curve.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CopyPointSection {
    /// Copy method (`process_vm`, `memcpy`, `cuda_memcpy`, `cuda_memcpy_batch`, `cuda_kernel`).
    pub method: Spanned<String>,
    /// `d2h` (save) or `h2d` (load).
    pub direction: Spanned<String>,
    /// Bytes of one contiguous piece moved (a byte count or a size such as `"16KiB"`).
    pub block_bytes: Spanned<ByteSize>,
    /// Measured throughput, GB/s (10^9 bytes per second).
    pub gbps: Spanned<f64>,
    /// When it was measured, RFC 3339 UTC.
    pub measured_at: Option<Spanned<String>>,
}

/// `[server]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServerSection {
    /// Unix socket path.
    pub socket: Option<Spanned<PathBuf>>,
    /// `host:port` for `/metrics`, or `"off"`.
    pub metrics_addr: Option<Spanned<String>>,
    /// Microseconds a shard polls for work before it sleeps.
    pub spin_us: Option<Spanned<u64>>,
}

/// `[memory]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MemorySection {
    /// Whole-machine pool size (`"16GiB"` or a byte count).
    pub pool_size: Option<Spanned<ByteSize>>,
    /// Pool size per NUMA node: `{ 0 = "8GiB", 1 = "8GiB" }`.
    pub pool_size_per_node: Option<Spanned<BTreeMap<String, Spanned<ByteSize>>>>,
    /// Use hugepages for the pool where available.
    pub hugepages: Option<Spanned<bool>>,
}

/// One `[[shard]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ShardSection {
    /// OS CPU number to pin to.
    pub core: Spanned<u32>,
    /// NUMA node; derived from the core when absent, checked against it when present.
    pub numa_node: Option<Spanned<u32>>,
    /// GPU index in PCI order.
    pub gpu: Option<Spanned<u32>>,
    /// RDMA device or interface name.
    pub nic: Option<Spanned<String>>,
    /// Directory or block device for the NVMe tier.
    pub ssd: Option<Spanned<PathBuf>>,
}

/// Parses `source` into a [`TopologyFile`], turning a TOML or schema error into a [`Diagnostic`]
/// that names the line, the key and the fix.
pub fn parse(source: &Source<'_>) -> Result<TopologyFile, Diagnostics> {
    toml::from_str(source.text).map_err(|e| Diagnostics(vec![toml_diagnostic(source, &e)]))
}

fn toml_diagnostic(source: &Source<'_>, e: &toml::de::Error) -> Diagnostic {
    let message = e.message().trim().to_string();
    let span = e.span();
    let key = span.clone().map(|s| key_at(source.text, s.start)).unwrap_or_else(|| "(file)".to_string());
    let fix = if let Some(rest) = message.strip_prefix("unknown field `") {
        let unknown = rest.split('`').next().unwrap_or_default();
        let expected: Vec<&str> =
            message.split("expected ").nth(1).unwrap_or_default().split('`').skip(1).step_by(2).collect();
        match closest(unknown, &expected) {
            Some(best) => format!("did you mean `{best}`? The keys allowed here are: {}", expected.join(", ")),
            None => format!("remove it; the keys allowed here are: {}", expected.join(", ")),
        }
    } else if message.starts_with("missing field") {
        "add the key named above to this table".to_string()
    } else if message.contains("parsable string") || message.contains("ByteSize") {
        "write a size such as \"16GiB\" or \"512MiB\", or a byte count".to_string()
    } else if message.contains("invalid type") {
        "give the value the type named above (a number without quotes, a string in quotes)".to_string()
    } else {
        "correct the TOML at this position; `kvloft topology` prints a valid file to start from".to_string()
    };
    Diagnostic::at(Severity::Error, source, span, key, message, fix)
}

/// The key a byte offset points into: the text before `=` on that line when the offset is in a
/// value, the key itself when it is in a key, `(file)` when neither.
fn key_at(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let line = &text[start..end];
    let key = match line.find('=') {
        Some(eq) => &line[..eq],
        None => line,
    };
    let key = key.trim().trim_matches(|c| c == '[' || c == ']').trim();
    if key.is_empty() {
        "(file)".to_string()
    } else {
        key.to_string()
    }
}

/// The candidate within edit distance 3 of `word`, closest first.
pub(crate) fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, _)| *d <= 3)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn src(text: &str) -> Source<'_> {
        Source { path: Path::new("t.toml"), text }
    }

    #[test]
    fn parses_every_section() {
        let text = r#"
reserved-cores = [0, 1]
[server]
socket = "/run/kvloft.sock"
metrics-addr = "off"
spin-us = 20
[memory]
pool-size = "8GiB"
hugepages = true
[[shard]]
core = 2
numa-node = 0
gpu = 0
nic = "mlx5_0"
ssd = "/mnt/nvme0/kvloft"
"#;
        let f = parse(&src(text)).unwrap();
        assert_eq!(f.reserved_cores.unwrap().get_ref().len(), 2);
        assert_eq!(f.memory.unwrap().pool_size.unwrap().get_ref().as_u64(), 8 << 30);
        assert_eq!(*f.shards[0].get_ref().core.get_ref(), 2);
    }

    #[test]
    fn misspelt_key_names_line_and_suggestion() {
        let text = "[memory]\npool-sise = \"1GiB\"\n";
        let d = parse(&src(text)).unwrap_err().0.remove(0);
        assert_eq!(d.line, Some(2));
        assert_eq!(d.key, "pool-sise");
        assert!(d.message.contains("unknown field `pool-sise`"), "{}", d.message);
        assert!(d.fix.starts_with("did you mean `pool-size`?"), "{}", d.fix);
    }

    #[test]
    fn misspelt_shard_key_is_rejected() {
        let text = "[[shard]]\ncore = 1\ngpus = 0\n";
        let d = parse(&src(text)).unwrap_err().0.remove(0);
        assert_eq!(d.line, Some(3));
        assert!(d.fix.contains("`gpu`"), "{}", d.fix);
    }

    #[test]
    fn wrong_type_is_an_error() {
        let d = parse(&src("[[shard]]\ncore = \"two\"\n")).unwrap_err().0.remove(0);
        assert_eq!(d.line, Some(2));
        assert!(d.message.contains("invalid type"), "{}", d.message);
    }

    #[test]
    fn bad_size_names_its_key() {
        let d = parse(&src("[memory]\npool-size = \"lots\"\n")).unwrap_err().0.remove(0);
        assert_eq!((d.line, d.key.as_str()), (Some(2), "pool-size"));
        assert!(d.fix.contains("16GiB"), "{}", d.fix);
    }

    #[test]
    fn parses_calibration_points() {
        let text = r#"
[calibration]
[[calibration.copy]]
method = "process_vm"
direction = "d2h"
block-bytes = 16384
gbps = 3.25
measured-at = "2026-11-24T05:00:00Z"
[[calibration.copy]]
method = "memcpy"
direction = "h2d"
block-bytes = "1MiB"
gbps = 7
"#;
        let f = parse(&src(text)).unwrap();
        let copy = &f.calibration.unwrap().copy;
        assert_eq!(copy.len(), 2);
        let p = copy[0].get_ref();
        assert_eq!((p.method.get_ref().as_str(), p.block_bytes.get_ref().as_u64()), ("process_vm", 16384));
        assert_eq!(*p.gbps.get_ref(), 3.25);
        assert_eq!(copy[1].get_ref().block_bytes.get_ref().as_u64(), 1 << 20);
        assert_eq!(*copy[1].get_ref().gbps.get_ref(), 7.0);
        assert!(copy[1].get_ref().measured_at.is_none());
    }

    #[test]
    fn misspelt_calibration_key_is_rejected() {
        let text = "[[calibration.copy]]\nmethod = \"memcpy\"\ndirection = \"d2h\"\nblock-byte = 4096\ngbps = 1.0\n";
        let d = parse(&src(text)).unwrap_err().0.remove(0);
        assert_eq!(d.line, Some(4));
        assert!(d.fix.contains("`block-bytes`"), "{}", d.fix);
    }

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("pool-sise", "pool-size"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(closest("zzzzzz", &["core", "gpu"]), None);
    }
}
