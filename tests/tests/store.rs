//! The block store through a real server: save and load with byte-for-byte checks, eviction
//! under pressure while leases are held, concurrent clients, cleanup when a client disconnects.

use kvloft_engine::protocol::{ErrorCode, LayerMemory, NamespaceSpec};
use kvloft_shard::client::{Client, ClientError};
use kvloft_tests::TestServer;
use std::time::{Duration, Instant};

/// Bytes of one K or V segment of a block.
const SEGMENT: usize = 1024;

/// A fake worker KV cache in this process: one layer, vLLM's CPU layout `[2, blocks, SEGMENT]`.
struct Cache {
    bytes: Vec<u8>,
    blocks: usize,
}

impl Cache {
    fn new(blocks: usize) -> Self {
        Self { bytes: vec![0u8; 2 * blocks * SEGMENT], blocks }
    }

    fn layer(&self) -> LayerMemory {
        LayerMemory {
            base: self.bytes.as_ptr() as u64,
            num_blocks: self.blocks as u32,
            block_stride: SEGMENT as u64,
            segments: 2,
            segment_stride: (self.blocks * SEGMENT) as u64,
            segment_bytes: SEGMENT as u64,
        }
    }

    fn ranges(&self, block: usize) -> [std::ops::Range<usize>; 2] {
        let k = block * SEGMENT;
        let v = (self.blocks + block) * SEGMENT;
        [k..k + SEGMENT, v..v + SEGMENT]
    }

    /// Fills `block` with bytes derived from `seed`.
    fn fill(&mut self, block: usize, seed: u64) {
        for (half, r) in self.ranges(block).into_iter().enumerate() {
            let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ half as u64;
            for b in &mut self.bytes[r] {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
        }
    }

    fn block(&self, block: usize) -> Vec<u8> {
        self.ranges(block).into_iter().flat_map(|r| self.bytes[r].to_vec()).collect()
    }

    fn poison(&mut self) {
        self.bytes.fill(0xa5);
    }
}

fn expected(seed: u64) -> Vec<u8> {
    let mut c = Cache::new(1);
    c.fill(0, seed);
    c.block(0)
}

/// 32 well-spread bytes for block `i` of run `salt` (splitmix64).
fn hash(salt: u64, i: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    let mut x = salt ^ i.wrapping_mul(0xd1b5_4a32_d192_ed03);
    for _ in 0..4 {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out
}

fn spec(model: &str) -> NamespaceSpec {
    NamespaceSpec {
        model: model.into(),
        dtype: "bfloat16".into(),
        kv_dtype: "auto".into(),
        num_layers: 1,
        num_kv_heads: 8,
        head_size: 64,
        block_size: 16,
        layout: "nhd".into(),
        tp_size: 1,
        pp_size: 1,
        group: 0,
        variant: String::new(),
    }
}

fn worker(server: &TestServer, instance: &str, model: &str, cache: &Cache) -> Client {
    let mut c = server.client().expect("connect");
    c.register_instance(instance, spec(model)).expect("register_instance");
    let slice = c.register_memory(0, vec![cache.layer()]).expect("register_memory");
    assert_eq!(slice, 2 * SEGMENT as u64);
    c
}

fn save_all(c: &mut Client, salt: u64, ids: impl Iterator<Item = usize>) -> (u32, u32) {
    let ids: Vec<usize> = ids.collect();
    let (mut saved, mut failed) = (0, 0);
    for chunk in ids.chunks(2000) {
        let blocks: Vec<(Vec<u8>, u32)> = chunk.iter().map(|&i| (hash(salt, i as u64), i as u32)).collect();
        let done = c.save(&blocks).expect("save");
        saved += done.saved + done.present;
        failed += done.failed;
    }
    (saved, failed)
}

#[test]
fn ten_thousand_blocks_round_trip_across_shards() {
    let server = TestServer::start(&[]);
    let n = 10_000usize;
    let mut cache = Cache::new(n);
    for i in 0..n {
        cache.fill(i, i as u64);
    }
    let mut c = worker(&server, "rt", "round-trip", &cache);
    assert_eq!(save_all(&mut c, 1, 0..n), (n as u32, 0));

    let stats = c.stats().unwrap();
    let slices: u64 = stats.shards.iter().map(|s| s.slices).sum();
    assert_eq!(slices, n as u64);
    if stats.shards.len() > 1 {
        assert!(stats.shards.iter().all(|s| s.slices > n as u64 / stats.shards.len() as u64 / 2), "spread: {stats:?}");
    }

    cache.poison();
    let hashes: Vec<Vec<u8>> = (0..n as u64).map(|i| hash(1, i)).collect();
    let lease = c.lookup(&hashes).unwrap();
    assert_eq!(lease.hits, n as u32);
    // Load hit i into engine block perm(i), a permutation, and compare every byte.
    let perm = |i: usize| (i * 7919) % n;
    let dest: Vec<u32> = (0..n).map(|i| perm(i) as u32).collect();
    let done = c.load(lease.lease, &dest).unwrap();
    assert_eq!((done.loaded, done.error), (n as u32, None));
    for i in 0..n {
        assert_eq!(cache.block(perm(i)), expected(i as u64), "block {i} loaded into {}", perm(i));
    }
    let stats = c.stats().unwrap();
    assert_eq!(stats.shards.iter().map(|s| s.loads).sum::<u64>(), n as u64);
    assert!(stats.shards.iter().map(|s| s.hits).sum::<u64>() >= n as u64);
    assert_eq!(stats.shards.iter().map(|s| s.leases).sum::<u64>(), 0, "a fully loaded lease is gone");
}

#[test]
fn prefix_hits_stop_at_the_first_missing_block() {
    let server = TestServer::start(&[]);
    let mut cache = Cache::new(64);
    for i in 0..64 {
        cache.fill(i, 1000 + i as u64);
    }
    let mut c = worker(&server, "prefix", "prefix", &cache);
    save_all(&mut c, 2, (0..20).chain(21..40));
    let hashes: Vec<Vec<u8>> = (0..40).map(|i| hash(2, i)).collect();
    let reply = c.lookup(&hashes).unwrap();
    assert_eq!(reply.hits, 20);
    c.release(reply.lease).unwrap();
    let e = c.release(reply.lease).unwrap_err();
    assert!(matches!(e, ClientError::Server { code: ErrorCode::UnknownLease, .. }), "{e}");
    // The hits past the gap are unpinned at lookup; the prefix's pins stay and load.
    let reply = c.lookup(&hashes).unwrap();
    assert_eq!(reply.hits, 20);
    let dest: Vec<u32> = (40..60).collect();
    let done = c.load(reply.lease, &dest).unwrap();
    assert_eq!((done.loaded, done.error), (20, None));
    for i in 0..20 {
        assert_eq!(cache.block(40 + i), expected(1000 + i as u64));
    }
    let e = c.release(reply.lease).unwrap_err();
    assert!(matches!(e, ClientError::Server { code: ErrorCode::UnknownLease, .. }), "a loaded lease is gone: {e}");
    // Another namespace sees nothing.
    let other_cache = Cache::new(4);
    let mut other = worker(&server, "other", "another-model", &other_cache);
    assert_eq!(other.lookup(&hashes).unwrap().hits, 0);
}

#[test]
fn eviction_spares_leased_blocks() {
    // 8 MiB over the shards: about 2,000 slices of 4 KiB in all.
    eviction_spares_leased_blocks_on(TestServer::start(&["--pool-size", "8MiB"]));
}

#[test]
fn eviction_spares_leased_blocks_on_one_shard() {
    // One shard answers a lookup before it pins (decision 44): the pins must still hold.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("one-shard.toml");
    std::fs::write(&config, "[[shard]]\ncore = 0\n").unwrap();
    let server = TestServer::start(&["--pool-size", "8MiB", "--config", config.to_str().unwrap()]);
    assert_eq!(server.client().unwrap().stats().unwrap().shards.len(), 1);
    eviction_spares_leased_blocks_on(server);
}

fn eviction_spares_leased_blocks_on(server: TestServer) {
    let n = 6_000usize;
    let mut cache = Cache::new(n);
    for i in 0..n {
        cache.fill(i, 50_000 + i as u64);
    }
    let mut c = worker(&server, "evict", "evict", &cache);
    let kept = 300usize;
    assert_eq!(save_all(&mut c, 3, 0..kept), (kept as u32, 0));
    let hashes: Vec<Vec<u8>> = (0..kept as u64).map(|i| hash(3, i)).collect();
    let lease = c.lookup(&hashes).unwrap();
    assert_eq!(lease.hits, kept as u32);

    // Three times the pool in new blocks: eviction must make room without touching the leased ones.
    let (saved, _failed) = save_all(&mut c, 3, kept..n);
    assert!(saved > 1000, "only {saved} saved under pressure");
    let stats = c.stats().unwrap();
    assert!(stats.shards.iter().map(|s| s.evictions).sum::<u64>() > 0, "{stats:?}");
    for s in &stats.shards {
        assert!(s.used_bytes <= s.pool_bytes, "shard {} over its pool", s.id);
    }

    cache.poison();
    let dest: Vec<u32> = (0..kept as u32).map(|i| i + 1000).collect();
    let done = c.load(lease.lease, &dest).unwrap();
    assert_eq!((done.loaded, done.error), (kept as u32, None));
    for i in 0..kept {
        assert_eq!(cache.block(i + 1000), expected(50_000 + i as u64), "leased block {i} survived eviction");
    }
}

#[test]
fn concurrent_clients_keep_their_bytes_apart() {
    let server = TestServer::start(&[]);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let server = &server;
            s.spawn(move || {
                let n = 500usize;
                let mut cache = Cache::new(n);
                for i in 0..n {
                    cache.fill(i, t * 1_000_000 + i as u64);
                }
                let mut c = worker(server, &format!("conc-{t}"), &format!("model-{t}"), &cache);
                assert_eq!(save_all(&mut c, 10 + t, 0..n), (n as u32, 0));
                cache.poison();
                let hashes: Vec<Vec<u8>> = (0..n as u64).map(|i| hash(10 + t, i)).collect();
                let lease = c.lookup(&hashes).unwrap();
                assert_eq!(lease.hits, n as u32);
                let ids: Vec<u32> = (0..n as u32).rev().collect();
                assert_eq!(c.load(lease.lease, &ids).unwrap().loaded, n as u32);
                for i in 0..n {
                    assert_eq!(cache.block(n - 1 - i), expected(t * 1_000_000 + i as u64));
                }
            });
        }
    });
}

#[test]
fn disconnect_releases_leases_within_a_second() {
    let server = TestServer::start(&[]);
    let mut cache = Cache::new(100);
    for i in 0..100 {
        cache.fill(i, i as u64);
    }
    let mut saver = worker(&server, "dc", "disconnect", &cache);
    save_all(&mut saver, 4, 0..100);
    {
        let mut scheduler = server.client().unwrap();
        scheduler.register_instance("dc", spec("disconnect")).unwrap();
        let hashes: Vec<Vec<u8>> = (0..100).map(|i| hash(4, i)).collect();
        assert_eq!(scheduler.lookup(&hashes).unwrap().hits, 100);
        let leases: u64 = saver.stats().unwrap().shards.iter().map(|s| s.leases).sum();
        assert_eq!(leases, 1);
    } // the scheduler's connection closes here
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let leases: u64 = saver.stats().unwrap().shards.iter().map(|s| s.leases).sum();
        if leases == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "lease still held 1 s after its client left");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn bad_requests_are_refused_and_the_connection_goes_on() {
    let server = TestServer::start(&[]);
    let cache = Cache::new(8);
    let mut c = server.client().unwrap();
    let e = c.lookup(&[vec![1; 32]]).unwrap_err();
    assert!(matches!(e, ClientError::Server { code: ErrorCode::NotRegistered, .. }), "{e}");
    c.register_instance("bad", spec("bad")).unwrap();
    let e = c.save(&[(vec![1; 32], 0)]).unwrap_err();
    assert!(matches!(e, ClientError::Server { code: ErrorCode::NoMemory, .. }), "{e}");
    c.register_memory(0, vec![cache.layer()]).unwrap();
    let e = c.save(&[(vec![1; 32], 8)]).unwrap_err();
    assert!(matches!(e, ClientError::Server { code: ErrorCode::BlockOutOfRange, .. }), "{e}");
    let e = c.save(&[(vec![1; 33], 0)]).unwrap_err();
    assert!(matches!(e, ClientError::Server { code: ErrorCode::TooLarge, .. }), "{e}");
    let e = c.load(0x1234_0000, &[0]).unwrap_err();
    assert!(matches!(e, ClientError::Server { code: ErrorCode::UnknownLease, .. }), "{e}");
    let mut other = server.client().unwrap();
    let e = other.register_instance("bad", spec("a-different-model")).unwrap_err();
    assert!(matches!(e, ClientError::Server { code: ErrorCode::Mismatch, .. }), "{e}");
    // A lease of one instance cannot be loaded by another.
    c.save(&[(vec![7; 32], 1)]).unwrap();
    let lease = c.lookup(&[vec![7; 32]]).unwrap();
    let other_cache = Cache::new(2);
    let mut thief = worker(&server, "thief", "bad", &other_cache);
    let e = thief.load(lease.lease, &[0]).unwrap_err();
    assert!(matches!(e, ClientError::Server { code: ErrorCode::LeaseNotOwned, .. }), "{e}");
    let e = c.load(lease.lease, &[2, 3]).unwrap_err();
    assert!(matches!(e, ClientError::Server { code: ErrorCode::BadRequest, .. }), "{e}");
    assert_eq!(c.load(lease.lease, &[2]).unwrap().loaded, 1, "the owner still can, after a refused load");
}

#[test]
fn saves_and_loads_in_flight_together_on_one_connection_each_complete_with_their_bytes() {
    // A worker's saves of consecutive steps overlap, as vLLM's connector sends them: the
    // client sends each before the last one's completion, and every completion matches its
    // own request.
    let server = TestServer::start(&[]);
    let (sets, per) = (6usize, 40usize);
    let n = sets * per;
    let mut cache = Cache::new(n);
    for i in 0..n {
        cache.fill(i, 7000 + i as u64);
    }
    let mut c = worker(&server, "pipe", "pipelined", &cache);
    let set = |s: usize| (s * per..(s + 1) * per).map(|i| (hash(77, i as u64), i as u32)).collect::<Vec<_>>();
    let ids: Vec<u64> = (0..sets).map(|s| c.save_queued(&set(s)).expect("save queued")).collect();
    // Completions are awaited out of order: the last request first.
    for &id in ids.iter().rev() {
        let done = c.wait_saved(id).expect("save done");
        assert_eq!((done.saved, done.failed, done.error), (per as u32, 0, None), "save {id}");
    }

    cache.poison();
    // Each set into the blocks of the set after it, every load in flight before any is awaited.
    let mut loads = Vec::new();
    for s in 0..sets {
        let hashes: Vec<Vec<u8>> = set(s).into_iter().map(|(h, _)| h).collect();
        let hit = c.lookup(&hashes).unwrap();
        assert_eq!(hit.hits, per as u32, "set {s}");
        let dest: Vec<u32> = (0..per).map(|k| (((s + 1) % sets) * per + k) as u32).collect();
        loads.push(c.load_queued(hit.lease, &dest).expect("load queued"));
    }
    for (s, &id) in loads.iter().enumerate() {
        let done = c.wait_loaded(id).expect("load done");
        assert_eq!((done.loaded, done.error), (per as u32, None), "load of set {s}");
    }
    for s in 0..sets {
        for k in 0..per {
            let into = ((s + 1) % sets) * per + k;
            assert_eq!(cache.block(into), expected(7000 + (s * per + k) as u64), "set {s} block {k} into {into}");
        }
    }
}
