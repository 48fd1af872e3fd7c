"""The vLLM connector's worker path on a GPU, without vLLM: layer-wise loads and saves.

    python scripts/device/gpu_connector.py --bin KVLOFT --out DIR [--reps N]
    python scripts/device/gpu_connector.py --cpu-smoke     # the model code alone, on CPU

The GPU machine has no vLLM, so :class:`Worker` below makes the calls vLLM makes on
``KvloftConnector``'s worker side, in vLLM's order, onto the very objects the connector builds in
``register_kv_caches``: a :class:`kvloft.vllm.link.Link` registering the KV cache by CUDA IPC,
:class:`kvloft.vllm.transfers.Transfers` and :class:`kvloft.gpu.LayerEvents`:

- ``start_load_kv``: the step's loads, synchronous (``load_mode = "sync"``), before the forward;
- ``wait_for_layer_load(i)``: before attention layer ``i`` reads the paged cache;
- ``save_kv_layer(i)``: after attention layer ``i`` wrote its KV;
- ``wait_for_save``: the step's saves, ordered by the per-layer events;
- ``get_finished``: the end of the step (synchronous loads' completions, failed blocks).

The model is a random Llama-style decoder in plain torch that reads and writes a paged KV cache
in vLLM's FlashAttention layout (``[2, blocks, block_size, kv_heads, head_dim]`` per layer), so
that attention layer ``i`` really reads the cache right after its wait.

Checks (each must hold, or the script exits non-zero):

1. Layer-wise save: engine A prefills a prompt with a GPU sleep at the start of every layer and
   submits the save with per-layer events before the GPU is done; the bytes kvloft stored equal
   A's cache.
2. Layer-wise load: engine B (fresh, its blocks poisoned with NaN) loads the prefix into other
   blocks and runs the next chunk in the same step; its logits equal A's bit for bit.
3. A step whose layers never waited has its load reported failed (its blocks recomputed).

Timings (medians): the chunk's forward alone, a whole load alone, load-then-forward (what
``load_mode = "async"`` costs the request) and the layer-wise step (load and forward overlapped);
the prefill plus its save with one event after the step against per-layer events.

Writes DIR/gpu-connector.json (the bench report format) and prints a table. With
``KVLOFT_LAYER_TRACE=1`` each layer-wise step also prints when its first and last layers started
on the GPU (``TRACE`` lines): layers that start as their loads land, not as the forward pass
reaches them, show the load lagging behind.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "python"))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# --------------------------------------------------------------------------------------------
# A paged Llama-style decoder in plain torch
# --------------------------------------------------------------------------------------------


class Model:
    """Random weights; ``forward`` runs tokens at ``positions`` of one sequence whose KV lives in
    ``cache`` (one tensor per layer) at ``blocks`` (the sequence's block table)."""

    def __init__(self, layers: int, hidden: int, heads: int, kv_heads: int, mlp: int, vocab: int, block: int,
                 device: str, dtype: torch.dtype) -> None:
        g = torch.Generator(device=device).manual_seed(0)
        self.layers, self.hidden, self.heads, self.kv_heads = layers, hidden, heads, kv_heads
        self.head_dim = hidden // heads
        self.block, self.device, self.dtype = block, device, dtype

        def w(*shape: int) -> torch.Tensor:
            return (torch.randn(*shape, generator=g, device=device) * (1.0 / math.sqrt(shape[-1]))).to(dtype)

        self.embed = w(vocab, hidden)
        self.lm_head = w(vocab, hidden)
        self.wqkv = [w((heads + 2 * kv_heads) * self.head_dim, hidden) for _ in range(layers)]
        self.wo = [w(hidden, hidden) for _ in range(layers)]
        self.w13 = [w(2 * mlp, hidden) for _ in range(layers)]
        self.w2 = [w(hidden, mlp) for _ in range(layers)]
        inv = 1.0 / (10000 ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        self.inv_freq = inv.to(device)

    def new_cache(self, num_blocks: int, fill: float = 0.0) -> list[torch.Tensor]:
        return [torch.full((2, num_blocks, self.block, self.kv_heads, self.head_dim), fill, dtype=self.dtype,
                           device=self.device) for _ in range(self.layers)]

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        cos, sin = freqs.cos().to(x.dtype)[:, None, :], freqs.sin().to(x.dtype)[:, None, :]
        x1, x2 = x[..., : self.head_dim // 2], x[..., self.head_dim // 2:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    @staticmethod
    def _norm(x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)

    def forward(self, tokens: torch.Tensor, start: int, cache: list[torch.Tensor], blocks: list[int],
                hooks: object | None = None, sleep_cycles: int = 0, table: torch.Tensor | None = None) -> torch.Tensor:
        """``table``: ``blocks`` already on the GPU. vLLM's model runner copies a step's inputs
        (block tables, slot mappings) to the GPU before ``start_load_kv``; a host-to-device copy
        issued after a large load was queued waits behind the load on the copy engine."""
        n = tokens.shape[0]
        end = start + n
        positions = torch.arange(start, end, device=self.device)
        if table is None:
            table = torch.tensor(blocks, device=self.device)
        slot_block = table[positions // self.block]
        slot_off = positions % self.block
        nblk = (end + self.block - 1) // self.block
        mask = None
        if start:
            kpos = torch.arange(end, device=self.device)
            mask = kpos[None, :] <= positions[:, None]
        x = self.embed[tokens]
        q_dim, kv_dim = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for i in range(self.layers):
            if sleep_cycles:
                torch.cuda._sleep(sleep_cycles)
            h = self._norm(x)
            qkv = h @ self.wqkv[i].T
            q = qkv[:, :q_dim].view(n, self.heads, self.head_dim)
            k = qkv[:, q_dim:q_dim + kv_dim].view(n, self.kv_heads, self.head_dim)
            v = qkv[:, q_dim + kv_dim:].view(n, self.kv_heads, self.head_dim)
            q, k = self._rope(q, positions), self._rope(k, positions)
            # vLLM's attention layer: wait for the layer's load, write the new KV, attend over
            # the paged cache, then hand the layer to the connector's save.
            if hooks is not None:
                hooks.wait_for_layer_load(i)
            layer = cache[i]
            layer[0, slot_block, slot_off] = k
            layer[1, slot_block, slot_off] = v
            keys = layer[0, table[:nblk]].reshape(-1, self.kv_heads, self.head_dim)[:end]
            vals = layer[1, table[:nblk]].reshape(-1, self.kv_heads, self.head_dim)[:end]
            rep = self.heads // self.kv_heads
            keys = keys.repeat_interleave(rep, dim=1).transpose(0, 1)
            vals = vals.repeat_interleave(rep, dim=1).transpose(0, 1)
            att = F.scaled_dot_product_attention(q.transpose(0, 1), keys, vals, attn_mask=mask,
                                                 is_causal=mask is None)
            if hooks is not None:
                hooks.save_kv_layer(i)
            x = x + att.transpose(0, 1).reshape(n, self.hidden) @ self.wo[i].T
            h = self._norm(x) @ self.w13[i].T
            gate, up = h.chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ self.w2[i].T
        return self._norm(x[-1:]) @ self.lm_head.T


# --------------------------------------------------------------------------------------------
# The connector's worker side, called as vLLM calls it
# --------------------------------------------------------------------------------------------


class Worker:
    """What ``KvloftConnector`` does in a GPU worker, minus vLLM's types (see the module doc)."""

    def __init__(self, sock: str, instance: str, namespace, cache: list[torch.Tensor], num_blocks: int) -> None:
        from kvloft.gpu import LayerEvents, cuda_layers
        from kvloft.vllm.link import Link, Memory
        from kvloft.vllm.transfers import Transfers

        layers, ipc, uuid = cuda_layers(cache, num_blocks)
        memory = Memory(0, layers, "cuda:0", gpu_uuid=uuid, ipc=ipc)
        self.link = Link(sock, instance, namespace, memory=memory, timeout=30.0, client_name=instance)
        if self.link.client() is None:
            raise SystemExit(f"{instance}: could not register with kvloft")
        self.events = LayerEvents(len(layers), cache[0].device)
        self.transfers = Transfers(self.link, load_timeout_s=30.0, layer_events=self.events)
        self.enabled = True  # False: the layers do not wait (vLLM not calling wait_for_layer_load)
        #: perf_counter when layer 0's wait returned (kvloft had queued the step's copies).
        self.layer0_ready = 0.0
        #: With KVLOFT_LAYER_TRACE set: a timing event recorded as each layer starts (after its
        #: wait), to see on the GPU whether layers start as their loads land.
        self.trace: list | None = None

    def bind_connector_metadata(self) -> None:
        self.events.reset_saves()

    def start_load_kv(self, loads) -> None:
        self.transfers.start_loads(loads, sync=True)
        self.submitted = time.perf_counter()

    def wait_for_layer_load(self, layer: int) -> None:
        if layer == 0:
            self.layer0_entered = time.perf_counter()
        if self.enabled:
            self.transfers.wait_layer(layer)
            if layer == 0:
                self.layer0_ready = time.perf_counter()
        if self.trace is not None:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.trace.append(e)

    def save_kv_layer(self, layer: int) -> None:
        self.events.record_save(layer)

    def wait_for_save(self, saves, per_layer: bool = True) -> None:
        if not per_layer:
            self.events.reset_saves()
        after, layers = self.events.save_order()
        self.transfers.start_saves(saves, after_event=after, layer_events=layers)

    def get_finished(self):
        return self.transfers.poll()

    def wait_saves(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.transfers.in_flight[1]:
            if time.monotonic() > deadline:
                raise SystemExit("saves did not complete")
            self.transfers.poll(0.001)


# --------------------------------------------------------------------------------------------


def median_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


def cpu_smoke() -> None:
    """The model's paged forward on CPU: a chunk after a prefill reads the prefix from the cache,
    and copying the prefix blocks elsewhere gives the same logits."""
    m = Model(layers=2, hidden=256, heads=4, kv_heads=2, mlp=512, vocab=100, block=16, device="cpu",
              dtype=torch.float32)
    tokens = torch.randint(0, 100, (80,))
    a_blocks = list(range(0, 8))
    b_blocks = [20 + 2 * i for i in range(8)]
    cache_a, cache_b = m.new_cache(40), m.new_cache(40, float("nan"))
    m.forward(tokens[:64], 0, cache_a, a_blocks)
    ref = m.forward(tokens[64:], 64, cache_a, a_blocks)
    for i in range(m.layers):
        cache_b[i][:, b_blocks[:4]] = cache_a[i][:, a_blocks[:4]]
    got = m.forward(tokens[64:], 64, cache_b, b_blocks)
    full = m.forward(tokens, 0, m.new_cache(40), a_blocks)
    assert torch.equal(got, ref), "logits differ after moving the prefix"
    assert torch.allclose(full, ref, atol=1e-4), "chunked and whole prefill disagree"
    print("cpu smoke: paged forward ok")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin")
    ap.add_argument("--out")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--prefix-blocks", default="128,512",
                    help="prefix sizes in blocks for the load timings; the checks use the largest")
    ap.add_argument("--chunk", type=int, default=4096, help="tokens of the chunk run after the prefix")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--mlp", type=int, default=11008)
    ap.add_argument("--config", help="kvloft serve --config (a topology keeping the shards off this process's CPUs)")
    ap.add_argument("--cpu-smoke", action="store_true")
    args = ap.parse_args()
    if args.cpu_smoke:
        cpu_smoke()
        return
    if not args.bin or not args.out:
        ap.error("--bin and --out are needed (or --cpu-smoke)")

    import kvloft
    import subprocess
    from kvloft.vllm.plan import LoadSpec, SaveSpec

    def start_server(binary: str, workdir: Path, pool: str) -> tuple[subprocess.Popen, str]:
        sock = str(workdir / "kvloft.sock")
        cmd = [binary, "serve", "--socket", sock, "--pool-size", pool, "--metrics-addr", "off"]
        if args.config:
            cmd += ["--config", args.config]
        p = subprocess.Popen(cmd, stdout=open(workdir / "server.log", "wb"), stderr=subprocess.STDOUT)
        for _ in range(600):
            if os.path.exists(sock):
                try:
                    with kvloft.Client(sock, timeout=2.0):
                        return p, sock
                except kvloft.KvloftError:
                    pass
            if p.poll() is not None:
                raise SystemExit(f"kvloft serve exited: {(workdir / 'server.log').read_text()[-2000:]}")
            time.sleep(0.1)
        raise SystemExit("kvloft serve did not start")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kvl-conn-"))
    server, sock = start_server(args.bin, work, "16GiB")
    failures: list[str] = []
    report: dict = {}
    try:
        bs, layers = 16, 32
        kv_heads, head_dim = 8, args.hidden // args.heads
        m = Model(layers=layers, hidden=args.hidden, heads=args.heads, kv_heads=kv_heads, mlp=args.mlp, vocab=1000,
                  block=bs, device="cuda", dtype=torch.float16)
        sizes = sorted(int(x) for x in args.prefix_blocks.split(","))
        nb = sizes[-1]
        prefix, chunk = nb * bs, args.chunk
        total_blocks = 2 * nb + 2 * (chunk // bs + 1) + 8
        a_blocks = list(range(0, nb + chunk // bs + 1))
        b_blocks = [total_blocks - 1 - i for i in range(nb + chunk // bs + 1)]  # other blocks, reversed
        g = torch.Generator(device="cpu").manual_seed(1)
        tokens = torch.randint(0, 1000, (prefix + chunk,), generator=g).cuda()
        ns = kvloft.Namespace(model="gpu-connector-llama", dtype="float16", num_layers=layers, num_kv_heads=kv_heads,
                              head_size=head_dim, block_size=bs, layout="nhd")
        cache_a = m.new_cache(total_blocks, float("nan"))
        cache_b = m.new_cache(total_blocks, float("nan"))
        a = Worker(sock, "engine-a", ns, cache_a, total_blocks)
        b = Worker(sock, "engine-b", ns, cache_b, total_blocks)
        sched = kvloft.Client(sock, timeout=30.0, client_name="scheduler")
        sched.register_instance("engine-b", ns)
        block_bytes = 2 * bs * kv_heads * head_dim * 2  # K and V of one block, one layer

        # 1. Layer-wise save behind a GPU sleep per layer, submitted before the GPU is done.
        hashes = [os.urandom(32) for _ in range(nb)]
        saves = [SaveSpec("prefill", hashes, a_blocks[:nb])]
        with torch.no_grad():
            a.bind_connector_metadata()
            m.forward(tokens[:prefix], 0, cache_a, a_blocks, hooks=a, sleep_cycles=10_000_000)  # ~5 ms per layer
            a.wait_for_save(saves)
            submitted_while_busy = not torch.cuda.current_stream().query()
            a.get_finished()
            a.wait_saves()
            torch.cuda.synchronize()
            counted = a.transfers.counters.peek()
            saved_ok = counted["saved_blocks"] == nb and counted["save_failed_blocks"] == 0
            # What kvloft holds equals A's cache: load it into B's blocks plainly and compare.
            hit = sched.lookup(hashes)
            rid = b.link.client().load(hit.lease, b_blocks[:nb], wait=False)
            b.link.client().wait_event(rid, timeout=30)
            same = all(torch.equal(cache_b[i][:, b_blocks[:nb]].view(torch.int16), cache_a[i][:, a_blocks[:nb]].view(torch.int16))
                       for i in range(layers))
            ref = m.forward(tokens[prefix:], prefix, cache_a, a_blocks)
        report["layerwise_save"] = {"saved_ok": saved_ok, "bytes_equal": same, "submitted_while_gpu_busy":
                                    submitted_while_busy}
        if not (saved_ok and same):
            failures.append(f"layer-wise save: saved_ok={saved_ok} bytes_equal={same} ({counted})")
        print(f"save: per-layer events, submitted while the GPU was busy: {submitted_while_busy}; "
              f"stored bytes equal A's cache: {same}", flush=True)

        def poison_b() -> None:
            for t in cache_b:
                t.fill_(float("nan"))
            torch.cuda.synchronize()

        # 2. Layer-wise load, then the chunk in the same step: logits bit-identical.
        def chunk_of(k: int) -> tuple[torch.Tensor, int]:
            return tokens[k * bs:k * bs + chunk], k * bs

        def layerwise_step(k: int = nb) -> tuple[torch.Tensor, float, float, set[int]]:
            poison_b()
            hit = sched.lookup(hashes[:k])
            if hit.hits != k:
                raise SystemExit(f"lookup found {hit.hits} of {k}")
            start_ev = torch.cuda.Event(enable_timing=True)
            if os.environ.get("KVLOFT_LAYER_TRACE"):
                b.trace = []
                start_ev.record()
            t0 = time.perf_counter()
            # The step's inputs first, as vLLM's model runner prepares them before the forward
            # context (and so before start_load_kv).
            table = torch.tensor(b_blocks, device=m.device)
            b.bind_connector_metadata()
            b.start_load_kv([LoadSpec("req", hit.lease, b_blocks[:k])])
            logits = m.forward(*chunk_of(k), cache_b, b_blocks, hooks=b, table=table)
            torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            if b.trace:
                starts = [start_ev.elapsed_time(e) for e in b.trace]
                print(f"TRACE k={k} step {elapsed * 1e3:.1f} ms; layer starts (ms): "
                      + " ".join(f"{x:.1f}" for x in starts[:4]) + " ... " + " ".join(f"{x:.1f}" for x in starts[-3:]),
                      flush=True)
                b.trace = None
            done = b.get_finished()
            if done.recving:
                raise SystemExit(f"a synchronous load was reported as a finished receive: {done.recving}")
            steps.append((b.submitted - t0, b.layer0_entered - t0))
            return logits, elapsed, b.layer0_ready - t0, b.transfers.take_failed_blocks()

        def whole_then_forward(k: int, forward: bool) -> float:
            poison_b()
            hit = sched.lookup(hashes[:k])
            client = b.link.client()
            t0 = time.perf_counter()
            rid = client.load(hit.lease, b_blocks[:k], wait=False)
            client.wait_event(rid, timeout=30)
            if forward:
                m.forward(*chunk_of(k), cache_b, b_blocks)
            torch.cuda.synchronize()
            return time.perf_counter() - t0

        def forward_only(k: int) -> float:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            m.forward(*chunk_of(k), cache_b, b_blocks)
            torch.cuda.synchronize()
            return time.perf_counter() - t0

        timings: list[dict] = []
        steps: list[tuple[float, float]] = []  # (submitted, layer 0 entered) per layer-wise step
        with torch.no_grad():
            layerwise_step()  # warm-up: opens the events, compiles kernels
            whole_then_forward(nb, True)
            equal, failed_any = [], set()
            for _ in range(args.reps):
                logits, _, _, failed = layerwise_step()
                equal.append(bool(torch.equal(logits, ref)))
                failed_any |= failed
            for k in sizes:
                t_lw, t_ready, t_seq, t_load, t_fwd = [], [], [], [], []
                steps.clear()
                for _ in range(args.reps):
                    _, el, ready, failed = layerwise_step(k)
                    failed_any |= failed
                    t_lw.append(el)
                    t_ready.append(ready)
                    t_seq.append(whole_then_forward(k, True))
                    t_load.append(whole_then_forward(k, False))
                    t_fwd.append(forward_only(k))
                timings.append({
                    "prefix_blocks": k, "layers": layers, "block_bytes_per_layer": block_bytes, "chunk_tokens": chunk,
                    "load_bytes": k * layers * block_bytes, "chunk_forward_ms": median_ms(t_fwd),
                    "whole_load_ms": median_ms(t_load), "load_then_forward_ms": median_ms(t_seq),
                    "layerwise_step_ms": median_ms(t_lw), "layer0_ready_ms": median_ms(t_ready),
                    "submitted_ms": median_ms([x for x, _ in steps]),
                    "layer0_entered_ms": median_ms([y for _, y in steps]),
                })
        report["layerwise_load"] = {"logits_equal": all(equal), "runs": len(equal), "failed_blocks": len(failed_any)}
        if not all(equal) or failed_any:
            failures.append(f"layer-wise load: logits equal in {sum(equal)} of {len(equal)} runs, "
                            f"{len(failed_any)} blocks reported failed")
        print(f"load: layer-wise, chunk in the same step: logits bit-identical in {sum(equal)}/{len(equal)} runs",
              flush=True)

        # 3. Layers that never wait: the step's load is reported failed.
        with torch.no_grad():
            b.enabled = False
            _, _, _, failed = layerwise_step()
            b.enabled = True
        report["unwaited_step_fails"] = failed == set(b_blocks[:nb])
        if not report["unwaited_step_fails"]:
            failures.append(f"a step that did not wait reported {len(failed)} of {nb} blocks failed")
        print(f"a step whose layers did not wait reports its {nb} blocks failed: {report['unwaited_step_fails']}",
              flush=True)

        # Saves: prefill + save until save_done, one event after the step against per-layer events.
        def prefill_and_save(per_layer: bool) -> float:
            for t in cache_a:
                t[:, a_blocks[:nb]] = 0
            torch.cuda.synchronize()
            hs = [os.urandom(32) for _ in range(nb)]
            t0 = time.perf_counter()
            a.bind_connector_metadata()
            m.forward(tokens[:prefix], 0, cache_a, a_blocks, hooks=a)
            a.wait_for_save([SaveSpec("p", hs, a_blocks[:nb])], per_layer=per_layer)
            a.wait_saves()
            return time.perf_counter() - t0

        def prefill_only() -> float:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            m.forward(tokens[:prefix], 0, cache_a, a_blocks)
            torch.cuda.synchronize()
            return time.perf_counter() - t0

        with torch.no_grad():
            prefill_and_save(True)
            prefill_and_save(False)
            s_layer, s_step, s_fwd = [], [], []
            for _ in range(args.reps):
                s_layer.append(prefill_and_save(True))
                s_step.append(prefill_and_save(False))
                s_fwd.append(prefill_only())
        counted = a.transfers.counters.peek()
        if counted["save_failed_blocks"]:
            failures.append(f"saves failed: {counted}")

        report["timing"] = {"loads": timings, "saves": {
            "prefix_blocks": nb, "layers": layers, "prefill_ms": median_ms(s_fwd),
            "prefill_save_step_event_ms": median_ms(s_step), "prefill_save_layer_events_ms": median_ms(s_layer)}}
    finally:
        server.terminate()
        server.wait(timeout=30)
        (out / "server.log").write_bytes((work / "server.log").read_bytes())

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "unknown")
    loads, saves_t = report["timing"]["loads"], report["timing"]["saves"]
    cases = [
        {"name": "connector_layerwise_checks", "params": {k: v for k, v in report.items() if k != "timing"},
         "samples": 1},
        # Medians in milliseconds, in params (the report format has no field for them).
        *({"name": f"connector_load_overlap_{t['prefix_blocks']}", "samples": args.reps, "params": t,
           "gbps": t["load_bytes"] / t["whole_load_ms"] / 1e6} for t in loads),
        {"name": "connector_save_overlap", "samples": args.reps, "params": saves_t},
    ]
    doc = {
        "suite": "gpu-connector",
        "machine": {"cpu": cpu, "cores": os.cpu_count() or 0, "numa_nodes": 1, "gpus": [torch.cuda.get_device_name(0)],
                    "kernel": platform.release(), "hostname": platform.node()},
        "command": " ".join(sys.argv),
        "git_rev": os.environ.get("KVLOFT_GIT_REV") or "unknown",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cases": cases,
    }
    (out / "gpu-connector.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\n{'prefix blocks':>13} {'MiB':>6} {'forward':>8} {'load':>7} {'GB/s':>5} {'load+fwd':>9} "
          f"{'layerwise':>9} {'layer0':>7}  (ms, medians of {args.reps})")
    for t in loads:
        print(f"{t['prefix_blocks']:13} {t['load_bytes'] >> 20:6} {t['chunk_forward_ms']:8.2f} {t['whole_load_ms']:7.2f} "
              f"{t['load_bytes'] / t['whole_load_ms'] / 1e6:5.1f} {t['load_then_forward_ms']:9.2f} "
              f"{t['layerwise_step_ms']:9.2f} {t['layer0_ready_ms']:7.2f}  (submitted {t['submitted_ms']:.2f}, "
              f"layer 0 entered {t['layer0_entered_ms']:.2f})")
    print(f"prefill {saves_t['prefill_ms']:.2f} ms; with its save, one event: {saves_t['prefill_save_step_event_ms']:.2f} "
          f"ms, per-layer events: {saves_t['prefill_save_layer_events_ms']:.2f} ms")
    if failures:
        print("FAILED: " + "; ".join(failures))
        sys.exit(1)
    print("all connector checks passed")


if __name__ == "__main__":
    main()
