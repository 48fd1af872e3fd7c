//! Prometheus metrics and the small HTTP endpoint that serves them.
//!
//! Metric handles are atomics created once at start; shards only increment them, so no lock is
//! taken on the request path. The text encoding happens on shard 0 when `/metrics` is scraped.

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::Instant;

/// Labels of per-shard series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabels {
    /// Shard id.
    pub shard: String,
    /// CPU the shard is pinned to.
    pub cpu: String,
    /// NUMA node.
    pub numa_node: String,
}

/// One shard's metric handles.
#[derive(Clone, Debug)]
pub struct ShardMetrics {
    /// Open client connections served by the shard.
    pub connections: Gauge,
    /// Requests answered.
    pub requests: Counter,
    /// Requests answered with an error frame.
    pub errors: Counter,
}

/// The registry and every handle in it.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    uptime: Gauge<f64, std::sync::atomic::AtomicU64>,
    started: Instant,
    /// Per-shard handles, by shard id.
    pub shards: Vec<ShardMetrics>,
}

impl Metrics {
    /// Registers every family for shards on `(cpu, node)` pairs.
    pub fn new(shards: &[(u32, u32)], version: &str, started: Instant) -> Self {
        let mut registry = Registry::with_prefix("kvloft");
        let info: Family<Vec<(String, String)>, Gauge> = Family::default();
        info.get_or_create(&vec![("version".into(), version.into())]).set(1);
        registry.register("build_info", "kvloft version", info);
        let count: Gauge = Gauge::default();
        count.set(shards.len() as i64);
        registry.register("shards", "Shards (pinned executors) running", count);
        let uptime = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register("uptime_seconds", "Seconds since the server started", uptime.clone());

        let connections: Family<ShardLabels, Gauge> = Family::default();
        let requests: Family<ShardLabels, Counter> = Family::default();
        let errors: Family<ShardLabels, Counter> = Family::default();
        let handles = shards
            .iter()
            .enumerate()
            .map(|(id, (cpu, node))| {
                let l = ShardLabels { shard: id.to_string(), cpu: cpu.to_string(), numa_node: node.to_string() };
                ShardMetrics {
                    connections: connections.get_or_create(&l).clone(),
                    requests: requests.get_or_create(&l).clone(),
                    errors: errors.get_or_create(&l).clone(),
                }
            })
            .collect();
        registry.register("shard_connections", "Client connections served by the shard", connections);
        registry.register("shard_requests", "Requests answered by the shard", requests);
        registry.register(
            "shard_errors",
            "Error frames sent by the shard: failed requests and unreadable frames",
            errors,
        );
        Self { registry, uptime, started, shards: handles }
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        self.uptime.set(self.started.elapsed().as_secs_f64());
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Largest HTTP request head read from a scraper.
const MAX_HTTP_HEAD_BYTES: usize = 8 << 10;

/// Serves `GET /metrics` (and `GET /health`) on `listener` until the task is dropped.
pub async fn serve_http(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok(stream) = listener.accept().await else { continue };
        let metrics = metrics.clone();
        glommio::spawn_local(async move {
            let _ = answer(stream, &metrics).await;
        })
        .detach();
    }
}

async fn answer(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || head.len() + n > MAX_HTTP_HEAD_BYTES {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let (status, ctype, body) = if line.starts_with(b"GET /metrics ") || line.starts_with(b"GET /metrics?") {
        ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", metrics.encode())
    } else if line.starts_with(b"GET /health ") {
        ("200 OK", "text/plain", "ok\n".to_string())
    } else {
        ("404 Not Found", "text/plain", "kvloft serves GET /metrics and GET /health\n".to_string())
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.close().await
}
