"""Client behaviour against a scripted in-process fake server (no kvloft binary needed)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support import FakeServer, Peer

import kvloft
from kvloft.__main__ import format_bytes, format_cpus, render_stats
from kvloft.config import DEFAULT_SOCKET_PATH, default_socket_path
from kvloft.protocol import BadMagic, FrameKind


def test_default_socket_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVLOFT_SOCKET", raising=False)
    assert default_socket_path() == DEFAULT_SOCKET_PATH == "/tmp/kvloft.sock"
    assert kvloft.Client().socket_path == "/tmp/kvloft.sock"
    monkeypatch.setenv("KVLOFT_SOCKET", "/run/kv.sock")
    assert kvloft.Client().socket_path == "/run/kv.sock"
    assert kvloft.Client(Path("/x/y.sock")).socket_path == "/x/y.sock"


def test_missing_socket_is_server_unavailable(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "nothing.sock")
    with pytest.raises(kvloft.ServerUnavailable) as e:
        kvloft.Client(path).connect()
    assert path in str(e.value) and "kvloft serve" in str(e.value)
    assert "does not exist" in str(e.value)
    with pytest.raises(kvloft.ServerUnavailable):
        kvloft.Client(path).stats()


def test_stale_socket_is_server_unavailable(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()  # the file stays, nobody listens
    with pytest.raises(kvloft.ServerUnavailable) as e:
        kvloft.Client(path).connect()
    assert "refused" in str(e.value) and path in str(e.value)


def test_hello_then_stats(fake: Callable[..., FakeServer]) -> None:
    def script(peer: Peer) -> None:
        peer.hello()
        rid, body = peer.recv()
        assert body == {"op": "stats"}
        peer.send(FrameKind.REPLY, rid, {"op": "stats", "pid": 1, "shards": []})

    server = fake(script)
    with kvloft.Client(server.path, client_name="unit") as client:
        assert client.server_info == {"op": "hello", "protocol": 1, "server_version": "0.0.0", "shards": 2}
        assert client.stats() == {"op": "stats", "pid": 1, "shards": []}
    assert not client.connected


def test_lazy_connect_sends_hello_first(fake: Callable[..., FakeServer]) -> None:
    def script(peer: Peer) -> None:
        peer.hello()
        rid, body = peer.recv()
        peer.send(FrameKind.REPLY, rid, {"op": "stats"})

    server = fake(script)
    client = kvloft.Client(server.path)
    assert client.stats() == {"op": "stats"}
    client.close()
    client.close()


def test_error_frame_is_server_error_and_connection_survives(fake: Callable[..., FakeServer]) -> None:
    def script(peer: Peer) -> None:
        rid, body = peer.recv()
        assert body == {"op": "stats"}
        peer.send(FrameKind.ERROR, rid, {"code": "hello_required", "message": "send hello first"})
        peer.hello()
        rid, body = peer.recv()
        peer.send(FrameKind.REPLY, rid, {"op": "stats"})

    server = fake(script)
    client = kvloft.Client(server.path)
    assert client.connect(hello=False) is None
    with pytest.raises(kvloft.ServerError) as e:
        client.stats()
    assert e.value.code == "hello_required" == kvloft.ErrorCode.HELLO_REQUIRED
    assert e.value.message == "send hello first"
    assert client.hello()["protocol"] == 1
    assert client.stats() == {"op": "stats"}
    client.close()


def test_request_sends_fields_and_matches_ids(fake: Callable[..., FakeServer]) -> None:
    def script(peer: Peer) -> None:
        peer.hello()
        rid, body = peer.recv()
        assert body == {"op": "lookup", "keys": [b"\x01", b"\x02"], "n": 3}
        # A late reply to an older request, two events, then the answer.
        peer.send(FrameKind.REPLY, rid - 1, {"op": "hello"})
        peer.send(FrameKind.EVENT, 77, {"op": "save_done", "n": 1})
        peer.send(FrameKind.EVENT, 78, {"op": "save_done", "n": 2})
        peer.send(FrameKind.REPLY, rid, {"op": "lookup", "hits": 3})
        peer.send(FrameKind.EVENT, 79, {"op": "load_done"})
        peer.recv()  # wait for the client to go

    server = fake(script)
    with kvloft.Client(server.path) as client:
        assert client.request("lookup", keys=[b"\x01", b"\x02"], n=3) == {"op": "lookup", "hits": 3}
        events: list[kvloft.Event] = []
        deadline = time.monotonic() + 5
        while len(events) < 3 and time.monotonic() < deadline:
            events += client.events(wait=0.5)
        assert [(e.request_id, e.body["op"]) for e in events] == [
            (77, "save_done"),
            (78, "save_done"),
            (79, "load_done"),
        ]
        assert client.events() == []


def test_event_queue_is_bounded(fake: Callable[..., FakeServer]) -> None:
    def script(peer: Peer) -> None:
        peer.hello()
        rid, _ = peer.recv()
        for i in range(5):
            peer.send(FrameKind.EVENT, i, {"i": i})
        peer.send(FrameKind.REPLY, rid, {"op": "stats"})
        peer.recv()

    server = fake(script)
    with kvloft.Client(server.path, max_events=2) as client:
        client.stats()
        assert [e.body["i"] for e in client.events()] == [3, 4]
        assert client.events_dropped == 3


def test_protocol_mismatch_names_both_versions(fake: Callable[..., FakeServer]) -> None:
    server = fake(lambda peer: peer.hello(protocol=2))
    with pytest.raises(kvloft.ProtocolMismatch) as e:
        kvloft.Client(server.path).connect()
    assert (e.value.client_version, e.value.server_version) == (1, 2)
    assert "protocol 2" in str(e.value) and "protocol 1" in str(e.value)


def test_refused_hello_is_protocol_mismatch(fake: Callable[..., FakeServer]) -> None:
    def script(peer: Peer) -> None:
        rid, _ = peer.recv()
        peer.send(FrameKind.ERROR, rid, {"code": "unsupported_version", "message": "this server speaks 3"})

    server = fake(script)
    with pytest.raises(kvloft.ProtocolMismatch, match="this server speaks 3"):
        kvloft.Client(server.path).connect()


def test_connection_lost_then_reconnect(fake: Callable[..., FakeServer]) -> None:
    def dies(peer: Peer) -> None:
        peer.hello()
        peer.recv()  # and close without answering

    def answers(peer: Peer) -> None:
        peer.hello()
        rid, _ = peer.recv()
        peer.send(FrameKind.REPLY, rid, {"op": "stats", "again": True})

    server = fake(dies, answers)
    client = kvloft.Client(server.path)
    client.connect()
    with pytest.raises(kvloft.ConnectionLost, match="closed the connection"):
        client.stats()
    assert not client.connected
    assert client.stats()["again"] is True
    client.close()


def test_timeout_keeps_connection_and_drops_late_reply(fake: Callable[..., FakeServer]) -> None:
    gate = threading.Event()

    def script(peer: Peer) -> None:
        peer.hello()
        late, _ = peer.recv()
        gate.wait(5)
        peer.send(FrameKind.REPLY, late, {"op": "stats", "late": True})
        rid, _ = peer.recv()
        peer.send(FrameKind.REPLY, rid, {"op": "stats", "late": False})

    server = fake(script)
    with kvloft.Client(server.path, timeout=0.2) as client:
        with pytest.raises(kvloft.RequestTimeout):
            client.stats()
        gate.set()
        assert client.stats() == {"op": "stats", "late": False}


def test_garbage_from_server_closes_connection(fake: Callable[..., FakeServer]) -> None:
    def script(peer: Peer) -> None:
        peer.recv()
        peer.conn.sendall(b"\x10\x00\x00\x00HTTP/1.1 400 Bad")

    server = fake(script)
    client = kvloft.Client(server.path)
    with pytest.raises(BadMagic):
        client.connect()
    assert not client.connected


def test_connection_level_error_is_raised(fake: Callable[..., FakeServer]) -> None:
    def script(peer: Peer) -> None:
        peer.hello()
        peer.recv()
        peer.send(FrameKind.ERROR, 0, {"code": "shutting_down", "message": "bye"})

    server = fake(script)
    with kvloft.Client(server.path) as client:
        with pytest.raises(kvloft.ServerError) as e:
            client.stats()
        assert (e.value.code, e.value.request_id) == ("shutting_down", 0)


def test_threads_share_a_client(fake: Callable[..., FakeServer]) -> None:
    def script(peer: Peer) -> None:
        peer.hello()
        for _ in range(40):
            rid, body = peer.recv()
            peer.send(FrameKind.REPLY, rid, {"op": "echo", "x": body["x"]})

    server = fake(script)
    results: list[bool] = []
    with kvloft.Client(server.path) as client:

        def work(n: int) -> None:
            for i in range(10):
                results.append(client.request("echo", x=n * 100 + i)["x"] == n * 100 + i)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results == [True] * 40


def test_render_stats() -> None:
    assert format_cpus([5, 0, 1, 2]) == "0-2,5"
    assert format_cpus([]) == "-"
    assert format_bytes(64 << 20) == "64 MiB"
    assert format_bytes(1536) == "1.5 KiB"
    table = render_stats(
        {
            "server_version": "0.1.0",
            "pid": 42,
            "uptime_s": 1.25,
            "socket": "/tmp/kvloft.sock",
            "pool_bytes": 64 << 20,
            "shards": [
                {"id": 0, "cpu": 0, "numa_node": 0, "gpu": None, "nic": None, "ssd": None,
                 "pool_bytes": 32 << 20, "thread_id": 100, "allowed_cpus": [0], "connections": 1, "requests": 7},
                {"id": 1, "cpu": 1, "numa_node": 0, "gpu": 0, "nic": "mlx5_0", "ssd": "/nvme",
                 "pool_bytes": 32 << 20, "thread_id": 101, "allowed_cpus": [1], "connections": 0, "requests": 0,
                 "slices": 3, "used_bytes": 3 << 14, "hits": 5, "misses": 1, "saves": 3, "loads": 2,
                 "evictions": 0, "leases": 1},
            ],
        }
    )
    lines = table.splitlines()
    assert "pid 42" in lines[0] and "64 MiB" in lines[2]
    assert lines[4].split()[:3] == ["shard", "cpu", "numa"]
    assert lines[5].split() == ["0", "0", "0", "-", "-", "-", "32", "MiB", "0", "100", "1", "7"] + ["-"] * 8
    assert "mlx5_0" in lines[6]
    assert lines[6].split()[-9:] == ["3", "48", "KiB", "5", "1", "3", "2", "0", "1"]


def test_cli_reports_missing_server(sock_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    from kvloft.__main__ import main

    path = os.path.join(sock_dir, "none.sock")
    assert main(["stats", "--socket", path]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kvloft: error:") and path in err and "kvloft serve" in err
