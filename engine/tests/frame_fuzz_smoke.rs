//! Deterministic smoke run of the `frame_decoder` fuzz target, for CI (which has no nightly
//! toolchain for cargo-fuzz): 20,000 inputs from a seeded splitmix64 (random bytes, valid frames
//! with random and with valid bodies, and mutations of valid streams), then every file of the
//! seed corpus, each through the same body the fuzzer runs, [`fuzzing::frame_decoder`].
//!
//! The seed corpus in `fuzz/corpus/frame_decoder/` is written by [`seeds`]; after changing the
//! protocol, rewrite it with `KVLOFT_WRITE_SEEDS=1 cargo test -p kvloft-engine --test
//! frame_fuzz_smoke`. The real fuzzer runs with `scripts/fuzz.sh`.

use kvloft_engine::fuzzing;
use kvloft_engine::protocol::{
    self, BlockHashBytes, Done, ErrorCode, ErrorReply, Event, FrameKind, Hello, HelloReply, LayerMemory, Load,
    LoadDone, Lookup, LookupReply, NamespaceSpec, PackedHashes, Queued, RegisterInstance, RegisterInstanceReply,
    RegisterMemory, RegisterMemoryReply, Release, Reply, Request, Save, SaveBlock, SaveDone, ShardStats, StatsReply,
    StatsRequest, HEADER_BYTES, LEN_BYTES, MAX_FRAME_BYTES,
};
use kvloft_engine::rng::SplitMix64;
use std::path::PathBuf;

/// Inputs in the smoke run.
const INPUTS: usize = 20_000;

/// Field names of every message, to build near-valid MessagePack maps from.
const FIELDS: &[&str] = &[
    "op",
    "protocol",
    "client",
    "pid",
    "instance",
    "namespace",
    "model",
    "rank",
    "device",
    "layers",
    "hashes",
    "blocks",
    "hash",
    "block_id",
    "lease",
    "block_ids",
    "saved",
    "loaded",
    "error",
    "code",
    "message",
    "shards",
];

/// Operation names, the known ones and some that are not.
const OPS: &[&str] = &[
    "hello",
    "register_instance",
    "register_memory",
    "lookup",
    "save",
    "load",
    "release",
    "stats",
    "save_done",
    "load_done",
    "fly",
    "",
];

struct Gen(SplitMix64);

impl Gen {
    fn below(&mut self, n: usize) -> usize {
        self.0.below(n as u64) as usize
    }

    fn u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    fn u32(&mut self) -> u32 {
        // Small values most of the time, like real fields; sometimes any.
        if self.below(4) == 0 {
            self.u64() as u32
        } else {
            self.below(100) as u32
        }
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u64() as u8).collect()
    }

    fn string(&mut self) -> String {
        const PARTS: &[&str] = &["a", "vllm", "-", "0", "bfloat16", "cuda:0", "é", "🦀", " ", "\u{0}"];
        (0..self.below(6)).map(|_| PARTS[self.below(PARTS.len())]).collect()
    }

    fn hash(&mut self) -> BlockHashBytes {
        let n = if self.below(4) == 0 { self.below(40) } else { 32 };
        BlockHashBytes::from(self.bytes(n))
    }

    fn namespace(&mut self) -> NamespaceSpec {
        NamespaceSpec {
            model: self.string(),
            dtype: self.string(),
            kv_dtype: self.string(),
            num_layers: self.u32(),
            num_kv_heads: self.u32(),
            head_size: self.u32(),
            block_size: self.u32(),
            layout: self.string(),
            tp_size: self.u32(),
            pp_size: self.u32(),
            group: self.u32(),
            variant: String::new(),
        }
    }

    fn request(&mut self) -> Request {
        match self.below(8) {
            0 => Request::Hello(Hello { protocol: self.u32(), client: self.string(), pid: self.u32() }),
            1 => Request::RegisterInstance(RegisterInstance { instance: self.string(), namespace: self.namespace() }),
            2 => Request::RegisterMemory(RegisterMemory {
                rank: self.u32(),
                device: self.string(),
                layers: (0..self.below(4))
                    .map(|_| LayerMemory {
                        base: self.u64(),
                        num_blocks: self.u32(),
                        block_stride: self.u64(),
                        segments: self.u32(),
                        segment_stride: self.u64(),
                        segment_bytes: self.u64(),
                    })
                    .collect(),
                gpu_uuid: None,
                ipc: vec![],
            }),
            3 if self.below(2) == 0 => {
                // The packed form, which the server may read in place (`PackedLookupView`).
                let n = 1 + self.below(32);
                let hashes: Vec<Vec<u8>> = (0..self.below(12)).map(|_| self.bytes(n)).collect();
                Request::Lookup(Lookup { hashes: vec![], packed: PackedHashes::pack(hashes.iter().map(Vec::as_slice)) })
            }
            3 => Request::Lookup(Lookup { hashes: (0..self.below(12)).map(|_| self.hash()).collect(), packed: None }),
            4 => Request::Save(Save {
                blocks: (0..self.below(8)).map(|_| SaveBlock { hash: self.hash(), block_id: self.u32() }).collect(),
                packed: None,
                after_event: None,
                layer_events: None,
            }),
            5 => Request::Load(Load {
                lease: self.u64(),
                block_ids: (0..self.below(8)).map(|_| self.u32()).collect(),
                block_ids_packed: None,
                layerwise: self.below(2) == 1,
            }),
            6 => Request::Release(Release { lease: self.u64() }),
            _ => Request::Stats(StatsRequest {}),
        }
    }

    fn option_string(&mut self) -> Option<String> {
        if self.below(2) == 0 {
            None
        } else {
            Some(self.string())
        }
    }

    fn reply(&mut self) -> Reply {
        match self.below(8) {
            0 => Reply::Hello(HelloReply {
                protocol: self.u32(),
                server_version: self.string(),
                shards: self.u32(),
                pid: self.u32(),
            }),
            1 => Reply::RegisterInstance(RegisterInstanceReply {
                namespace_id: self.string(),
                slices_per_block: self.u32(),
            }),
            2 => Reply::RegisterMemory(RegisterMemoryReply { slice_bytes: self.u64() }),
            3 => Reply::Lookup(LookupReply { hits: self.u32(), lease: self.u64(), lease_ttl_s: self.u32() }),
            4 => Reply::Save(Queued { blocks: self.u32() }),
            5 => Reply::Load(Queued { blocks: self.u32() }),
            6 => Reply::Release(Done {}),
            _ => Reply::Stats(StatsReply {
                server_version: self.string(),
                pid: self.u32(),
                uptime_s: f64::from_bits(self.u64()),
                socket: self.string(),
                pool_bytes: self.u64(),
                shards: (0..self.below(3)).map(|_| self.shard()).collect(),
            }),
        }
    }

    fn shard(&mut self) -> ShardStats {
        ShardStats {
            id: self.u32(),
            cpu: self.u32(),
            numa_node: self.u32(),
            gpu: if self.below(2) == 0 { None } else { Some(self.u32()) },
            nic: self.option_string(),
            ssd: self.option_string(),
            pool_bytes: self.u64(),
            thread_id: self.u32() as i32,
            allowed_cpus: (0..self.below(4)).map(|_| self.u32()).collect(),
            connections: self.u64(),
            requests: self.u64(),
            slices: self.u64(),
            used_bytes: self.u64(),
            hits: self.u64(),
            misses: self.u64(),
            evictions: self.u64(),
            saves: self.u64(),
            loads: self.u64(),
            leases: self.u64(),
        }
    }

    fn event(&mut self) -> Event {
        if self.below(2) == 0 {
            Event::SaveDone(SaveDone {
                saved: self.u32(),
                present: self.u32(),
                failed: self.u32(),
                error: self.option_string(),
            })
        } else {
            Event::LoadDone(LoadDone { loaded: self.u32(), error: self.option_string() })
        }
    }

    fn error_reply(&mut self) -> ErrorReply {
        const CODES: &[ErrorCode] = &[
            ErrorCode::BadFrame,
            ErrorCode::UnsupportedVersion,
            ErrorCode::BadRequest,
            ErrorCode::UnknownOp,
            ErrorCode::HelloRequired,
            ErrorCode::NotRegistered,
            ErrorCode::NoMemory,
            ErrorCode::AlreadyRegistered,
            ErrorCode::Mismatch,
            ErrorCode::BlockOutOfRange,
            ErrorCode::UnknownLease,
            ErrorCode::LeaseNotOwned,
            ErrorCode::TooLarge,
            ErrorCode::MemoryAccess,
            ErrorCode::ShuttingDown,
            ErrorCode::Internal,
        ];
        ErrorReply { code: CODES[self.below(CODES.len())], message: self.string() }
    }

    /// One MessagePack value, nested at most `depth` deep.
    fn msgpack_value(&mut self, out: &mut Vec<u8>, depth: usize) {
        let choice = self.below(if depth == 0 { 9 } else { 11 });
        match choice {
            0 => out.push(0xc0),                        // nil
            1 => out.push(0xc2 + self.below(2) as u8),  // bool
            2 => out.push(self.below(0x80) as u8),      // positive fixint
            3 => out.push(0xe0 | self.below(32) as u8), // negative fixint
            4 => {
                out.push(0xcf); // u64
                out.extend_from_slice(&self.u64().to_be_bytes());
            }
            5 => {
                out.push(0xcb); // f64
                out.extend_from_slice(&self.u64().to_be_bytes());
            }
            6 => {
                let s = self.string();
                out.push(0xd9); // str 8
                out.push(s.len() as u8);
                out.extend_from_slice(s.as_bytes());
            }
            7 => {
                let b = self.hash();
                out.push(0xc4); // bin 8
                out.push(b.len() as u8);
                out.extend_from_slice(&b);
            }
            8 => {
                // A header whose announced length runs past the end of the body.
                out.extend_from_slice(&[0xdd, 0xff, 0xff, 0xff, 0xff]);
            }
            9 => {
                let n = self.below(4);
                out.push(0x90 | n as u8); // fixarray
                for _ in 0..n {
                    self.msgpack_value(out, depth - 1);
                }
            }
            _ => self.msgpack_map(out, depth - 1),
        }
    }

    /// A map with keys from the messages' field names (sometimes `"op"` with an operation name).
    fn msgpack_map(&mut self, out: &mut Vec<u8>, depth: usize) {
        let n = self.below(5);
        out.push(0x80 | n as u8); // fixmap
        for _ in 0..n {
            let key = FIELDS[self.below(FIELDS.len())];
            out.push(0xa0 | key.len() as u8);
            out.extend_from_slice(key.as_bytes());
            if key == "op" && self.below(4) != 0 {
                let op = OPS[self.below(OPS.len())];
                out.push(0xa0 | op.len() as u8);
                out.extend_from_slice(op.as_bytes());
            } else {
                self.msgpack_value(out, depth);
            }
        }
    }

    /// A body for a frame of `kind`: the right message, another kind's, a near-valid map, or noise.
    fn body(&mut self, kind: FrameKind) -> Vec<u8> {
        match (self.below(6), kind) {
            (0, _) => {
                let n = self.below(48);
                self.bytes(n)
            }
            (1, _) => {
                let mut out = Vec::new();
                self.msgpack_map(&mut out, 3);
                out
            }
            (2, _) => {
                let mut out = vec![0x81, 0xa2, b'o', b'p'];
                let op = OPS[self.below(OPS.len())];
                out.push(0xa0 | op.len() as u8);
                out.extend_from_slice(op.as_bytes());
                out
            }
            (_, FrameKind::Request) => protocol::to_body(&self.request()),
            (_, FrameKind::Reply) => protocol::to_body(&self.reply()),
            (_, FrameKind::Event) => protocol::to_body(&self.event()),
            (_, FrameKind::Error) => protocol::to_body(&self.error_reply()),
        }
    }

    fn kind(&mut self) -> FrameKind {
        match self.below(8) {
            0 => FrameKind::Reply,
            1 => FrameKind::Event,
            2 => FrameKind::Error,
            _ => FrameKind::Request,
        }
    }

    /// One to four valid frames; returns where each starts.
    fn stream(&mut self, out: &mut Vec<u8>) -> Vec<usize> {
        let mut starts = Vec::new();
        for _ in 0..1 + self.below(4) {
            starts.push(out.len());
            let kind = self.kind();
            let body = self.body(kind);
            let id = if self.below(2) == 0 { self.below(8) as u64 } else { self.u64() };
            protocol::encode(out, kind, id, &body);
        }
        starts
    }

    /// Damages `data`, a stream of frames starting at `starts`.
    fn mutate(&mut self, data: &mut Vec<u8>, starts: &[usize]) {
        let at = starts[self.below(starts.len())];
        match self.below(9) {
            0 if !data.is_empty() => {
                for _ in 0..1 + self.below(4) {
                    let i = self.below(data.len());
                    data[i] ^= 1 << self.below(8);
                }
            }
            1 => data.truncate(self.below(data.len() + 1)),
            2 if at + LEN_BYTES <= data.len() => {
                let old = u32::from_le_bytes(data[at..at + LEN_BYTES].try_into().unwrap());
                let new = match self.below(7) {
                    0 => self.below(HEADER_BYTES + 1) as u32,
                    1 => old.wrapping_add(1 + self.below(3) as u32),
                    2 => old.wrapping_sub(1 + self.below(3) as u32),
                    3 => MAX_FRAME_BYTES as u32,
                    4 => MAX_FRAME_BYTES as u32 + 1,
                    5 => u32::MAX,
                    _ => self.u64() as u32,
                };
                data[at..at + LEN_BYTES].copy_from_slice(&new.to_le_bytes());
            }
            3 if at + LEN_BYTES + HEADER_BYTES <= data.len() => {
                // Version, kind or magic.
                let i = at + LEN_BYTES + [0, 1, 2, 2, 3, 3][self.below(6)];
                data[i] = if self.below(2) == 0 { self.below(6) as u8 } else { self.u64() as u8 };
            }
            4 if at + LEN_BYTES + HEADER_BYTES <= data.len() => {
                // Insert into or delete from the body, keeping the frame's length right.
                let len = u32::from_le_bytes(data[at..at + LEN_BYTES].try_into().unwrap()) as usize;
                let body = at + LEN_BYTES + HEADER_BYTES;
                let end = (at + LEN_BYTES + len).clamp(body, data.len());
                let i = body + self.below(end - body + 1);
                let new_len = if self.below(2) == 0 || i == end {
                    let n = 1 + self.below(4);
                    let extra = self.bytes(n);
                    data.splice(i..i, extra);
                    len + n
                } else {
                    let n = (1 + self.below(4)).min(end - i);
                    data.drain(i..i + n);
                    len - n
                };
                data[at..at + LEN_BYTES].copy_from_slice(&(new_len as u32).to_le_bytes());
            }
            5 => {
                let mut more = Vec::new();
                self.stream(&mut more);
                let more_len = more.len();
                let cut = self.below(more_len + 1);
                data.extend_from_slice(&more[..cut]);
            }
            6 => {
                let n = self.below(16);
                let noise = self.bytes(n);
                data.extend_from_slice(&noise);
            }
            7 if !data.is_empty() => {
                // Duplicate a slice in place.
                let i = self.below(data.len());
                let j = i + self.below(data.len() - i + 1);
                let copy = data[i..j].to_vec();
                data.splice(j..j, copy);
            }
            _ => {
                let mut front = Vec::new();
                self.stream(&mut front);
                front.append(data);
                *data = front;
            }
        }
    }

    fn input(&mut self) -> Vec<u8> {
        let mut data = Vec::new();
        match self.below(20) {
            0..=2 => {
                let n = self.below(96);
                data = self.bytes(n);
            }
            3..=10 => {
                self.stream(&mut data);
            }
            _ => {
                let starts = self.stream(&mut data);
                for _ in 0..1 + self.below(3) {
                    self.mutate(&mut data, &starts);
                }
            }
        }
        data
    }
}

#[test]
fn smoke_run_of_random_and_mutated_frames() {
    let mut g = Gen(SplitMix64::new(0x6b76_6c6f_6674));
    let started = std::time::Instant::now();
    let mut bytes = 0;
    for i in 0..INPUTS {
        let data = g.input();
        bytes += data.len();
        let outcome = std::panic::catch_unwind(|| fuzzing::frame_decoder(&data));
        if let Err(e) = outcome {
            let path = std::env::temp_dir().join(format!("frame_decoder-crash-{i}"));
            let _ = std::fs::write(&path, &data);
            panic!("input {i} ({} bytes, saved to {}) failed: {e:?}", data.len(), path.display());
        }
    }
    eprintln!("{INPUTS} inputs, {bytes} bytes, in {:.2?}", started.elapsed());
}

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/frame_decoder")
}

fn frame(kind: FrameKind, id: u64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    protocol::encode(&mut out, kind, id, body);
    out
}

fn request(id: u64, r: &Request) -> Vec<u8> {
    frame(FrameKind::Request, id, &protocol::to_body(r))
}

/// The seed corpus: valid frames of the common requests and answers, and the fatal cases.
fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let hashes: Vec<BlockHashBytes> = (0..4u8).map(|i| BlockHashBytes::from(vec![i; 32])).collect();
    let hello = Request::Hello(Hello { protocol: 1, client: "kvloft-cli".into(), pid: 4242 });
    let lookup = Request::Lookup(Lookup { hashes: hashes.clone(), packed: None });
    let save = Request::Save(Save {
        blocks: hashes.iter().enumerate().map(|(i, h)| SaveBlock { hash: h.clone(), block_id: i as u32 }).collect(),
        packed: None,
        after_event: None,
        layer_events: None,
    });
    let namespace = NamespaceSpec {
        model: "Qwen/Qwen3-0.6B".into(),
        dtype: "bfloat16".into(),
        kv_dtype: "auto".into(),
        num_layers: 28,
        num_kv_heads: 8,
        head_size: 128,
        block_size: 16,
        layout: "nhd".into(),
        tp_size: 1,
        pp_size: 1,
        group: 0,
        variant: String::new(),
    };
    let layer = LayerMemory {
        base: 0x7f00_0000_0000,
        num_blocks: 64,
        block_stride: 4096,
        segments: 2,
        segment_stride: 2048,
        segment_bytes: 2048,
    };

    let mut session = Vec::new();
    for (id, r) in [
        hello.clone(),
        Request::RegisterInstance(RegisterInstance { instance: "engine-0".into(), namespace }),
        Request::RegisterMemory(RegisterMemory {
            rank: 0,
            device: "cpu".into(),
            layers: vec![layer; 2],
            gpu_uuid: None,
            ipc: vec![],
        }),
        lookup.clone(),
        Request::Load(Load { lease: 9, block_ids: vec![3, 4], block_ids_packed: None, layerwise: false }),
        Request::Release(Release { lease: 9 }),
    ]
    .iter()
    .enumerate()
    {
        session.extend(request(id as u64 + 1, r));
    }

    let mut answers = frame(
        FrameKind::Reply,
        1,
        &protocol::to_body(&Reply::Hello(HelloReply {
            protocol: 1,
            server_version: "0.1.0".into(),
            shards: 2,
            pid: 7,
        })),
    );
    answers.extend(frame(FrameKind::Reply, 2, &protocol::to_body(&Reply::Save(Queued { blocks: 4 }))));
    answers.extend(frame(
        FrameKind::Event,
        2,
        &protocol::to_body(&Event::SaveDone(SaveDone { saved: 4, present: 0, failed: 0, error: None })),
    ));
    answers.extend(frame(
        FrameKind::Error,
        3,
        &protocol::to_body(&ErrorReply { code: ErrorCode::UnknownLease, message: "lease 9 expired".into() }),
    ));

    let mut bad_magic = request(1, &hello);
    bad_magic[LEN_BYTES] = b'X';

    let mut oversize = ((MAX_FRAME_BYTES + 1) as u32).to_le_bytes().to_vec();
    oversize.extend_from_slice(b"KL\x01\x01");

    // A frame of a newer header version is skipped; the stats request after it is answered.
    let mut skipped = request(5, &Request::Stats(StatsRequest {}));
    skipped[LEN_BYTES + 2] = 2;
    skipped.extend(request(6, &Request::Stats(StatsRequest {})));

    vec![
        ("hello", request(1, &hello)),
        ("stats", request(42, &Request::Stats(StatsRequest {}))),
        ("lookup", request(3, &lookup)),
        ("lookup_packed", {
            let mut out = Vec::new();
            protocol::encode_packed_lookup(&mut out, 11, hashes.iter().map(|h| h.as_slice())).expect("one hash length");
            out
        }),
        ("save", request(4, &save)),
        ("session", session),
        ("answers", answers),
        ("unknown_op", frame(FrameKind::Request, 8, b"\x81\xa2op\xa3fly")),
        ("skipped_version", skipped),
        ("bad_magic", bad_magic),
        ("oversize", oversize),
    ]
}

/// The committed seed corpus is what [`seeds`] writes (`KVLOFT_WRITE_SEEDS=1` rewrites it).
#[test]
fn seed_corpus_is_current() {
    let dir = corpus_dir();
    let write = std::env::var_os("KVLOFT_WRITE_SEEDS").is_some();
    if write {
        std::fs::create_dir_all(&dir).unwrap();
    }
    for (name, bytes) in seeds() {
        assert!(bytes.len() < 4096, "seed {name} is {} bytes", bytes.len());
        let path = dir.join(name);
        if write {
            std::fs::write(&path, &bytes).unwrap();
        }
        let on_disk = std::fs::read(&path).unwrap_or_default();
        assert!(
            on_disk == bytes,
            "{} is not what the test generates: rewrite the seeds with KVLOFT_WRITE_SEEDS=1",
            path.display()
        );
    }
}

/// Every file of the corpus, seeds and whatever the fuzzer added, passes the fuzz body.
#[test]
fn seed_corpus_passes() {
    let mut files = 0;
    for entry in std::fs::read_dir(corpus_dir()).expect("fuzz/corpus/frame_decoder exists") {
        let path = entry.unwrap().path();
        if path.is_file() {
            fuzzing::frame_decoder(&std::fs::read(&path).unwrap());
            files += 1;
        }
    }
    assert!(files >= seeds().len(), "only {files} corpus files");
}
