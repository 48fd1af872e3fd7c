//! The shared-memory mailbox through a real server (decision 47): lookups and releases through
//! it answer like the socket, on a server that polls it and on ones that must be rung; bad
//! contents get error replies and the connection goes on.

use kvloft_engine::protocol::{self, ErrorCode, ErrorReply, FrameKind, LayerMemory, NamespaceSpec, Request};
use kvloft_shard::client::{Client, ClientError};
use kvloft_tests::TestServer;

const BLOCKS: usize = 256;
const SEGMENT: u64 = 1024;

fn namespace() -> NamespaceSpec {
    NamespaceSpec {
        model: "mailbox-test".into(),
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

fn block_hash(i: usize) -> Vec<u8> {
    let x = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    [x, x.rotate_left(17), x.rotate_left(31), !x].iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// A server started with `toml` as its topology file.
fn server(toml: &str) -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("topology.toml");
    std::fs::write(&config, toml).unwrap();
    (TestServer::start(&["--config", config.to_str().unwrap()]), dir)
}

/// A client of instance "mb" that saved `BLOCKS` blocks from `memory`.
fn saved(server: &TestServer, memory: &[u8]) -> Client {
    let mut c = server.client().unwrap();
    c.register_instance("mb", namespace()).unwrap();
    let layer = LayerMemory {
        base: memory.as_ptr() as u64,
        num_blocks: BLOCKS as u32,
        block_stride: SEGMENT,
        segments: 2,
        segment_stride: BLOCKS as u64 * SEGMENT,
        segment_bytes: SEGMENT,
    };
    c.register_memory(0, vec![layer]).unwrap();
    let blocks: Vec<(Vec<u8>, u32)> = (0..BLOCKS).map(|i| (block_hash(i), i as u32)).collect();
    assert_eq!(c.save(&blocks).unwrap().saved, BLOCKS as u32);
    c
}

fn mailbox_client(server: &TestServer) -> Client {
    let mut c = server.client().unwrap();
    c.register_instance("mb", namespace()).unwrap();
    c.attach_mailbox().unwrap();
    assert!(c.has_mailbox());
    c
}

fn lookups_match_the_socket(toml: &str) {
    let (server, _dir) = server(toml);
    let memory: Vec<u8> = (0..2 * BLOCKS * SEGMENT as usize).map(|i| (i % 251) as u8).collect();
    let mut socket = saved(&server, &memory);
    let mut mb = mailbox_client(&server);
    let hashes: Vec<Vec<u8>> = (0..BLOCKS).map(block_hash).collect();
    for n in [1, 64, BLOCKS] {
        let by_socket = socket.lookup(&hashes[..n]).unwrap();
        let by_mailbox = mb.lookup(&hashes[..n]).unwrap();
        assert_eq!((by_socket.hits, by_mailbox.hits), (n as u32, n as u32));
        socket.release(by_socket.lease).unwrap();
        mb.release(by_mailbox.lease).unwrap();
    }
    // A prefix that stops at a missing block, and a lookup of nothing stored.
    let mut gap = hashes[..10].to_vec();
    gap.push(block_hash(BLOCKS + 5));
    gap.extend_from_slice(&hashes[10..20]);
    let r = mb.lookup(&gap).unwrap();
    assert_eq!(r.hits, 10);
    mb.release(r.lease).unwrap();
    assert_eq!(mb.lookup(&[block_hash(BLOCKS + 6)]).unwrap().hits, 0);
    // A lookup too large for the mailbox (9,000 hashes: about 290 KiB) goes over the socket.
    let many: Vec<Vec<u8>> = (0..9000).map(|i| hashes[i % BLOCKS].clone()).collect();
    let r = mb.lookup(&many).unwrap();
    assert_eq!(r.hits, 9000);
    mb.release(r.lease).unwrap();
    // Errors come back through the mailbox too.
    match mb.release(0xdead_beef) {
        Err(ClientError::Server { code, .. }) => {
            assert!(matches!(code, ErrorCode::UnknownLease | ErrorCode::LeaseNotOwned))
        }
        other => panic!("release of an unknown lease: {other:?}"),
    }
    // Hundreds of round trips in a row stay in step.
    for i in 0..500 {
        let r = mb.lookup(&hashes[i % 100..i % 100 + 8]).unwrap();
        assert_eq!(r.hits, 8);
        mb.release(r.lease).unwrap();
    }
    let stats = socket.stats().unwrap();
    assert_eq!(stats.shards.iter().map(|s| s.leases).sum::<u64>(), 0, "every lease released");
    // A second mailbox on one connection is refused; the first keeps working.
    assert!(matches!(mb.attach_mailbox(), Err(ClientError::Server { code: ErrorCode::AlreadyRegistered, .. })));
    assert_eq!(mb.lookup(&hashes[..4]).unwrap().hits, 4);
}

#[test]
fn mailbox_lookups_match_the_socket_on_a_polling_shard() {
    // One shard polls its connections' mailboxes after each reply ([server] spin-us 100).
    lookups_match_the_socket("[server]\nspin-us = 100\n[[shard]]\ncore = 0\n");
    // Servers of several shards poll too (decision 51).
    lookups_match_the_socket("[server]\nspin-us = 100\n[[shard]]\ncore = 0\n[[shard]]\ncore = 1\n");
}

#[test]
fn mailbox_lookups_match_the_socket_when_the_server_must_be_rung() {
    // Without polling every request is rung for over the socket.
    lookups_match_the_socket("[server]\nspin-us = 0\n[[shard]]\ncore = 0\n");
    lookups_match_the_socket("[server]\nspin-us = 0\n[[shard]]\ncore = 0\n[[shard]]\ncore = 1\n");
}

fn error_of(frame: &protocol::Frame) -> ErrorReply {
    assert_eq!(frame.kind, FrameKind::Error, "expected an error frame");
    protocol::from_body(&frame.body).unwrap()
}

#[test]
fn bad_mailbox_contents_get_errors_and_the_connection_goes_on() {
    let (server, _dir) = server("[server]\nspin-us = 100\n[[shard]]\ncore = 0\n");
    let mut c = mailbox_client(&server);
    // Bytes that are not a frame.
    let e = error_of(&c.mailbox_exchange(b"\x00\x00\x00\x20garbage that is no kvloft frame").unwrap());
    assert_eq!(e.code, ErrorCode::BadFrame, "{e:?}");
    // Nothing at all.
    let e = error_of(&c.mailbox_exchange(b"").unwrap());
    assert_eq!(e.code, ErrorCode::BadFrame, "{e:?}");
    assert!(e.message.contains("not exactly one whole frame"), "{e:?}");
    // A whole frame followed by stray bytes, and a truncated frame.
    let mut frame = Vec::new();
    protocol::encode(&mut frame, FrameKind::Request, 7, &protocol::to_body(&Request::Stats(Default::default())));
    let mut two = frame.clone();
    two.extend_from_slice(&frame);
    let e = error_of(&c.mailbox_exchange(&two).unwrap());
    assert!(e.message.contains("not exactly one whole frame"), "{e:?}");
    let e = error_of(&c.mailbox_exchange(&frame[..frame.len() - 3]).unwrap());
    assert!(e.message.contains("not exactly one whole frame"), "{e:?}");
    // A body that is not a request, and attach_mailbox from inside the mailbox.
    let mut bad = Vec::new();
    protocol::encode(&mut bad, FrameKind::Request, 8, b"\x91\x01");
    let answer = c.mailbox_exchange(&bad).unwrap();
    assert_eq!(answer.request_id, 8);
    error_of(&answer);
    let mut attach = Vec::new();
    protocol::encode(
        &mut attach,
        FrameKind::Request,
        9,
        &protocol::to_body(&Request::AttachMailbox(Default::default())),
    );
    let e = error_of(&c.mailbox_exchange(&attach).unwrap());
    assert_eq!(e.code, ErrorCode::BadRequest, "{e:?}");
    // A valid request still works through the mailbox, and stats through it too.
    let answer = c.mailbox_exchange(&frame).unwrap();
    assert_eq!((answer.kind, answer.request_id), (FrameKind::Reply, 7));
    assert_eq!(c.lookup(&[block_hash(1)]).unwrap().hits, 0);
    // The socket too, and the server serves others.
    assert!(c.stats().is_ok());
    assert!(server.client().unwrap().stats().is_ok());
}

#[test]
fn a_client_that_leaves_with_a_mailbox_takes_nothing_down() {
    let (server, _dir) = server("[server]\nspin-us = 100\n[[shard]]\ncore = 0\n");
    let memory = vec![7u8; 2 * BLOCKS * SEGMENT as usize];
    let mut keeper = saved(&server, &memory);
    {
        let mut c = mailbox_client(&server);
        let r = c.lookup(&[block_hash(0), block_hash(1)]).unwrap();
        assert_eq!(r.hits, 2);
        // Dropped with its lease held: the server releases it.
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let leases: u64 = keeper.stats().unwrap().shards.iter().map(|s| s.leases).sum();
        if leases == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the leaver's lease is still held");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut again = mailbox_client(&server);
    assert_eq!(again.lookup(&[block_hash(0)]).unwrap().hits, 1);
}
