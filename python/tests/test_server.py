"""Integration tests against a real ``kvloft serve`` process.

The binary is ``$KVLOFT_BIN`` when set (a relative path is taken from the repository root),
else ``$CARGO_TARGET_DIR/debug/kvloft``, else ``<repo>/target/debug/kvloft``. Build it first
(``cargo build`` in the repository root); a missing binary fails these tests, it does not skip
them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import kvloft
from kvloft.protocol import FrameDecoder, FrameKind

REPO_ROOT = Path(__file__).resolve().parents[2]
PYTHON_DIR = REPO_ROOT / "python"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
POOL_SIZE = "64MiB"
POOL_BYTES = 64 << 20


def server_binary() -> Path:
    """Where the ``kvloft`` binary under test is."""
    if os.environ.get("KVLOFT_BIN"):
        path = Path(os.environ["KVLOFT_BIN"])
        return path if path.is_absolute() else REPO_ROOT / path
    if os.environ.get("CARGO_TARGET_DIR"):
        target = Path(os.environ["CARGO_TARGET_DIR"])
        return (target if target.is_absolute() else REPO_ROOT / target) / "debug" / "kvloft"
    return REPO_ROOT / "target" / "debug" / "kvloft"


@dataclass
class RunningServer:
    """A ``kvloft serve`` process started for one test."""

    process: subprocess.Popen[bytes]
    socket_path: str
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's combined stdout and stderr."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server output)"
        return "\n".join(text.splitlines()[-lines:]) or "(no server output)"


def _fail(message: str, server: RunningServer) -> None:
    pytest.fail(f"{message}\n--- server output (last lines) ---\n{server.log_tail()}", pytrace=False)


@pytest.fixture
def server_process() -> Iterator[RunningServer]:
    """Start ``kvloft serve`` on a fresh socket, wait until it answers hello, stop it after.

    Teardown sends SIGTERM and requires exit code 0 within 10 s and the socket file removed.
    """
    binary = server_binary()
    if not binary.is_file() or not os.access(binary, os.X_OK):
        pytest.fail(
            f"kvloft server binary not found at {binary}: build it first with `cargo build` in "
            f"{REPO_ROOT}, or set KVLOFT_BIN to the binary to test",
            pytrace=False,
        )
    # A short directory: Unix socket paths are limited to about 107 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="kvl-"))
    socket_path = str(workdir / "kvloft.sock")
    log_path = workdir / "server.log"
    cmd = [str(binary), "serve", "--socket", socket_path, "--metrics-addr", "off", "--pool-size", POOL_SIZE]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    server = RunningServer(process, socket_path, log_path)
    try:
        _wait_ready(server, cmd)
        yield server
        _stop(server)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_ready(server: RunningServer, cmd: list[str]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        code = server.process.poll()
        if code is not None:
            _fail(f"`{' '.join(cmd)}` exited with code {code} before serving", server)
        if os.path.exists(server.socket_path):
            try:
                with kvloft.Client(server.socket_path, timeout=2.0, client_name="pytest-probe"):
                    return
            except kvloft.KvloftError as e:
                last_error = e
        time.sleep(0.05)
    _fail(
        f"`{' '.join(cmd)}` did not answer hello on {server.socket_path} within {START_TIMEOUT_S:.0f} s "
        f"(last error: {last_error})",
        server,
    )


def _stop(server: RunningServer) -> None:
    if server.process.poll() is not None:
        _fail(f"the server exited on its own during the test, with code {server.process.returncode}", server)
    server.process.send_signal(signal.SIGTERM)
    try:
        code = server.process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _fail(f"the server did not exit within {STOP_TIMEOUT_S:.0f} s of SIGTERM", server)
    if code != 0:
        _fail(f"the server exited with code {code} after SIGTERM, expected 0", server)
    if os.path.exists(server.socket_path):
        _fail(f"the server left its socket file {server.socket_path} behind after SIGTERM", server)


@pytest.fixture
def server(server_process: RunningServer) -> str:
    """The socket path of a running server."""
    return server_process.socket_path


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


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PYTHON_DIR), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "kvloft", *args], capture_output=True, text=True, env=env, timeout=30
    )


def test_python_cli_stats_json(server: str, server_process: RunningServer) -> None:
    result = _run_cli("stats", "--socket", server, "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["pid"] == server_process.process.pid
    assert len(stats["shards"]) >= 1


def test_python_cli_stats_table(server: str) -> None:
    result = _run_cli("stats", "--socket", server)
    assert result.returncode == 0, result.stderr
    assert "shard" in result.stdout and server in result.stdout
