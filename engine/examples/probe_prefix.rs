//! Times the index's prefix probe (`SliceTable::get_prefix_mut`) over 1,024 keys of 32-byte
//! hashes, outside any server: the part of a 1,024-hash lookup that grows with the index.
//!
//! `cargo run --release -p kvloft-engine --example probe_prefix -- [RESIDENT] [shuffled]` stores
//! a 4,096-key working set interleaved with RESIDENT other keys (as `kvloft bench socket
//! --resident-blocks` saves them), or in a random order with `shuffled` (so that no key's item
//! follows its predecessor's), then prints the median and the 10th and 90th percentiles of 20,000
//! probes of 1,024 working-set keys in prefix order.
use kvloft_engine::key::{BlockHash, BlockKey, SliceKey};
use kvloft_engine::namespace::NamespaceId;
use kvloft_engine::rng::SplitMix64;
use kvloft_engine::table::SliceTable;
use std::time::Instant;

fn hash(salt: u64, i: u64) -> BlockHash {
    let mut r = SplitMix64::new(salt.wrapping_mul(0x9e37) ^ i);
    let mut b = [0u8; 32];
    for c in b.chunks_mut(8) {
        c.copy_from_slice(&r.next_u64().to_le_bytes());
    }
    BlockHash::try_from(&b[..]).unwrap()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let resident: u64 = args.get(1).map(|s| s.parse().unwrap()).unwrap_or(0);
    let shuffled = args.get(2).is_some_and(|s| s == "shuffled");
    let ns = NamespaceId([7; 16]);
    let w = 4096u64;
    let mut order: Vec<(u64, u64)> = Vec::new();
    let every = resident / w + 1;
    let (mut nw, mut nr) = (0, 0);
    for p in 0..resident + w {
        if (p % every == 0 && nw < w) || nr == resident {
            order.push((1, nw));
            nw += 1;
        } else {
            order.push((2, nr));
            nr += 1;
        }
    }
    if shuffled {
        let mut r = SplitMix64::new(5);
        for k in (1..order.len()).rev() {
            order.swap(k, (r.next_u64() % (k as u64 + 1)) as usize);
        }
    }
    let mut t = SliceTable::new();
    for (s, i) in order {
        t.insert(SliceKey { block: BlockKey { ns, hash: hash(s, i) }, rank: 0 }, 0u32);
    }
    let ws: Vec<BlockHash> = (0..w).map(|i| hash(1, i)).collect();
    let mut times = Vec::new();
    for r in 0..20_000usize {
        let start = (r * 97) % (w as usize - 1024 + 1);
        let t0 = Instant::now();
        let n = t.get_prefix_mut(
            ns,
            1024,
            |i| (ws[start + i], 0),
            |_, _, v| {
                *v += 1;
                true
            },
        );
        times.push(t0.elapsed().as_nanos() as u64);
        assert_eq!(n, 1024);
    }
    times.sort();
    let us = |q: usize| times[q] as f64 / 1e3;
    println!(
        "resident {resident} shuffled {shuffled}: p50 {:.1} us p10 {:.1} p90 {:.1}",
        us(10_000),
        us(2_000),
        us(18_000)
    );
}
