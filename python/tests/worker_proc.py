"""A stand-alone inference worker for the cross-process store test.

    python worker_proc.py save --socket PATH --instance ID --seed SEED --count N
    python worker_proc.py load --socket PATH --instance ID --seed SEED --count N

``save`` fills N blocks of a fresh CPU KV cache with bytes derived from their block hashes and
saves them; ``load`` looks the same hashes up, loads them into other (poisoned) blocks and
compares every byte. Each process regenerates what it expects from ``--seed`` alone. The last
line of stdout is a JSON report; the exit status is 0 only when everything checked out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from support import chain_hashes, make_namespace, new_cache  # noqa: E402

import kvloft  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["save", "load"])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--instance", required=True)
    parser.add_argument("--seed", required=True)
    parser.add_argument("--count", type=int, required=True)
    args = parser.parse_args()

    hashes = chain_hashes(args.seed, args.count)
    report: dict[str, object] = {"mode": args.mode, "pid": os.getpid()}
    ok = False
    with kvloft.Client(args.socket, client_name=f"worker-proc-{args.mode}") as client:
        client.register_instance(args.instance, make_namespace())
        # Loads go to blocks count..2*count-1, so a load that wrote block i for hash i would show.
        with new_cache(2 * args.count) as cache:
            reply = client.register_memory(0, cache.layers())
            report["slice_bytes"] = reply.get("slice_bytes")
            if args.mode == "save":
                for i, h in enumerate(hashes):
                    cache.fill_block(i, h)
                done = client.save([(h, i) for i, h in enumerate(hashes)])
                report["save_done"] = done
                ok = done["saved"] + done["present"] == args.count and done["failed"] == 0
            else:
                dst = list(range(args.count, 2 * args.count))
                cache.poison(dst)
                hit = client.lookup(hashes)
                report["hits"] = hit.hits
                if hit.hits == args.count:
                    done = client.load(hit.lease, dst)
                    report["load_done"] = done
                    bad = [i for i, h in enumerate(hashes) if cache.read_block(dst[i]) != cache.expected(h)]
                    report["mismatched"] = bad[:20]
                    report["mismatched_count"] = len(bad)
                    ok = not bad
    report["ok"] = ok
    print(json.dumps(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
