"""Command line: ``python -m kvloft stats [--socket PATH] [--json]``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__
from .client import Client
from .config import default_socket_path
from .errors import KvloftError


def format_bytes(n: int) -> str:
    """Render a byte count with a binary unit: ``67108864`` -> ``64 MiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_cpus(cpus: Sequence[int]) -> str:
    """Render a CPU list the way the kernel does: ``[0, 1, 2, 5]`` -> ``0-2,5``."""
    parts: list[str] = []
    ordered = sorted(set(cpus))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts) or "-"


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def render_stats(stats: dict[str, Any]) -> str:
    """Render a ``stats`` reply as a summary and a table with one row per shard."""
    lines = [
        f"server   kvloft {stats.get('server_version', '?')}  pid {stats.get('pid', '?')}  "
        f"uptime {float(stats.get('uptime_s', 0)):.1f} s",
        f"socket   {stats.get('socket', '?')}",
        f"pool     {format_bytes(int(stats.get('pool_bytes', 0)))}",
        "",
    ]
    header = [
        "shard", "cpu", "numa", "gpu", "nic", "ssd", "pool", "allowed cpus", "tid", "conns", "requests",
        "slices", "used", "hits", "misses", "saves", "loads", "evictions", "leases",
    ]
    rows = [
        [
            _cell(s.get("id")),
            _cell(s.get("cpu")),
            _cell(s.get("numa_node")),
            _cell(s.get("gpu")),
            _cell(s.get("nic")),
            _cell(s.get("ssd")),
            format_bytes(int(s.get("pool_bytes", 0))),
            format_cpus(s.get("allowed_cpus", [])),
            _cell(s.get("thread_id")),
            _cell(s.get("connections")),
            _cell(s.get("requests")),
            _cell(s.get("slices")),
            "-" if s.get("used_bytes") is None else format_bytes(int(s["used_bytes"])),
            _cell(s.get("hits")),
            _cell(s.get("misses")),
            _cell(s.get("saves")),
            _cell(s.get("loads")),
            _cell(s.get("evictions")),
            _cell(s.get("leases")),
        ]
        for s in stats.get("shards", [])
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kvloft", description="kvloft Python client")
    parser.add_argument("--version", action="version", version=f"kvloft (python) {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    stats = commands.add_parser("stats", help="print the server's figures")
    stats.add_argument(
        "--socket",
        default=None,
        metavar="PATH",
        help=f"server socket (default: $KVLOFT_SOCKET or /tmp/kvloft.sock; now {default_socket_path()})",
    )
    stats.add_argument("--json", action="store_true", help="print the stats reply as JSON")
    stats.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help="reply timeout (default 5)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        with Client(args.socket, timeout=args.timeout, client_name="kvloft-python-cli") as client:
            stats = client.stats()
    except KvloftError as e:
        print(f"kvloft: error: {e}", file=sys.stderr)
        return 1
    stats.pop("op", None)
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        print(render_stats(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
