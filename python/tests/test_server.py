"""Integration tests against a real ``kvloft serve`` process (fixtures in conftest.py).

The binary is ``$KVLOFT_BIN`` when set (a relative path is taken from the repository root),
else ``$CARGO_TARGET_DIR/debug/kvloft``, else ``<repo>/target/debug/kvloft``. Build it first
(``cargo build`` in the repository root); a missing binary fails these tests, it does not skip
them.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from pathlib import Path

import pytest
from support import POOL_BYTES, RunningServer, run_python_cli

import kvloft
from kvloft.protocol import FrameDecoder, FrameKind

pytestmark = pytest.mark.server


def _cpu_list(text: str) -> list[int]:
    """Parse a kernel CPU list such as ``0-2,5``."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if "-" in part:
            lo, hi = part.split("-")
            cpus.extend(range(int(lo), int(hi) + 1))
        elif part:
            cpus.append(int(part))
    return cpus


def test_hello(server: str) -> None:
    with kvloft.Client(server, client_name="pytest") as client:
        info = client.hello()
    assert info["op"] == "hello"
    assert info["protocol"] == 1
    assert info["shards"] >= 1
    assert isinstance(info["server_version"], str) and info["server_version"]


def test_stats_shards_are_pinned_one_per_core(server: str, server_process: RunningServer) -> None:
    with kvloft.Client(server) as client:
        shard_count = client.server_info["shards"]
        stats = client.stats()
    assert stats["op"] == "stats"
    assert stats["pid"] == server_process.process.pid
    assert stats["uptime_s"] >= 0
    assert stats["socket"] == server
    assert stats["pool_bytes"] == POOL_BYTES, "pool_bytes is the configured pool over all shards"
    assert stats["server_version"]
    shards = stats["shards"]
    assert len(shards) == shard_count
    assert [s["id"] for s in shards] == list(range(shard_count))
    cpus = [s["cpu"] for s in shards]
    assert len(set(cpus)) == len(cpus), f"two shards share a cpu: {cpus}"
    for s in shards:
        assert s["allowed_cpus"] == [s["cpu"]], f"shard {s['id']} is not pinned to its own core: {s}"
    assert sum(s["pool_bytes"] for s in shards) <= POOL_BYTES
    assert sum(s["connections"] for s in shards) >= 1, "this client's connection is not counted"
    # The kernel agrees with what each executor reported about itself.
    task_dir = Path(f"/proc/{stats['pid']}/task")
    if task_dir.is_dir():
        for s in shards:
            status = (task_dir / str(s["thread_id"]) / "status").read_text()
            (line,) = [ln for ln in status.splitlines() if ln.startswith("Cpus_allowed_list:")]
            assert _cpu_list(line.split(":", 1)[1]) == [s["cpu"]], f"thread of shard {s['id']}: {line}"


def test_request_before_hello_is_refused_and_connection_survives(server: str) -> None:
    client = kvloft.Client(server)
    client.connect(hello=False)
    try:
        with pytest.raises(kvloft.ServerError) as e:
            client.stats()
        assert e.value.code == "hello_required"
        assert e.value.message
        assert client.connected
        assert client.hello()["protocol"] == 1
        assert client.stats()["shards"]
    finally:
        client.close()


def test_unknown_op_is_refused_and_connection_survives(server: str) -> None:
    with kvloft.Client(server) as client:
        with pytest.raises(kvloft.ServerError) as e:
            client.request("fly", altitude=3)
        assert e.value.code == "unknown_op"
        assert client.stats()["shards"]


def test_hello_with_other_protocol_is_refused(server: str) -> None:
    with kvloft.Client(server) as client:
        pass
    client = kvloft.Client(server)
    client.connect(hello=False)
    try:
        with pytest.raises(kvloft.ServerError) as e:
            client.request("hello", protocol=99, client="pytest", pid=os.getpid())
        assert e.value.code == "unsupported_version"
        assert client.hello()["protocol"] == 1
    finally:
        client.close()


def test_bad_magic_closes_only_that_connection(server: str) -> None:
    with kvloft.Client(server, client_name="bystander") as bystander:
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.settimeout(5.0)
        raw.connect(server)
        raw.sendall(struct.pack("<I", 12) + b"XX\x01\x01" + bytes(8))
        received = b""
        try:
            while chunk := raw.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        except socket.timeout:
            pytest.fail("the server kept the connection open after a frame with bad magic")
        finally:
            raw.close()
        # An error frame before closing is allowed; if one came, it says bad_frame.
        for frame in FrameDecoder().feed(received):
            assert frame.kind is FrameKind.ERROR
            assert frame.message()["code"] == "bad_frame"
        assert bystander.stats()["shards"]
    with kvloft.Client(server) as fresh:
        assert fresh.stats()["shards"]


def test_python_cli_stats_json(server: str, server_process: RunningServer) -> None:
    result = run_python_cli("stats", "--socket", server, "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["pid"] == server_process.process.pid
    assert len(stats["shards"]) >= 1


def test_python_cli_stats_table(server: str) -> None:
    result = run_python_cli("stats", "--socket", server)
    assert result.returncode == 0, result.stderr
    assert "shard" in result.stdout and server in result.stdout
