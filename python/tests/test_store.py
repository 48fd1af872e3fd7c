"""The store operations against a real ``kvloft serve``: register, lookup, save, load, release,
their events and errors, with real CPU KV memory read and written by the server's host
backend (fixtures in conftest.py, helpers in support.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
from support import (
    TESTS_DIR,
    binary_stats,
    chain_hashes,
    make_namespace,
    new_cache,
    python_env,
    shard_sum,
)

import kvloft
from kvloft import HostKVCache, ServerError

pytestmark = pytest.mark.server

#: How long a disconnected client's leases may outlive it.
CLEANUP_S = 1.0


@pytest.fixture
def clients(server: str) -> Iterator[Callable[..., kvloft.Client]]:
    """Open connected clients to the server; all are closed after the test."""
    opened: list[kvloft.Client] = []

    def connect(name: str = "pytest-store", timeout: float = 10.0) -> kvloft.Client:
        client = kvloft.Client(server, timeout=timeout, client_name=name)
        client.connect()
        opened.append(client)
        return client

    yield connect
    for client in opened:
        client.close()


@pytest.fixture
def caches() -> Iterator[Callable[[int], HostKVCache]]:
    """Allocate CPU KV caches; unmapped after the test (after the clients closed)."""
    made: list[HostKVCache] = []

    def make(num_blocks: int) -> HostKVCache:
        cache = new_cache(num_blocks)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        cache.close()


def _worker(
    clients: Callable[..., kvloft.Client],
    caches: Callable[[int], HostKVCache],
    instance: str,
    num_blocks: int,
    namespace: kvloft.Namespace | None = None,
    rank: int = 0,
) -> tuple[kvloft.Client, HostKVCache]:
    """A registered worker connection with its own CPU KV cache."""
    client = clients(f"worker-{instance}-{rank}")
    client.register_instance(instance, namespace or make_namespace())
    cache = caches(num_blocks)
    reply = client.register_memory(rank, cache.layers())
    assert reply["slice_bytes"] == cache.slice_bytes
    return client, cache


def _save_filled(client: kvloft.Client, cache: HostKVCache, hashes: list[bytes], first_block: int = 0) -> dict:
    """Fill blocks first_block.. with their hashes' bytes and save them; returns save_done."""
    for i, h in enumerate(hashes):
        cache.fill_block(first_block + i, h)
    return client.save([(h, first_block + i) for i, h in enumerate(hashes)])


def _mismatched(cache: HostKVCache, hashes: list[bytes], block_ids: list[int]) -> list[int]:
    return [i for i, (h, b) in enumerate(zip(hashes, block_ids)) if cache.read_block(b) != cache.expected(h)]


def _wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _leases(client: kvloft.Client) -> list[int]:
    return [int(s["leases"]) for s in client.stats()["shards"]]


# ---------------------------------------------------------------------------------------
# The main path.
# ---------------------------------------------------------------------------------------


def test_hello_names_the_server_pid(server: str, server_process) -> None:
    with kvloft.Client(server) as client:
        assert client.server_info["pid"] == server_process.process.pid
        assert client.server_pid == server_process.process.pid


def test_save_and_load_1000_blocks_across_shards(clients, caches) -> None:
    n = 1000
    worker = clients("worker")
    reg = worker.register_instance("engine-a", make_namespace())
    assert re.fullmatch(r"[0-9a-f]{32}", reg["namespace_id"]), reg
    assert reg["slices_per_block"] == 1
    cache = caches(2048)
    mem = worker.register_memory(0, cache.layers())
    assert mem["slice_bytes"] == cache.slice_bytes == 16 * 1024
    hashes = chain_hashes("thousand", n)

    done = _save_filled(worker, cache, hashes)
    assert done["op"] == "save_done"
    assert (done["saved"], done["present"], done["failed"], done.get("error")) == (n, 0, 0, None)

    stats = worker.stats()
    assert shard_sum(stats, "slices") == n
    assert shard_sum(stats, "saves") == n
    assert shard_sum(stats, "used_bytes") >= n * cache.slice_bytes
    if len(stats["shards"]) > 1:
        per_shard = [s["slices"] for s in stats["shards"]]
        assert all(count > 0 for count in per_shard), f"blocks are not spread over the shards: {per_shard}"

    # The scheduler of the same instance looks up; the worker loads with its lease.
    scheduler = clients("scheduler")
    assert scheduler.register_instance("engine-a", make_namespace())["namespace_id"] == reg["namespace_id"]
    hit = scheduler.lookup(hashes)
    assert hit.hits == n and hit.lease != 0 and hit.lease_ttl_s > 0
    assert sum(_leases(scheduler)) > 0, "a live lease is not counted in the shards' stats"

    dst = list(range(1024, 1024 + n))
    cache.poison(dst)
    assert _mismatched(cache, hashes, dst) == list(range(n))
    loaded = worker.load(hit.lease, dst)
    assert loaded["op"] == "load_done"
    assert (loaded["loaded"], loaded.get("error")) == (n, None)
    assert _mismatched(cache, hashes, dst) == []
    # The source blocks were not disturbed.
    assert _mismatched(cache, hashes, list(range(n))) == []

    # A fully loaded lease is gone.
    assert _wait_for(lambda: sum(_leases(worker)) == 0, 2.0), _leases(worker)
    with pytest.raises(ServerError) as e:
        scheduler.release(hit.lease)
    assert e.value.code == "unknown_lease"

    # Saving the same blocks again copies nothing.
    again = worker.save([(h, i) for i, h in enumerate(hashes)])
    assert (again["saved"], again["present"], again["failed"]) == (0, n, 0)
    stats = worker.stats()
    assert shard_sum(stats, "slices") == n
    assert shard_sum(stats, "loads") == n
    assert shard_sum(stats, "hits") >= n


def test_completions_are_matched_to_their_requests(clients, caches) -> None:
    worker, cache = _worker(clients, caches, "engine-a", 256)
    first, second = chain_hashes("first", 40), chain_hashes("second", 60)
    for i, h in enumerate(first + second):
        cache.fill_block(i, h)
    rid1 = worker.save([(h, i) for i, h in enumerate(first)], wait=False)
    rid2 = worker.save([(h, 40 + i) for i, h in enumerate(second)], wait=False)
    assert isinstance(rid1, int) and isinstance(rid2, int) and rid1 != rid2
    # Collect out of order: the first completion waits in the queue for its own waiter.
    assert worker.wait_event(rid2, timeout=30)["saved"] == 60
    assert worker.wait_event(rid1, timeout=30)["saved"] == 40

    hit1, hit2 = worker.lookup(first), worker.lookup(second)
    assert (hit1.hits, hit2.hits) == (40, 60)
    cache.poison(range(100, 200))
    lid1 = worker.load(hit1.lease, range(100, 140), wait=False)
    lid2 = worker.load(hit2, range(140, 200), wait=False)  # a LookupResult is accepted as the lease
    assert worker.wait_event(lid2, timeout=30)["loaded"] == 60
    assert worker.wait_event(lid1, timeout=30)["loaded"] == 40
    assert _mismatched(cache, first + second, list(range(100, 200))) == []
    assert worker.events() == []


def test_lookup_hits_stop_at_the_first_missing_hash(clients, caches) -> None:
    worker, cache = _worker(clients, caches, "engine-a", 64)
    chain = chain_hashes("prefix", 10)
    done = _save_filled(worker, cache, chain[:5] + chain[6:])  # everything but block 5
    assert done["saved"] == 9
    assert worker.lookup(chain).hits == 5
    assert worker.lookup(chain[:3]).hits == 3
    assert worker.lookup(chain[6:]).hits == 4
    assert worker.lookup([chain[5]] + chain[:5]).hits == 0
    miss = worker.lookup(chain_hashes("never-saved", 4))
    assert (miss.hits, miss.lease) == (0, 0)
    empty = worker.lookup([])
    assert (empty.hits, empty.lease) == (0, 0)
    # Hashes of any length from 1 to 32 bytes are keys of their own.
    short = [b"\x01", b"\x01\x02", bytes(range(32))]
    cache.fill_block(20, b"a")
    cache.fill_block(21, b"b")
    cache.fill_block(22, b"c")
    assert worker.save([(short[0], 20), (short[1], 21), (short[2], 22)])["saved"] == 3
    hit = worker.lookup(short)
    assert hit.hits == 3
    worker.release(hit.lease)
    stats = worker.stats()
    assert shard_sum(stats, "misses") > 0


def test_release_and_unknown_lease(clients, caches) -> None:
    worker, cache = _worker(clients, caches, "engine-a", 64)
    chain = chain_hashes("lease", 8)
    _save_filled(worker, cache, chain)
    hit = worker.lookup(chain)
    assert hit.hits == 8
    assert sum(_leases(worker)) > 0
    assert worker.release(hit.lease) is None
    assert _wait_for(lambda: sum(_leases(worker)) == 0, CLEANUP_S), _leases(worker)
    for call in (lambda: worker.release(hit.lease), lambda: worker.load(hit.lease, range(32, 40))):
        with pytest.raises(ServerError) as e:
            call()
        assert e.value.code == "unknown_lease", e.value
        assert e.value.message
    with pytest.raises(ServerError) as e:
        worker.release(0xDEAD_BEEF_1234)
    assert e.value.code == "unknown_lease"
    # The connection goes on.
    assert worker.lookup(chain).hits == 8


def test_block_id_out_of_range_is_refused_and_connection_survives(clients, caches) -> None:
    worker, cache = _worker(clients, caches, "engine-a", 16)
    chain = chain_hashes("range", 4)
    _save_filled(worker, cache, chain)
    hit = worker.lookup(chain)
    assert hit.hits == 4
    with pytest.raises(ServerError) as e:
        worker.load(hit.lease, [8, 9, 10, 16])
    assert e.value.code == "block_out_of_range", e.value
    with pytest.raises(ServerError) as e:
        worker.save([(b"\x42" * 32, 16)])
    assert e.value.code == "block_out_of_range", e.value
    # The connection keeps working: a fresh lookup and load succeed.
    assert worker.stats()["shards"]
    again = worker.lookup(chain)
    assert again.hits == 4
    cache.poison(range(8, 12))
    assert worker.load(again.lease, range(8, 12))["loaded"] == 4
    assert _mismatched(cache, chain, list(range(8, 12))) == []


def test_save_before_register_memory_is_no_memory(clients) -> None:
    client = clients()
    client.register_instance("engine-a", make_namespace())
    with pytest.raises(ServerError) as e:
        client.save([(b"\x01" * 32, 0)])
    assert e.value.code == "no_memory", e.value
    assert client.lookup([b"\x01" * 32]).hits == 0  # still usable


def test_requests_before_register_instance_are_not_registered(clients, caches) -> None:
    client = clients()
    with pytest.raises(ServerError) as e:
        client.lookup([b"\x01" * 32])
    assert e.value.code == "not_registered", e.value
    cache = caches(4)
    with pytest.raises(ServerError) as e:
        client.register_memory(0, cache.layers())
    assert e.value.code == "not_registered", e.value
    client.register_instance("engine-a", make_namespace())
    assert client.lookup([b"\x01" * 32]).hits == 0


def test_registration_conflicts(clients, caches) -> None:
    first = clients()
    first.register_instance("engine-a", make_namespace())
    with pytest.raises(ServerError) as e:
        first.register_instance("engine-b", make_namespace())
    assert e.value.code == "already_registered", e.value
    # Another connection of the same instance with another namespace.
    other = clients()
    with pytest.raises(ServerError) as e:
        other.register_instance("engine-a", make_namespace(block_size=32))
    assert e.value.code == "mismatch", e.value
    # A rank outside tp_size * pp_size.
    cache = caches(4)
    with pytest.raises(ServerError) as e:
        first.register_memory(1, cache.layers())
    assert e.value.code == "mismatch", e.value
    first.register_memory(0, cache.layers())
    with pytest.raises(ServerError) as e:
        first.register_memory(0, cache.layers())
    assert e.value.code == "already_registered", e.value


def test_server_enforces_the_bounds(clients, caches) -> None:
    """The server refuses what the client's own checks would have stopped (raw requests)."""
    worker, _cache = _worker(clients, caches, "engine-a", 4)
    too_many = [b"\x01"] * (kvloft.MAX_BATCH_BLOCKS + 1)
    for op, fields in (
        ("lookup", {"hashes": too_many}),
        ("lookup", {"hashes": [b"\x01" * (kvloft.MAX_HASH_BYTES + 1)]}),
        ("save", {"blocks": [{"hash": b"\x01", "block_id": 0}] * (kvloft.MAX_BATCH_BLOCKS + 1)}),
        ("save", {"blocks": [{"hash": b"\x01" * (kvloft.MAX_HASH_BYTES + 1), "block_id": 0}]}),
    ):
        with pytest.raises(ServerError) as e:
            worker.request(op, **fields)
        assert e.value.code == "too_large", (op, e.value)
        assert str(kvloft.MAX_BATCH_BLOCKS) in e.value.message or str(kvloft.MAX_HASH_BYTES) in e.value.message
    assert worker.lookup([b"\x01"]).hits == 0


def test_lease_of_another_instance_is_not_owned(clients, caches) -> None:
    a, cache_a = _worker(clients, caches, "engine-a", 32)
    b, cache_b = _worker(clients, caches, "engine-b", 32)
    chain = chain_hashes("owned", 6)
    _save_filled(a, cache_a, chain)
    hit = a.lookup(chain)
    assert hit.hits == 6
    with pytest.raises(ServerError) as e:
        b.load(hit.lease, range(10, 16))
    assert e.value.code == "lease_not_owned", e.value
    with pytest.raises(ServerError) as e:
        b.release(hit.lease)
    assert e.value.code == "lease_not_owned", e.value
    # engine-b shares the namespace, so it sees the blocks with its own lease.
    own = b.lookup(chain)
    assert own.hits == 6
    cache_b.poison(range(10, 16))
    assert b.load(own.lease, range(10, 16))["loaded"] == 6
    assert _mismatched(cache_b, chain, list(range(10, 16))) == []
    # The refused attempts left a's lease intact.
    cache_a.poison(range(20, 26))
    assert a.load(hit.lease, range(20, 26))["loaded"] == 6
    assert _mismatched(cache_a, chain, list(range(20, 26))) == []


def test_namespaces_do_not_share_blocks(clients, caches) -> None:
    ns1, ns2 = make_namespace(), make_namespace(model="kvloft-test/other-model@0")
    a, cache_a = _worker(clients, caches, "engine-a", 32, ns1)
    c, cache_c = _worker(clients, caches, "engine-c", 32, ns2)
    chain = chain_hashes("shared-prompt", 5)
    _save_filled(a, cache_a, chain)
    miss = c.lookup(chain)
    assert (miss.hits, miss.lease) == (0, 0)
    # The same hashes in ns2 are other blocks with other bytes.
    other_bytes = [b"ns2:" + h for h in chain]
    for i, seed in enumerate(other_bytes):
        cache_c.fill_block(i, seed)
    done = c.save([(h, i) for i, h in enumerate(chain)])
    assert (done["saved"], done["present"]) == (5, 0)
    hit_a, hit_c = a.lookup(chain), c.lookup(chain)
    assert (hit_a.hits, hit_c.hits) == (5, 5)
    cache_a.poison(range(10, 15))
    cache_c.poison(range(10, 15))
    a.load(hit_a.lease, range(10, 15))
    c.load(hit_c.lease, range(10, 15))
    assert _mismatched(cache_a, chain, list(range(10, 15))) == []
    assert [cache_c.read_block(10 + i) == cache_c.expected(s) for i, s in enumerate(other_bytes)] == [True] * 5
    id1 = clients().register_instance("engine-x", ns1)["namespace_id"]
    id2 = clients().register_instance("engine-y", ns2)["namespace_id"]
    assert id1 != id2
    assert clients().register_instance("engine-z", make_namespace())["namespace_id"] == id1


def test_block_is_visible_once_every_rank_saved(clients, caches) -> None:
    ns = make_namespace(tp_size=2)
    r0, cache0 = _worker(clients, caches, "engine-tp", 32, ns, rank=0)
    r1, cache1 = _worker(clients, caches, "engine-tp", 32, ns, rank=1)
    chain = chain_hashes("tp2", 4)
    rank0_bytes = [b"rank0:" + h for h in chain]
    rank1_bytes = [b"rank1:" + h for h in chain]
    for i in range(4):
        cache0.fill_block(i, rank0_bytes[i])
        cache1.fill_block(i, rank1_bytes[i])
    assert r0.save([(h, i) for i, h in enumerate(chain)])["saved"] == 4
    assert r0.lookup(chain).hits == 0, "a block with one of its two slices written is visible"
    assert r1.save([(h, i) for i, h in enumerate(chain[:2])])["saved"] == 2
    hit = r0.lookup(chain)
    assert hit.hits == 2
    # Each rank loads its own slice with the one lease; the lease lives until both did.
    cache0.poison(range(10, 12))
    cache1.poison(range(10, 12))
    assert r0.load(hit.lease, [10, 11])["loaded"] == 2
    assert sum(_leases(r0)) > 0, "the lease ended before every rank loaded"
    assert r1.load(hit.lease, [10, 11])["loaded"] == 2
    assert [cache0.read_block(10 + i) == cache0.expected(rank0_bytes[i]) for i in range(2)] == [True, True]
    assert [cache1.read_block(10 + i) == cache1.expected(rank1_bytes[i]) for i in range(2)] == [True, True]
    assert _wait_for(lambda: sum(_leases(r0)) == 0, 2.0), _leases(r0)


def test_unreadable_memory_fails_the_load(clients, caches) -> None:
    a, cache_a = _worker(clients, caches, "engine-a", 16)
    chain = chain_hashes("unreadable", 3)
    _save_filled(a, cache_a, chain)
    # A worker whose registered memory was unmapped after registration.
    gone = new_cache(16)
    layers = gone.layers()
    gone.close()
    b = clients("worker-unmapped")
    b.register_instance("engine-b", make_namespace())
    try:
        b.register_memory(0, layers)
    except ServerError as e:  # a server may probe the memory when it is registered
        assert e.code == "memory_access", e
        return
    hit = b.lookup(chain)
    assert hit.hits == 3
    with pytest.raises((kvloft.LoadFailed, ServerError)) as e:
        b.load(hit.lease, [0, 1, 2])
    if isinstance(e.value, ServerError):
        assert e.value.code == "memory_access", e.value
    else:
        assert e.value.error and e.value.requested == 3
    assert b.stats()["shards"]


# ---------------------------------------------------------------------------------------
# Across processes, and cleanup.
# ---------------------------------------------------------------------------------------


def _run_worker(mode: str, server: str, instance: str, seed: str, count: int) -> dict:
    result = subprocess.run(
        [
            sys.executable,
            str(TESTS_DIR / "worker_proc.py"),
            mode,
            "--socket",
            server,
            "--instance",
            instance,
            "--seed",
            seed,
            "--count",
            str(count),
        ],
        capture_output=True,
        text=True,
        env=python_env(),
        timeout=120,
    )
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0 and lines, (
        f"`worker_proc.py {mode}` exited with {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return json.loads(lines[-1])


def test_blocks_outlive_the_process_that_saved_them(server: str) -> None:
    """Acceptance: one process saves and exits; a fresh one looks up, loads and compares."""
    n = 300
    saved = _run_worker("save", server, "engine-before-restart", "acceptance", n)
    assert saved["ok"] and saved["save_done"]["saved"] == n, saved
    loaded = _run_worker("load", server, "engine-after-restart", "acceptance", n)
    assert loaded["ok"] and loaded["hits"] == n and loaded["mismatched_count"] == 0, loaded
    assert saved["pid"] != loaded["pid"]
    stats = binary_stats(server)
    assert shard_sum(stats, "hits") >= n
    assert shard_sum(stats, "saves") >= n
    assert shard_sum(stats, "loads") >= n


def test_leases_of_a_closed_connection_are_released(server: str, clients, caches) -> None:
    worker, cache = _worker(clients, caches, "engine-a", 32)
    chain = chain_hashes("cleanup", 16)
    _save_filled(worker, cache, chain)
    observer = clients("observer")

    holder = kvloft.Client(server, client_name="lease-holder")
    holder.register_instance("engine-a", make_namespace())
    hit = holder.lookup(chain)
    assert hit.hits == 16
    assert sum(_leases(observer)) > 0
    holder.close()  # closes the socket without releasing
    start = time.monotonic()
    released = _wait_for(lambda: all(n == 0 for n in _leases(observer)), CLEANUP_S)
    assert released, f"leases per shard {time.monotonic() - start:.2f} s after the close: {_leases(observer)}"
