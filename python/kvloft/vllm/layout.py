"""How a vLLM KV-cache tensor maps onto kvloft's per-layer memory description.

kvloft addresses engine block ``b`` of a layer as ``segments`` runs of ``segment_bytes`` at
``base + b * block_stride + s * segment_stride`` (see ``LayerMemory``). :func:`describe` finds
that description from the tensor's shape and strides, so any layout whose blocks are such runs
works: block-outermost caches (vLLM's CPU cache ``[num_blocks, heads, block, 2 * head_size]``,
FlashInfer's HND ``[num_blocks, 2, heads, block, head_size]``, MLA ``[num_blocks, block, dim]``),
K/V-first caches (``[2, num_blocks, ...]``: two segments) and layer-interleaved (cross-layer)
views, whose block stride spans every layer. Attention kernels may split one engine block into
several kernel blocks; those are folded back when they are adjacent. A layout that cannot be
described this way is refused with the reason, and the connector then stays off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..store import LayerMemory


class LayoutError(ValueError):
    """The KV-cache tensor's layout cannot be described as kvloft block segments."""


@dataclass(frozen=True)
class TensorGeometry:
    """What :func:`describe` needs of a tensor (``torch.Tensor`` has all of it)."""

    shape: tuple[int, ...]
    #: Strides in elements.
    stride: tuple[int, ...]
    element_size: int
    data_ptr: int

    @classmethod
    def of(cls, tensor) -> TensorGeometry:
        """The geometry of a ``torch.Tensor``."""
        return cls(tuple(tensor.shape), tuple(tensor.stride()), tensor.element_size(), tensor.data_ptr())


def _contiguous_bytes(shape: Sequence[int], stride: Sequence[int], elem: int) -> int | None:
    """Bytes of a dense C-order region with these sizes and strides, or None if it is not one."""
    expected = 1
    for size, st in zip(reversed(shape), reversed(stride)):
        if size != 1 and st != expected:
            return None
        expected *= size
    return expected * elem


def describe(g: TensorGeometry, num_blocks: int) -> LayerMemory:
    """The :class:`LayerMemory` of one layer's cache holding ``num_blocks`` engine blocks.

    Raises :class:`LayoutError` when no axis holds the blocks or a block's bytes are not one or
    two dense runs.
    """
    if num_blocks < 1:
        raise LayoutError(f"num_blocks must be at least 1, got {num_blocks}")
    shape, stride, elem = g.shape, g.stride, g.element_size
    candidates: list[tuple[int, int | None]] = []  # (block axis, K/V axis)
    for axis, size in enumerate(shape[:2]):
        if size % num_blocks == 0 and size >= num_blocks:
            kv_axis = 0 if axis == 1 and shape[0] == 2 else None
            if axis == 1 and kv_axis is None:
                continue
            candidates.append((axis, kv_axis))
    if not candidates:
        raise LayoutError(
            f"no leading axis of shape {list(shape)} holds the {num_blocks} blocks "
            "(expected [num_blocks, ...] or [2, num_blocks, ...])"
        )
    axis, kv_axis = candidates[0]
    per_block = shape[axis] // num_blocks  # kernel blocks per engine block
    inner = _contiguous_bytes(shape[axis + 1 :], stride[axis + 1 :], elem)
    if inner is None:
        raise LayoutError(f"a block of the cache (shape {list(shape)}, strides {list(stride)}) is not one dense run")
    block_stride = stride[axis] * elem
    if per_block > 1:
        if block_stride != inner:
            raise LayoutError(
                f"the {per_block} kernel blocks of an engine block are not adjacent "
                f"(stride {block_stride} bytes, block {inner} bytes)"
            )
        inner *= per_block
        block_stride *= per_block
    if kv_axis is None:
        return LayerMemory(base=g.data_ptr, num_blocks=num_blocks, block_stride=block_stride, segments=1,
                           segment_stride=0, segment_bytes=inner)
    return LayerMemory(base=g.data_ptr, num_blocks=num_blocks, block_stride=block_stride, segments=2,
                       segment_stride=stride[kv_axis] * elem, segment_bytes=inner)


def block_shape(g: TensorGeometry, num_blocks: int) -> str:
    """The shape of one block, for the namespace variant (``"2x[16,8,128]"`` for K/V-first)."""
    axis = 0 if g.shape[0] % num_blocks == 0 and g.shape[0] >= num_blocks else 1
    inner = list(g.shape[axis + 1 :])
    per_block = g.shape[axis] // num_blocks
    text = ",".join(str(x) for x in inner)
    prefix = "2x" if axis == 1 else ""
    suffix = f"x{per_block}" if per_block > 1 else ""
    return f"{prefix}[{text}]{suffix}"
