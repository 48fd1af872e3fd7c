//! The server as a user runs it: one pinned shard per core, clean shutdown, stats, metrics.

use kvloft_tests::{kvloft, thread_affinities, TestServer};
use kvloft_topology::discover;
use std::io::{Read, Write};
use std::net::TcpStream;

#[test]
fn default_topology_pins_one_shard_per_core() {
    let machine = discover().expect("discovery");
    let server = TestServer::start(&[]);
    let stats = server.client().expect("connect").stats().expect("stats");
    assert_eq!(stats.shards.len(), machine.cores.len(), "one shard per physical core");
    assert_eq!(stats.pid, server.pid());
    assert_eq!(stats.pool_bytes, 64 << 20);
    let mut cpus: Vec<u32> = stats.shards.iter().map(|s| s.cpu).collect();
    cpus.dedup();
    assert_eq!(cpus.len(), stats.shards.len(), "every shard on its own CPU");
    for s in &stats.shards {
        assert_eq!(s.allowed_cpus, vec![s.cpu], "shard {} reports its own affinity", s.id);
    }
    // /proc agrees: each executor thread (named kvloft-s<id>-<executor>) may run on one CPU only.
    let threads = thread_affinities(server.pid());
    for s in &stats.shards {
        let prefix = format!("kvloft-s{}-", s.id);
        let (_, allowed) = threads
            .iter()
            .find(|(name, _)| name.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no thread {prefix}* in {threads:?}"));
        assert_eq!(allowed, &s.cpu.to_string(), "thread of shard {} in /proc", s.id);
    }
    let socket = server.socket.clone();
    let (status, stderr) = server.stop("TERM");
    assert!(status.success(), "exit status {status}: {stderr}");
    assert!(stderr.contains("kvloft: stopped"), "{stderr}");
    assert!(!socket.exists(), "socket file removed on shutdown");
}

#[test]
fn sigint_stops_cleanly() {
    let server = TestServer::start(&[]);
    let socket = server.socket.clone();
    let (status, _) = server.stop("INT");
    assert!(status.success());
    assert!(!socket.exists());
}

#[test]
fn stats_command_prints_table_and_json() {
    let server = TestServer::start(&[]);
    let socket = server.socket.to_str().unwrap().to_string();
    let out = kvloft(&["stats", "--socket", &socket]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("shard") && text.contains("pinned"), "{text}");
    let out = kvloft(&["stats", "--socket", &socket, "--json"]);
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(json.contains("\"allowed_cpus\"") && json.contains("\"uptime_s\""), "{json}");
}

#[test]
fn stats_without_server_names_the_socket_and_the_fix() {
    let out = kvloft(&["stats", "--socket", "/tmp/kvloft-test-no-such.sock"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/tmp/kvloft-test-no-such.sock") && err.contains("kvloft serve"), "{err}");
}

#[test]
fn second_server_on_the_same_socket_is_refused() {
    let server = TestServer::start(&[]);
    let socket = server.socket.to_str().unwrap().to_string();
    let out = kvloft(&["serve", "--socket", &socket, "--metrics-addr", "off", "--pool-size", "64MiB"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already serving"), "{err}");
    assert!(server.client().is_ok(), "the first server still serves");
}

#[test]
fn metrics_endpoint_serves_prometheus_text() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let server = TestServer::start(&["--metrics-addr", &addr]);
    let _ = server.client().unwrap().stats().unwrap();
    let mut stream = TcpStream::connect(&addr).expect("metrics endpoint");
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    assert!(body.contains("kvloft_shards "), "{body}");
    assert!(body.contains("kvloft_shard_requests_total{shard=\"0\""), "{body}");
}

#[test]
fn pool_larger_than_memory_is_refused() {
    let out = kvloft(&["serve", "--socket", "/tmp/kvloft-test-pool.sock", "--pool-size", "64TiB"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("NUMA node 0") && err.contains("--pool-size"), "{err}");
}
