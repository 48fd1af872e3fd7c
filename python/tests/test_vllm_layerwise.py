"""The worker's layer-wise loads and saves (GPU memory) in ``Transfers``, driven by scripted
kvloft events: the CUDA side (``kvloft.gpu.LayerEvents``) is replaced by a recorder, since the
machine running these tests has no GPU. The real thing runs on the H100 in
``scripts/device/gpu_connector.py``."""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest

from kvloft.client import Event
from kvloft.errors import ServerError
from kvloft.vllm.plan import LoadSpec
from kvloft.vllm.transfers import Transfers

LAYERS = 3


class ScriptedClient:
    """Takes loads and hands out the events a test queued (what kvloft would send)."""

    def __init__(self) -> None:
        self.next_id = 1
        self.loads: list[tuple[int, int, list[int], bool]] = []
        self.queued: deque[Event] = deque()
        self.released: list[int] = []
        #: Events queued as soon as the connector polls (kvloft answering meanwhile).
        self.on_poll: list[Event] = []
        self.refuse: set[int] = set()
        self.connected = True

    def load(self, lease: int, block_ids: list[int], wait: bool, layerwise: bool) -> int:
        assert not wait
        if lease in self.refuse:
            raise ServerError("unknown_lease", f"lease {lease} is unknown")
        rid = self.next_id
        self.next_id += 1
        self.loads.append((rid, lease, list(block_ids), layerwise))
        return rid

    def events(self, wait: float | None = 0.0) -> list[Event]:
        self.queued.extend(self.on_poll)
        self.on_poll = []
        taken = list(self.queued)
        self.queued.clear()
        return taken

    def release(self, lease: int) -> None:
        self.released.append(lease)


class ScriptedLink:
    def __init__(self, client: ScriptedClient) -> None:
        self._client = client
        self.up = True

    def client(self) -> ScriptedClient:
        return self._client

    def fail(self, e: BaseException) -> None:
        self.up = False


class RecordedEvents:
    """Stands in for ``kvloft.gpu.LayerEvents``: records what the stream would wait on."""

    def __init__(self) -> None:
        self.adopted: list[list[bytes]] = []
        self.waits: list[tuple[int | None, list[bytes]]] = []
        self._load: list[bytes] = []

    def clear_load(self) -> None:
        self._load = []

    def adopt_load(self, handles: list[bytes]) -> None:
        if len(handles) != LAYERS:
            raise ValueError(f"kvloft announced {len(handles)} layer events for {LAYERS} layers")
        self._load = list(handles)
        self.adopted.append(list(handles))

    def wait_load(self, layer: int | None) -> None:
        if self._load:
            self.waits.append((layer, list(self._load)))


def layers_event(rid: int, tag: bytes = b"e") -> Event:
    return Event(rid, {"op": "load_layers", "events": [tag + bytes([i]) * 63 for i in range(LAYERS)]})


def done_event(rid: int, loaded: int, error: str | None = None) -> Event:
    return Event(rid, {"op": "load_done", "loaded": loaded, "error": error})


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def rig() -> tuple[Transfers, ScriptedClient, RecordedEvents, Clock]:
    client = ScriptedClient()
    events = RecordedEvents()
    clock = Clock()
    t = Transfers(ScriptedLink(client), load_timeout_s=5.0, clock=clock, layer_events=events)  # type: ignore[arg-type]
    return t, client, events, clock


def test_each_layer_waits_for_the_last_announcement_and_poll_waits_for_completion(rig) -> None:
    t, client, events, _ = rig
    t.start_loads([LoadSpec("a", 11, [1, 2]), LoadSpec("b", 12, [3])], sync=True)
    assert [(lease, layerwise) for _, lease, _, layerwise in client.loads] == [(11, True), (12, True)]
    # Nothing announced yet: the first layer's wait collects both announcements.
    client.on_poll = [layers_event(1, b"a"), layers_event(2, b"b")]
    t.wait_layer(0)
    t.wait_layer(1)
    t.wait_layer(None)
    assert len(events.adopted) == 2
    last = events.adopted[-1]
    assert events.waits == [(0, last), (1, last), (None, last)]
    # The step ends only with both completions; neither is a finished receive.
    client.on_poll = [done_event(1, 2), done_event(2, 1)]
    done = t.poll()
    assert done.recving == set() and t.take_failed_blocks() == set()
    assert t.in_flight == (0, 0)
    counted = t.counters.peek()
    assert (counted["loads"], counted["loaded_blocks"], counted["load_failures"]) == (2, 3, 0)
    # The next step has no loads: its layers wait for nothing.
    t.wait_layer(0)
    assert len(events.waits) == 3


def test_a_load_failing_before_its_copy_is_queued(rig) -> None:
    t, client, events, _ = rig
    client.refuse.add(13)
    t.start_loads([LoadSpec("refused", 13, [7]), LoadSpec("expired", 14, [8, 9]), LoadSpec("ok", 15, [10])], sync=True)
    assert t.take_failed_blocks() == {7}, "refused at submission"
    # "expired" (request 1) fails before its copy is queued: no announcement, only its end.
    client.on_poll = [done_event(1, 0, "lease expired; recompute"), layers_event(2)]
    t.wait_layer(0)
    assert t.take_failed_blocks() == {8, 9}
    assert events.waits == [(0, events.adopted[0])]
    client.on_poll = [done_event(2, 1)]
    assert t.poll().recving == set()
    assert t.take_failed_blocks() == set()
    counted = t.counters.peek()
    assert (counted["loads"], counted["load_failures"], counted["loaded_blocks"]) == (3, 2, 1)


def test_a_step_whose_layers_never_waited_recomputes_its_loads(rig) -> None:
    t, client, events, _ = rig
    t.start_loads([LoadSpec("a", 21, [4, 5])], sync=True)
    client.on_poll = [layers_event(1), done_event(1, 2)]
    done = t.poll()  # no wait_layer: the forward may have read the blocks mid-copy
    assert done.recving == set()
    assert t.take_failed_blocks() == {4, 5}
    assert t.counters.peek()["load_failures"] == 1


def test_an_announcement_that_does_not_fit_waits_for_the_whole_load(rig) -> None:
    t, client, events, _ = rig
    t.start_loads([LoadSpec("a", 31, [6])], sync=True)
    client.on_poll = [Event(1, {"op": "load_layers", "events": [b"x" * 64]})]  # 1 handle, 3 layers
    client.queued.append(done_event(1, 1))
    t.wait_layer(0)  # returns once the load is complete, without stream waits
    assert events.waits == [] and t.in_flight == (0, 0)
    t.poll()
    assert t.take_failed_blocks() == set()


def test_no_announcement_within_the_load_timeout(rig) -> None:
    t, client, events, clock = rig

    def slow(wait: float | None = 0.0) -> list[Event]:
        clock.now += 1.0
        return []

    client.events = slow  # type: ignore[method-assign]
    t.start_loads([LoadSpec("a", 41, [1, 2, 3])], sync=True)
    t.wait_layer(0)
    assert t.take_failed_blocks() == {1, 2, 3}
    assert client.released == [41]
    assert events.waits == []
    assert t.poll().recving == set() and t.in_flight == (0, 0)
