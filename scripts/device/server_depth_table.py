#!/usr/bin/env python3
"""Ratios to the contiguous ceiling of a `kvloft bench gpu --server --server-depth N` report, one
row per (layout, blocks): in-process staged, one request at a time, and N in flight.

    python3 server_depth_table.py REPORT.json
"""
import collections, json, sys

rows = collections.defaultdict(dict)
for c in json.load(open(sys.argv[1]))["cases"]:
    p = c["params"]
    kind = p.get("method") if p.get("path") != "server" else f"q{p.get('in_flight', 1)}"
    if kind not in ("staged",) and not kind.startswith("q"):
        continue
    rows[(p["layout"], p["block_bytes"] >> 10, p["batch"])][(p["direction"], kind)] = c.get("ratio")
kinds = sorted({k for r in rows.values() for k in r})
print("layout kib blocks " + " ".join(f"{d}:{k}" for d, k in kinds))
for key in sorted(rows):
    print(*key, *(f"{rows[key].get(k, float('nan')):.2f}" for k in kinds))
