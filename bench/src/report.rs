//! Result files: one JSON document per suite run.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::path::Path;

/// The machine a run was measured on.
#[derive(Debug, Clone, Serialize)]
pub struct MachineInfo {
    /// CPU model name.
    pub cpu: String,
    /// Online physical cores.
    pub cores: usize,
    /// NUMA nodes.
    pub numa_nodes: usize,
    /// GPU names (PCI order); empty without a GPU.
    pub gpus: Vec<String>,
    /// Kernel release.
    pub kernel: String,
    /// Host name.
    pub hostname: String,
}

impl MachineInfo {
    /// Reads this machine (discovery, `/proc/cpuinfo`, the kernel release).
    pub fn current() -> Self {
        let machine = kvloft_topology::discover().ok();
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines().find_map(|l| {
                    l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
                })
            })
            .unwrap_or_else(|| "unknown".into());
        let kernel =
            std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default();
        Self {
            cpu,
            cores: machine.as_ref().map_or(0, |m| m.cores.len()),
            numa_nodes: machine.as_ref().map_or(0, |m| m.nodes.len()),
            gpus: machine
                .as_ref()
                .map(|m| {
                    m.gpus
                        .iter()
                        .map(|g| g.name.clone().unwrap_or_else(|| format!("NVIDIA GPU {}", g.pci_bus_id)))
                        .collect()
                })
                .unwrap_or_default(),
            kernel,
            hostname: machine.map(|m| m.hostname).unwrap_or_default(),
        }
    }
}

/// One measured case: its parameters and figures (those that apply).
#[derive(Debug, Clone, Serialize, Default)]
pub struct Case {
    /// Case name, unique within the run.
    pub name: String,
    /// Parameters of the case.
    pub params: serde_json::Map<String, serde_json::Value>,
    /// Operations measured.
    pub samples: u64,
    /// Median latency, microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50_us: Option<f64>,
    /// 90th percentile latency, microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p90_us: Option<f64>,
    /// 99th percentile latency, microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_us: Option<f64>,
    /// Largest latency, microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_us: Option<f64>,
    /// Operations per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ops_per_s: Option<f64>,
    /// Throughput, GB/s (10^9 bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gbps: Option<f64>,
    /// I/O operations per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iops: Option<f64>,
    /// The ceiling measured in the same run, GB/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ceiling_gbps: Option<f64>,
    /// `gbps / ceiling_gbps`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
}

impl Case {
    /// Fills the latency percentiles from a histogram of nanoseconds.
    pub fn with_latency(mut self, h: &Histogram<u64>) -> Self {
        let us = |ns: u64| ns as f64 / 1000.0;
        self.samples = h.len();
        self.p50_us = Some(us(h.value_at_quantile(0.50)));
        self.p90_us = Some(us(h.value_at_quantile(0.90)));
        self.p99_us = Some(us(h.value_at_quantile(0.99)));
        self.max_us = Some(us(h.max()));
        self
    }
}

/// A suite's result file.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Suite name (`socket`, `d2h`, ...).
    pub suite: String,
    /// Where it ran.
    pub machine: MachineInfo,
    /// The command line that produced it.
    pub command: String,
    /// `git rev-parse --short HEAD` of the build, when known.
    pub git_rev: String,
    /// Start time, RFC 3339 UTC.
    pub started_at: String,
    /// The cases.
    pub cases: Vec<Case>,
}

impl Report {
    /// An empty report for `suite`, stamped now.
    pub fn new(suite: &str) -> Self {
        Self {
            suite: suite.into(),
            machine: MachineInfo::current(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            git_rev: env!("KVLOFT_GIT_REV").to_string(),
            started_at: rfc3339_now(),
            cases: Vec::new(),
        }
    }

    /// Writes the report as pretty JSON.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(path, text + "\n")
    }
}

/// The current time as `YYYY-MM-DDTHH:MM:SSZ` (UTC), without a date crate.
fn rfc3339_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        let t = rfc3339_now();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'));
    }

    #[test]
    fn latency_percentiles_in_microseconds() {
        let mut h = Histogram::<u64>::new(3).unwrap();
        for ns in 1..=1000u64 {
            h.record(ns * 1000).unwrap();
        }
        let c = Case::default().with_latency(&h);
        assert_eq!(c.samples, 1000);
        assert!((c.p50_us.unwrap() - 500.0).abs() < 2.0);
        assert!((c.p99_us.unwrap() - 990.0).abs() < 3.0);
    }
}
