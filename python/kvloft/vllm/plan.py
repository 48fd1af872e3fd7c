"""The scheduler side's bookkeeping: which blocks to look up, load and save, step by step.

Pure logic over request-like objects (``request_id``, ``block_hashes``, ``num_tokens``,
``num_computed_tokens``), so it is tested without vLLM. The rules:

- A lookup covers the request's full blocks after the ones vLLM's own prefix cache already has,
  and never the block holding the last prompt token (vLLM must compute at least one token).
- A load goes into the blocks vLLM allocated for the hit, right after the local hit.
- A block is saved once it is full and its KV is computed: after the step that computes its last
  token (speculative tokens are not counted: their KV may be rejected). Blocks that came from
  kvloft or from vLLM's prefix cache are not saved again.
- A finished request whose blocks are being saved keeps them until the worker reports the saves
  done (``delay_free``); the worker learns which requests through :attr:`StepPlan.delayed_free`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import KvloftError
from .link import Link, is_unreachable
from .stats import ConnectorCounters

log = logging.getLogger("vllm.kvloft")


class RequestLike(Protocol):
    """What the planner reads of a vLLM ``Request``."""

    request_id: str
    block_hashes: Sequence[bytes]
    num_tokens: int
    num_computed_tokens: int


@dataclass
class LoadSpec:
    """Load ``len(block_ids)`` leading hits of ``lease`` into these engine blocks."""

    req_id: str
    lease: int
    block_ids: list[int]


@dataclass
class SaveSpec:
    """Save the engine blocks ``block_ids`` under ``hashes`` (same length, same order)."""

    req_id: str
    hashes: list[bytes]
    block_ids: list[int]


@dataclass
class StepPlan:
    """What the workers do in one step (carried by the connector metadata)."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    #: Requests preempted this step: their blocks are freed, so their saves must finish first.
    preempted: list[str] = field(default_factory=list)
    #: Finished requests whose blocks vLLM keeps until the workers report their saves done.
    delayed_free: list[str] = field(default_factory=list)


@dataclass
class _Tracked:
    request: Any
    #: Lease from the latest lookup, not yet handed to a load (0: none).
    lease: int = 0
    lease_start: int = 0
    lease_hits: int = 0
    lease_time: float = 0.0
    #: Blocks vLLM's prefix cache had at the latest lookup.
    local_blocks: int = 0
    #: Blocks [0, saved_upto) are stored in kvloft, loaded from it, or being saved.
    saved_upto: int = 0
    #: A load was planned and the request has not run since: its computed-token count is not
    #: real KV yet.
    loading: bool = False
    #: Some save of this request was planned.
    had_saves: bool = False


class Planner:
    """The scheduler side of the connector, minus vLLM's types.

    Args:
        link: the scheduler's connection to kvloft (lookups and releases).
        block_size: tokens per engine block.
        hashes_per_block: entries of ``request.block_hashes`` per engine block (1 unless vLLM
            hashes at a finer granularity than it allocates).
        loads / saves: what the connector's mode allows.
        async_loads: whether a hit is loaded while the request waits outside the batch
            (``True``) or in the step that runs it (``False``, ``load_mode = "sync"``).
        min_lookup_blocks: fewest blocks worth a lookup.
        counters: where lookups are counted.
        lease_ttl_s: how long kvloft keeps a lease; a lease is reused for a repeated query
            of the same request for half of that.
    """

    def __init__(
        self,
        link: Link,
        block_size: int,
        hashes_per_block: int = 1,
        loads: bool = True,
        saves: bool = True,
        async_loads: bool = True,
        min_lookup_blocks: int = 1,
        counters: ConnectorCounters | None = None,
        lease_ttl_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if block_size < 1 or hashes_per_block < 1:
            raise ValueError("block_size and hashes_per_block must be at least 1")
        self.link = link
        self.block_size = block_size
        self.hashes_per_block = hashes_per_block
        self.loads = loads
        self.saves = saves
        self.async_loads = async_loads
        self.min_lookup_blocks = min_lookup_blocks
        self.counters = counters or ConnectorCounters()
        self.lease_ttl_s = lease_ttl_s
        self._clock = clock
        self._tracked: dict[str, _Tracked] = {}
        self._pending_loads: list[LoadSpec] = []
        self._pending_saves: list[SaveSpec] = []
        self._delayed_free: list[str] = []

    # -- queries --------------------------------------------------------------------

    def block_hashes(self, request: RequestLike) -> Sequence[bytes]:
        """The request's hash per engine block (the chained hash of its last hash block)."""
        hashes = request.block_hashes
        k = self.hashes_per_block
        return hashes if k == 1 else hashes[k - 1 :: k]

    def tracked(self, req_id: str) -> bool:
        """Whether the planner holds state for ``req_id``."""
        return req_id in self._tracked

    # -- vLLM scheduler hooks ---------------------------------------------------------

    def on_new_request(self, request: RequestLike) -> None:
        """Starts tracking ``request``."""
        self._track(request)

    def num_new_matched_tokens(self, request: RequestLike, num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens kvloft can supply beyond the ``num_computed_tokens`` vLLM has, and whether
        they are loaded asynchronously. Takes a lease on the hits (reused when asked again)."""
        t = self._track(request)
        b = self.block_size
        start = num_computed_tokens // b
        t.local_blocks = start
        if not self.loads:
            return 0, False
        hashes = self.block_hashes(request)
        # Never the last token: vLLM must compute at least one to sample the next.
        end = min(len(hashes), max(request.num_tokens - 1, 0) // b)
        if end - start < self.min_lookup_blocks:
            self._release(t)
            return 0, False
        now = self._clock()
        if t.lease and t.lease_start == start and now - t.lease_time < self.lease_ttl_s / 2:
            return min(t.lease_hits, end - start) * b, self.async_loads
        self._release(t)
        client = self.link.client() if self._link_ok() else None
        if client is None:
            return 0, False
        began = time.perf_counter()
        try:
            hit = client.lookup(hashes[start:end])
        except KvloftError as e:
            self._link_error("lookup", e)
            return 0, False
        except OSError as e:
            self._link_error("lookup", e)
            return 0, False
        self.counters.lookup(end - start, hit.hits, time.perf_counter() - began, b)
        if hit.hits == 0:
            return 0, False
        t.lease, t.lease_start, t.lease_hits, t.lease_time = hit.lease, start, hit.hits, now
        return hit.hits * b, self.async_loads

    def after_alloc(self, request: RequestLike, block_ids: Sequence[int], num_external_tokens: int) -> None:
        """Plans the load of ``num_external_tokens`` into the blocks vLLM allocated."""
        t = self._track(request)
        n = num_external_tokens // self.block_size
        if n == 0 or t.lease == 0:
            self._release(t)
            t.saved_upto = max(t.saved_upto, t.local_blocks)
            return
        start = t.lease_start
        ids = list(block_ids[start : start + n])
        if len(ids) != n or n > t.lease_hits:
            # vLLM allocated less than asked, or asked for more than the lease holds: load
            # nothing rather than guess.
            log.warning("kvloft: request %s: cannot map %d loaded blocks onto its blocks; recomputing", request.request_id, n)
            self._release(t)
            return
        self._pending_loads.append(LoadSpec(request.request_id, t.lease, ids))
        t.lease = 0  # the load owns it now
        t.loading = True
        t.saved_upto = max(t.saved_upto, start + n)

    def build(
        self,
        num_scheduled_tokens: Mapping[str, int],
        spec_tokens: Mapping[str, Sequence[int]],
        preempted: Iterable[str],
        block_ids_of: Callable[[str], Sequence[int]],
    ) -> StepPlan:
        """The plan for this step: loads planned since the last step, saves of the blocks this
        step completes, preempted requests and finished requests that wait for their saves."""
        plan = StepPlan(loads=self._pending_loads, saves=self._pending_saves, delayed_free=self._delayed_free)
        self._pending_loads, self._pending_saves, self._delayed_free = [], [], []
        b = self.block_size
        for req_id, scheduled in num_scheduled_tokens.items():
            t = self._tracked.get(req_id)
            if t is None:
                continue
            t.loading = False
            request = t.request
            if request.num_computed_tokens < t.saved_upto * b:
                # Recomputing blocks it had (a failed load, a preemption): save them again.
                t.saved_upto = request.num_computed_tokens // b
            if not self.saves:
                continue
            computed = request.num_computed_tokens + scheduled - len(spec_tokens.get(req_id, ()))
            spec = self._save_spec(t, computed, lambda: block_ids_of(req_id))
            if spec is not None:
                plan.saves.append(spec)
        plan.preempted = [r for r in preempted if r in self._tracked and self._tracked[r].had_saves]
        return plan

    def finished(self, request: RequestLike, block_ids: Sequence[int]) -> bool:
        """Forgets ``request``; saves its last computed blocks. Returns whether vLLM must keep
        its blocks until the workers report its saves done."""
        t = self._tracked.pop(request.request_id, None)
        if t is None:
            return False
        self._release(t)
        if self.saves and not t.loading:
            spec = self._save_spec(t, request.num_computed_tokens, lambda: block_ids)
            if spec is not None:
                self._pending_saves.append(spec)
        if t.had_saves:
            self._delayed_free.append(request.request_id)
        return t.had_saves

    # -- internals ----------------------------------------------------------------

    def _track(self, request: RequestLike) -> _Tracked:
        t = self._tracked.get(request.request_id)
        if t is None:
            t = self._tracked[request.request_id] = _Tracked(request)
        else:
            t.request = request
        return t

    def _save_spec(self, t: _Tracked, computed_tokens: int, block_ids: Callable[[], Sequence[int]]) -> SaveSpec | None:
        hashes = self.block_hashes(t.request)
        full = min(len(hashes), max(computed_tokens, 0) // self.block_size)
        if full <= t.saved_upto:
            return None
        ids = list(block_ids()[t.saved_upto : full])
        if len(ids) != full - t.saved_upto:
            return None  # fewer blocks than computed tokens: nothing safe to save
        spec = SaveSpec(t.request.request_id, list(hashes[t.saved_upto : full]), ids)
        t.saved_upto = full
        t.had_saves = True
        return spec

    def _release(self, t: _Tracked) -> None:
        lease, t.lease = t.lease, 0
        if not lease or not self.link.up:
            return
        client = self.link.client()
        if client is None:
            return
        try:
            client.release(lease)
        except KvloftError as e:
            if is_unreachable(e):
                self.link.fail(e)
            # unknown_lease (expired) needs nothing.
        except OSError as e:
            self.link.fail(e)

    def _link_ok(self) -> bool:
        try:
            return self.link.client() is not None
        except KvloftError as e:
            log.error("kvloft: %s; serving without kvloft", e)
            return False

    def _link_error(self, what: str, e: BaseException) -> None:
        self.counters.failure(what)
        if is_unreachable(e):
            self.link.fail(e)
        else:
            log.warning("kvloft: %s failed: %s", what, e)
