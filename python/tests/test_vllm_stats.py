"""The connector's figures (``kvloft.vllm.stats``): counters per process, merged over workers,
summarised for vLLM's log line."""

from __future__ import annotations

import pytest

from kvloft.vllm import stats
from kvloft.vllm.stats import COUNTS, MAX_SAMPLES, SAMPLES, ConnectorCounters, empty, is_empty, merge, summary


def test_empty() -> None:
    data = empty()
    assert set(data) == set(COUNTS) | set(SAMPLES)
    assert all(data[k] == 0 for k in COUNTS) and all(data[k] == [] for k in SAMPLES)
    assert is_empty(data)
    assert empty() is not data and empty()["lookup_s"] is not data["lookup_s"]


def test_merge_adds_counts_and_concatenates_samples() -> None:
    a = empty()
    a.update(lookups=2, lookup_blocks=10, hit_blocks=4, errors=1, lookup_s=[0.1, 0.2], load_s=[1.0])
    b = empty()
    b.update(lookups=1, lookup_blocks=5, hit_blocks=5, saves=3, saved_blocks=7, lookup_s=[0.3], save_s=[2.0])
    out = merge(a, b)
    assert (out["lookups"], out["lookup_blocks"], out["hit_blocks"]) == (3, 15, 9)
    assert (out["saves"], out["saved_blocks"], out["errors"]) == (3, 7, 1)
    assert out["lookup_s"] == [0.1, 0.2, 0.3] and out["load_s"] == [1.0] and out["save_s"] == [2.0]
    # New lists: the inputs are untouched.
    assert a["lookup_s"] == [0.1, 0.2] and a["lookups"] == 2 and b["lookup_s"] == [0.3]
    out["lookup_s"].append(9.0)
    assert a["lookup_s"] == [0.1, 0.2]
    assert merge(b, a)["lookups"] == out["lookups"]


def test_merge_with_missing_keys_and_foreign_payloads() -> None:
    out = merge({"lookups": 2, "lookup_s": [0.5]}, {})
    assert out["lookups"] == 2 and out["lookup_s"] == [0.5] and out["saves"] == 0 and out["save_s"] == []
    assert merge({}, {}) == empty()
    # Unknown keys are dropped.
    assert "other" not in merge({"other": 1}, {"other": 2})


def test_merge_keeps_the_newest_samples() -> None:
    a = {"load_s": [float(i) for i in range(MAX_SAMPLES)]}
    b = {"load_s": [-1.0, -2.0]}
    out = merge(a, b)
    assert len(out["load_s"]) == MAX_SAMPLES
    assert out["load_s"][-2:] == [-1.0, -2.0] and out["load_s"][0] == 2.0


def test_summary() -> None:
    data = empty()
    data.update(lookups=4, lookup_blocks=8, hit_blocks=3, loads=2, loaded_blocks=3, load_failures=1,
                lookup_s=[0.001, 0.003, 0.002], load_s=[0.010, 0.020], save_s=[])
    out = summary(data)
    assert {k: out[k] for k in COUNTS} == {**{k: 0 for k in COUNTS}, "lookups": 4, "lookup_blocks": 8,
                                            "hit_blocks": 3, "loads": 2, "loaded_blocks": 3, "load_failures": 1}
    assert out["hit_rate"] == 0.375
    assert out["lookup_p50_ms"] == 2.0
    assert out["load_p50_ms"] == 15.0
    assert out["save_p50_ms"] == 0.0
    assert set(out) == set(COUNTS) | {"hit_rate", "lookup_p50_ms", "load_p50_ms", "save_p50_ms"}


def test_summary_of_nothing() -> None:
    out = summary(empty())
    assert out["hit_rate"] == 0.0 and all(out[k] == 0 for k in COUNTS)
    assert summary({})["hit_rate"] == 0.0
    assert summary({"lookup_blocks": 3, "hit_blocks": 1})["hit_rate"] == pytest.approx(0.3333)


def test_is_empty_looks_at_counts() -> None:
    for key in COUNTS:
        data = empty()
        data[key] = 1
        assert not is_empty(data), key
    assert is_empty({})
    assert is_empty({"lookup_s": [0.1]})  # samples without counts: nothing to report


def test_counters_record_and_take_resets() -> None:
    c = ConnectorCounters()
    assert c.take() is None
    c.lookup(blocks=6, hits=4, seconds=0.002)
    c.lookup(blocks=2, hits=0, seconds=0.004)
    c.load(blocks=4, seconds=0.01, ok=True)
    c.load(blocks=3, seconds=99.0, ok=False)
    c.save(saved=5, present=2, failed=1, seconds=0.03)
    c.failure("lookup")
    peeked = c.peek()
    taken = c.take()
    assert taken == peeked
    assert (taken["lookups"], taken["lookup_blocks"], taken["hit_blocks"]) == (2, 8, 4)
    assert (taken["loads"], taken["loaded_blocks"], taken["load_failures"]) == (2, 4, 1)
    assert (taken["saves"], taken["saved_blocks"], taken["present_blocks"], taken["save_failed_blocks"]) == (1, 5, 2, 1)
    assert taken["errors"] == 1
    assert taken["lookup_s"] == [0.002, 0.004]
    assert taken["load_s"] == [0.01]  # a failed load has no latency sample
    assert taken["save_s"] == [0.03]
    # Taken: the next interval starts from nothing.
    assert c.take() is None
    assert c.peek() == empty()
    c.save(0, 0, 3, 0.0)
    again = c.take()
    assert again is not None and again["saves"] == 1 and again["save_failed_blocks"] == 3
    assert again["lookups"] == 0 and again["lookup_s"] == []
    # What was taken is not changed by later counting.
    assert taken["saves"] == 1


def test_peek_is_a_copy() -> None:
    c = ConnectorCounters()
    c.lookup(1, 1, 0.5)
    peeked = c.peek()
    peeked["lookups"] = 100
    peeked["lookup_s"].append(1.0)
    assert c.peek()["lookups"] == 1 and c.peek()["lookup_s"] == [0.5]


def test_counters_bound_their_samples() -> None:
    c = ConnectorCounters()
    for i in range(MAX_SAMPLES + 10):
        c.lookup(1, 0, float(i))
    data = c.take()
    assert data is not None
    assert data["lookups"] == MAX_SAMPLES + 10  # counts stay exact
    assert len(data["lookup_s"]) == MAX_SAMPLES and data["lookup_s"][0] == 10.0


def test_workers_are_merged_and_summarised() -> None:
    """What vLLM does with the scheduler's and the workers' figures of one interval."""
    scheduler, worker0, worker1 = ConnectorCounters(), ConnectorCounters(), ConnectorCounters()
    scheduler.lookup(10, 5, 0.001)
    worker0.load(5, 0.02, True)
    worker0.save(5, 0, 0, 0.04)
    worker1.load(5, 0.04, True)
    worker1.save(4, 1, 0, 0.02)
    total = stats.empty()
    for c in (scheduler, worker0, worker1):
        data = c.take()
        assert data is not None
        total = merge(total, data)
    out = summary(total)
    assert (out["lookups"], out["hit_rate"], out["loads"], out["loaded_blocks"]) == (1, 0.5, 2, 10)
    assert (out["saves"], out["saved_blocks"], out["present_blocks"]) == (2, 9, 1)
    assert out["load_p50_ms"] == 30.0 and out["save_p50_ms"] == 30.0 and out["lookup_p50_ms"] == 1.0
