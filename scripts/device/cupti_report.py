#!/usr/bin/env python3
"""Per-request GPU timelines from scripts/device/cupti_trace.c's files.

A request's copy in kvloft starts with the upload of its block table (one cuMemcpyHtoDAsync); an
episode runs from that call to the first cuEventQuery of the same thread that finds the work done
(or a cuEventSynchronize). For each episode this prints, in
microseconds from the upload's start: when the last copy call was queued, when the GPU's first
and last operations ran, how long the copy engines were busy inside their span (the rest are
gaps), when a cuEventQuery first saw the work done, and how long before the upload the
previous episode's work was seen done ("before": the server's path between two requests). Episodes are grouped by direction and
bytes moved; medians per group, then the median episode of each group in full.

    python3 cupti_report.py TRACE.<pid>.txt [...] [--full]
"""

import argparse
import statistics
import sys

NOT_READY = 600  # CUDA_ERROR_NOT_READY
UPLOAD = "cuMemcpyHtoDAsync_v2"
KINDS = {1: "h2d", 2: "d2h", 8: "d2d"}


def read(path):
    api, gpu = [], []
    for line in open(path):
        f = line.split()
        if not f:
            continue
        if f[0] == "api":
            api.append((int(f[1]), int(f[2]), int(f[3]), int(f[4]), f[5], int(f[6])))
        elif f[0] == "copy":
            gpu.append(("copy", int(f[1]), int(f[2]), int(f[3]), int(f[4]), int(f[5]), KINDS.get(int(f[6]), f[6])))
        elif f[0] == "kern":
            gpu.append(("kern", int(f[1]), int(f[2]), int(f[3]), int(f[4]), int(f[5]), " ".join(f[6:])))
    api.sort()
    gpu.sort(key=lambda g: g[1])
    return api, gpu


def union(intervals):
    total, end = 0, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def episodes(api, gpu):
    corr = {a[3]: a for a in api}
    uploads = [a for a in api if a[4] == UPLOAD]
    out = []
    for i, up in enumerate(uploads):
        t0 = up[0]
        t1 = uploads[i + 1][0] if i + 1 < len(uploads) else float("inf")
        calls = []
        for a in api:
            if a[0] < t0 or a[2] != up[2]:
                continue
            if a[0] >= t1:
                break
            calls.append(a)
            if a[4] == "cuEventSynchronize" or (a[4] == "cuEventQuery" and a[5] != NOT_READY):
                break
        ids = {a[3] for a in calls}
        ops = [g for g in gpu if g[4] in ids]
        work = [g for g in ops if not (g[0] == "copy" and g[4] == up[3])]
        if not work:
            continue
        copies = [g for g in work if g[0] == "copy"]
        kerns = [g for g in work if g[0] == "kern"]
        last_gpu = max(g[2] for g in work)
        queued = max((a[1] for a in calls if a[4] not in ("cuEventQuery", "cuEventSynchronize")), default=t0)
        seen = [a for a in calls if a[4] == "cuEventSynchronize" or (a[4] == "cuEventQuery" and a[5] != NOT_READY)]
        direction = copies[0][6] if copies else "?"
        nbytes = sum(g[5] for g in copies)
        span = (min(g[1] for g in copies), max(g[2] for g in copies)) if copies else (t0, t0)
        out.append(
            {
                "key": (direction, nbytes),
                "calls": len(calls),
                "queued": (queued - t0) / 1e3,
                "gpu_first": (min(g[1] for g in work) - t0) / 1e3,
                "copy_first": (span[0] - t0) / 1e3,
                "gpu_last": (last_gpu - t0) / 1e3,
                "copy_span": (span[1] - span[0]) / 1e3,
                "copy_busy": union([(g[1], g[2]) for g in copies]) / 1e3,
                "copies": len(copies),
                "kernels": len(kerns),
                "seen": ((seen[0][1] - t0) / 1e3) if seen else float("nan"),
                "seen_at": seen[0][1] if seen else None,
                "before": float("nan"),
                "t0": t0,
                "ops": ops,
                "api": calls,
                "corr": corr,
            }
        )
    for prev, e in zip(out, out[1:]):
        if prev["seen_at"] is not None:
            e["before"] = (e["t0"] - prev["seen_at"]) / 1e3
    return out


def full(ep):
    t0 = ep["t0"]
    rows = [(a[0], f"  cpu {(a[0]-t0)/1e3:8.1f} {(a[1]-a[0])/1e3:6.1f}  {a[4]}") for a in ep["api"] if a[4] != "cuEventQuery"]
    for g in ep["ops"]:
        what = f"{g[0]} s{g[3]} {g[5] if g[0]=='copy' else 'grid ' + str(g[5])} {g[6][:24] if g[0]=='kern' else g[6]}"
        rows.append((g[1], f"  gpu {(g[1]-t0)/1e3:8.1f} {(g[2]-g[1])/1e3:6.1f}  {what}"))
    return "\n".join(r for _, r in sorted(rows))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--full", action="store_true", help="print each group's median episode in full")
    args = ap.parse_args()
    cols = ["before", "calls", "queued", "gpu_first", "copy_first", "copy_span", "copy_busy", "gpu_last", "seen", "copies", "kernels"]
    for path in args.files:
        api, gpu = read(path)
        eps = episodes(api, gpu)
        groups = {}
        for e in eps:
            groups.setdefault(e["key"], []).append(e)
        print(f"# {path}: {len(api)} driver calls, {len(gpu)} GPU operations, {len(eps)} episodes")
        print("dir  MiB      n  " + " ".join(f"{c:>10}" for c in cols))
        for key, es in sorted(groups.items()):
            med = {c: statistics.median([e[c] for e in es if e[c] == e[c]] or [float("nan")]) for c in cols}
            print(f"{key[0]:<4} {key[1]/2**20:7.1f} {len(es):4}  " + " ".join(f"{med[c]:10.1f}" for c in cols))
        inside = {a[3] for e in eps for a in e["api"]}
        corr = {a[3]: a for a in api}
        lone = {}
        for g in gpu:
            a = corr.get(g[4])
            if g[0] == "copy" and g[4] not in inside and a and g[5] >= 1 << 20:
                lone.setdefault((g[6], g[5]), []).append(((g[2] - g[1]) / 1e3, (g[1] - a[0]) / 1e3, (g[2] - a[0]) / 1e3))
        for key, v in sorted(lone.items()):
            med = [statistics.median(x[i] for x in v) for i in range(3)]
            print(
                f"single copy {key[0]} {key[1]/2**20:.1f} MiB x{len(v)}: GPU {med[0]:.1f} us, "
                f"call to start {med[1]:.1f}, call to end {med[2]:.1f} ({key[1]/med[0]/1e3:.1f} GB/s on the GPU)"
            )
        if args.full:
            for key, es in sorted(groups.items()):
                es = sorted(es, key=lambda e: e["gpu_last"])
                ep = es[len(es) // 2]
                print(f"## {key[0]} {key[1]/2**20:.1f} MiB, median episode (us from the table upload)")
                print(full(ep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
