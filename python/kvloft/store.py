"""Message types and client-side checks of the store operations (register, lookup, save,
load, release), mirroring ``engine/src/protocol.rs``.

The checks raise :class:`ValueError` (or :class:`TypeError` for a value of the wrong kind)
before anything is sent, so a bad batch never costs a round trip or a server error.
"""

from __future__ import annotations

import struct

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .namespace import check_u32
from .protocol import MAX_BATCH_BLOCKS, MAX_HASH_BYTES, MAX_LAYERS

_U64_MAX = (1 << 64) - 1

#: Block hashes as accepted by the client: ``bytes`` (vLLM's ``BlockHash``), or any bytes-like
#: object, which is copied to ``bytes``.
BlockHash = bytes


def check_u64(name: str, value: object, minimum: int = 0) -> int:
    """Return ``value`` as an int after checking it is an integer in ``minimum..=u64::MAX``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, not {type(value).__name__} {value!r}")
    if not minimum <= value <= _U64_MAX:
        raise ValueError(f"{name} must be in {minimum}..{_U64_MAX}, got {value}")
    return int(value)


@dataclass(frozen=True)
class LayerMemory:
    """Where one layer's KV blocks live in the worker's memory (``LayerMemory`` on the wire).

    Segment ``s`` of engine block ``b`` starts at ``base + b * block_stride + s *
    segment_stride`` and is ``segment_bytes`` long. vLLM's CPU KV cache of one layer, a
    tensor ``[2, num_blocks, block_bytes]``, is ``LayerMemory(base=addr, num_blocks=n,
    block_stride=block_bytes, segments=2, segment_stride=n * block_bytes,
    segment_bytes=block_bytes)``.
    """

    #: Address of block 0, segment 0, in the worker's address space.
    base: int
    #: Engine blocks in this layer's cache.
    num_blocks: int
    #: Bytes from one block to the next.
    block_stride: int
    #: Segments per block: 2 for split K/V, 1 for MLA or cross-layer blocks.
    segments: int
    #: Bytes from one segment to the next (ignored with one segment).
    segment_stride: int
    #: Bytes of one segment of one block.
    segment_bytes: int

    def __post_init__(self) -> None:
        check_u64("LayerMemory.base", self.base)
        check_u32("LayerMemory.num_blocks", self.num_blocks, minimum=1)
        check_u64("LayerMemory.block_stride", self.block_stride)
        check_u32("LayerMemory.segments", self.segments, minimum=1)
        check_u64("LayerMemory.segment_stride", self.segment_stride)
        check_u64("LayerMemory.segment_bytes", self.segment_bytes, minimum=1)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of this layer over all its segments."""
        return self.segments * self.segment_bytes

    def to_wire(self) -> dict[str, int]:
        """The ``LayerMemory`` map sent in ``register_memory``."""
        return asdict(self)


@dataclass(frozen=True)
class LookupResult:
    """Answer to ``lookup``."""

    #: Leading hashes whose every slice is stored (the prefix hit count).
    hits: int
    #: Pins those hits until every rank loaded them, :meth:`kvloft.Client.release`, or expiry;
    #: 0 when ``hits`` is 0.
    lease: int
    #: Seconds the lease stays valid.
    lease_ttl_s: int


def layers_to_wire(layers: Sequence[LayerMemory]) -> list[dict[str, int]]:
    """Check a ``register_memory`` layer list and return its wire form."""
    if isinstance(layers, LayerMemory):
        raise TypeError("layers must be a list of LayerMemory, one per layer, not a single LayerMemory")
    layers = list(layers)
    if not layers:
        raise ValueError("register_memory needs at least one layer")
    if len(layers) > MAX_LAYERS:
        raise ValueError(f"register_memory describes {len(layers)} layers, more than the limit of {MAX_LAYERS}")
    for i, layer in enumerate(layers):
        if not isinstance(layer, LayerMemory):
            raise TypeError(f"layers[{i}] must be a kvloft.LayerMemory, not {type(layer).__name__}")
    return [layer.to_wire() for layer in layers]


def check_batch(what: str, n: int) -> None:
    """Refuse a batch of more than :data:`MAX_BATCH_BLOCKS` entries."""
    if n > MAX_BATCH_BLOCKS:
        raise ValueError(
            f"{what} carries {n} blocks, more than the limit of {MAX_BATCH_BLOCKS} per request; "
            f"split it into batches of at most {MAX_BATCH_BLOCKS}"
        )


def check_hash(value: object, where: str = "block hash") -> bytes:
    """Return one block hash as ``bytes`` after checking it is 1 to 32 bytes long."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    else:
        raise TypeError(
            f"{where} must be bytes (vLLM's BlockHash), not {type(value).__name__}; "
            f"encode it first, e.g. hashlib.sha256(...).digest()"
        )
    if not 1 <= len(data) <= MAX_HASH_BYTES:
        raise ValueError(f"{where} must be 1 to {MAX_HASH_BYTES} bytes long, got {len(data)} bytes")
    return data


def hashes_to_wire(hashes: Iterable[object]) -> list[bytes]:
    """Check the hashes of a ``lookup`` and return them as a list of ``bytes``."""
    if isinstance(hashes, (bytes, bytearray, memoryview, str)):
        raise TypeError("lookup takes a list of block hashes, not a single hash")
    out = [check_hash(h, f"hashes[{i}]") for i, h in enumerate(hashes)]
    check_batch("lookup", len(out))
    return out


def save_blocks_to_wire(blocks: Iterable[tuple[object, int]]) -> list[dict[str, Any]]:
    """Check the ``(hash, block_id)`` pairs of a ``save`` and return the ``SaveBlock`` maps."""
    out: list[dict[str, Any]] = []
    for i, item in enumerate(blocks):
        try:
            block_hash, block_id = item  # type: ignore[misc]
        except (TypeError, ValueError):
            raise TypeError(f"blocks[{i}] must be a (hash, block_id) pair, not {item!r}") from None
        out.append(
            {
                "hash": check_hash(block_hash, f"blocks[{i}] hash"),
                "block_id": check_u32(f"blocks[{i}] block_id", block_id),
            }
        )
    check_batch("save", len(out))
    return out


def pack_save(blocks: Iterable[tuple[object, int]]) -> dict[str, Any] | None:
    """The ``packed`` form of a ``save`` (``{"hash_bytes", "hashes", "block_ids"}``) when every
    hash is ``bytes`` of one valid length and every block id a u32; ``None`` otherwise (the
    caller then sends the checked list form, whose errors name the bad entry)."""
    blocks = blocks if isinstance(blocks, list) else list(blocks)
    if not blocks or len(blocks) > MAX_BATCH_BLOCKS or set(map(type, blocks)) != {tuple}:
        return None
    if set(map(len, blocks)) != {2}:
        return None
    hashes, ids = zip(*blocks)
    if set(map(type, hashes)) != {bytes} or set(map(type, ids)) != {int}:
        return None  # other types (bytearray, bool, ...) take the checked path
    lengths = set(map(len, hashes))
    n = lengths.pop()
    if lengths or not 1 <= n <= MAX_HASH_BYTES:
        return None
    try:
        packed_ids = struct.pack(f"<{len(ids)}I", *ids)
    except struct.error:
        return None
    return {"hash_bytes": n, "hashes": b"".join(hashes), "block_ids": packed_ids}


def pack_block_ids(block_ids: Iterable[int]) -> bytes:
    """The ``block_ids_packed`` form of a ``load``: little-endian u32s (checked)."""
    ids = block_ids if isinstance(block_ids, list) else list(block_ids)
    try:
        if all(type(i) is int for i in ids):
            packed = struct.pack(f"<{len(ids)}I", *ids)
            check_batch("load", len(ids))
            return packed
    except struct.error:
        pass
    return struct.pack(f"<{len(ids)}I", *block_ids_to_wire(ids))


def block_ids_to_wire(block_ids: Iterable[int]) -> list[int]:
    """Check the destination block ids of a ``load``."""
    out = [check_u32(f"block_ids[{i}]", b) for i, b in enumerate(block_ids)]
    check_batch("load", len(out))
    return out


def lease_to_wire(lease: object) -> int:
    """Check a lease id (a u64; ``LookupResult`` objects are accepted for convenience)."""
    if isinstance(lease, LookupResult):
        lease = lease.lease
    return check_u64("lease", lease)
