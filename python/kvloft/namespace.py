"""The namespace of an inference instance: everything that changes the bytes of a block.

Mirrors ``NamespaceSpec`` in ``engine/src/protocol.rs``. Two engines whose namespaces are
equal share blocks; any difference (a different model revision, dtype, block size, TP
size...) makes every lookup a miss. The server derives a stable ``namespace_id`` from it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

#: Attention layouts the protocol names (``NamespaceSpec.layout``).
LAYOUTS = ("nhd", "hnd", "mla", "cross_layer")

_U32_MAX = (1 << 32) - 1


def check_u32(name: str, value: object, minimum: int = 0) -> int:
    """Return ``value`` as an int after checking it is an integer in ``minimum..=u32::MAX``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, not {type(value).__name__} {value!r}")
    if not minimum <= value <= _U32_MAX:
        raise ValueError(f"{name} must be in {minimum}..{_U32_MAX}, got {value}")
    return int(value)


@dataclass(frozen=True, kw_only=True)
class Namespace:
    """Everything that changes the bytes of a block (``NamespaceSpec`` on the wire).

    Fields are keyword-only; the ones every engine must state have no default::

        Namespace(model="meta-llama/Llama-3.1-8B@5206a32", dtype="bfloat16",
                  num_layers=32, num_kv_heads=8, head_size=128, block_size=16)
    """

    #: Model identity (name or path, plus revision where known).
    model: str
    #: Model dtype (``bfloat16``).
    dtype: str
    #: KV-cache dtype (``auto``, ``fp8_e4m3``).
    kv_dtype: str = "auto"
    #: Attention layers whose KV is stored.
    num_layers: int
    #: KV heads per layer (over all TP ranks).
    num_kv_heads: int
    #: Head size.
    head_size: int
    #: Tokens per block.
    block_size: int
    #: Attention layout: one of :data:`LAYOUTS` (``nhd``, ``hnd``, ``mla``, ``cross_layer``).
    layout: str = "nhd"
    #: Tensor-parallel size.
    tp_size: int = 1
    #: Pipeline-parallel size.
    pp_size: int = 1
    #: Hybrid-attention group id (0 for plain models).
    group: int = 0
    #: Anything else that changes a block's bytes and the other fields do not name (the
    #: engine's physical cache layout, attention backend, block shape); ``""`` for none.
    variant: str = ""

    def __post_init__(self) -> None:
        for name in ("model", "dtype", "kv_dtype", "layout"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"namespace {name} must be a non-empty string, got {value!r}")
        for name in ("num_layers", "num_kv_heads", "head_size", "block_size", "tp_size", "pp_size"):
            check_u32(f"namespace {name}", getattr(self, name), minimum=1)
        check_u32("namespace group", self.group)
        if not isinstance(self.variant, str):
            raise ValueError(f"namespace variant must be a string, got {self.variant!r}")
        if len(self.variant.encode()) > 256:
            raise ValueError(f"namespace variant is {len(self.variant.encode())} bytes long; at most 256 are allowed")
        if self.layout not in LAYOUTS:
            raise ValueError(f"namespace layout must be one of {', '.join(LAYOUTS)}; got {self.layout!r}")

    @property
    def ranks(self) -> int:
        """Workers per instance, and slices per block: ``tp_size * pp_size``."""
        return self.tp_size * self.pp_size

    def to_wire(self) -> dict[str, Any]:
        """The ``NamespaceSpec`` map sent in ``register_instance``."""
        return asdict(self)

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> Namespace:
        """Build a namespace from a ``NamespaceSpec`` map; unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in body.items() if k in names})
