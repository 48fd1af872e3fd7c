"""The connector's worker side (``kvloft.vllm.transfers.Transfers``) against a real ``kvloft serve``:
a worker ``Link`` registers a real CPU KV cache; saves and loads go through the server's host
backend; the scheduler side's lookups (for real leases) go through a second connection of the same
instance. The server is also killed (SIGKILL) under the transfers."""

from __future__ import annotations

import ctypes
import mmap
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
from support import RunningServer, chain_hashes, make_namespace, new_cache, restart

import kvloft
from kvloft.vllm.link import Link, Memory
from kvloft.vllm.plan import LoadSpec, SaveSpec
from kvloft.vllm.transfers import Transfers

pytestmark = pytest.mark.server

INSTANCE = "engine-transfers"
NUM_BLOCKS = 64
PROT_NONE = 0  # not in the mmap module


@dataclass
class Rig:
    server: RunningServer
    cache: kvloft.HostKVCache
    link: Link
    transfers: Transfers
    scheduler: kvloft.Client
    #: Seconds added to the transfers' clock (a load's age).
    skew: list[float]
    #: Every request reported finished, in order: ("sending" | "recving", req_id).
    reported: list[tuple[str, str]] = field(default_factory=list)

    def poll(self, wait: float = 0.0):
        done = self.transfers.poll(wait)
        self.reported += [("sending", r) for r in sorted(done.sending)]
        self.reported += [("recving", r) for r in sorted(done.recving)]
        return done

    def poll_until(self, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, (
                f"timed out; in flight {self.transfers.in_flight}, reported {self.reported}, "
                f"counters {self.transfers.counters.peek()}"
            )
            self.poll(0.05)

    def count(self, kind: str, req_id: str) -> int:
        return self.reported.count((kind, req_id))

    def fill(self, hashes: list[bytes], first_block: int) -> list[int]:
        ids = list(range(first_block, first_block + len(hashes)))
        for h, b in zip(hashes, ids):
            self.cache.fill_block(b, h)
        return ids

    def matches(self, hashes: list[bytes], ids: list[int]) -> bool:
        return all(self.cache.read_block(b) == self.cache.expected(h) for h, b in zip(hashes, ids))

    def store(self, hashes: list[bytes], first_block: int = 0) -> list[int]:
        """Saves blocks through the transfers and waits for the completion."""
        ids = self.fill(hashes, first_block)
        before = self.transfers.counters.peek()["saves"]
        self.transfers.start_saves([SaveSpec("store", hashes, ids)])
        self.poll_until(lambda: self.transfers.counters.peek()["saves"] == before + 1)
        return ids


@pytest.fixture
def rig(server_process: RunningServer) -> Iterator[Rig]:
    namespace = make_namespace()
    cache = new_cache(NUM_BLOCKS)
    link = Link(server_process.socket_path, INSTANCE, namespace, Memory(rank=0, layers=cache.layers()),
                timeout=1.0, backoff=(0.01, 0.05), client_name="pytest-worker")
    assert link.client() is not None and link.up
    scheduler = kvloft.Client(server_process.socket_path, timeout=5.0, client_name="pytest-scheduler")
    scheduler.register_instance(INSTANCE, namespace)
    skew = [0.0]
    transfers = Transfers(link, load_timeout_s=30.0, clock=lambda: time.monotonic() + skew[0])
    r = Rig(server_process, cache, link, transfers, scheduler, skew)
    yield r
    link.close()
    scheduler.close()
    cache.close()
    if server_process.process.poll() is not None:
        restart(server_process)  # a test killed it; the fixture's teardown wants a live server


@contextmanager
def events_held(link: Link) -> Iterator[None]:
    """Inside the block the worker's completions stay unread on its socket (the real server sends
    them when it is done), so a test decides when the transfers see them."""
    client = link.client()
    assert client is not None

    def nothing_yet(wait: float | None = 0.0) -> list:
        time.sleep(wait or 0.0)
        return []

    client.events = nothing_yet  # type: ignore[method-assign]
    try:
        yield
    finally:
        del client.events  # the real method again


@contextmanager
def protected(cache: kvloft.HostKVCache, layer: int, prot: int) -> Iterator[None]:
    """One layer of the cache with other page protections (``mprotect``) inside the block: the
    server's host backend then fails to write (``PROT_READ``) or read (``PROT_NONE``) it. The
    test must not touch that layer meanwhile."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    addr, size = cache.address(layer), cache.layer_bytes
    assert libc.mprotect(addr, size, prot) == 0, os.strerror(ctypes.get_errno())
    try:
        yield
    finally:
        assert libc.mprotect(addr, size, mmap.PROT_READ | mmap.PROT_WRITE) == 0


def kill(server: RunningServer) -> None:
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()


# ---------------------------------------------------------------------------------------
# Saves
# ---------------------------------------------------------------------------------------


def test_saves_complete_and_are_counted(rig: Rig) -> None:
    chain = chain_hashes("saves", 6)
    ids = rig.fill(chain, 0)
    t = rig.transfers
    t.start_saves([SaveSpec("a", chain[:3], ids[:3]), SaveSpec("b", chain[3:], ids[3:])])
    assert t.in_flight == (0, 1)  # one kvloft request per step
    rig.poll_until(lambda: t.in_flight == (0, 0))
    counted = t.counters.peek()
    assert (counted["saves"], counted["saved_blocks"], counted["present_blocks"], counted["save_failed_blocks"]) == (
        1, 6, 0, 0
    )
    assert len(counted["save_s"]) == 1 and counted["save_s"][0] >= 0
    assert rig.reported == []  # nothing was finished
    assert rig.scheduler.lookup(chain).hits == 6


def test_a_hash_saved_twice_in_one_step_is_sent_once(rig: Rig) -> None:
    chain = chain_hashes("twice", 3)
    ids = rig.fill(chain, 10)
    t = rig.transfers
    t.start_saves([SaveSpec("a", chain, ids), SaveSpec("b", chain, ids)])
    rig.poll_until(lambda: t.in_flight == (0, 0))
    counted = t.counters.peek()
    assert (counted["saves"], counted["saved_blocks"], counted["present_blocks"]) == (1, 3, 0)
    # Saved again in a later step: all present.
    t.start_saves([SaveSpec("c", chain, ids)])
    rig.poll_until(lambda: t.in_flight == (0, 0))
    counted = t.counters.peek()
    assert (counted["saves"], counted["saved_blocks"], counted["present_blocks"]) == (2, 3, 3)


def test_nothing_to_save_sends_nothing(rig: Rig) -> None:
    t = rig.transfers
    t.start_saves([])
    t.start_saves([SaveSpec("a", [], [])])
    assert t.in_flight == (0, 0)
    t.mark_delayed(["a"])  # no save in flight: its blocks are free at once
    assert rig.poll().sending == {"a"}
    assert t.counters.take() is None


def test_delayed_free_is_reported_only_after_its_saves(rig: Rig) -> None:
    chain = chain_hashes("delayed", 40)
    ids = rig.fill(chain, 0)
    t = rig.transfers
    with events_held(rig.link):
        t.start_saves([SaveSpec("a", chain[:20], ids[:20]), SaveSpec("b", chain[20:], ids[20:])])
        t.mark_delayed(["a", "idle"])  # "idle" has no save in flight: free at once
        time.sleep(0.2)  # the server completes the save meanwhile
        assert rig.poll(0.05).sending == {"idle"}
        assert t.in_flight == (0, 1) and t.counters.peek()["saves"] == 0
        assert rig.poll(0.05).sending == set()  # the completion is not collected: not reported
        assert t.wait_for_saves(["a"], timeout=0.2) is False
    rig.poll_until(lambda: rig.count("sending", "a") == 1)
    assert t.in_flight == (0, 0)
    assert t.counters.peek()["saves"] == 1 and t.counters.peek()["saved_blocks"] == 40
    # "b" finished later, after its save completed: reported at the next poll.
    assert rig.poll().sending == set()
    t.mark_delayed(["b"])
    assert rig.poll().sending == {"b"}
    for _ in range(3):
        rig.poll(0.02)
    assert [rig.count("sending", r) for r in ("a", "b", "idle")] == [1, 1, 1]


def test_a_request_with_saves_in_two_steps_waits_for_both(rig: Rig) -> None:
    chain = chain_hashes("two-steps", 30)
    ids = rig.fill(chain, 0)
    t = rig.transfers
    t.start_saves([SaveSpec("a", chain[:15], ids[:15])])
    t.start_saves([SaveSpec("a", chain[15:], ids[15:])])
    assert t.in_flight == (0, 2)
    t.mark_delayed(["a"])
    rig.poll_until(lambda: rig.count("sending", "a") == 1)
    assert t.in_flight == (0, 0) and t.counters.peek()["saves"] == 2


def test_wait_for_saves_and_drain(rig: Rig) -> None:
    chain = chain_hashes("wait", 20)
    ids = rig.fill(chain, 0)
    t = rig.transfers
    t.start_saves([SaveSpec("p", chain[:10], ids[:10])])
    assert t.wait_for_saves(["p", "other"], timeout=20) is True
    assert t.in_flight == (0, 0)
    assert t.wait_for_saves(["p"], timeout=0) is True  # nothing in flight
    t.start_saves([SaveSpec("q", chain[10:], ids[10:])])
    t.drain(timeout=20)
    assert t.in_flight == (0, 0) and t.counters.peek()["saved_blocks"] == 20
    assert rig.scheduler.lookup(chain).hits == 20


# ---------------------------------------------------------------------------------------
# Loads
# ---------------------------------------------------------------------------------------


def test_load_with_a_real_lease(rig: Rig) -> None:
    chain = chain_hashes("load", 4)
    rig.store(chain, first_block=0)
    hit = rig.scheduler.lookup(chain)
    assert hit.hits == 4 and hit.lease
    dst = [20, 21, 22, 23]
    rig.cache.poison(dst)
    t = rig.transfers
    t.start_loads([LoadSpec("r", hit.lease, dst)])
    assert t.in_flight == (1, 0)
    rig.poll_until(lambda: rig.count("recving", "r") == 1)
    assert t.take_failed_blocks() == set()
    assert rig.matches(chain, dst)
    counted = t.counters.peek()
    assert (counted["loads"], counted["loaded_blocks"], counted["load_failures"]) == (1, 4, 0)
    assert len(counted["load_s"]) == 1
    assert rig.reported == [("recving", "r")]


def test_load_of_the_leading_hits_of_a_lease(rig: Rig) -> None:
    chain = chain_hashes("partial", 5)
    rig.store(chain, first_block=0)
    hit = rig.scheduler.lookup(chain)
    rig.cache.poison([30, 31])
    rig.transfers.start_loads([LoadSpec("r", hit.lease, [30, 31])])
    rig.poll_until(lambda: rig.count("recving", "r") == 1)
    assert rig.transfers.take_failed_blocks() == set()
    assert rig.matches(chain[:2], [30, 31])


def test_load_with_a_bogus_lease_fails_its_blocks(rig: Rig) -> None:
    t = rig.transfers
    rig.cache.poison([40, 41], byte=0x5A)
    t.start_loads([LoadSpec("bad", 987654321, [40, 41])])
    rig.poll_until(lambda: rig.count("recving", "bad") == 1)
    assert t.take_failed_blocks() == {40, 41}
    assert t.take_failed_blocks() == set()  # taken once
    assert rig.cache.read_block(40) == rig.cache.read_block(41) == b"\x5a" * rig.cache.slice_bytes
    counted = t.counters.peek()
    assert (counted["loads"], counted["loaded_blocks"], counted["load_failures"]) == (1, 0, 1)
    # A refused load is not an outage: the link stays up and the next load works.
    assert rig.link.up and rig.link.drops == 0
    chain = chain_hashes("after-bad", 2)
    rig.store(chain, first_block=0)
    hit = rig.scheduler.lookup(chain)
    t.start_loads([LoadSpec("good", hit.lease, [42, 43])])
    rig.poll_until(lambda: rig.count("recving", "good") == 1)
    assert t.take_failed_blocks() == set() and rig.matches(chain, [42, 43])
    for _ in range(3):
        rig.poll(0.02)
    assert rig.count("recving", "bad") == 1


def test_a_load_kvloft_cannot_complete_fails_its_blocks(rig: Rig) -> None:
    """A load_done with an error (the server cannot write the worker's memory): the request is
    reported with every block of the load listed, none used."""
    chain = chain_hashes("unwritable", 4)
    rig.store(chain, first_block=0)
    hit = rig.scheduler.lookup(chain)
    dst = [20, 21, 22, 23]
    t = rig.transfers
    with protected(rig.cache, 1, mmap.PROT_READ):
        t.start_loads([LoadSpec("r", hit.lease, dst)])
        rig.poll_until(lambda: rig.count("recving", "r") == 1)
    assert t.take_failed_blocks() == set(dst)
    counted = t.counters.peek()
    assert (counted["loads"], counted["load_failures"], counted["loaded_blocks"]) == (1, 1, 0)
    assert rig.link.up  # a failed load is not an outage


def test_a_save_kvloft_cannot_complete_still_frees_the_blocks(rig: Rig) -> None:
    chain = chain_hashes("unreadable", 6)
    ids = rig.fill(chain, 0)
    t = rig.transfers
    with protected(rig.cache, 0, PROT_NONE):
        t.start_saves([SaveSpec("x", chain, ids)])
        t.mark_delayed(["x"])
        rig.poll_until(lambda: rig.count("sending", "x") == 1)
    counted = t.counters.peek()
    assert (counted["saves"], counted["saved_blocks"], counted["save_failed_blocks"]) == (1, 0, 6)
    assert rig.scheduler.lookup(chain).hits == 0
    # Readable again: the same blocks save.
    t.start_saves([SaveSpec("y", chain, ids)])
    rig.poll_until(lambda: t.in_flight == (0, 0))
    assert t.counters.peek()["saved_blocks"] == 6 and rig.scheduler.lookup(chain).hits == 6


def test_failed_and_good_loads_in_one_step(rig: Rig) -> None:
    chain = chain_hashes("mixed", 3)
    rig.store(chain, first_block=0)
    hit = rig.scheduler.lookup(chain)
    t = rig.transfers
    t.start_loads([LoadSpec("bad", 1 << 40, [50, 51]), LoadSpec("good", hit.lease, [52, 53, 54])])
    rig.poll_until(lambda: {r for _, r in rig.reported} == {"bad", "good"})
    assert t.take_failed_blocks() == {50, 51}
    assert rig.matches(chain, [52, 53, 54])


def test_a_load_past_its_timeout_is_reported_once(rig: Rig) -> None:
    chain = chain_hashes("timeout", 8)
    rig.store(chain, first_block=0)
    hit = rig.scheduler.lookup(chain)
    t = rig.transfers
    with events_held(rig.link):
        t.start_loads([LoadSpec("slow", hit.lease, list(range(20, 28)))])
        assert rig.poll().recving == set()  # not expired yet
        rig.skew[0] += 31.0  # past load_timeout_s
        assert rig.poll().recving == {"slow"}
    assert t.take_failed_blocks() == set(range(20, 28))
    assert t.in_flight == (0, 0)
    counted = t.counters.peek()
    assert (counted["loads"], counted["load_failures"]) == (1, 1)
    # Its late completion reports nothing more; the link is still usable.
    t.start_saves([SaveSpec("later", chain[:1], [0])])
    rig.poll_until(lambda: t.in_flight == (0, 0))
    for _ in range(3):
        rig.poll(0.02)
    assert rig.reported == [("recving", "slow")] and t.counters.peek()["loads"] == 1
    assert t.take_failed_blocks() == set()
    assert rig.link.up and rig.link.drops == 0


# ---------------------------------------------------------------------------------------
# kvloft going away
# ---------------------------------------------------------------------------------------


def test_server_killed_with_a_load_in_flight(rig: Rig) -> None:
    """The kill found by the next load: the load in flight fails with it, before any poll."""
    chain = chain_hashes("killed-load", 16)
    rig.store(chain, first_block=0)
    hit = rig.scheduler.lookup(chain)
    dst = list(range(32, 48))
    t = rig.transfers
    with events_held(rig.link):  # its completion not collected before the kill
        t.start_loads([LoadSpec("inflight", hit.lease, dst)])
        assert t.in_flight == (1, 0)
        kill(rig.server)
        # Loads started while kvloft is gone fail at once, without an exception; the
        # connection's end fails the load in flight too.
        t.start_loads([LoadSpec("after1", 5, [1, 2]), LoadSpec("after2", 6, [3])])
        assert t.in_flight == (0, 0)
    done = rig.poll()
    assert done.recving == {"inflight", "after1", "after2"}
    assert t.take_failed_blocks() == set(dst) | {1, 2, 3}
    counted = t.counters.peek()
    assert (counted["loads"], counted["load_failures"], counted["loaded_blocks"]) == (3, 3, 0)
    assert counted["errors"] == 1
    assert not rig.link.up and rig.link.drops == 1
    for _ in range(3):
        assert rig.poll(0.02).recving == set()


def test_server_killed_found_by_the_poll(rig: Rig) -> None:
    """The kill found while collecting completions: the load and the save in flight end, each
    reported once (completed, if kvloft sent its completion before dying)."""
    chain = chain_hashes("killed-poll", 16)
    rig.store(chain, first_block=0)
    hit = rig.scheduler.lookup(chain)
    dst = list(range(32, 48))
    rig.cache.poison(dst)
    other = chain_hashes("killed-poll-save", 8)
    ids = rig.fill(other, 48)
    t = rig.transfers
    with events_held(rig.link):
        t.start_loads([LoadSpec("inflight", hit.lease, dst)])
        t.start_saves([SaveSpec("saving", other, ids)])
        t.mark_delayed(["saving"])
        kill(rig.server)
        assert rig.poll().recving == set()
    rig.poll_until(lambda: rig.count("recving", "inflight") == 1 and rig.count("sending", "saving") == 1)
    failed = t.take_failed_blocks()
    if failed:
        assert failed == set(dst)
        assert t.counters.peek()["load_failures"] == 1
    else:  # a completion read before the connection's end may be used
        assert rig.matches(chain, dst) and t.counters.peek()["loaded_blocks"] == len(dst)
    counted = t.counters.peek()
    assert counted["saves"] == 2 and counted["saved_blocks"] + counted["save_failed_blocks"] == 16 + 8
    assert t.in_flight == (0, 0)
    # Loads started now fail at once.
    t.start_loads([LoadSpec("after", 5, [1, 2])])
    assert rig.poll().recving == {"after"} and t.take_failed_blocks() == {1, 2}
    assert not rig.link.up


def test_server_killed_then_loads_and_saves(rig: Rig) -> None:
    t = rig.transfers
    chain = chain_hashes("killed-first", 4)
    ids = rig.fill(chain, 0)
    kill(rig.server)
    # The link does not know yet: the first request finds the connection closed.
    t.start_loads([LoadSpec("l1", 7, [10, 11])])
    t.start_saves([SaveSpec("s1", chain, ids)])
    t.mark_delayed(["s1"])
    t.start_loads([LoadSpec("l2", 8, [12])])
    done = rig.poll(0.1)
    assert done.recving == {"l1", "l2"} and done.sending == {"s1"}
    assert t.take_failed_blocks() == {10, 11, 12}
    assert t.in_flight == (0, 0)
    counted = t.counters.peek()
    assert counted["save_failed_blocks"] == 4 and counted["saved_blocks"] == 0
    assert counted["load_failures"] == 2
    assert not rig.link.up

    # kvloft comes back: after the back-off the link registers the memory again and saves work.
    restart(rig.server)
    deadline = time.monotonic() + 10
    while t.counters.peek()["saved_blocks"] < 4:
        assert time.monotonic() < deadline, t.counters.peek()
        t.start_saves([SaveSpec("s2", chain, ids)])
        rig.poll_until(lambda: t.in_flight == (0, 0))
        time.sleep(0.02)
    assert rig.link.connects == 2
    with kvloft.Client(rig.server.socket_path, timeout=5.0) as scheduler:
        scheduler.register_instance(INSTANCE, make_namespace())
        assert scheduler.lookup(chain).hits == 4


def test_server_killed_with_a_save_in_flight_frees_the_blocks(rig: Rig) -> None:
    chain = chain_hashes("killed-save", 40)
    ids = rig.fill(chain, 0)
    t = rig.transfers
    with events_held(rig.link):
        t.start_saves([SaveSpec("x", chain[:30], ids[:30])])
        t.mark_delayed(["x"])
        kill(rig.server)
        assert rig.poll().sending == set()
        # The next step's save finds kvloft gone: the save in flight ends with it.
        t.start_saves([SaveSpec("y", chain[30:], ids[30:])])
        assert t.in_flight == (0, 0)
        t.mark_delayed(["y"])
    done = rig.poll()
    assert done.sending == {"x", "y"}
    counted = t.counters.peek()
    assert (counted["saves"], counted["saved_blocks"], counted["save_failed_blocks"]) == (2, 0, 40)
    assert t.wait_for_saves(["x", "y"], timeout=1) is True
    t.drain(timeout=1)
    for _ in range(3):
        assert rig.poll(0.02).sending == set()


def test_no_server_at_all(tmp_path) -> None:
    with kvloft.HostKVCache(num_layers=2, num_blocks=8, block_bytes=64) as cache:
        link = Link(str(tmp_path / "nobody.sock"), INSTANCE, make_namespace(num_layers=2),
                    Memory(0, cache.layers()), timeout=0.5, backoff=(0.01, 0.05))
        t = Transfers(link)
        t.start_loads([LoadSpec("l", 3, [1, 2])])
        t.start_saves([SaveSpec("s", chain_hashes("x", 2), [3, 4])])
        t.mark_delayed(["s"])
        done = t.poll(0.05)
        assert (done.recving, done.sending) == ({"l"}, {"s"})
        assert t.take_failed_blocks() == {1, 2}
        assert t.in_flight == (0, 0) and link.connects == 0
        counted = t.counters.take()
        assert counted is not None
        assert (counted["loads"], counted["load_failures"], counted["saves"], counted["save_failed_blocks"]) == (
            1, 1, 1, 2
        )
        assert t.counters.take() is None


def test_saves_in_flight_are_bounded(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    import kvloft.vllm.transfers as transfers_mod

    monkeypatch.setattr(transfers_mod, "MAX_INFLIGHT_SAVES", 2)
    chain = chain_hashes("bounded", 3)
    ids = rig.fill(chain, 0)
    t = rig.transfers
    with events_held(rig.link):
        for i in range(3):
            t.start_saves([SaveSpec(f"r{i}", chain[i : i + 1], ids[i : i + 1])])
        assert t.in_flight == (0, 2), "the third step's save is skipped while two are in flight"
        assert t.counters.peek()["save_failed_blocks"] == 1
        t.mark_delayed(["r2"])
        assert rig.poll().sending == {"r2"}, "a skipped save holds no blocks"
    rig.poll_until(lambda: t.in_flight == (0, 0))


# ---------------------------------------------------------------------------------------
# Synchronous loads (load_mode = "sync") on CPU memory: done before the forward pass starts
# ---------------------------------------------------------------------------------------


def test_a_sync_load_is_complete_when_start_loads_returns(rig: Rig) -> None:
    chain = chain_hashes("sync-load", 4)
    rig.store(chain, first_block=0)
    hit = rig.scheduler.lookup(chain)
    dst = [20, 21, 22, 23]
    rig.cache.poison(dst)
    t = rig.transfers
    t.start_loads([LoadSpec("r", hit.lease, dst)], sync=True)
    # The forward pass may read the blocks now: no poll ran.
    assert t.in_flight == (0, 0)
    assert rig.matches(chain, dst)
    t.wait_layer(0)  # nothing left to wait for
    assert rig.poll().recving == set(), "a synchronous load is never reported as a finished receive"
    assert t.take_failed_blocks() == set()
    counted = t.counters.peek()
    assert (counted["loads"], counted["loaded_blocks"], counted["load_failures"]) == (1, 4, 0)


def test_a_failed_sync_load_lists_its_blocks_in_the_same_step(rig: Rig) -> None:
    chain = chain_hashes("sync-mixed", 3)
    rig.store(chain, first_block=0)
    hit = rig.scheduler.lookup(chain)
    t = rig.transfers
    t.start_loads([LoadSpec("bad", 1 << 40, [50, 51]), LoadSpec("good", hit.lease, [52, 53, 54])], sync=True)
    assert t.take_failed_blocks() == {50, 51}
    assert rig.matches(chain, [52, 53, 54])
    assert rig.poll().recving == set()
    # A copy that fails on the server (the worker's memory is read-only) is a failure too.
    chain2 = chain_hashes("sync-unwritable", 2)
    rig.store(chain2, first_block=0)
    hit2 = rig.scheduler.lookup(chain2)
    with protected(rig.cache, 1, mmap.PROT_READ):
        t.start_loads([LoadSpec("ro", hit2.lease, [60, 61])], sync=True)
    assert t.take_failed_blocks() == {60, 61}
    counted = t.counters.peek()
    assert (counted["loads"], counted["load_failures"], counted["loaded_blocks"]) == (3, 2, 3)


def test_sync_loads_with_kvloft_gone_fail_at_once(rig: Rig) -> None:
    chain = chain_hashes("sync-killed", 2)
    rig.store(chain, first_block=0)
    hit = rig.scheduler.lookup(chain)
    kill(rig.server)
    t = rig.transfers
    t.start_loads([LoadSpec("a", hit.lease, [1, 2]), LoadSpec("b", 7, [3])], sync=True)
    assert t.in_flight == (0, 0)
    assert t.take_failed_blocks() == {1, 2, 3}
    assert rig.poll().recving == set()
