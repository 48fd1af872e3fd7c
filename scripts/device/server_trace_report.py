#!/usr/bin/env python3
"""Medians of the per-request lines a server writes with KVLOFT_TRACE_GPU=1 (shard/src/trace.rs).

    python3 server_trace_report.py SERVER_LOG [...]

For each log, one line per (operation, blocks): how many requests, then the median microseconds
from the request's frame to each mark (spawned, slots, pushed, queued, seen, answered).
"""
import re, sys, statistics, collections
for path in sys.argv[1:]:
    g = collections.defaultdict(lambda: collections.defaultdict(list))
    for line in open(path):
        m = re.match(r"kvloft: trace shard \d+ (\w+) (\d+) blocks \(us from the request's frame\): (.*)", line)
        if not m: continue
        f = m.group(3).split()
        for k, v in zip(f[::2], f[1::2]):
            g[(m.group(1), int(m.group(2)))][k].append(float(v))
    print("#", path)
    for key, marks in sorted(g.items()):
        print(key[0], key[1], len(marks["answered"]), " ".join(f"{k} {statistics.median(v):.1f}" for k, v in marks.items()))
