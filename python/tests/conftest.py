"""Fixtures shared by the test modules (helpers in support.py).

Tests that need the real ``kvloft`` binary carry the ``server`` marker; run only the others
with ``pytest -m "not server"``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import POOL_SIZE, FakeServer, RunningServer, Script, require_binary, stop, wait_ready


@pytest.fixture
def server_process() -> Iterator[RunningServer]:
    """Start ``kvloft serve`` on a fresh socket, wait until it answers hello, stop it after.

    Teardown sends SIGTERM and requires exit code 0 within 10 s and the socket file removed.
    """
    binary = require_binary()
    # A short directory: Unix socket paths are limited to about 107 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="kvl-"))
    socket_path = str(workdir / "kvloft.sock")
    log_path = workdir / "server.log"
    cmd = [str(binary), "serve", "--socket", socket_path, "--metrics-addr", "off", "--pool-size", POOL_SIZE]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    server = RunningServer(process, socket_path, log_path)
    try:
        wait_ready(server, cmd)
        yield server
        stop(server)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def server(server_process: RunningServer) -> str:
    """The socket path of a running server."""
    return server_process.socket_path


@pytest.fixture
def sock_dir() -> Iterator[str]:
    """A short temporary directory (Unix socket paths are limited to about 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="kvl-") as d:
        yield d


@pytest.fixture
def fake(sock_dir: str) -> Iterator[Callable[..., FakeServer]]:
    """Start a scripted fake server: ``fake(script, ...)``, one script per connection."""
    servers: list[FakeServer] = []

    def start(*scripts: Script) -> FakeServer:
        server = FakeServer(os.path.join(sock_dir, f"fake{len(servers)}.sock"), list(scripts))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.join()
