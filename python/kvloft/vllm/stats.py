"""Connector-side figures: lookups and hits, load and save latency, failures.

:class:`ConnectorCounters` collects them in the scheduler and in each worker; vLLM takes them
every step through ``get_kv_connector_stats`` (as :class:`KvloftStats`, in
:mod:`kvloft.vllm.connector`), adds the workers' together and logs or exports the sums.
"""

from __future__ import annotations

import statistics
from typing import Any

#: Latency samples kept per interval for each operation; older ones are dropped (the counts
#: stay exact).
MAX_SAMPLES = 1024

#: Counters summed when stats are aggregated.
COUNTS = (
    "lookups",
    "lookup_blocks",
    "hit_blocks",
    "hit_tokens",
    "loads",
    "loaded_blocks",
    "load_failures",
    "saves",
    "saved_blocks",
    "present_blocks",
    "save_failed_blocks",
    "errors",
)
#: Latency sample lists (seconds), concatenated when stats are aggregated.
SAMPLES = ("lookup_s", "load_s", "save_s")


def empty() -> dict[str, Any]:
    """A fresh stats payload: every count 0, every sample list empty."""
    data: dict[str, Any] = {k: 0 for k in COUNTS}
    data.update({k: [] for k in SAMPLES})
    return data


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``a`` and ``b`` added together (a new dict); missing keys count as empty."""
    out = empty()
    for k in COUNTS:
        out[k] = int(a.get(k, 0)) + int(b.get(k, 0))
    for k in SAMPLES:
        out[k] = (list(a.get(k, ())) + list(b.get(k, ())))[-MAX_SAMPLES:]
    return out


def summary(data: dict[str, Any]) -> dict[str, int | float]:
    """One interval's figures for vLLM's log line: counts, hit rate, median latencies (ms)."""
    out: dict[str, int | float] = {k: int(data.get(k, 0)) for k in COUNTS}
    looked = out["lookup_blocks"]
    out["hit_rate"] = round(out["hit_blocks"] / looked, 4) if looked else 0.0
    for k in SAMPLES:
        samples = data.get(k) or []
        name = k.removesuffix("_s")
        out[f"{name}_p50_ms"] = round(statistics.median(samples) * 1e3, 3) if samples else 0.0
    return out


def is_empty(data: dict[str, Any]) -> bool:
    """Whether nothing was counted."""
    return not any(data.get(k) for k in COUNTS)


class ConnectorCounters:
    """What one connector process counted since the last :meth:`take`."""

    def __init__(self) -> None:
        self._data = empty()

    def lookup(self, blocks: int, hits: int, seconds: float, block_size: int = 0) -> None:
        """One lookup of ``blocks`` block hashes that found ``hits`` leading ones
        (``block_size`` tokens each)."""
        d = self._data
        d["lookups"] += 1
        d["lookup_blocks"] += blocks
        d["hit_blocks"] += hits
        d["hit_tokens"] += hits * block_size
        _sample(d["lookup_s"], seconds)

    def load(self, blocks: int, seconds: float, ok: bool) -> None:
        """One load of ``blocks`` blocks that completed (``ok``) or failed."""
        d = self._data
        d["loads"] += 1
        if ok:
            d["loaded_blocks"] += blocks
            _sample(d["load_s"], seconds)
        else:
            d["load_failures"] += 1

    def save(self, saved: int, present: int, failed: int, seconds: float) -> None:
        """One save request's completion."""
        d = self._data
        d["saves"] += 1
        d["saved_blocks"] += saved
        d["present_blocks"] += present
        d["save_failed_blocks"] += failed
        _sample(d["save_s"], seconds)

    def failure(self, what: str) -> None:
        """A request to kvloft that failed (kvloft unreachable or refused it)."""
        self._data["errors"] += 1

    def peek(self) -> dict[str, Any]:
        """The figures so far (a copy)."""
        return merge(self._data, {})

    def take(self) -> dict[str, Any] | None:
        """The figures since the last call, then starts over; ``None`` when nothing happened."""
        if is_empty(self._data):
            return None
        data, self._data = self._data, empty()
        return data


def _sample(samples: list[float], seconds: float) -> None:
    if len(samples) >= MAX_SAMPLES:
        del samples[0]
    samples.append(seconds)
