"""GPU tests of kvloft's server path, run on a machine with an NVIDIA GPU and torch.

    python scripts/device/gpu_roundtrip.py --bin KVLOFT --out DIR [--quick]

1. Round trip: for every layout (nhd: K/V-first [2, blocks, ...]; hnd/mla: [blocks, ...];
   cross_layer: one [blocks, layers, ...] tensor), block sizes 16 to 256 KiB and batch sizes,
   random bytes are saved from one set of blocks through `kvloft serve` (CUDA IPC, the cuda
   backend), loaded into another set poisoned first, and compared byte for byte. Save and load
   are timed from the request to the completion event (the full server path) and set against a
   contiguous pinned copy of the same bytes measured in the same run.
2. A real model: a random Llama-style model (transformers) on the GPU; its prefill KV is written
   into a paged cache, saved through kvloft, loaded into different blocks of a fresh cache, and
   the next step's logits must equal those of the run that never left the GPU.

Writes DIR/gpu-server.json (the bench report format) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "python"))

import torch  # noqa: E402

import kvloft  # noqa: E402
from kvloft.gpu import cuda_layers  # noqa: E402

LAYERS = 32


def start_server(binary: str, workdir: Path, pool: str) -> tuple[subprocess.Popen, str]:
    sock = str(workdir / "kvloft.sock")
    log = open(workdir / "server.log", "wb")
    p = subprocess.Popen([binary, "serve", "--socket", sock, "--pool-size", pool, "--metrics-addr", "off"],
                         stdout=log, stderr=subprocess.STDOUT)
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


def make_cache(layout: str, num_blocks: int, block_bytes: int) -> tuple[list[torch.Tensor], object]:
    """Per-layer uint8 views of the engine's cache, and the owner of the memory."""
    dev = "cuda"
    if layout == "nhd":
        ts = [torch.empty((2, num_blocks, block_bytes // 2), dtype=torch.uint8, device=dev) for _ in range(LAYERS)]
        return ts, ts
    if layout in ("hnd", "mla"):
        ts = [torch.empty((num_blocks, block_bytes), dtype=torch.uint8, device=dev) for _ in range(LAYERS)]
        return ts, ts
    big = torch.empty((num_blocks, LAYERS, block_bytes), dtype=torch.uint8, device=dev)
    return [big[:, i, :] for i in range(LAYERS)], big


def block_view(t: torch.Tensor, layout: str, ids: torch.Tensor) -> torch.Tensor:
    return t[:, ids] if layout == "nhd" else t[ids]


def namespace(layout: str, block_bytes: int) -> kvloft.Namespace:
    return kvloft.Namespace(model="gpu-roundtrip", dtype="uint8", num_layers=LAYERS, num_kv_heads=1,
                            head_size=block_bytes, block_size=1, layout=layout, variant=f"test/{block_bytes}")


_CEILING_BUFFERS: dict = {}


def ceiling(nbytes: int, d2h: bool, reps: int = 7) -> float:
    """GB/s of one contiguous pinned copy of `nbytes` (buffers allocated and touched once)."""
    if "host" not in _CEILING_BUFFERS:
        _CEILING_BUFFERS["host"] = torch.ones(2 << 30, dtype=torch.uint8, pin_memory=True)
        _CEILING_BUFFERS["dev"] = torch.ones(2 << 30, dtype=torch.uint8, device="cuda")
    host, devb = _CEILING_BUFFERS["host"][:nbytes], _CEILING_BUFFERS["dev"][:nbytes]
    (host.copy_(devb, non_blocking=True) if d2h else devb.copy_(host, non_blocking=True))
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        (host.copy_(devb, non_blocking=True) if d2h else devb.copy_(host, non_blocking=True))
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def roundtrip(sock: str, cases: list, block_sizes: list[int], batches: list[int], reps: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(7)
    for layout in ("nhd", "hnd", "mla", "cross_layer"):
        for bb in block_sizes:
            fitting = [b for b in batches if b * bb * LAYERS <= (2 << 30)]
            if not fitting:
                continue
            nb = 2 * max(fitting)
            tensors, owner = make_cache(layout, nb, bb)
            for t in tensors:
                t.copy_(torch.randint(0, 256, t.shape, dtype=torch.uint8, device="cuda", generator=gen))
            layers, ipc, uuid = cuda_layers(tensors, nb)
            client = kvloft.Client(sock, timeout=30)
            client.register_instance(f"rt-{layout}-{bb}", namespace(layout, bb))
            client.register_memory(0, layers, device="cuda:0", gpu_uuid=uuid, ipc=ipc)
            torch.cuda.synchronize()
            for batch in fitting:
                perm = torch.randperm(nb, device="cuda", generator=gen)
                a, b = perm[:batch], perm[batch:2 * batch]
                nbytes = batch * bb * LAYERS
                save_t, load_t = [], []
                for r in range(reps + 1):
                    hashes = [os.urandom(32) for _ in range(batch)]
                    t0 = time.perf_counter()
                    done = client.save(list(zip(hashes, a.tolist())))
                    save_t.append(time.perf_counter() - t0)
                    if done["saved"] != batch:
                        raise SystemExit(f"{layout} {bb} b{batch}: save {done}")
                    for t in tensors:
                        if layout == "nhd":
                            t[:, b] = 0xA5
                        else:
                            t[b] = 0xA5
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    hit = client.lookup(hashes)
                    client.load(hit.lease, b.tolist())
                    load_t.append(time.perf_counter() - t0)
                    if hit.hits != batch:
                        raise SystemExit(f"{layout} {bb} b{batch}: {hit.hits} hits of {batch}")
                    for i, t in enumerate(tensors):
                        if not torch.equal(block_view(t, layout, a), block_view(t, layout, b)):
                            raise SystemExit(f"MISMATCH {layout} {bb} b{batch} layer {i} round {r}")
                for direction, times in (("d2h", save_t[1:]), ("h2d", load_t[1:])):
                    med = statistics.median(times)
                    ceil = ceiling(nbytes, direction == "d2h")
                    gbps = nbytes / med / 1e9
                    cases.append({
                        "name": f"{direction}_{layout}_{bb >> 10}k_b{batch}_server",
                        "params": {"direction": direction, "layout": layout, "block_bytes": bb, "batch": batch,
                                   "layers": LAYERS, "bytes": nbytes, "path": "server", "verified": True,
                                   "sm_budget": 16},
                        "samples": len(times), "p50_us": med * 1e6, "gbps": gbps, "ceiling_gbps": ceil,
                        "ratio": gbps / ceil,
                    })
                    print(f"{direction} {layout:<12} {bb >> 10:>4} KiB b{batch:<5} {gbps:6.2f} GB/s  ceiling {ceil:6.2f}  "
                          f"ratio {gbps / ceil:.2f}  p50 {med * 1e3:8.2f} ms  verified", flush=True)
            client.close()
            del tensors, owner
            torch.cuda.empty_cache()


def model_test(sock: str) -> dict:
    try:
        from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        return {"skipped": f"transformers is not installed: {e}"}
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=1024)
    model = LlamaForCausalLM(cfg).to("cuda", torch.float16).eval()
    bs, nblk, seq = 16, 64, 96
    ids = torch.randint(0, 1000, (1, seq + 1), device="cuda")
    with torch.no_grad():
        out = model(ids[:, :seq], use_cache=True)
        cache = out.past_key_values
        keys = [cache.layers[i].keys if hasattr(cache, "layers") else cache.key_cache[i] for i in range(4)]
        vals = [cache.layers[i].values if hasattr(cache, "layers") else cache.value_cache[i] for i in range(4)]
        ref = model(ids[:, seq:], past_key_values=cache, use_cache=True).logits
        # Paged caches in vLLM's FlashAttention layout: [2, blocks, block_size, kv_heads, head_dim].
        src = [torch.zeros(2, nblk, bs, 4, 64, dtype=torch.float16, device="cuda") for _ in range(4)]
        dst = [torch.full((2, nblk, bs, 4, 64), float("nan"), dtype=torch.float16, device="cuda") for _ in range(4)]
        a = list(range(5, 5 + seq // bs))
        b = [40 + 3 * i for i in range(seq // bs)]
        for l in range(4):
            for i, blk in enumerate(a):
                src[l][0, blk] = keys[l][0, :, i * bs:(i + 1) * bs].transpose(0, 1)
                src[l][1, blk] = vals[l][0, :, i * bs:(i + 1) * bs].transpose(0, 1)
        torch.cuda.synchronize()
    ns = kvloft.Namespace(model="tiny-llama-gpu", dtype="float16", num_layers=4, num_kv_heads=4, head_size=64,
                          block_size=bs, layout="nhd")
    hashes = [os.urandom(32) for _ in a]
    saver, loader = kvloft.Client(sock, timeout=30), kvloft.Client(sock, timeout=30)
    for c, t, rank_inst in ((saver, src, "model-a"), (loader, dst, "model-b")):
        layers, ipc, uuid = cuda_layers(t, nblk)
        c.register_instance(rank_inst, ns)
        c.register_memory(0, layers, device="cuda:0", gpu_uuid=uuid, ipc=ipc)
    done = saver.save(list(zip(hashes, a)))
    # Another connection can look up before the owners have sealed the save (decision 55: a
    # miss, never wrong bytes); a real scheduler recomputes, the test asks again.
    deadline = time.monotonic() + 2.0
    hit = loader.lookup(hashes)
    while hit.hits < len(hashes) and time.monotonic() < deadline:
        loader.release(hit.lease)
        time.sleep(0.001)
        hit = loader.lookup(hashes)
    loader.load(hit.lease, b[:hit.hits])
    with torch.no_grad():
        rebuilt = DynamicCache()
        for l in range(4):
            k = torch.cat([dst[l][0, blk] for blk in b]).transpose(0, 1).unsqueeze(0)
            v = torch.cat([dst[l][1, blk] for blk in b]).transpose(0, 1).unsqueeze(0)
            rebuilt.update(k.contiguous(), v.contiguous(), l)
        got = model(ids[:, seq:], past_key_values=rebuilt, use_cache=True).logits
    equal = bool(torch.equal(got, ref))
    result = {"saved": done["saved"], "hits": hit.hits, "blocks": len(a), "logits_equal": equal,
              "max_abs_diff": float((got.float() - ref.float()).abs().max())}
    print(f"model: saved {done['saved']} blocks, {hit.hits} hits, next-step logits identical: {equal}", flush=True)
    return result


def schema_report(model: dict, cases: list) -> dict:
    """The run as a bench report (docs/src/bench-schema.json): the model test is one case."""
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown")
    model_case = {"name": "model_logits", "params": {"model": "random Llama, 4 layers, fp16, 16-token blocks",
                                                     **model}, "samples": 1}
    return {
        "suite": "gpu-server",
        "machine": {"cpu": cpu, "cores": os.cpu_count() or 0, "numa_nodes": 1,
                    "gpus": [torch.cuda.get_device_name(0)], "kernel": platform.release(), "hostname": platform.node()},
        "command": " ".join(sys.argv),
        "git_rev": os.environ.get("KVLOFT_GIT_REV") or "unknown",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cases": [model_case, *cases],
    }


def ordering_test(sock: str) -> dict:
    """A save ordered by an interprocess event: the blocks are written on a side stream behind a
    long GPU sleep and the save is sent at once, without synchronizing; the copy must wait."""
    nb, bb = 64, 64 << 10
    t = torch.zeros((nb, bb), dtype=torch.uint8, device="cuda")
    expected = torch.randint(0, 256, (8, bb), dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    layers, ipc, uuid = cuda_layers([t], nb)
    c = kvloft.Client(sock, timeout=30)
    c.register_instance("ordering", kvloft.Namespace(model="ordering", dtype="uint8", num_layers=1, num_kv_heads=1,
                                                     head_size=bb, block_size=1, layout="hnd"))
    c.register_memory(0, layers, device="cuda:0", gpu_uuid=uuid, ipc=ipc)
    results = {}
    for mode in ("after_event", "no_event"):
        a = torch.arange(8, device="cuda") + (0 if mode == "after_event" else 8)
        b = torch.arange(8, device="cuda") + 32 + (0 if mode == "after_event" else 8)
        side = torch.cuda.Stream()
        ev = torch.cuda.Event(interprocess=True)
        with torch.cuda.stream(side):
            torch.cuda._sleep(1_000_000_000)  # about half a second of GPU time
            t[a] = expected
            ev.record(side)
        hashes = [os.urandom(32) for _ in range(8)]
        handle = bytes(ev.ipc_handle()) if mode == "after_event" else None
        c.save(list(zip(hashes, a.tolist())), after_event=handle)
        side.synchronize()
        hit = c.lookup(hashes)
        c.load(hit.lease, b.tolist())
        results[mode] = bool(torch.equal(t[b], expected))
    print(f"ordering: save after an interprocess event read the new bytes: {results['after_event']}; "
          f"without it: {results['no_event']}", flush=True)
    c.close()
    return {"event_len": len(bytes(torch.cuda.Event(interprocess=True).ipc_handle())), "with_event_correct":
            results["after_event"], "without_event_correct": results["no_event"]}


def layerwise_test(sock: str, layout: str = "nhd", batch: int = 256, block_bytes: int = 16 << 10,
                   sleep_cycles: int = 20_000_000) -> dict:
    """Layer-wise save and load (32 layers of ``layout``), each checked byte for byte.

    The worker's blocks A and the blocks B loaded into are shuffled block ids, so the copies'
    block-to-slot mapping is checked, not only contiguous runs.

    Save: the worker writes layer i of blocks A on a side stream behind a GPU sleep per layer and
    records interprocess event i after it; the save is sent at once with the per-layer events
    (no CPU synchronization), so its copy of layer i must wait for event i. Load: into poisoned
    blocks B with ``layerwise``; once ``wait_layers`` returns, a fresh stream waits on event i
    and snapshots layer i of B, for every layer, without any CPU synchronization with kvloft;
    every snapshot must equal A's bytes. Reports the time from the load request to the events
    (when layer 0 may be read) and to ``load_done``."""
    nb = 2 * batch
    tensors, _owner = make_cache(layout, nb, block_bytes)
    for t in tensors:
        t.zero_()
    gen = torch.Generator(device="cuda").manual_seed(11)
    shape = (2, batch, block_bytes // 2) if layout == "nhd" else (batch, block_bytes)
    expected = [torch.randint(0, 256, shape, dtype=torch.uint8, device="cuda", generator=gen) for _ in range(LAYERS)]
    torch.cuda.synchronize()
    layers, ipc, uuid = cuda_layers(tensors, nb)
    c = kvloft.Client(sock, timeout=30)
    c.register_instance(f"layerwise-{layout}-{block_bytes}", namespace(layout, block_bytes))
    c.register_memory(0, layers, device="cuda:0", gpu_uuid=uuid, ipc=ipc)
    a = torch.randperm(batch, device="cuda", generator=gen)
    b = torch.randperm(batch, device="cuda", generator=gen) + batch

    def put(t: torch.Tensor, ids: torch.Tensor, value) -> None:
        if layout == "nhd":
            t[:, ids] = value
        else:
            t[ids] = value
    side = torch.cuda.Stream()
    events = [torch.cuda.Event(interprocess=True) for _ in range(LAYERS)]
    with torch.cuda.stream(side):
        for i, t in enumerate(tensors):
            torch.cuda._sleep(sleep_cycles)  # 20M cycles: about 10 ms of GPU time per layer
            put(t, a, expected[i])
            events[i].record(side)
    hashes = [os.urandom(32) for _ in range(batch)]
    t0 = time.perf_counter()
    done = c.save(list(zip(hashes, a.tolist())), layer_events=[bytes(e.ipc_handle()) for e in events])
    save_s = time.perf_counter() - t0
    side.synchronize()
    if done["saved"] != batch:
        raise SystemExit(f"layerwise save: {done}")
    for t in tensors:
        put(t, b, 0xA5)
    torch.cuda.synchronize()
    results = {"save_ok": True, "save_ms": save_s * 1e3}
    opened: dict[bytes, torch.cuda.Event] = {}
    load_ok, to_layers, to_done = [], [], []
    for _ in range(3):
        hit = c.lookup(hashes)
        for t in tensors:
            put(t, b, 0xA5)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        rid = c.load(hit.lease, b.tolist(), wait=False, layerwise=True)
        handles = c.wait_layers(rid)
        to_layers.append(time.perf_counter() - t0)
        reader = torch.cuda.Stream()
        snaps = []
        with torch.cuda.stream(reader):
            for i, h in enumerate(handles):
                if h not in opened:
                    opened[h] = torch.cuda.Event.from_ipc_handle(torch.cuda.current_device(), h)
                reader.wait_event(opened[h])
                snaps.append(block_view(tensors[i], layout, b).clone())
        reader.synchronize()
        c.wait_event(rid)
        to_done.append(time.perf_counter() - t0)
        load_ok.append(len(handles) == LAYERS and all(torch.equal(s, e) for s, e in zip(snaps, expected)))
    results.update({
        "layers": LAYERS, "batch": batch, "block_bytes": block_bytes,
        "load_ok": all(load_ok), "load_to_events_ms": statistics.median(to_layers) * 1e3,
        "load_to_done_ms": statistics.median(to_done) * 1e3,
    })
    # Save reads the bytes written behind each layer's event: load them back plainly and compare.
    for t in tensors:
        put(t, b, 0xA5)
    hit = c.lookup(hashes)
    c.load(hit.lease, b.tolist())
    results["save_ok"] = all(torch.equal(block_view(t, layout, b), e) for t, e in zip(tensors, expected))
    results["layout"] = layout
    print(f"layerwise {layout}: save behind per-layer events read the new bytes: {results['save_ok']}; layer-wise load "
          f"snapshots equal: {results['load_ok']}; events after {results['load_to_events_ms']:.2f} ms, load_done "
          f"after {results['load_to_done_ms']:.2f} ms ({batch} blocks x {LAYERS} layers x {block_bytes >> 10} KiB)",
          flush=True)
    c.close()
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--block-kib", default="16,64,256", help="block sizes (KiB per layer), comma-separated")
    ap.add_argument("--batches", default="64,1024,4096", help="batch sizes, comma-separated")
    ap.add_argument("--pool", default="8GiB")
    ap.add_argument("--no-model", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kvl-gpu-"))
    server, sock = start_server(args.bin, work, args.pool)
    cases: list = []
    try:
        model = {"skipped": "--no-model"} if args.no_model else model_test(sock)
        model["ordering"] = ordering_test(sock)
        # Every layout at 16 KiB; 256 KiB blocks (a 4 MiB layer per 16 blocks) for two of them.
        lw = [layerwise_test(sock, layout) for layout in ("nhd", "hnd", "mla", "cross_layer")]
        lw += [layerwise_test(sock, layout, batch=64, block_bytes=256 << 10, sleep_cycles=2_000_000)
               for layout in ("nhd", "cross_layer")]
        model["layerwise"] = lw
        if not all(r["save_ok"] and r["load_ok"] for r in lw):
            raise SystemExit(f"layer-wise copies differ: {[(r['layout'], r['block_bytes']) for r in lw if not (r['save_ok'] and r['load_ok'])]}")
        blocks = [int(k) << 10 for k in args.block_kib.split(",")]
        batches = [int(b) for b in args.batches.split(",")]
        if args.quick:
            blocks, batches = blocks[:1], batches[:1]
        roundtrip(sock, cases, blocks, batches, args.reps)
    finally:
        server.terminate()
        server.wait(timeout=30)
        (out / "server.log").write_bytes((work / "server.log").read_bytes())
    report = schema_report(model, cases)
    (out / "gpu-server.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
