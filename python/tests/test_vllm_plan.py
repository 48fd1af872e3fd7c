"""The connector's scheduler side (``kvloft.vllm.plan.Planner``) over fake vLLM requests, with its
lookups answered by a real ``kvloft serve``: blocks are saved first by a worker connection of the
same instance (a real CPU KV cache), then the planner looks them up through its ``Link``."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import pytest
from support import RunningServer, chain_hashes, make_namespace, new_cache, restart, shard_sum

import kvloft
from kvloft.vllm.link import Link
from kvloft.vllm.plan import LoadSpec, Planner, SaveSpec, StepPlan

B = 16  # tokens per block (make_namespace's block_size)
INSTANCE = "engine-plan"


@dataclass
class Req:
    """What the planner reads of a vLLM ``Request``."""

    request_id: str
    block_hashes: list[bytes]
    num_tokens: int
    num_computed_tokens: int = 0


@dataclass
class Store:
    """A worker of the instance that saves blocks for the planner to find."""

    socket_path: str
    worker: kvloft.Client
    cache: kvloft.HostKVCache
    links: list[Link] = field(default_factory=list)

    def save(self, hashes: Sequence[bytes], first_block: int = 0) -> None:
        for i, h in enumerate(hashes):
            self.cache.fill_block(first_block + i, h)
        done = self.worker.save([(h, first_block + i) for i, h in enumerate(hashes)])
        assert (done["saved"] + done["present"], done["failed"]) == (len(hashes), 0), done

    def planner(self, backoff: tuple[float, float] = (0.5, 10.0), **kwargs) -> Planner:
        link = Link(self.socket_path, INSTANCE, make_namespace(), timeout=10.0, backoff=backoff,
                    client_name="pytest-scheduler")
        self.links.append(link)
        return Planner(link, B, **kwargs)

    def leases(self) -> int:
        return shard_sum(self.worker.stats(), "leases")

    def no_leases(self) -> bool:
        """Whether every lease is gone (waits a little: releases reach the shards asynchronously)."""
        deadline = time.monotonic() + 2.0
        while self.leases() != 0:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True


@pytest.fixture
def store(server_process: RunningServer) -> Iterator[Store]:
    server = server_process.socket_path
    worker = kvloft.Client(server, timeout=10.0, client_name="pytest-worker")
    worker.register_instance(INSTANCE, make_namespace())
    cache = new_cache(64)
    worker.register_memory(0, cache.layers())
    s = Store(server, worker, cache)
    yield s
    for link in s.links:
        link.close()
    worker.close()
    cache.close()
    if server_process.process.poll() is not None:
        restart(server_process)  # a test killed it; the fixture's teardown wants a live server


def ids_of(table: dict[str, list[int]]) -> Callable[[str], list[int]]:
    return lambda req_id: table[req_id]


def step(planner: Planner, scheduled: dict[str, int], table: dict[str, list[int]],
         spec: dict[str, list[int]] | None = None, preempted: Sequence[str] = ()) -> StepPlan:
    return planner.build(scheduled, spec or {}, preempted, ids_of(table))


# ---------------------------------------------------------------------------------------
# Lookups
# ---------------------------------------------------------------------------------------


@pytest.mark.server
def test_hits_are_full_blocks_but_never_the_block_of_the_last_token(store: Store) -> None:
    chain = chain_hashes("last-token", 6)
    store.save(chain[:4])
    planner = store.planner()
    # 64 tokens: 4 full blocks, but the 4th holds the last prompt token: 3 may be claimed.
    assert planner.num_new_matched_tokens(Req("a", chain[:4], 64), 0) == (3 * B, True)
    # 65 tokens: the last token is in a 5th, partial block: all 4 full blocks may be claimed.
    assert planner.num_new_matched_tokens(Req("b", chain[:4], 65), 0) == (4 * B, True)
    # 97 tokens, 6 full blocks, 4 stored: hits stop at the first missing block.
    assert planner.num_new_matched_tokens(Req("c", chain[:6], 97), 0) == (4 * B, True)
    # A prompt of one block and a token, and one of exactly one block.
    assert planner.num_new_matched_tokens(Req("d", chain[:1], 17), 0) == (B, True)
    assert planner.num_new_matched_tokens(Req("e", chain[:1], 16), 0) == (0, False)
    assert planner.num_new_matched_tokens(Req("f", [], 5), 0) == (0, False)
    counted = planner.counters.peek()
    assert (counted["lookups"], counted["lookup_blocks"], counted["hit_blocks"]) == (4, 3 + 4 + 6 + 1, 3 + 4 + 4 + 1)


@pytest.mark.server
def test_nothing_stored_is_a_miss(store: Store) -> None:
    planner = store.planner()
    assert planner.num_new_matched_tokens(Req("a", chain_hashes("nothing", 4), 70), 0) == (0, False)
    assert planner.counters.peek()["lookups"] == 1
    assert store.no_leases()


@pytest.mark.server
def test_only_blocks_beyond_the_local_hit_are_looked_up(store: Store) -> None:
    chain = chain_hashes("beyond", 6)
    store.save(chain[2:4])  # blocks 0 and 1 are only in vLLM's own prefix cache
    planner = store.planner()
    req = Req("a", chain, 97)
    # Looked up from block 0, the chain breaks at once.
    assert planner.num_new_matched_tokens(req, 0) == (0, False)
    # vLLM has 2 blocks: the lookup starts at block 2 and finds 2 more.
    assert planner.num_new_matched_tokens(Req("b", chain, 97), 2 * B) == (2 * B, True)
    # A partial local block counts as not computed (hits start at its block).
    assert planner.num_new_matched_tokens(Req("c", chain, 97), 2 * B + 5) == (2 * B, True)
    # vLLM has everything up to the last-token block: nothing to look up.
    assert planner.num_new_matched_tokens(Req("d", chain[:4], 64), 3 * B) == (0, False)
    counted = planner.counters.peek()
    assert (counted["lookups"], counted["lookup_blocks"], counted["hit_blocks"]) == (3, 6 + 4 + 4, 0 + 2 + 2)


@pytest.mark.server
def test_min_lookup_blocks(store: Store) -> None:
    chain = chain_hashes("min", 4)
    store.save(chain)
    planner = store.planner(min_lookup_blocks=3)
    assert planner.num_new_matched_tokens(Req("a", chain[:2], 40), 0) == (0, False)
    assert planner.num_new_matched_tokens(Req("b", chain[:4], 70), 2 * B) == (0, False)  # 2 beyond the local 2
    assert planner.counters.peek()["lookups"] == 0
    assert planner.num_new_matched_tokens(Req("c", chain[:3], 49), 0) == (3 * B, True)


@pytest.mark.server
def test_a_repeated_query_reuses_the_lease(store: Store) -> None:
    chain = chain_hashes("repeat", 3)
    store.save(chain)
    planner = store.planner()
    req = Req("a", chain, 60)
    assert planner.num_new_matched_tokens(req, 0) == (3 * B, True)
    assert planner.num_new_matched_tokens(req, 0) == (3 * B, True)
    assert planner.counters.peek()["lookups"] == 1
    assert store.leases() > 0
    # vLLM allocated nothing for the hit (asked again later, or gave up): the lease is released.
    planner.after_alloc(req, [], 0)
    assert store.no_leases()
    assert step(planner, {}, {}).loads == []
    # A query from another offset is a new lookup.
    assert planner.num_new_matched_tokens(req, B) == (2 * B, True)
    assert planner.counters.peek()["lookups"] == 2


@pytest.mark.server
def test_hashes_per_block(store: Store) -> None:
    """vLLM hashing every 8 tokens of a 16-token block: the engine block's hash is its second."""
    fine = chain_hashes("fine", 8)
    store.save(fine[1::2])
    planner = store.planner(hashes_per_block=2)
    assert list(planner.block_hashes(Req("a", fine, 70))) == fine[1::2]
    assert planner.num_new_matched_tokens(Req("a", fine, 70), 0) == (4 * B, True)
    assert planner.num_new_matched_tokens(Req("b", fine[:7], 64), 0) == (3 * B, True)


# ---------------------------------------------------------------------------------------
# Loads
# ---------------------------------------------------------------------------------------


@pytest.mark.server
def test_after_alloc_plans_a_load_into_the_allocated_blocks(store: Store) -> None:
    chain = chain_hashes("load", 6)
    store.save(chain[:4], first_block=0)
    planner = store.planner()
    req = Req("a", chain, 97, num_computed_tokens=0)
    # vLLM's prefix cache has blocks 0-1; kvloft has 2-3.
    got = planner.num_new_matched_tokens(req, 2 * B)
    assert got == (2 * B, True)
    allocated = [40, 41, 42, 43, 44, 45, 46]
    planner.after_alloc(req, allocated, 2 * B)
    plan = step(planner, {}, {"a": allocated})  # the request waits for its load: not scheduled
    assert len(plan.loads) == 1
    load = plan.loads[0]
    assert load == LoadSpec("a", load.lease, [42, 43]) and load.lease != 0
    assert plan.saves == [] and plan.delayed_free == [] and plan.preempted == []
    # The load is handed over once.
    assert step(planner, {}, {"a": allocated}).loads == []

    # The lease is real: a worker of the instance loads the right bytes with it.
    store.cache.poison([42, 43])
    done = store.worker.load(load.lease, load.block_ids)
    assert done["loaded"] == 2
    assert [store.cache.read_block(b) for b in (42, 43)] == [store.cache.expected(h) for h in chain[2:4]]


@pytest.mark.server
def test_sync_loads_run_in_the_step_that_loads_them(store: Store) -> None:
    """``load_mode = "sync"``: the hit is not asynchronous, so vLLM schedules the request in
    the step that loads it; that step's plan holds the load and saves only what it computes."""
    chain = chain_hashes("sync", 6)
    store.save(chain[:4], first_block=0)
    planner = store.planner(async_loads=False)
    req = Req("a", chain, 97, num_computed_tokens=0)
    assert planner.num_new_matched_tokens(req, B) == (3 * B, False)
    assert planner.num_new_matched_tokens(req, B) == (3 * B, False), "the reused lease too"
    allocated = [40, 41, 42, 43, 44, 45, 46]
    planner.after_alloc(req, allocated, 3 * B)
    # vLLM sets the computed tokens (local + external) and schedules the rest of the prompt.
    req.num_computed_tokens = 4 * B
    plan = step(planner, {"a": 97 - 4 * B}, {"a": allocated})
    assert [(load.req_id, load.block_ids) for load in plan.loads] == [("a", [41, 42, 43])]
    # The step computes blocks 4 and 5 (the 97th token is in a 7th, partial block).
    assert [(s.block_ids, s.hashes) for s in plan.saves] == [([44, 45], chain[4:6])]


@pytest.mark.server
def test_load_is_planned_for_fewer_blocks_than_the_hit(store: Store) -> None:
    chain = chain_hashes("fewer", 5)
    store.save(chain)
    planner = store.planner()
    req = Req("a", chain, 90)
    assert planner.num_new_matched_tokens(req, 0) == (5 * B, True)
    planner.after_alloc(req, [7, 8, 9, 10, 11, 12], 3 * B)
    [load] = step(planner, {}, {}).loads
    assert load.block_ids == [7, 8, 9]


@pytest.mark.server
def test_a_load_that_cannot_be_mapped_is_not_planned(store: Store) -> None:
    chain = chain_hashes("unmapped", 4)
    store.save(chain)
    planner = store.planner()
    req = Req("a", chain, 70)
    assert planner.num_new_matched_tokens(req, 0) == (4 * B, True)
    planner.after_alloc(req, [1, 2], 4 * B)  # fewer blocks than the load needs
    assert step(planner, {}, {}).loads == []
    assert store.no_leases()  # released, not leaked


# ---------------------------------------------------------------------------------------
# Saves
# ---------------------------------------------------------------------------------------


@pytest.mark.server
def test_saves_follow_the_computed_tokens(store: Store) -> None:
    chain = chain_hashes("save", 6)
    planner = store.planner()
    req = Req("a", chain[:5], 81)
    planner.on_new_request(req)
    assert planner.num_new_matched_tokens(req, 0) == (0, False)
    planner.after_alloc(req, [], 0)
    table = {"a": [20, 21, 22, 23, 24, 25]}

    # Chunked prefill: 40 tokens complete blocks 0 and 1.
    plan = step(planner, {"a": 40}, table)
    assert plan.saves == [SaveSpec("a", chain[0:2], [20, 21])]
    req.num_computed_tokens = 40
    # The other 41 complete blocks 2 to 4 (the 5th block's last token is the 81st).
    plan = step(planner, {"a": 41}, table)
    assert plan.saves == [SaveSpec("a", chain[2:5], [22, 23, 24])]
    req.num_computed_tokens = 81
    # Decoding within block 5: nothing new.
    assert step(planner, {"a": 1}, table).saves == []
    # Block 5 becomes full and hashed, but with speculative tokens only part of it is computed:
    # 94 + 3 (1 sampled, 2 drafts) = 97 tokens, 2 of them speculative.
    req.block_hashes, req.num_computed_tokens, req.num_tokens = chain[:6], 94, 97
    assert step(planner, {"a": 3}, table, spec={"a": [7, 8]}).saves == []
    # Without the drafts the same step completes block 5.
    assert step(planner, {"a": 3}, table, spec={"a": [7]}).saves == [SaveSpec("a", chain[5:6], [25])]
    # Never saved twice.
    req.num_computed_tokens = 97
    assert step(planner, {"a": 1}, table).saves == []


@pytest.mark.server
def test_loaded_and_locally_cached_blocks_are_not_saved_again(store: Store) -> None:
    chain = chain_hashes("no-resave", 6)
    store.save(chain[:4])
    planner = store.planner()
    req = Req("a", chain, 97)
    assert planner.num_new_matched_tokens(req, B) == (3 * B, True)  # block 0 local, 1-3 in kvloft
    table = {"a": [30, 31, 32, 33, 34, 35, 36]}
    planner.after_alloc(req, table["a"], 3 * B)
    plan = step(planner, {}, table)
    assert [load.block_ids for load in plan.loads] == [[31, 32, 33]] and plan.saves == []
    # The load done, the request runs on from token 64: only blocks 4 and 5 are new.
    req.num_computed_tokens = 4 * B
    plan = step(planner, {"a": 20}, table)
    assert plan.saves == [SaveSpec("a", chain[4:5], [34])]
    # It finishes (aborted) having computed block 5 too: that block is saved at the finish.
    req.num_computed_tokens = 96
    assert planner.finished(req, table["a"]) is True
    plan = step(planner, {}, table)
    assert plan.saves == [SaveSpec("a", chain[5:6], [35])] and plan.delayed_free == ["a"]


@pytest.mark.server
def test_a_failed_load_is_recomputed_and_saved(store: Store) -> None:
    chain = chain_hashes("failed-load", 6)
    store.save(chain[:4])
    planner = store.planner()
    req = Req("a", chain, 97)
    assert planner.num_new_matched_tokens(req, 2 * B) == (2 * B, True)
    table = {"a": [50, 51, 52, 53, 54, 55, 56]}
    planner.after_alloc(req, table["a"], 2 * B)
    assert len(step(planner, {}, table).loads) == 1
    # The worker reported the load failed: vLLM recomputes from the local hit (block 2).
    req.num_computed_tokens = 2 * B
    plan = step(planner, {"a": 97 - 32}, table)
    assert plan.saves == [SaveSpec("a", chain[2:6], [52, 53, 54, 55])]


@pytest.mark.server
def test_local_prefix_blocks_are_not_saved(store: Store) -> None:
    chain = chain_hashes("local", 4)
    planner = store.planner()
    req = Req("a", chain, 70, num_computed_tokens=2 * B)
    assert planner.num_new_matched_tokens(req, 2 * B) == (0, False)
    planner.after_alloc(req, [], 0)
    plan = step(planner, {"a": 70 - 32}, {"a": [1, 2, 3, 4, 5]})
    assert plan.saves == [SaveSpec("a", chain[2:4], [3, 4])]


@pytest.mark.server
def test_fewer_block_ids_than_computed_blocks_saves_nothing(store: Store) -> None:
    chain = chain_hashes("short-table", 4)
    planner = store.planner()
    req = Req("a", chain, 70)
    planner.on_new_request(req)
    assert step(planner, {"a": 70}, {"a": [1, 2]}).saves == []
    # With the full table a later step saves all 4.
    req.num_computed_tokens = 70
    assert step(planner, {"a": 1}, {"a": [1, 2, 3, 4, 5]}).saves == [SaveSpec("a", chain, [1, 2, 3, 4])]


@pytest.mark.server
def test_untracked_requests_are_ignored(store: Store) -> None:
    planner = store.planner()
    plan = step(planner, {"ghost": 100}, {}, preempted=["ghost"])
    assert plan == StepPlan()
    assert planner.finished(Req("ghost", chain_hashes("g", 2), 40), [1, 2]) is False


# ---------------------------------------------------------------------------------------
# Finishing and preemption
# ---------------------------------------------------------------------------------------


@pytest.mark.server
def test_finished_delays_the_free_only_when_saves_were_planned(store: Store) -> None:
    chain = chain_hashes("finish", 4)
    store.save(chain[:2], first_block=60)  # hashes of request "b"
    planner = store.planner()
    a = Req("a", chain_hashes("finish-a", 3), 50)
    b = Req("b", chain[:2], 20)  # one full block: its last token is in block 1
    for r in (a, b):
        planner.on_new_request(r)
        planner.num_new_matched_tokens(r, 0)
        planner.after_alloc(r, [], 0)
    table = {"a": [1, 2, 3, 4], "b": [5, 6]}
    plan = step(planner, {"a": 50, "b": 10}, table)  # b computes less than a block
    assert plan.saves == [SaveSpec("a", a.block_hashes, [1, 2, 3])]
    a.num_computed_tokens, b.num_computed_tokens = 50, 10

    assert planner.finished(b, table["b"]) is False
    assert planner.finished(a, table["a"]) is True
    assert not planner.tracked("a") and not planner.tracked("b")
    plan = step(planner, {}, table)
    assert plan.delayed_free == ["a"] and plan.saves == []
    assert step(planner, {}, table).delayed_free == []
    assert planner.finished(a, table["a"]) is False  # already forgotten


@pytest.mark.server
def test_finished_saves_the_last_computed_blocks(store: Store) -> None:
    chain = chain_hashes("finish-save", 3)
    planner = store.planner()
    req = Req("a", chain, 50)
    planner.on_new_request(req)
    planner.after_alloc(req, [], 0)
    table = [9, 8, 7, 6]
    # Finished (aborted) before any step planned its saves: its computed blocks are saved.
    req.num_computed_tokens = 40
    assert planner.finished(req, table) is True
    plan = step(planner, {}, {})
    assert plan.saves == [SaveSpec("a", chain[:2], [9, 8])] and plan.delayed_free == ["a"]


@pytest.mark.server
def test_finished_while_loading_saves_nothing(store: Store) -> None:
    chain = chain_hashes("finish-loading", 4)
    store.save(chain[:3])
    planner = store.planner()
    req = Req("a", chain, 70)
    assert planner.num_new_matched_tokens(req, 0) == (3 * B, True)
    planner.after_alloc(req, [1, 2, 3, 4, 5], 3 * B)
    [load] = step(planner, {}, {}).loads
    # Whatever vLLM counts as computed while the load is in flight is not KV yet: nothing saved.
    req.num_computed_tokens = 4 * B
    assert planner.finished(req, [1, 2, 3, 4, 5]) is False
    plan = step(planner, {}, {})
    assert plan.saves == [] and plan.delayed_free == []
    # The load owns its lease: finishing the request did not release it under the worker.
    store.cache.poison([1, 2, 3])
    assert store.worker.load(load.lease, load.block_ids)["loaded"] == 3
    assert [store.cache.read_block(b) for b in (1, 2, 3)] == [store.cache.expected(h) for h in chain[:3]]


@pytest.mark.server
def test_finished_releases_an_unused_lease(store: Store) -> None:
    chain = chain_hashes("finish-lease", 3)
    store.save(chain)
    planner = store.planner()
    req = Req("a", chain, 60)
    assert planner.num_new_matched_tokens(req, 0) == (3 * B, True)
    assert store.leases() > 0
    assert planner.finished(req, []) is False
    assert store.no_leases()


@pytest.mark.server
def test_preempted_lists_requests_with_saves(store: Store) -> None:
    planner = store.planner()
    reqs = {name: Req(name, chain_hashes(name, 3), 50) for name in ("a", "b")}
    for r in reqs.values():
        planner.on_new_request(r)
        planner.after_alloc(r, [], 0)
    table = {"a": [1, 2, 3, 4], "b": [5, 6, 7, 8]}
    plan = step(planner, {"a": 50, "b": 8}, table)  # only a completes blocks
    assert [s.req_id for s in plan.saves] == ["a"]
    plan = step(planner, {}, table, preempted=["a", "b", "unknown"])
    assert plan.preempted == ["a"]

    # The preempted request restarts from nothing: its blocks are saved again when recomputed
    # (kvloft answers "present"), into its new blocks.
    a = reqs["a"]
    a.num_computed_tokens = 0
    planner.num_new_matched_tokens(a, 0)
    planner.after_alloc(a, [], 0)
    table["a"] = [11, 12, 13, 14]
    plan = step(planner, {"a": 50}, table)
    assert plan.saves == [SaveSpec("a", a.block_hashes, [11, 12, 13])]


# ---------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------


@pytest.mark.server
def test_save_only_never_looks_up(store: Store) -> None:
    chain = chain_hashes("save-only", 4)
    store.save(chain)
    planner = store.planner(loads=False)
    req = Req("a", chain, 70)
    assert planner.num_new_matched_tokens(req, 0) == (0, False)
    assert planner.counters.peek()["lookups"] == 0 and store.leases() == 0
    planner.after_alloc(req, [1, 2, 3, 4, 5], 0)
    plan = step(planner, {"a": 70}, {"a": [1, 2, 3, 4, 5]})
    assert plan.loads == [] and plan.saves == [SaveSpec("a", chain, [1, 2, 3, 4])]


@pytest.mark.server
def test_load_only_never_saves(store: Store) -> None:
    chain = chain_hashes("load-only", 6)
    store.save(chain[:2])
    planner = store.planner(saves=False)
    req = Req("a", chain, 97)
    assert planner.num_new_matched_tokens(req, 0) == (2 * B, True)
    table = {"a": [1, 2, 3, 4, 5, 6, 7]}
    planner.after_alloc(req, table["a"], 2 * B)
    plan = step(planner, {}, table)
    assert [load.block_ids for load in plan.loads] == [[1, 2]]
    req.num_computed_tokens = 2 * B
    plan = step(planner, {"a": 97 - 32}, table, preempted=["a"])
    assert plan.saves == [] and plan.preempted == []
    req.num_computed_tokens = 97
    assert planner.finished(req, table["a"]) is False
    assert step(planner, {}, table) == StepPlan()


# ---------------------------------------------------------------------------------------
# kvloft unreachable
# ---------------------------------------------------------------------------------------


def test_no_server_every_lookup_misses_and_nothing_raises(tmp_path) -> None:
    missing = os.path.join(str(tmp_path), "nobody.sock")
    link = Link(missing, INSTANCE, make_namespace(), timeout=0.5, backoff=(0.01, 0.05))
    planner = Planner(link, B)
    chain = chain_hashes("no-server", 6)
    for i in range(5):
        req = Req(f"r{i}", chain, 97)
        planner.on_new_request(req)
        assert planner.num_new_matched_tokens(req, 0) == (0, False)
        assert planner.num_new_matched_tokens(req, 2 * B) == (0, False)
        planner.after_alloc(req, [], 0)
    assert link.up is False and link.connects == 0
    table = {f"r{i}": list(range(10 * i, 10 * i + 7)) for i in range(5)}
    # Saves are still planned (the workers skip them while kvloft is down).
    plan = step(planner, {"r0": 97}, table, preempted=["r1"])
    assert plan.saves == [SaveSpec("r0", chain, table["r0"][:6])] and plan.loads == []
    assert planner.finished(Req("r0", chain, 97, 97), table["r0"]) is True
    assert planner.finished(Req("r1", chain, 97), table["r1"]) is False
    assert step(planner, {}, table).delayed_free == ["r0"]
    counted = planner.counters.peek()
    assert counted["lookups"] == 0 and counted["hit_blocks"] == 0


@pytest.mark.server
def test_unknown_namespace_every_lookup_misses(server: str) -> None:
    """Until the workers' handshake gives the namespace, the scheduler's link stays down."""
    link = Link(server, INSTANCE, None, timeout=5.0)
    planner = Planner(link, B)
    try:
        req = Req("a", chain_hashes("no-namespace", 4), 70)
        assert planner.num_new_matched_tokens(req, 0) == (0, False)
        assert link.up is False and link.connects == 0
        link.namespace = make_namespace()
        assert planner.num_new_matched_tokens(Req("b", req.block_hashes, 70), 0) == (0, False)
        assert link.up is True and link.connects == 1
        assert planner.counters.peek()["lookups"] == 1
    finally:
        link.close()


@pytest.mark.server
def test_server_killed_lookups_miss_then_recover(store: Store, server_process: RunningServer) -> None:
    chain = chain_hashes("killed", 4)
    store.save(chain)
    planner = store.planner(backoff=(0.01, 0.05))
    assert planner.num_new_matched_tokens(Req("a", chain, 70), 0) == (4 * B, True)
    server_process.process.kill()
    server_process.process.wait()
    for i in range(3):
        req = Req(f"k{i}", chain, 70)
        assert planner.num_new_matched_tokens(req, 0) == (0, False)
        planner.after_alloc(req, [], 0)
        assert planner.finished(req, []) is False
    assert planner.link.up is False and planner.link.drops >= 1
    assert planner.counters.peek()["errors"] >= 1
    # A fresh server on the same socket: the link reconnects once the back-off has passed.
    restart(server_process)
    deadline = time.monotonic() + 5
    while not planner.link.up and time.monotonic() < deadline:
        assert planner.num_new_matched_tokens(Req("after", chain, 70), 0) == (0, False)  # a fresh, empty store
        time.sleep(0.02)
    assert planner.link.up and planner.link.connects == 2
