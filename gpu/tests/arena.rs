//! The pinned host arena: mapping, pre-touch, locking, hugepage fallback, bounds.

use kvloft_gpu::arena::HUGE_PAGE_BYTES;
use kvloft_gpu::{Arena, ArenaError};

/// The `/proc/self/smaps` entry of the mapping that contains `addr`: (Rss kB, Locked kB, VmFlags).
/// Tests run in parallel, so the kernel may have merged the arena with a neighbouring mapping of
/// the same flags: the entry can be larger than the arena.
fn smaps_entry(addr: usize) -> (u64, u64, String) {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let contains = |l: &str| {
        let range = l.split_whitespace().next().unwrap_or_default();
        let mut ends = range.split('-').map(|v| usize::from_str_radix(v, 16));
        matches!((ends.next(), ends.next()), (Some(Ok(lo)), Some(Ok(hi))) if lo <= addr && addr < hi)
    };
    let mut lines = smaps.lines().skip_while(|l| !(l.contains('-') && contains(l)));
    assert!(lines.next().is_some(), "no mapping contains {addr:#x}");
    let (mut rss, mut locked, mut flags) = (None, None, String::new());
    for line in lines {
        let kb = |l: &str| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok());
        if line.starts_with("Rss:") {
            rss = kb(line);
        } else if line.starts_with("Locked:") {
            locked = kb(line);
        } else if let Some(f) = line.strip_prefix("VmFlags:") {
            flags = f.trim().to_string();
            break;
        }
    }
    (rss.unwrap(), locked.unwrap(), flags)
}

fn single_node() -> bool {
    std::fs::read_to_string("/sys/devices/system/node/online").map_or(true, |s| s.trim() == "0")
}

#[test]
fn allocates_pretouches_and_locks() {
    let asked = 3 * 1024 * 1024 + 1;
    let arena = Arena::new(asked, None, false).unwrap();
    let page = arena.page_bytes();
    assert_eq!(arena.len() % page, 0);
    assert_eq!(arena.len(), asked.div_ceil(page) * page, "rounded up to the page");
    assert!(!arena.hugepages());
    assert!(arena.notes().is_empty(), "{:?}", arena.notes());
    assert!(arena.prefault_gbps() > 0.0);
    let (rss_kb, locked_kb, flags) = smaps_entry(arena.as_ptr() as usize);
    // The kernel may merge this mapping with an adjacent one of another test's arena (same flags),
    // so the smaps entry can be larger than the arena, never smaller.
    assert!(rss_kb * 1024 >= arena.len(), "every page is resident after pre-touch");
    assert!(locked_kb * 1024 >= arena.len(), "every page is locked");
    assert!(flags.split_whitespace().any(|f| f == "lo"), "VM_LOCKED missing: {flags}");
}

#[test]
fn larger_arena_touches_in_parallel() {
    let arena = Arena::new(64 << 20, Some(0), false).unwrap();
    let (rss_kb, locked_kb, _) = smaps_entry(arena.as_ptr() as usize);
    assert!(rss_kb * 1024 >= arena.len() && locked_kb * 1024 >= arena.len());
    assert!(arena.notes().is_empty(), "{:?}", arena.notes());
    eprintln!(
        "pre-touched {} MiB in {:?} ({:.2} GB/s)",
        arena.len() >> 20,
        arena.touch_duration(),
        arena.prefault_gbps()
    );
}

#[test]
fn read_write_round_trip_and_bounds() {
    let mut arena = Arena::new(10_000, None, false).unwrap();
    let len = arena.len();
    let mut zeros = vec![1u8; 64];
    arena.read(len - 64, &mut zeros).unwrap();
    assert!(zeros.iter().all(|&b| b == 0), "fresh memory is zero");

    let data: Vec<u8> = (0..5000u32).map(|i| (i * 7 + 3) as u8).collect();
    arena.write(4000, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    arena.read(4000, &mut back).unwrap();
    assert_eq!(back, data);
    arena.write(len - 1, &[9]).unwrap();
    arena.write(len, &[]).unwrap();

    let err = arena.write(len - 1, &[1, 2]).unwrap_err();
    assert!(
        matches!(err, ArenaError::OutOfBounds { offset, len: 2, arena_bytes } if offset == len - 1 && arena_bytes == len)
    );
    assert!(matches!(arena.read(u64::MAX, &mut [0u8; 2]), Err(ArenaError::OutOfBounds { .. })));
    assert!(matches!(arena.read(len + 1, &mut []), Err(ArenaError::OutOfBounds { .. })));
}

#[test]
fn hugepages_fall_back_with_a_note_when_too_few_are_reserved() {
    let dir = "/sys/kernel/mm/hugepages/hugepages-2048kB";
    let count = |f: &str| std::fs::read_to_string(format!("{dir}/{f}")).ok().and_then(|s| s.trim().parse::<u64>().ok());
    let free = count("free_hugepages").unwrap_or(0).saturating_sub(count("resv_hugepages").unwrap_or(0));
    // Ask for one more hugepage than are free, so the fallback happens whatever is reserved.
    let pages = free + 1;
    if pages > 128 {
        eprintln!("{free} hugepages free: skipping the fallback check");
        return;
    }
    let arena = Arena::new(pages * HUGE_PAGE_BYTES, None, true).unwrap();
    if arena.hugepages() {
        // Someone reserved more between our count and the mapping.
        assert_eq!(arena.page_bytes(), HUGE_PAGE_BYTES);
        return;
    }
    assert_eq!(arena.len(), pages * HUGE_PAGE_BYTES);
    assert!(arena.page_bytes() < HUGE_PAGE_BYTES);
    let note = arena.notes().join("\n");
    assert!(note.contains("hugepages requested but"), "{note}");
    assert!(note.contains("using 4 KiB pages") && note.contains("nr_hugepages"), "{note}");
    let (rss_kb, locked_kb, _) = smaps_entry(arena.as_ptr() as usize);
    assert!(rss_kb * 1024 >= arena.len() && locked_kb * 1024 >= arena.len());
}

#[test]
fn hugepages_are_used_when_reserved() {
    let arena = Arena::new(HUGE_PAGE_BYTES + 1, None, true).unwrap();
    if arena.hugepages() {
        assert_eq!(arena.page_bytes(), HUGE_PAGE_BYTES);
        assert_eq!(arena.len(), 2 * HUGE_PAGE_BYTES);
        assert!(arena.notes().is_empty(), "{:?}", arena.notes());
        let mut arena = arena;
        arena.write(HUGE_PAGE_BYTES + 5, b"huge").unwrap();
        let mut back = [0u8; 4];
        arena.read(HUGE_PAGE_BYTES + 5, &mut back).unwrap();
        assert_eq!(&back, b"huge");
    } else {
        assert_eq!(arena.notes().len(), 1, "the fallback says why: {:?}", arena.notes());
    }
}

#[test]
fn numa_binding_is_skipped_on_one_node() {
    let arena = Arena::new(1 << 20, Some(7), false).unwrap();
    if single_node() {
        assert_eq!(arena.node(), None);
        assert!(arena.notes().is_empty(), "single node: skipped silently, got {:?}", arena.notes());
    } else {
        // Node 7 rarely exists; binding to it fails and says so, without failing the arena.
        assert!(arena.node() == Some(7) || arena.notes().iter().any(|n| n.contains("mbind")), "{:?}", arena.notes());
    }
}

#[test]
fn zero_bytes_is_refused() {
    assert!(matches!(Arena::new(0, None, false), Err(ArenaError::Empty)));
    assert!(matches!(Arena::new(u64::MAX, None, false), Err(ArenaError::TooLarge { .. })));
}

#[test]
fn arena_moves_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Arena>();
    let mut arena = Arena::new(4096, None, false).unwrap();
    arena.write(0, b"moved").unwrap();
    let arena = std::thread::spawn(move || {
        let mut back = [0u8; 5];
        arena.read(0, &mut back).unwrap();
        assert_eq!(&back, b"moved");
        arena
    })
    .join()
    .unwrap();
    assert_eq!(arena.len(), arena.page_bytes());
}

/// Arenas made one after another are never neighbours in the address space, whatever the kernel's
/// placement: a copy that merged ranges across two of them would span two GPU registrations.
#[test]
fn arenas_are_never_adjacent() {
    use kvloft_gpu::arena::GUARD_BYTES;
    let arenas: Vec<Arena> = (0..4).map(|_| Arena::new(4 << 20, None, false).unwrap()).collect();
    for (i, a) in arenas.iter().enumerate() {
        let (a0, a1) = (a.as_ptr() as usize, a.as_ptr() as usize + a.len() as usize);
        for b in &arenas[i + 1..] {
            let (b0, b1) = (b.as_ptr() as usize, b.as_ptr() as usize + b.len() as usize);
            let gap = if a1 <= b0 { b0 - a1 } else { a0 - b1 };
            assert!(gap >= 2 * GUARD_BYTES, "arenas {a0:#x}..{a1:#x} and {b0:#x}..{b1:#x} are {gap} bytes apart");
        }
    }
    // The mapping itself is whole and writable.
    let mut a = Arena::new(10_000, None, false).unwrap();
    a.write(a.len() - 4, &[1, 2, 3, 4]).unwrap();
    let mut back = [0u8; 4];
    a.read(a.len() - 4, &mut back).unwrap();
    assert_eq!(back, [1, 2, 3, 4]);
}
