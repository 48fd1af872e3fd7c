"""Helpers shared by the test modules: the real server under test, a scripted fake server,
and the data of the store tests. Fixtures built on them live in conftest.py.

The server binary is ``$KVLOFT_BIN`` when set (a relative path is taken from the repository
root), else ``$CARGO_TARGET_DIR/debug/kvloft``, else ``<repo>/target/debug/kvloft``. Build it
first (``cargo build`` in the repository root); a missing binary fails the server tests, it
does not skip them.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import kvloft
from kvloft.protocol import FrameDecoder, FrameKind, encode_frame

REPO_ROOT = Path(__file__).resolve().parents[2]
PYTHON_DIR = REPO_ROOT / "python"
TESTS_DIR = Path(__file__).resolve().parent
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
POOL_SIZE = "64MiB"
POOL_BYTES = 64 << 20


# ---------------------------------------------------------------------------------------
# The real server.
# ---------------------------------------------------------------------------------------


def server_binary() -> Path:
    """Where the ``kvloft`` binary under test is."""
    if os.environ.get("KVLOFT_BIN"):
        path = Path(os.environ["KVLOFT_BIN"])
        return path if path.is_absolute() else REPO_ROOT / path
    if os.environ.get("CARGO_TARGET_DIR"):
        target = Path(os.environ["CARGO_TARGET_DIR"])
        return (target if target.is_absolute() else REPO_ROOT / target) / "debug" / "kvloft"
    return REPO_ROOT / "target" / "debug" / "kvloft"


def require_binary() -> Path:
    """The binary under test; fails the test (never skips it) when it is missing."""
    binary = server_binary()
    if not binary.is_file() or not os.access(binary, os.X_OK):
        pytest.fail(
            f"kvloft server binary not found at {binary}: build it first with `cargo build` in "
            f"{REPO_ROOT}, or set KVLOFT_BIN to the binary to test",
            pytrace=False,
        )
    return binary


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


def fail_with_log(message: str, server: RunningServer) -> None:
    pytest.fail(f"{message}\n--- server output (last lines) ---\n{server.log_tail()}", pytrace=False)


def wait_ready(server: RunningServer, cmd: list[str]) -> None:
    """Wait until the server answers hello, or fail with its output."""
    deadline = time.monotonic() + START_TIMEOUT_S
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        code = server.process.poll()
        if code is not None:
            fail_with_log(f"`{' '.join(cmd)}` exited with code {code} before serving", server)
        if os.path.exists(server.socket_path):
            try:
                with kvloft.Client(server.socket_path, timeout=2.0, client_name="pytest-probe"):
                    return
            except kvloft.KvloftError as e:
                last_error = e
        time.sleep(0.05)
    fail_with_log(
        f"`{' '.join(cmd)}` did not answer hello on {server.socket_path} within {START_TIMEOUT_S:.0f} s "
        f"(last error: {last_error})",
        server,
    )


def stop(server: RunningServer) -> None:
    """SIGTERM the server; require exit code 0 within 10 s and the socket file removed."""
    if server.process.poll() is not None:
        fail_with_log(f"the server exited on its own during the test, with code {server.process.returncode}", server)
    server.process.send_signal(signal.SIGTERM)
    try:
        code = server.process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        fail_with_log(f"the server did not exit within {STOP_TIMEOUT_S:.0f} s of SIGTERM", server)
    if code != 0:
        fail_with_log(f"the server exited with code {code} after SIGTERM, expected 0", server)
    if os.path.exists(server.socket_path):
        fail_with_log(f"the server left its socket file {server.socket_path} behind after SIGTERM", server)


def restart(server: RunningServer) -> None:
    """Start a fresh ``kvloft serve`` on the socket of ``server``, whose process a test killed
    (the fixture's teardown then stops the new one); waits until it answers hello."""
    if server.process.poll() is None:
        server.process.kill()
    server.process.wait()
    try:
        os.unlink(server.socket_path)
    except FileNotFoundError:
        pass
    cmd = [
        str(require_binary()), "serve", "--socket", server.socket_path, "--metrics-addr", "off",
        "--pool-size", POOL_SIZE,
    ]
    with open(server.log_path, "ab") as log:
        server.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    wait_ready(server, cmd)


def python_env() -> dict[str, str]:
    """The environment for a child Python process that imports this checkout's kvloft."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PYTHON_DIR), env.get("PYTHONPATH")]))
    return env


def run_python_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m kvloft ARGS``."""
    return subprocess.run(
        [sys.executable, "-m", "kvloft", *args], capture_output=True, text=True, env=python_env(), timeout=30
    )


def binary_stats(socket_path: str) -> dict[str, Any]:
    """``kvloft stats --socket PATH --json`` run with the binary under test."""
    result = subprocess.run(
        [str(require_binary()), "stats", "--socket", socket_path, "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, f"kvloft stats failed ({result.returncode}): {result.stderr}"
    return json.loads(result.stdout)


def shard_sum(stats: dict[str, Any], field: str) -> int:
    """A per-shard figure summed over the shards (a missing field counts as absent: fails)."""
    shards = stats["shards"]
    missing = [s["id"] for s in shards if field not in s]
    assert not missing, f"stats of shards {missing} have no {field!r}: {shards}"
    return sum(int(s[field]) for s in shards)


# ---------------------------------------------------------------------------------------
# Store test data.
# ---------------------------------------------------------------------------------------

#: Layers, bytes of one K (or V) segment of one block: a slice is 4 * 2 * 2 KiB = 16 KiB.
TEST_LAYERS = 4
TEST_SEGMENT_BYTES = 2048


def make_namespace(**changes: Any) -> kvloft.Namespace:
    """The namespace the store tests use; ``changes`` override fields."""
    fields: dict[str, Any] = {
        "model": "kvloft-test/tiny-model@0",
        "dtype": "bfloat16",
        "kv_dtype": "auto",
        "num_layers": TEST_LAYERS,
        "num_kv_heads": 2,
        "head_size": 32,
        "block_size": 16,
        "layout": "nhd",
        "tp_size": 1,
        "pp_size": 1,
    }
    fields.update(changes)
    return kvloft.Namespace(**fields)


def chain_hashes(seed: str, n: int, start: int = 0) -> list[bytes]:
    """``n`` chained 32-byte block hashes, like vLLM's: each folds in the one before.

    ``start`` skips the first hashes of the chain (the result is ``chain[start:start+n]``).
    """
    out: list[bytes] = []
    prev = hashlib.sha256(b"kvloft-test-root:" + seed.encode()).digest()
    for i in range(start + n):
        prev = hashlib.sha256(prev + i.to_bytes(4, "little")).digest()
        if i >= start:
            out.append(prev)
    return out


def new_cache(num_blocks: int, layers: int = TEST_LAYERS, segment_bytes: int = TEST_SEGMENT_BYTES) -> kvloft.HostKVCache:
    return kvloft.HostKVCache(num_layers=layers, num_blocks=num_blocks, block_bytes=segment_bytes)


# ---------------------------------------------------------------------------------------
# A scripted fake server (no binary needed).
# ---------------------------------------------------------------------------------------


class Peer:
    """The server side of one accepted connection."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.decoder = FrameDecoder()
        self.pending: list[Any] = []

    def recv(self) -> tuple[int, dict[str, Any]]:
        """Return (request id, body) of the next request."""
        while not self.pending:
            data = self.conn.recv(65536)
            if not data:
                raise EOFError
            self.pending.extend(self.decoder.feed(data))
        frame = self.pending.pop(0)
        assert frame.kind is FrameKind.REQUEST
        return frame.request_id, frame.message()

    def send(self, kind: FrameKind, request_id: int, body: dict[str, Any]) -> None:
        self.conn.sendall(encode_frame(kind, request_id, body))

    def reply(self, request_id: int, body: dict[str, Any]) -> None:
        self.send(FrameKind.REPLY, request_id, body)

    def event(self, request_id: int, body: dict[str, Any]) -> None:
        self.send(FrameKind.EVENT, request_id, body)

    def error(self, request_id: int, code: str, message: str = "refused") -> None:
        self.send(FrameKind.ERROR, request_id, {"code": code, "message": message})

    def expect(self, op: str) -> tuple[int, dict[str, Any]]:
        """Receive the next request and check its op."""
        rid, body = self.recv()
        assert body["op"] == op, f"expected {op!r}, got {body}"
        return rid, body

    def hello(self, protocol: int = 1, pid: int | None = None) -> None:
        """Answer the client's hello (with the server pid ``pid`` when given)."""
        rid, body = self.recv()
        assert body["op"] == "hello" and body["protocol"] == 1 and body["pid"] == os.getpid()
        reply: dict[str, Any] = {"op": "hello", "protocol": protocol, "server_version": "0.0.0", "shards": 2}
        if pid is not None:
            reply["pid"] = pid
        self.send(FrameKind.REPLY, rid, reply)


Script = Callable[[Peer], None]


class FakeServer:
    """Listens on a Unix socket and runs one script per accepted connection, in order."""

    def __init__(self, path: str, scripts: list[Script]) -> None:
        self.path = path
        self.scripts = scripts
        self.errors: list[BaseException] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for script in self.scripts:
            conn, _ = self.sock.accept()
            with conn:
                try:
                    script(Peer(conn))
                except EOFError:
                    pass
                except BaseException as e:  # reported by the fixture
                    self.errors.append(e)

    def join(self) -> None:
        self.thread.join(timeout=5)
        self.sock.close()
        assert not self.thread.is_alive(), "fake server script did not finish"
        if self.errors:
            raise self.errors[0]
