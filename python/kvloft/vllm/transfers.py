"""The worker side's transfers: loads and saves submitted to kvloft and their completions.

Pure kvloft (no vLLM types), so it is tested against a real server without vLLM. Every save is
asynchronous on kvloft's side: it is submitted in one step and its completion event is collected
in a later :meth:`Transfers.poll`. Loads come in two kinds:

- *Asynchronous* loads (``load_mode = "async"``): the request waits outside the batch, and its
  load is reported finished in a later step.
- *Synchronous* loads (``load_mode = "sync"``): the request runs in the step that loads it.
  Each attention layer calls :meth:`Transfers.wait_layer` first. On a GPU that makes the compute
  stream wait (on the GPU) for that layer's copy only, so later layers load while earlier ones
  compute. On CPU the first layer waits until every load of the step completed. The step ends
  (:meth:`Transfers.poll`) only once every synchronous load has its completion, so a load that
  failed is reported in the step that used it.

The invariants:

- A request's load is reported exactly once: loaded, or failed with its blocks listed for
  recomputation (never partly used). Asynchronous loads are reported finished (``recving``);
  synchronous ones only through their failed blocks.
- A finished request whose blocks vLLM keeps for its saves (``delayed_free``) is reported once
  its saves have completed (saved, present or failed), so vLLM never reuses a block kvloft may
  still be reading.
- kvloft going away fails every load in flight and ends every save in flight; vLLM goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import KvloftError, ServerError
from ..protocol import EVENT_LOAD_DONE, EVENT_LOAD_LAYERS
from .link import Link, is_unreachable
from .plan import LoadSpec, SaveSpec
from .stats import ConnectorCounters

log = logging.getLogger("vllm.kvloft")

#: Save requests one worker keeps in flight; a step whose save would exceed it skips its save
#: (a future miss) rather than let a stalled kvloft grow the table without bound.
MAX_INFLIGHT_SAVES = 256


@dataclass
class _Load:
    spec: LoadSpec
    started: float
    #: A synchronous layer-wise load whose per-layer events kvloft has announced.
    announced: bool = False
    #: A synchronous load whose step ran without waiting for it: its blocks are recomputed.
    unwaited: bool = False


@dataclass
class _Save:
    req_ids: list[str]
    blocks: int
    started: float


@dataclass
class Finished:
    """What :meth:`Transfers.poll` reports to vLLM."""

    sending: set[str] = field(default_factory=set)
    recving: set[str] = field(default_factory=set)


class Transfers:
    """A worker's loads and saves in flight.

    Args:
        link: the worker's connection (registered with its KV memory).
        load_timeout_s: a load not complete after this long is reported failed (and its
            lease released), so the request is recomputed.
        counters: where completions are counted.
        layer_events: with GPU memory, the worker's :class:`~kvloft.gpu.LayerEvents`:
            synchronous loads are then layer-wise (the compute stream waits per layer).
    """

    def __init__(
        self,
        link: Link,
        load_timeout_s: float = 30.0,
        counters: ConnectorCounters | None = None,
        clock: Callable[[], float] = time.monotonic,
        layer_events: Any = None,
    ) -> None:
        self.link = link
        self.layer_events = layer_events
        self.load_timeout_s = load_timeout_s
        self.counters = counters or ConnectorCounters()
        self._clock = clock
        self._loads: dict[int, _Load] = {}
        #: This step's synchronous loads, until their completion.
        self._sync: dict[int, _Load] = {}
        #: Every synchronous load of the step is announced (GPU) or complete (CPU).
        self._sync_ready = True
        #: This step submitted synchronous layer-wise loads: its attention layers wait for them.
        self._step_loads = False
        #: Some attention layer of the step waited (:meth:`wait_layer`).
        self._waited = False
        self._saves: dict[int, _Save] = {}
        #: Saves in flight per request.
        self._pending: dict[str, int] = {}
        #: Finished requests whose blocks vLLM keeps until their saves are done.
        self._delayed: set[str] = set()
        self._done = Finished()
        self._failed_blocks: set[int] = set()

    # -- submission -------------------------------------------------------------------

    def start_loads(self, loads: Iterable[LoadSpec], sync: bool = False) -> None:
        """Submits each load; a load kvloft cannot take fails at once. ``sync`` loads feed this
        step's forward pass: every attention layer calls :meth:`wait_layer` before it reads
        the cache, and :meth:`poll` waits for their completions."""
        layerwise = sync and self.layer_events is not None
        if sync:
            self._finish_sync()  # a previous step's, should poll not have run
            if self.layer_events is not None:
                self.layer_events.clear_load()
        for spec in loads:
            client = self._client()
            if client is None:
                self._fail_load(spec, "kvloft is unreachable", sync)
                continue
            try:
                rid = client.load(spec.lease, spec.block_ids, wait=False, layerwise=layerwise)
            except KvloftError as e:
                self._fail_load(spec, str(e), sync)
                self._on_error(e)
                continue
            except OSError as e:
                self._fail_load(spec, str(e), sync)
                self._on_error(e)
                continue
            (self._sync if sync else self._loads)[rid] = _Load(spec, self._clock())
            if sync:
                self._sync_ready = False
                self._step_loads = layerwise
        if sync and self.layer_events is None:
            # CPU memory: kvloft's copy is done on the host, before the forward pass starts.
            self._finish_sync()

    def wait_layer(self, layer: int | None) -> None:
        """Called before attention layer ``layer`` (its index among the registered layers;
        ``None``: unknown, wait for all) reads the KV cache. In a step with layer-wise loads
        (GPU memory), the first call waits on the host until kvloft has queued every copy of
        the step, and every call makes the current stream wait, on the GPU, for the layer's
        copy. (With CPU memory :meth:`start_loads` already waited for the whole loads.)"""
        if not self._step_loads:
            return
        self._waited = True
        if not self._sync_ready:
            self._await_sync(lambda: all(load.announced for load in self._sync.values()))
            self._sync_ready = True
        if self.layer_events is not None:
            self.layer_events.wait_load(layer)

    def start_saves(
        self,
        saves: Iterable[SaveSpec],
        after_event: bytes | None = None,
        layer_events: Sequence[bytes] | None = None,
    ) -> None:
        """Submits this step's saves as one kvloft request (a hash saved twice is sent once);
        with GPU memory, ``after_event`` orders the copy after the step's kernels, or
        ``layer_events`` each layer's copy after the kernels that wrote that layer."""
        blocks: list[tuple[bytes, int]] = []
        seen: set[bytes] = set()
        req_ids: list[str] = []
        for spec in saves:
            req_ids.append(spec.req_id)
            for h, b in zip(spec.hashes, spec.block_ids):
                if h not in seen:
                    seen.add(h)
                    blocks.append((h, b))
        if not blocks:
            return
        if len(self._saves) >= MAX_INFLIGHT_SAVES:
            log.warning("kvloft: %d saves in flight; skipping this step's save", len(self._saves))
            self.counters.save(0, 0, len(blocks), 0.0)
            return
        client = self._client()
        if client is None:
            self.counters.save(0, 0, len(blocks), 0.0)
            return
        try:
            rid = client.save(blocks, wait=False, after_event=after_event, layer_events=layer_events)
        except (KvloftError, OSError) as e:
            self.counters.save(0, 0, len(blocks), 0.0)
            self._on_error(e)
            return
        self._saves[rid] = _Save(req_ids, len(blocks), self._clock())
        for r in req_ids:
            self._pending[r] = self._pending.get(r, 0) + 1

    def mark_delayed(self, req_ids: Iterable[str]) -> None:
        """Finished requests whose blocks vLLM keeps until this worker reports their saves."""
        for r in req_ids:
            if self._pending.get(r):
                self._delayed.add(r)
            else:
                self._done.sending.add(r)

    # -- completion -------------------------------------------------------------------

    def poll(self, wait: float = 0.0) -> Finished:
        """Collects completions (waiting up to ``wait`` seconds for the first) and returns
        the requests finished since the last call. Waits first for the completion of every
        synchronous load of the step, so that a failed one is reported in the step that used
        its blocks."""
        self._finish_sync()
        self._collect(wait)
        self._expire_loads()
        done, self._done = self._done, Finished()
        return done

    def take_failed_blocks(self) -> set[int]:
        """Engine blocks whose load failed since the last call: vLLM recomputes them."""
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def wait_for_saves(self, req_ids: Iterable[str], timeout: float | None = None) -> bool:
        """Blocks until no save of ``req_ids`` is in flight (their blocks are about to be
        reused). Returns False if ``timeout`` passed first."""
        wanted = set(req_ids)
        deadline = None if timeout is None else self._clock() + timeout
        while any(self._pending.get(r) for r in wanted):
            remaining = 0.05 if deadline is None else min(0.05, deadline - self._clock())
            if remaining <= 0:
                return False
            self._collect(remaining)
        return True

    @property
    def in_flight(self) -> tuple[int, int]:
        """Loads and saves in flight."""
        return len(self._loads) + len(self._sync), len(self._saves)

    def drain(self, timeout: float) -> None:
        """Waits up to ``timeout`` for everything in flight (at shutdown)."""
        deadline = self._clock() + timeout
        while (self._loads or self._sync or self._saves) and self._clock() < deadline:
            self._collect(min(0.05, max(0.0, deadline - self._clock())))

    # -- internals ------------------------------------------------------------------

    def _client(self):
        try:
            return self.link.client()
        except KvloftError as e:
            log.error("kvloft: %s; serving without kvloft", e)
            return None

    def _finish_sync(self) -> None:
        if self._step_loads and not self._waited:
            # The forward pass never waited for the layer-wise copies (vLLM did not call
            # wait_for_layer_load): it may have read blocks mid-copy, so they are recomputed.
            log.error("kvloft: the step's attention layers did not wait for kvloft's loads; their blocks are "
                      "recomputed (use load_mode = \"async\" with this model)")
            for load in self._sync.values():
                load.unwaited = True
        if self._sync:
            self._await_sync(lambda: not self._sync)
        self._sync_ready = True
        self._step_loads = False
        self._waited = False

    def _await_sync(self, ready: Callable[[], bool]) -> None:
        """Collects events until ``ready()``; synchronous loads still short of it after
        ``load_timeout_s`` fail (and their leases are released)."""
        while self._sync and not ready():
            oldest = min(load.started for load in self._sync.values())
            remaining = oldest + self.load_timeout_s - self._clock()
            if remaining <= 0:
                for load in self._sync.values():
                    self._fail_load(load.spec, f"no completion within {self.load_timeout_s} s", True)
                    self._release(load.spec.lease)
                self._sync.clear()
                return
            self._collect(min(0.05, remaining))

    def _collect(self, wait: float) -> None:
        if not self._loads and not self._saves and not self._sync:
            return
        client = self.link.client() if self.link.up else None
        if client is None:
            self._connection_gone("the connection to kvloft closed")
            return
        try:
            events = client.events(wait=wait)
        except (KvloftError, OSError) as e:
            self.counters.failure("events")
            if is_unreachable(e):
                self._connection_gone(str(e))
                self.link.fail(e)
            else:
                log.warning("kvloft: reading events failed: %s", e)
            return
        now = self._clock()
        for event in events:
            body = event.body
            op = body.get("op")
            if event.request_id in self._sync:
                self._sync_event(event.request_id, op, body, now)
            elif op == EVENT_LOAD_DONE:
                load = self._loads.pop(event.request_id, None)
                if load is None:
                    continue  # a load already reported failed (timed out)
                n = len(load.spec.block_ids)
                ok = not body.get("error") and body.get("loaded") == n
                if ok:
                    self.counters.load(n, now - load.started, True)
                    self._done.recving.add(load.spec.req_id)
                else:
                    self._fail_load(load.spec, str(body.get("error") or f"loaded {body.get('loaded')} of {n}"))
            elif op == "save_done":
                save = self._saves.pop(event.request_id, None)
                if save is None:
                    continue
                failed = int(body.get("failed") or 0)
                self.counters.save(int(body.get("saved") or 0), int(body.get("present") or 0), failed, now - save.started)
                if failed and body.get("error"):
                    log.debug("kvloft: %d blocks not saved: %s", failed, body.get("error"))
                self._save_ended(save)

    def _sync_event(self, rid: int, op: Any, body: dict[str, Any], now: float) -> None:
        load = self._sync[rid]
        if op == EVENT_LOAD_LAYERS:
            if self.layer_events is None:
                return
            try:
                self.layer_events.adopt_load(body.get("events") or [])
            except (ValueError, RuntimeError) as e:
                # The stream cannot wait for this load's layers: wait_layer waits on the host
                # for its completion instead (it stays unannounced).
                log.error("kvloft: cannot use the load's layer events (%s); waiting for the whole load", e)
                return
            load.announced = True
            return
        if op != EVENT_LOAD_DONE:
            return
        del self._sync[rid]
        n = len(load.spec.block_ids)
        if load.unwaited:
            self._fail_load(load.spec, "the forward pass did not wait for it", True)
        elif not body.get("error") and body.get("loaded") == n:
            self.counters.load(n, now - load.started, True)
        else:
            self._fail_load(load.spec, str(body.get("error") or f"loaded {body.get('loaded')} of {n}"), True)

    def _expire_loads(self) -> None:
        now = self._clock()
        expired = [rid for rid, load in self._loads.items() if now - load.started > self.load_timeout_s]
        for rid in expired:
            load = self._loads.pop(rid)
            self._fail_load(load.spec, f"no completion within {self.load_timeout_s} s")
            self._release(load.spec.lease)

    def _release(self, lease: int) -> None:
        client = self.link.client() if self.link.up else None
        if client is not None:
            try:
                client.release(lease)
            except (KvloftError, OSError):
                pass

    def _connection_gone(self, why: str) -> None:
        """kvloft closed the connection: nothing in flight will complete."""
        for load in self._loads.values():
            self._fail_load(load.spec, why)
        self._loads.clear()
        for load in self._sync.values():
            self._fail_load(load.spec, why, True)
        self._sync.clear()
        for save in self._saves.values():
            self.counters.save(0, 0, save.blocks, 0.0)
            self._save_ended(save)
        self._saves.clear()

    def _save_ended(self, save: _Save) -> None:
        for r in save.req_ids:
            left = self._pending.get(r, 0) - 1
            if left > 0:
                self._pending[r] = left
                continue
            self._pending.pop(r, None)
            if r in self._delayed:
                self._delayed.discard(r)
                self._done.sending.add(r)

    def _fail_load(self, spec: LoadSpec, why: str, sync: bool = False) -> None:
        log.warning("kvloft: load of %d blocks for request %s failed (%s); recomputing them", len(spec.block_ids), spec.req_id, why)
        self.counters.load(len(spec.block_ids), 0.0, False)
        self._failed_blocks.update(spec.block_ids)
        if not sync:
            self._done.recving.add(spec.req_id)

    def _on_error(self, e: BaseException) -> None:
        self.counters.failure("transfer")
        if is_unreachable(e) and not isinstance(e, ServerError):
            self._connection_gone(str(e))
            self.link.fail(e)
