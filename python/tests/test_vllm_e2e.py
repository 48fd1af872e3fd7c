"""End to end on real vLLM (CPU): KvloftConnector saves prefixes in one engine process and a
fresh process loads them; outputs stay token-identical to vLLM without kvloft; kvloft dying and
coming back never breaks serving.

Needs vLLM for CPU (``scripts/setup-vllm.sh`` installs it); skipped when it is absent unless
``KVLOFT_REQUIRE_VLLM=1`` (set by ``scripts/test.sh``), which turns the skip into a failure.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import RunningServer, binary_stats, require_binary, shard_sum, wait_ready

import sys

sys.path.insert(0, str(Path(__file__).resolve().parent / "vllm_e2e"))
from harness import REPO_ROOT, Engine, vllm_missing  # noqa: E402

pytestmark = [pytest.mark.server, pytest.mark.vllm]

BLOCK = 32  # tokens per block (the CPU attention backend needs a multiple of 32)
POOL = "256MiB"


def _skip_or_fail() -> None:
    why = vllm_missing()
    if why is None:
        return
    if os.environ.get("KVLOFT_REQUIRE_VLLM") == "1":
        pytest.fail(f"vLLM end-to-end tests required but vLLM cannot run: {why}", pytrace=False)
    pytest.skip(why)


def words(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(997)}" for _ in range(n))


SHARED = words(1, 4 * BLOCK)  # 4 full blocks
PROMPT_X = words(2, 150)
PROMPT_S1 = SHARED + " " + words(3, 40)
PROMPT_S2 = SHARED + " " + words(4, 40)
PROMPT_Y = words(5, 3 * BLOCK + 7)
PROMPT_W = words(6, 2 * BLOCK + 20)
BATCH_Z = [words(10 + i, 70 + 9 * i) for i in range(6)]
SINGLE = {"X": PROMPT_X, "S1": PROMPT_S1, "S2": PROMPT_S2, "Y": PROMPT_Y, "W": PROMPT_W}
BATCH_TOKENS = 48


class Server:
    """A kvloft server on a fixed socket that a test can kill and start again."""

    def __init__(self, workdir: Path) -> None:
        self.binary = require_binary()
        self.socket_path = str(workdir / "kvloft.sock")
        self.workdir = workdir
        self.running: RunningServer | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log_path = self.workdir / f"server-{self.starts}.log"
        cmd = [str(self.binary), "serve", "--socket", self.socket_path, "--metrics-addr", "off", "--pool-size", POOL]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self.running = RunningServer(process, self.socket_path, log_path)
        wait_ready(self.running, cmd)

    def kill(self) -> None:
        assert self.running is not None
        self.running.process.send_signal(signal.SIGKILL)
        self.running.process.wait()
        self.running = None
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)  # a killed server leaves its socket file

    def stop(self) -> None:
        if self.running is not None and self.running.process.poll() is None:
            self.running.process.send_signal(signal.SIGTERM)
            try:
                self.running.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.running.process.kill()
                self.running.process.wait()
        self.running = None

    def stats(self) -> dict:
        return binary_stats(self.socket_path)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="kvl-e2e-"))
    yield d
    if os.environ.get("KVLOFT_KEEP_E2E") != "1":
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def model() -> Path:
    _skip_or_fail()
    from make_model import build

    out = Path(os.environ.get("KVLOFT_E2E_MODEL_DIR") or REPO_ROOT / "target" / "e2e-model")
    return build(out)


@pytest.fixture(scope="module")
def baseline(model: Path, workdir: Path) -> dict[str, list[int]]:
    """Greedy outputs of vLLM without kvloft, one generate call per prompt (and the batch)."""
    with Engine(model, workdir / "engine-baseline.log") as engine:
        outs = {name: engine.generate([p])["outputs"][0] for name, p in SINGLE.items()}
        outs["Z"] = engine.generate(BATCH_Z, max_tokens=BATCH_TOKENS)["outputs"]
        assert engine.metrics().get("vllm:external_prefix_cache_hits", 0) == 0
    return outs


def ext_hits(result: dict) -> float:
    return result["metrics"].get("vllm:external_prefix_cache_hits", 0.0)


def test_fresh_engine_loads_prefixes_from_kvloft(model: Path, workdir: Path, baseline: dict) -> None:
    server = Server(workdir / "share")
    server.workdir.mkdir()
    server.start()
    try:
        with Engine(model, workdir / "engine-a.log", server.socket_path) as a:
            r = a.generate([PROMPT_X])
            assert r["outputs"][0] == baseline["X"]
            assert ext_hits(r) == 0, "a fresh kvloft has nothing to hit"
            assert a.generate([PROMPT_S1])["outputs"][0] == baseline["S1"]
        saved = shard_sum(server.stats(), "slices")
        assert saved >= 4 + 4, f"engine A should have saved X's and S1's full blocks, kvloft holds {saved}"

        # A second, fresh process: vLLM's own prefix cache is empty, the prefix comes from kvloft.
        with Engine(model, workdir / "engine-b.log", server.socket_path) as b:
            r = b.generate([PROMPT_X])
            assert r["outputs"][0] == baseline["X"], "outputs with loaded KV differ from vLLM without kvloft"
            x_tokens = len(PROMPT_X.split())
            assert ext_hits(r) == (x_tokens - 1) // BLOCK * BLOCK, r["metrics"]
            before = ext_hits(r)
            r = b.generate([PROMPT_S2])
            assert r["outputs"][0] == baseline["S2"]
            # S2 shares only SHARED's 4 blocks with what was saved: exactly those hit.
            assert ext_hits(r) - before == 4 * BLOCK, r["metrics"]
        stats = server.stats()
        assert shard_sum(stats, "hits") > 0 and shard_sum(stats, "loads") > 0, stats
    finally:
        server.stop()


def test_sync_loads_in_a_fresh_engine(model: Path, workdir: Path, baseline: dict) -> None:
    """``load_mode = "sync"``: a hit runs in the step that loads it (vLLM's synchronous
    external loads) and its outputs still equal vLLM's without kvloft."""
    server = Server(workdir / "sync")
    server.workdir.mkdir()
    server.start()
    try:
        with Engine(model, workdir / "engine-sync-a.log", server.socket_path) as a:
            assert a.generate([PROMPT_X])["outputs"][0] == baseline["X"]
            assert a.generate([PROMPT_S1])["outputs"][0] == baseline["S1"]
        with Engine(model, workdir / "engine-sync-b.log", server.socket_path, {"load_mode": "sync"}) as b:
            r = b.generate([PROMPT_X])
            assert r["outputs"][0] == baseline["X"], "outputs with synchronously loaded KV differ"
            x_tokens = len(PROMPT_X.split())
            assert ext_hits(r) == (x_tokens - 1) // BLOCK * BLOCK, r["metrics"]
            assert r["metrics"].get("vllm:kvloft_loaded_blocks", 0) == (x_tokens - 1) // BLOCK, r["metrics"]
            assert r["metrics"].get("vllm:kvloft_load_failures", 0) == 0, r["metrics"]
            before = ext_hits(r)
            r = b.generate([PROMPT_S2])
            assert r["outputs"][0] == baseline["S2"]
            assert ext_hits(r) - before == 4 * BLOCK, r["metrics"]
    finally:
        server.stop()


def test_engine_survives_kvloft_dying_and_hits_resume(model: Path, workdir: Path, baseline: dict) -> None:
    server = Server(workdir / "restart")
    server.workdir.mkdir()
    server.start()
    extra = {"reconnect_initial_s": 0.2, "reconnect_max_s": 0.5}
    try:
        with Engine(model, workdir / "engine-c.log", server.socket_path, extra) as c:
            assert c.generate([PROMPT_Y])["outputs"][0] == baseline["Y"]
            c.reset_prefix_cache()
            r = c.generate([PROMPT_Y])
            assert r["outputs"][0] == baseline["Y"]
            hits = ext_hits(r)
            assert hits > 0, "after vLLM's prefix cache is emptied, the prefix comes from kvloft"
            # The connector's own Prometheus metrics (vllm:kvloft_*) agree with vLLM's count.
            assert r["metrics"].get("vllm:kvloft_hit_tokens") == hits, r["metrics"]
            assert r["metrics"].get("vllm:kvloft_loaded_blocks", 0) > 0, r["metrics"]

            # kvloft is killed while a batch is being served.
            c.send({"op": "generate", "prompts": BATCH_Z, "max_tokens": BATCH_TOKENS})
            import time

            time.sleep(0.5)
            server.kill()
            r = c.answer("generate during the kill")
            assert r["outputs"] == baseline["Z"], "outputs changed when kvloft died mid-run"

            # kvloft down: no hits, correct outputs.
            c.reset_prefix_cache()
            r = c.generate([PROMPT_Y])
            assert r["outputs"][0] == baseline["Y"]
            assert ext_hits(r) == hits, "nothing can hit while kvloft is down"

            # kvloft back (empty): saves and hits resume without restarting vLLM.
            server.start()
            time.sleep(1.0)  # longer than the back-off
            assert c.generate([PROMPT_W])["outputs"][0] == baseline["W"]
            c.reset_prefix_cache()
            r = c.generate([PROMPT_W])
            assert r["outputs"][0] == baseline["W"]
            assert ext_hits(r) > hits, "hits resume once kvloft is back"
        stats = server.stats()
        assert shard_sum(stats, "hits") > 0, stats
    finally:
        server.stop()


PLUGIN_CHECK = r"""
import json
from vllm.plugins import load_general_plugins
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
load_general_plugins()
cls = KVConnectorFactory.get_connector_class_by_name("KvloftConnector")
from kvloft.vllm import KvloftConnector
assert cls is KvloftConnector, cls
stats = cls.build_kv_connector_stats({"lookups": 2, "lookup_blocks": 10, "hit_blocks": 4, "lookup_s": [0.001, 0.003]})
more = cls.build_kv_connector_stats({"loads": 1, "loaded_blocks": 4, "load_s": [0.002]})
total = stats.aggregate(more)
import types
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
prom = cls.build_prom_metrics(types.SimpleNamespace(kv_transfer_config=None),
                              {Counter: Counter, Gauge: Gauge, Histogram: Histogram},
                              ["model_name", "engine"], {0: ["tiny", "0"]})
prom.observe({"hit_tokens": 96, "load_failures": 1, "load_s": [0.002, 0.004]}, 0)
labels = {"model_name": "tiny", "engine": "0"}
exported = {
    "hit_tokens": REGISTRY.get_sample_value("vllm:kvloft_hit_tokens_total", labels),
    "load_failures": REGISTRY.get_sample_value("vllm:kvloft_load_failures_total", labels),
    "load_count": REGISTRY.get_sample_value("vllm:kvloft_load_seconds_count", labels),
}
print(json.dumps({"reduced": total.reduce(), "empty": cls.build_kv_connector_stats().is_empty(), "prom": exported}))
"""


def test_plugin_registers_the_connector_and_its_stats() -> None:
    """The ``vllm.general_plugins`` entry point makes the name resolve; the stats aggregate and
    reach vLLM's Prometheus endpoint as ``vllm:kvloft_*``."""
    _skip_or_fail()
    from harness import engine_env

    import json as _json

    done = subprocess.run(
        [sys.executable, "-c", PLUGIN_CHECK], env=engine_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = _json.loads(done.stdout.strip().splitlines()[-1])
    reduced = out["reduced"]
    assert reduced["lookups"] == 2 and reduced["hit_blocks"] == 4 and reduced["loaded_blocks"] == 4
    assert reduced["hit_rate"] == 0.4
    assert reduced["lookup_p50_ms"] == 2.0 and reduced["load_p50_ms"] == 2.0
    assert out["empty"] is True
    assert out["prom"] == {"hit_tokens": 96.0, "load_failures": 1.0, "load_count": 2.0}
