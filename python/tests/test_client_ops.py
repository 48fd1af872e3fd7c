"""The register / lookup / save / load / release API against a scripted fake (no binary needed):
what goes on the wire, how completions are matched, and the client-side checks."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from support import FakeServer, Peer, make_namespace

import kvloft
from kvloft import LayerMemory, LookupResult, Namespace
from kvloft.protocol import (
    MAX_BATCH_BLOCKS,
    MAX_FRAME_BYTES,
    MAX_HASH_BYTES,
    MAX_LAYERS,
    MAX_REQUEST_ID,
    FrameKind,
    encode_frame,
)
from kvloft.store import hashes_to_wire, save_blocks_to_wire

H1, H2, H3 = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
LAYER = LayerMemory(base=0x10000, num_blocks=8, block_stride=64, segments=2, segment_stride=512, segment_bytes=64)

Fake = Callable[..., FakeServer]


def _register(peer: Peer, memory: bool = False) -> None:
    rid, body = peer.expect("register_instance")
    peer.reply(rid, {"op": "register_instance", "namespace_id": "ab" * 16, "slices_per_block": 1})
    if memory:
        rid, body = peer.expect("register_memory")
        peer.reply(rid, {"op": "register_memory", "slice_bytes": 256})


def _queued(peer: Peer, op: str) -> tuple[int, dict[str, Any]]:
    rid, body = peer.expect(op)
    if op == "save":
        n = len(body["packed"]["block_ids"]) // 4 if "packed" in body else len(body["blocks"])
    else:
        n = len(body["block_ids_packed"]) // 4 if "block_ids_packed" in body else len(body["block_ids"])
    peer.reply(rid, {"op": op, "blocks": n})
    return rid, body


def _save_done(saved: int, present: int = 0, failed: int = 0, error: str | None = None) -> dict[str, Any]:
    return {"op": "save_done", "saved": saved, "present": present, "failed": failed, "error": error}


def _client(server: FakeServer, **kw: Any) -> kvloft.Client:
    client = kvloft.Client(server.path, **kw)
    client.connect()
    return client


# ---------------------------------------------------------------------------------------
# Registration.
# ---------------------------------------------------------------------------------------


def test_namespace_wire_form_mirrors_namespacespec() -> None:
    ns = Namespace(model="m@1", dtype="bfloat16", num_layers=32, num_kv_heads=8, head_size=128, block_size=16)
    assert ns.to_wire() == {
        "model": "m@1",
        "dtype": "bfloat16",
        "kv_dtype": "auto",
        "num_layers": 32,
        "num_kv_heads": 8,
        "head_size": 128,
        "block_size": 16,
        "layout": "nhd",
        "tp_size": 1,
        "pp_size": 1,
        "group": 0,
        "variant": "",
    }
    assert list(ns.to_wire()) == [  # the Rust field order
        "model", "dtype", "kv_dtype", "num_layers", "num_kv_heads", "head_size",
        "block_size", "layout", "tp_size", "pp_size", "group", "variant",
    ]
    assert Namespace.from_wire({**ns.to_wire(), "future": 1}) == ns
    assert make_namespace(tp_size=2, pp_size=2).ranks == 4
    for bad in ({"num_layers": 0}, {"block_size": -1}, {"model": ""}, {"layout": "NHD"}, {"tp_size": True},
                {"group": 1 << 32}, {"head_size": 1.5}):
        with pytest.raises(ValueError):
            make_namespace(**bad)
    with pytest.raises(TypeError):
        Namespace("m", "bfloat16", "auto", 1, 1, 1, 1)  # type: ignore[misc]  # keyword-only


def test_register_instance_and_memory_send_their_specs(fake: Fake, monkeypatch: pytest.MonkeyPatch) -> None:
    granted: list[int] = []
    monkeypatch.setattr(kvloft.client, "grant_access", lambda pid: granted.append(pid) or True)

    def script(peer: Peer) -> None:
        peer.hello(pid=4242)
        rid, body = peer.expect("register_instance")
        assert body == {"op": "register_instance", "instance": "engine-0", "namespace": make_namespace().to_wire()}
        peer.reply(rid, {"op": "register_instance", "namespace_id": "ab" * 16, "slices_per_block": 1})
        rid, body = peer.expect("register_memory")
        assert granted == [4242], "access was not granted before the server was told about the memory"
        assert body == {"op": "register_memory", "rank": 0, "device": "cpu", "layers": [LAYER.to_wire()] * 2}
        assert body["layers"][0] == {
            "base": 0x10000, "num_blocks": 8, "block_stride": 64, "segments": 2, "segment_stride": 512,
            "segment_bytes": 64,
        }
        peer.reply(rid, {"op": "register_memory", "slice_bytes": 256})
        peer.recv()

    with _client(fake(script)) as client:
        assert client.server_pid == 4242
        reply = client.register_instance("engine-0", make_namespace())
        assert reply["namespace_id"] == "ab" * 16
        assert client.register_memory(0, [LAYER, LAYER])["slice_bytes"] == 256
        assert client.access_granted is True


def test_cuda_memory_grants_nothing(fake: Fake, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kvloft.client, "grant_access", lambda pid: pytest.fail("granted for cuda memory"))

    def script(peer: Peer) -> None:
        peer.hello(pid=4242)
        _register(peer)
        rid, body = peer.expect("register_memory")
        assert body["device"] == "cuda:1"
        assert body["gpu_uuid"] == bytes(range(16))
        assert body["ipc"] == [{"handle": b"h" * 64, "offset": 4096}]
        peer.reply(rid, {"op": "register_memory", "slice_bytes": 256})

    with _client(fake(script)) as client:
        client.register_instance("engine-0", make_namespace())
        with pytest.raises(ValueError, match="gpu_uuid"):
            client.register_memory(3, [LAYER], device="cuda:1")
        with pytest.raises(ValueError, match="IPC handle"):
            client.register_memory(3, [LAYER], device="cuda:1", gpu_uuid=bytes(range(16)), ipc=[])
        client.register_memory(3, [LAYER], device="cuda:1", gpu_uuid=bytes(range(16)), ipc=[(b"h" * 64, 4096)])
        assert client.access_granted is None


def test_reconnect_repeats_the_registrations(fake: Fake, monkeypatch: pytest.MonkeyPatch) -> None:
    granted: list[int] = []
    monkeypatch.setattr(kvloft.client, "grant_access", lambda pid: granted.append(pid) or True)

    def first(peer: Peer) -> None:
        peer.hello(pid=100)
        _register(peer, memory=True)
        peer.expect("lookup")  # and the server goes away

    def second(peer: Peer) -> None:
        peer.hello(pid=200)
        rid, body = peer.expect("register_instance")
        assert body["instance"] == "engine-0"
        peer.reply(rid, {"op": "register_instance", "namespace_id": "ab" * 16, "slices_per_block": 1})
        rid, body = peer.expect("register_memory")
        assert (body["rank"], len(body["layers"])) == (2, 1)
        peer.reply(rid, {"op": "register_memory", "slice_bytes": 256})
        rid, _ = peer.expect("lookup")
        peer.reply(rid, {"op": "lookup", "hits": 0, "lease": 0, "lease_ttl_s": 30})

    server = fake(first, second)
    client = _client(server)
    client.register_instance("engine-0", make_namespace())
    client.register_memory(2, [LAYER])
    with pytest.raises(kvloft.ConnectionLost):
        client.lookup([H1])
    assert client.lookup([H1]) == LookupResult(hits=0, lease=0, lease_ttl_s=30)
    assert granted == [100, 200], "the new server was not granted access"
    client.close()


# ---------------------------------------------------------------------------------------
# Lookup, save, load, release.
# ---------------------------------------------------------------------------------------


def test_lookup_sends_hashes_as_bin(fake: Fake) -> None:
    def script(peer: Peer) -> None:
        peer.hello()
        rid, body = peer.expect("lookup")
        assert body["hashes"] == [H1, b"\x07", H3]
        assert all(type(h) is bytes for h in body["hashes"])
        peer.reply(rid, {"op": "lookup", "hits": 2, "lease": 77, "lease_ttl_s": 30})
        rid, body = peer.expect("release")
        assert body == {"op": "release", "lease": 77}
        peer.reply(rid, {"op": "release"})

    with _client(fake(script)) as client:
        hit = client.lookup([H1, bytearray(b"\x07"), memoryview(H3)])
        assert hit == LookupResult(hits=2, lease=77, lease_ttl_s=30)
        assert client.release(hit) is None


def test_save_waits_for_its_own_completion(fake: Fake) -> None:
    def script(peer: Peer) -> None:
        peer.hello()
        rid, body = _queued(peer, "save")
        # Hashes of one length travel packed: hashes back to back, block ids as u32 LE.
        assert body["packed"] == {"hash_bytes": len(H1), "hashes": H1 + H2, "block_ids": bytes([5, 0, 0, 0, 6, 0, 0, 0])}
        peer.event(rid + 1000, {"op": "save_done", "saved": 9, "present": 0, "failed": 0, "error": None})
        peer.event(rid, _save_done(1, present=1))
        peer.recv()

    with _client(fake(script)) as client:
        done = client.save([(H1, 5), (H2, 6)])
        assert done == _save_done(1, present=1)
        # The completion of another request stayed queued.
        (other,) = client.events(wait=1.0)
        assert other.body["saved"] == 9


def test_completions_are_collected_in_any_order(fake: Fake) -> None:
    def script(peer: Peer) -> None:
        peer.hello()
        save1, _ = _queued(peer, "save")
        save2, _ = _queued(peer, "save")
        load, body = _queued(peer, "load")
        assert body == {"op": "load", "lease": 9, "block_ids_packed": bytes([3, 0, 0, 0, 4, 0, 0, 0])}
        peer.event(load, {"op": "load_done", "loaded": 2, "error": None})
        peer.event(save2, _save_done(2))
        peer.event(save1, _save_done(1))
        peer.recv()

    with _client(fake(script)) as client:
        r1 = client.save([(H1, 0)], wait=False)
        r2 = client.save([(H2, 1), (H3, 2)], wait=False)
        r3 = client.load(9, [3, 4], wait=False)
        assert len({r1, r2, r3}) == 3
        assert client.wait_event(r1, timeout=5)["saved"] == 1
        assert client.wait_event(r3, timeout=5)["loaded"] == 2
        assert client.wait_event(r2, timeout=5)["saved"] == 2
        assert client.events() == []


def test_failed_load_raises_load_failed(fake: Fake) -> None:
    def script(peer: Peer) -> None:
        peer.hello()
        rid, _ = _queued(peer, "load")
        peer.event(rid, {"op": "load_done", "loaded": 1, "error": "copy failed: EFAULT"})
        rid, _ = _queued(peer, "load")
        peer.event(rid, {"op": "load_done", "loaded": 1, "error": None})  # short, without a reason
        rid, _ = _queued(peer, "load")
        peer.event(rid, {"op": "load_done", "loaded": 0, "error": "lease expired"})
        peer.recv()

    with _client(fake(script)) as client:
        with pytest.raises(kvloft.LoadFailed) as e:
            client.load(5, [0, 1, 2])
        assert (e.value.error, e.value.loaded, e.value.requested) == ("copy failed: EFAULT", 1, 3)
        assert "recompute" in str(e.value)
        with pytest.raises(kvloft.LoadFailed, match="1 blocks loaded, not the 2"):
            client.load(6, [0, 1])
        rid = client.load(7, [0], wait=False)
        with pytest.raises(kvloft.LoadFailed, match="lease expired"):
            client.wait_event(rid, timeout=5)


def test_refused_requests_raise_error_codes(fake: Fake) -> None:
    def script(peer: Peer) -> None:
        peer.hello()
        rid, _ = peer.expect("save")
        peer.error(rid, "no_memory", "register_memory first")
        rid, _ = peer.expect("load")
        peer.error(rid, "unknown_lease", "look up again")
        rid, _ = peer.expect("lookup")
        peer.reply(rid, {"op": "lookup", "hits": 0, "lease": 0, "lease_ttl_s": 30})

    with _client(fake(script)) as client:
        with pytest.raises(kvloft.ServerError) as e:
            client.save([(H1, 0)])
        assert e.value.code == kvloft.ErrorCode.NO_MEMORY
        with pytest.raises(kvloft.ServerError) as e:
            client.load(3, [0])
        assert e.value.code == "unknown_lease"
        assert client.lookup([H1]).hits == 0


def test_wait_event_timeout_then_success(fake: Fake) -> None:
    gate = threading.Event()

    def script(peer: Peer) -> None:
        peer.hello()
        rid, _ = _queued(peer, "save")
        gate.wait(5)
        peer.event(rid, _save_done(1))
        peer.recv()

    with _client(fake(script)) as client:
        rid = client.save([(H1, 0)], wait=False)
        start = time.monotonic()
        with pytest.raises(kvloft.RequestTimeout):
            client.wait_event(rid, timeout=0.2)
        assert time.monotonic() - start < 2
        gate.set()
        assert client.wait_event(rid, timeout=5)["saved"] == 1


def test_lost_connection_fails_the_waiters(fake: Fake) -> None:
    def first(peer: Peer) -> None:
        peer.hello()
        _queued(peer, "save")
        _queued(peer, "save")  # then close without completions

    def second(peer: Peer) -> None:
        peer.hello()
        rid, _ = peer.expect("stats")
        peer.reply(rid, {"op": "stats"})

    server = fake(first, second)
    client = _client(server)
    r1 = client.save([(H1, 0)], wait=False)
    with pytest.raises(kvloft.ConnectionLost):
        client.save([(H2, 1)], wait=True, timeout=5)
    client.stats()  # a new connection
    with pytest.raises(kvloft.ConnectionLost, match=f"save request {r1}"):
        client.wait_event(r1, timeout=5)
    client.close()


def test_dropped_completion_is_event_lost(fake: Fake) -> None:
    def script(peer: Peer) -> None:
        peer.hello()
        rid, _ = _queued(peer, "save")
        peer.event(rid, _save_done(1))
        peer.event(900, {"op": "x"})
        peer.event(901, {"op": "x"})
        rid2, _ = peer.expect("stats")
        peer.reply(rid2, {"op": "stats"})
        peer.recv()

    with _client(fake(script), max_events=2) as client:
        rid = client.save([(H1, 0)], wait=False)
        client.stats()
        with pytest.raises(kvloft.EventLost):
            client.wait_event(rid, timeout=5)
        assert client.events_dropped == 1


def test_a_waiting_thread_lets_other_requests_through(fake: Fake) -> None:
    def script(peer: Peer) -> None:
        peer.hello()
        save_id = None
        for _ in range(2):
            rid, body = peer.recv()
            if body["op"] == "save":
                save_id = rid
                peer.reply(rid, {"op": "save", "blocks": 1})
            else:
                peer.reply(rid, {"op": "stats", "ok": True})
        assert save_id is not None
        peer.event(save_id, _save_done(1))
        peer.recv()

    with _client(fake(script)) as client:
        result: list[Any] = []
        waiter = threading.Thread(target=lambda: result.append(client.save([(H1, 0)], timeout=5)))
        waiter.start()
        time.sleep(0.1)
        assert client.stats()["ok"] is True  # answered while the waiter waits
        waiter.join(5)
        assert result == [_save_done(1)]


# ---------------------------------------------------------------------------------------
# Client-side checks: nothing is sent (there is no server at this path).
# ---------------------------------------------------------------------------------------


def test_inputs_are_checked_before_sending(sock_dir: str) -> None:
    client = kvloft.Client(f"{sock_dir}/none.sock")
    with pytest.raises(ValueError, match="1 to 32 bytes"):
        client.lookup([H1, b""])
    with pytest.raises(ValueError, match="1 to 32 bytes"):
        client.lookup([b"\x00" * (MAX_HASH_BYTES + 1)])
    with pytest.raises(TypeError, match="must be bytes"):
        client.lookup(["abc"])
    with pytest.raises(TypeError, match="list of block hashes"):
        client.lookup(H1)
    with pytest.raises(ValueError, match=f"limit of {MAX_BATCH_BLOCKS}"):
        client.lookup([H1] * (MAX_BATCH_BLOCKS + 1))
    with pytest.raises(ValueError, match=f"limit of {MAX_BATCH_BLOCKS}"):
        client.save([(H1, 0)] * (MAX_BATCH_BLOCKS + 1))
    with pytest.raises(ValueError, match=f"limit of {MAX_BATCH_BLOCKS}"):
        client.load(1, range(MAX_BATCH_BLOCKS + 1))
    with pytest.raises(ValueError, match="block_id"):
        client.save([(H1, -1)])
    with pytest.raises(ValueError, match="block_id"):
        client.save([(H1, 1 << 32)])
    with pytest.raises(TypeError, match="pair"):
        client.save([H1])
    with pytest.raises(ValueError, match=r"blocks\[0\] hash"):
        client.save([(b"", 0)])
    with pytest.raises(ValueError, match="block_ids"):
        client.load(1, [0, 2.5])
    with pytest.raises(ValueError, match="lease"):
        client.load(-1, [0])
    with pytest.raises(ValueError, match="lease"):
        client.release(1 << 64)
    with pytest.raises(ValueError, match="instance"):
        client.register_instance("", make_namespace())
    with pytest.raises(TypeError, match="Namespace"):
        client.register_instance("e", make_namespace().to_wire())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one layer"):
        client.register_memory(0, [])
    with pytest.raises(ValueError, match=f"limit of {MAX_LAYERS}"):
        client.register_memory(0, [LAYER] * (MAX_LAYERS + 1))
    with pytest.raises(TypeError, match="list of LayerMemory"):
        client.register_memory(0, LAYER)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rank"):
        client.register_memory(-1, [LAYER])
    with pytest.raises(ValueError, match="segments"):
        LayerMemory(base=0, num_blocks=1, block_stride=1, segments=0, segment_stride=0, segment_bytes=1)
    with pytest.raises(ValueError, match="num_blocks"):
        LayerMemory(base=0, num_blocks=1 << 32, block_stride=1, segments=1, segment_stride=0, segment_bytes=1)
    assert not client.connected


def test_the_largest_batches_fit_in_one_frame() -> None:
    blocks = save_blocks_to_wire([(b"\xff" * MAX_HASH_BYTES, 0xFFFFFFFF)] * MAX_BATCH_BLOCKS)
    frame = encode_frame(FrameKind.REQUEST, MAX_REQUEST_ID, {"op": "save", "blocks": blocks})
    assert len(frame) <= MAX_FRAME_BYTES
    frame = encode_frame(
        FrameKind.REQUEST, 1, {"op": "lookup", "hashes": hashes_to_wire([b"\xff" * 32] * MAX_BATCH_BLOCKS)}
    )
    assert len(frame) <= MAX_FRAME_BYTES
