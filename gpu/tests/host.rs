//! The `host` backend: copies between a CPU process's KV cache and pool slots.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use kvloft_engine::protocol::LayerMemory;
use kvloft_gpu::host::{MAX_IOVECS, MAX_ITEMS};
use kvloft_gpu::{Arena, ArenaError, HostError, HostMemory};

/// Deterministic bytes (xorshift64*), so a child process can rebuild the same cache.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

/// A layer at `offset` bytes into the fake cache.
fn layer(
    offset: u64,
    num_blocks: u32,
    block_stride: u64,
    segments: u32,
    segment_stride: u64,
    segment_bytes: u64,
) -> LayerMemory {
    LayerMemory { base: offset, num_blocks, block_stride, segments, segment_stride, segment_bytes }
}

/// The layers moved to the cache's real address.
fn at(base: u64, layers: &[LayerMemory]) -> Vec<LayerMemory> {
    layers.iter().map(|l| LayerMemory { base: l.base + base, ..*l }).collect()
}

/// Bytes of cache the (relative) layers reach.
fn extent(layers: &[LayerMemory]) -> usize {
    let end = |l: &LayerMemory| {
        l.base
            + u64::from(l.num_blocks - 1) * l.block_stride
            + u64::from(l.segments - 1) * l.segment_stride
            + l.segment_bytes
    };
    layers.iter().map(end).max().unwrap() as usize
}

/// The (offset, len) ranges of `block` in the cache, in slice order (relative layers).
fn ranges(layers: &[LayerMemory], block: u32) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for l in layers {
        for s in 0..u64::from(l.segments) {
            out.push((
                (l.base + u64::from(block) * l.block_stride + s * l.segment_stride) as usize,
                l.segment_bytes as usize,
            ));
        }
    }
    out
}

/// The slice of `block` as the pool should hold it.
fn slice_of(cache: &[u8], layers: &[LayerMemory], block: u32) -> Vec<u8> {
    ranges(layers, block).into_iter().flat_map(|(o, n)| cache[o..o + n].to_vec()).collect()
}

/// `cache` with the slices of `sources` written into blocks `targets`.
fn with_blocks(cache: &[u8], layers: &[LayerMemory], targets: &[u32], slices: &[Vec<u8>]) -> Vec<u8> {
    let mut out = cache.to_vec();
    for (&block, slice) in targets.iter().zip(slices) {
        let mut at = 0;
        for (o, n) in ranges(layers, block) {
            out[o..o + n].copy_from_slice(&slice[at..at + n]);
            at += n;
        }
    }
    out
}

/// Saves `sources` into slots at `offsets`, checks the slots, poisons the cache, loads the slots
/// into `targets` and checks the whole cache: the targets hold the sources' bytes, nothing else
/// changed.
fn round_trip(rel: &[LayerMemory], sources: &[u32], targets: &[u32], offsets: &[u64], seed: u64) {
    let mut cache = pattern(extent(rel), seed);
    let original = cache.clone();
    let host = HostMemory::new(std::process::id() as i32, at(cache.as_mut_ptr() as u64, rel)).unwrap();
    let slice = host.slice_bytes();
    assert_eq!(slice, rel.iter().map(|l| u64::from(l.segments) * l.segment_bytes).sum::<u64>());
    let mut arena = Arena::new(offsets.iter().max().unwrap() + slice, None, false).unwrap();

    let save: Vec<(u32, u64)> = sources.iter().copied().zip(offsets.iter().copied()).collect();
    host.save_into(&mut arena, &save).unwrap();
    let expected: Vec<Vec<u8>> = sources.iter().map(|&b| slice_of(&original, rel, b)).collect();
    for (want, &offset) in expected.iter().zip(offsets) {
        let mut got = vec![0u8; slice as usize];
        arena.read(offset, &mut got).unwrap();
        assert!(got == *want, "slot at {offset} does not hold its block's slice");
    }

    let poison = pattern(cache.len(), seed ^ 0xdead_beef);
    cache.copy_from_slice(&poison);
    let load: Vec<(u32, u64)> = targets.iter().copied().zip(offsets.iter().copied()).collect();
    host.load_from(&arena, &load).unwrap();
    std::hint::black_box(&mut cache);
    let want = with_blocks(&poison, rel, targets, &expected);
    let first_diff = cache.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "cache differs after load");
}

#[test]
fn three_layers_two_segments_with_padding() {
    // Per block: K (96 B), 32 B gap, V (96 B), 96 B padding; layers 4 KiB apart.
    let rel: Vec<LayerMemory> = (0..3).map(|i| layer(i * 4096, 10, 320, 2, 128, 96)).collect();
    // Slots out of order, one with a gap before it.
    let slice = 3 * 2 * 96;
    round_trip(&rel, &[5, 0, 7], &[1, 9, 3], &[2 * slice, 0, 3 * slice + 100], 1);
}

#[test]
fn single_segment_layout() {
    // MLA-like: one latent segment per block, padded.
    let rel = vec![layer(0, 8, 700, 1, 0, 576), layer(8 * 700, 8, 600, 1, 999, 576)];
    round_trip(&rel, &[7, 2], &[0, 6], &[0, 2 * 576], 2);
}

#[test]
fn planar_layout_of_vllm_tensors() {
    // vLLM's (2, num_blocks, ...) tensor per layer: the K plane, then the V plane.
    let (blocks, bytes) = (12u32, 256u64);
    let plane = u64::from(blocks) * bytes;
    let rel: Vec<LayerMemory> = (0..4).map(|i| layer(i * 2 * plane, blocks, bytes, 2, plane, bytes)).collect();
    round_trip(&rel, &[11, 0, 4, 5], &[5, 4, 0, 11], &[0, 2048, 4096, 6144], 3);
}

#[test]
fn adjacent_ranges_merge() {
    // K/V adjacent inside a block and blocks back to back: consecutive blocks into consecutive
    // slots are one range on each side.
    let rel = vec![layer(0, 16, 128, 2, 64, 64)];
    round_trip(&rel, &[2, 3, 4, 5], &[10, 11, 12, 13], &[0, 128, 256, 384], 4);
    // Cross-layer layout: all layers of a block are contiguous (layer i at i * 32, block stride
    // 4 * 32), so one block is one range.
    let rel: Vec<LayerMemory> = (0..4).map(|i| layer(i * 32, 6, 128, 1, 0, 32)).collect();
    round_trip(&rel, &[0, 1, 5], &[3, 4, 2], &[256, 0, 128], 5);
}

#[test]
fn batches_beyond_iov_max() {
    // Two separated segments per block and scattered blocks: far more than MAX_IOVECS ranges.
    let blocks = 3000u32;
    let rel = vec![layer(0, blocks, 200, 2, 100, 40), layer(200 * u64::from(blocks), blocks, 200, 2, 100, 40)];
    let sources: Vec<u32> = (0..blocks).map(|i| (i * 7) % blocks).collect();
    let targets: Vec<u32> = (0..blocks).map(|i| (i * 11 + 5) % blocks).collect();
    let offsets: Vec<u64> = (0..u64::from(blocks)).map(|i| ((i * 13) % u64::from(blocks)) * 160).collect();
    assert!(sources.len() * 4 > 2 * MAX_IOVECS);
    round_trip(&rel, &sources, &targets, &offsets, 6);
}

#[test]
fn block_out_of_range_is_refused_before_any_copy() {
    let mut cache = pattern(64 * 1024, 7);
    let rel = vec![layer(0, 10, 256, 2, 128, 128), layer(4096, 6, 256, 2, 128, 128)];
    let host = HostMemory::new(std::process::id() as i32, at(cache.as_mut_ptr() as u64, &rel)).unwrap();
    assert!(host.check_block(5).is_ok());
    assert!(matches!(host.check_block(6), Err(HostError::BlockOutOfRange { block_id: 6, layer: 1, num_blocks: 6 })));
    assert!(matches!(host.check_block(10), Err(HostError::BlockOutOfRange { block_id: 10, layer: 0, num_blocks: 10 })));
    let mut arena = Arena::new(4 * host.slice_bytes(), None, false).unwrap();
    let err = host.save_into(&mut arena, &[(1, 0), (6, host.slice_bytes())]).unwrap_err();
    assert!(matches!(err, HostError::BlockOutOfRange { block_id: 6, .. }), "{err}");
    let mut slot = vec![1u8; host.slice_bytes() as usize];
    arena.read(0, &mut slot).unwrap();
    assert!(slot.iter().all(|&b| b == 0), "nothing was copied");

    let err = host.load_from(&arena, &[(0, arena.len() - 1)]).unwrap_err();
    assert!(matches!(err, HostError::Slot(ArenaError::OutOfBounds { .. })), "{err}");
    let too_many = vec![(0u32, 0u64); MAX_ITEMS + 1];
    assert!(matches!(host.load_from(&arena, &too_many), Err(HostError::TooManyItems { .. })));
}

#[test]
fn bad_layer_descriptions_name_layer_and_field() {
    let good = layer(1 << 20, 4, 256, 2, 128, 128);
    let pid = std::process::id() as i32;
    let check = |bad: LayerMemory, field: &str| {
        let err = HostMemory::new(pid, vec![good, bad]).unwrap_err();
        match &err {
            HostError::InvalidLayer { layer: 1, field: f, .. } if *f == field => {}
            other => panic!("expected layer 1 {field}, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.starts_with(&format!("layer 1: {field}")), "{msg}");
    };
    check(LayerMemory { segments: 3, ..good }, "segments");
    check(LayerMemory { segments: 0, ..good }, "segments");
    check(LayerMemory { segment_bytes: 0, ..good }, "segment_bytes");
    check(LayerMemory { num_blocks: 0, ..good }, "num_blocks");
    check(LayerMemory { segment_stride: 100, ..good }, "segment_stride");
    check(LayerMemory { block_stride: 100, ..good }, "block_stride");
    // V of block b on top of K of block b + 1.
    check(LayerMemory { block_stride: 256, segment_stride: 200, ..good }, "block_stride");
    check(LayerMemory { base: u64::MAX - 1000, ..good }, "base");
    check(LayerMemory { block_stride: u64::MAX / 2, ..good }, "base");

    assert!(matches!(HostMemory::new(0, vec![good]), Err(HostError::InvalidPid { pid: 0 })));
    assert!(matches!(HostMemory::new(pid, vec![]), Err(HostError::NoLayers)));
    assert!(matches!(HostMemory::new(pid, vec![good; 5000]), Err(HostError::TooManyLayers { count: 5000, .. })));
    // Segment stride is ignored with one segment; a single block needs no stride.
    assert!(HostMemory::new(pid, vec![LayerMemory { segments: 1, segment_stride: 0, ..good }]).is_ok());
    assert!(HostMemory::new(pid, vec![LayerMemory { num_blocks: 1, block_stride: 0, ..good }]).is_ok());
}

#[test]
fn unmapped_client_memory_is_a_bad_address() {
    let mut arena = Arena::new(1 << 16, None, false).unwrap();
    let pid = std::process::id() as i32;
    // Page 1 is never mapped.
    let host = HostMemory::new(pid, vec![layer(4096, 4, 256, 2, 128, 128)]).unwrap();
    let err = host.save_into(&mut arena, &[(0, 0)]).unwrap_err();
    assert!(matches!(err, HostError::BadAddress { pid: p, .. } if p == pid), "{err}");
    assert!(matches!(host.load_from(&arena, &[(1, 0)]), Err(HostError::BadAddress { .. })));

    // A valid first layer then an unmapped one: the kernel copies part, then faults.
    let mut cache = pattern(4096, 8);
    let layers = vec![layer(cache.as_mut_ptr() as u64, 4, 256, 2, 128, 128), layer(4096, 4, 256, 2, 128, 128)];
    let host = HostMemory::new(pid, layers).unwrap();
    let err = host.save_into(&mut arena, &[(2, 0)]).unwrap_err();
    assert!(matches!(err, HostError::BadAddress { .. }), "{err}");
    let mut got = vec![0u8; 256];
    arena.read(0, &mut got).unwrap();
    assert_eq!(got, cache[512..768].to_vec(), "the reachable part arrived before the fault");
}

#[test]
fn missing_process_is_client_gone() {
    // Above any pid_max the kernel allows (2^22).
    let host = HostMemory::new(i32::MAX - 1, vec![layer(1 << 20, 4, 256, 2, 128, 128)]).unwrap();
    let mut arena = Arena::new(4096, None, false).unwrap();
    let err = host.save_into(&mut arena, &[(0, 0)]).unwrap_err();
    assert!(matches!(err, HostError::ClientGone { pid } if pid == i32::MAX - 1), "{err}");
    assert!(matches!(host.load_from(&arena, &[(0, 0)]), Err(HostError::ClientGone { .. })));
}

#[test]
fn foreign_process_needs_permission() {
    use std::os::unix::fs::MetadataExt;
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let uid: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let owner = std::fs::metadata("/proc/1").map(|m| m.uid());
    if uid == 0 || owner.is_err() || owner.as_ref().is_ok_and(|&o| o == uid) {
        eprintln!("running as root or as pid 1's owner: no foreign process to be refused");
        return;
    }
    let host = HostMemory::new(1, vec![layer(1 << 20, 4, 256, 2, 128, 128)]).unwrap();
    let mut arena = Arena::new(4096, None, false).unwrap();
    let err = host.save_into(&mut arena, &[(0, 0)]).unwrap_err();
    assert!(matches!(err, HostError::Permission { pid: 1, .. }), "{err}");
    assert!(err.to_string().contains("PR_SET_PTRACER"), "{err}");
}

const CHILD_ENV: &str = "KVLOFT_GPU_HOST_TEST_CHILD";
const CHILD_SEED: u64 = 0x5eed;

fn child_layers() -> Vec<LayerMemory> {
    (0..3).map(|i| layer(i * 4096, 10, 320, 2, 128, 96)).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Not a test on its own: when re-run by `child_process_round_trip` with `CHILD_ENV` set, plays
/// the inference process. It prints where its cache is, waits for a line on stdin, then prints
/// the cache.
#[test]
fn child_helper() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    // Never outlive a parent that failed before sending its line.
    std::thread::spawn(|| {
        std::thread::sleep(std::time::Duration::from_secs(60));
        std::process::exit(2);
    });
    let mut cache = pattern(extent(&child_layers()), CHILD_SEED);
    // libtest has printed `test child_helper ... ` without a newline: start a fresh line.
    println!("\nKVLOFT-CHILD {} {}", cache.as_mut_ptr() as usize, cache.len());
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    std::hint::black_box(&mut cache);
    println!("\nKVLOFT-DUMP {}", hex(&cache));
    std::io::stdout().flush().unwrap();
}

#[test]
fn child_process_round_trip() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_helper", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut marked = |marker: &str| -> String {
        let mut line = String::new();
        loop {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "child ended before {marker}");
            if let Some(at) = line.find(marker) {
                return line[at + marker.len()..].trim().to_string();
            }
        }
    };
    let where_ = marked("KVLOFT-CHILD ");
    let (addr, len) = where_.split_once(' ').unwrap();
    let (addr, len): (u64, usize) = (addr.parse().unwrap(), len.parse().unwrap());

    let rel = child_layers();
    let original = pattern(extent(&rel), CHILD_SEED);
    assert_eq!(len, original.len());
    let host = HostMemory::new(child.id() as i32, at(addr, &rel)).unwrap();
    let slice = host.slice_bytes();
    let mut arena = Arena::new(3 * slice, None, false).unwrap();
    host.save_into(&mut arena, &[(5, 0), (0, slice), (7, 2 * slice)]).unwrap();
    let expected: Vec<Vec<u8>> = [5, 0, 7].iter().map(|&b| slice_of(&original, &rel, b)).collect();
    for (i, want) in expected.iter().enumerate() {
        let mut got = vec![0u8; slice as usize];
        arena.read(i as u64 * slice, &mut got).unwrap();
        assert!(got == *want, "slot {i} does not hold its block");
    }
    host.load_from(&arena, &[(1, 0), (9, slice), (3, 2 * slice)]).unwrap();

    writeln!(child.stdin.as_mut().unwrap(), "go").unwrap();
    let dump = marked("KVLOFT-DUMP ");
    assert!(child.wait().unwrap().success());
    let want = hex(&with_blocks(&original, &rel, &[1, 9, 3], &expected));
    assert!(dump == want, "the child's cache differs after load");

    // The child has exited and been reaped.
    let err = host.load_from(&arena, &[(0, 0)]).unwrap_err();
    assert!(matches!(err, HostError::ClientGone { .. }), "{err}");
}
