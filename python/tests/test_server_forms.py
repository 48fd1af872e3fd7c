"""Server answers to GPU registrations on a machine without a GPU, and to the packed save and
load forms (both forms at once, counts that disagree)."""

from __future__ import annotations

import struct

import pytest
from support import make_namespace, new_cache

import kvloft
from kvloft import ServerError

pytestmark = pytest.mark.server

LAYER = {"base": 0, "num_blocks": 8, "block_stride": 4096, "segments": 1, "segment_stride": 0, "segment_bytes": 4096}


def _registered(server: str, name: str) -> kvloft.Client:
    c = kvloft.Client(server)
    c.register_instance(name, make_namespace())
    return c


def _refused(client: kvloft.Client, body: dict, code: str, *words: str) -> str:
    with pytest.raises(ServerError) as e:
        client.request(body.pop("op"), **body)
    assert e.value.code == code, e.value
    for w in words:
        assert w in e.value.message, e.value.message
    return e.value.message


def test_cuda_registration_errors_name_what_is_missing(server: str) -> None:
    with _registered(server, "gpu-1") as c:
        _refused(c, {"op": "register_memory", "rank": 0, "device": "cuda:0", "layers": [LAYER]}, "bad_request",
                 "gpu_uuid")
        body = {"op": "register_memory", "rank": 0, "device": "cuda:0", "layers": [LAYER],
                "gpu_uuid": bytes(16), "ipc": [{"handle": bytes(64), "offset": 0}]}
        msg = _refused(c, body, "bad_request")
        # Without a driver the server says so; with one, the all-zero UUID names no GPU.
        assert "CUDA driver" in msg or "no GPU" in msg, msg
        _refused(c, {"op": "register_memory", "rank": 0, "device": "tpu:0", "layers": [LAYER]}, "bad_request",
                 "tpu:0", "cuda:N")
        # The connection still works.
        assert c.stats()["shards"]


def test_packed_save_and_load_forms_are_checked(server: str) -> None:
    with _registered(server, "forms") as c, new_cache(num_blocks=8) as cache:
        c.register_memory(0, cache.layers())
        h = b"\x07" * 32
        both = {"op": "save", "blocks": [{"hash": h, "block_id": 1}],
                "packed": {"hash_bytes": 32, "hashes": h, "block_ids": struct.pack("<I", 1)}}
        _refused(c, both, "bad_request", "not both")
        uneven = {"op": "save", "packed": {"hash_bytes": 32, "hashes": h * 2, "block_ids": struct.pack("<I", 1)}}
        _refused(c, uneven, "bad_request", "2 packed hashes but 1 block ids")
        ragged = {"op": "save", "packed": {"hash_bytes": 32, "hashes": h, "block_ids": b"\x01\x00"}}
        _refused(c, ragged, "bad_request", "4-byte ids")
        out_of_range = {"op": "save", "packed": {"hash_bytes": 32, "hashes": h, "block_ids": struct.pack("<I", 99)}}
        _refused(c, out_of_range, "block_out_of_range", "block 0")
        _refused(c, {"op": "load", "lease": 5, "block_ids": [1], "block_ids_packed": struct.pack("<I", 1)},
                 "bad_request", "not both")
        _refused(c, {"op": "save", "blocks": [{"hash": h, "block_id": 1}], "after_event": bytes(64)},
                 "bad_request", "after_event needs GPU memory")
        # Layer-wise ordering is for GPU memory; both orderings at once is refused before that.
        _refused(c, {"op": "save", "blocks": [{"hash": h, "block_id": 1}], "layer_events": [bytes(64)]},
                 "bad_request", "layer_events needs GPU memory")
        _refused(c, {"op": "save", "blocks": [{"hash": h, "block_id": 1}], "after_event": bytes(64),
                     "layer_events": [bytes(64)]}, "bad_request", "not both")
        _refused(c, {"op": "load", "lease": 5, "block_ids": [1], "layerwise": True},
                 "bad_request", "layerwise loads need GPU memory")
        # The packed forms work end to end (what the client sends by default).
        cache.fill_block(3, "forms")
        assert c.save([(h, 3)])["saved"] == 1
        hit = c.lookup([h])
        cache.poison([5])
        c.load(hit.lease, [5])
        assert cache.read_block(5) == cache.read_block(3)
