"""Describing torch CUDA tensors for kvloft's ``cuda`` backend (needs torch; imported on use).

The server opens the worker's KV cache by CUDA IPC: for each layer it needs the IPC handle of
the allocation the tensor lives in and the byte offset of the tensor's block 0 in it, plus the
GPU's UUID (which names the GPU whatever ``CUDA_VISIBLE_DEVICES`` says)::

    layers, ipc, uuid = kvloft.gpu.cuda_layers(kv_caches, num_blocks)
    client.register_memory(rank, layers, device="cuda:0", gpu_uuid=uuid, ipc=ipc)
"""

from __future__ import annotations

import uuid as _uuid
from collections.abc import Sequence
from typing import Any

from .store import LayerMemory


def gpu_uuid(device: Any) -> bytes:
    """The 16-byte UUID of a torch CUDA device."""
    import torch

    props = torch.cuda.get_device_properties(device)
    raw = props.uuid
    if isinstance(raw, (bytes, bytearray)) and len(raw) == 16:
        return bytes(raw)
    text = str(raw).removeprefix("GPU-")
    return _uuid.UUID(text).bytes


#: torch's shareable-handle format: a version byte, a kind byte, then the handle
#: (c10/cuda/CUDACachingAllocator.cpp: SHAREABLE_HANDLE_VERSION, ShareableHandleType).
_TORCH_HANDLE_KIND_CUDA_MALLOC = ord("c")
_TORCH_HANDLE_KIND_EXPANDABLE = ord("e")


def cuda_ipc_handle(raw: bytes) -> bytes:
    """The 64-byte ``cudaIpcMemHandle_t`` in what torch's ``_share_cuda_()`` returns: the bare
    handle (older torch) or torch's versioned form (2 bytes, then the handle)."""
    raw = bytes(raw)
    if len(raw) == 64:
        return raw
    if len(raw) == 66 and raw[1] == _TORCH_HANDLE_KIND_CUDA_MALLOC:
        return raw[2:]
    if len(raw) >= 2 and raw[1] == _TORCH_HANDLE_KIND_EXPANDABLE:
        raise ValueError(
            "the KV cache was allocated with expandable segments (PYTORCH_CUDA_ALLOC_CONF="
            "expandable_segments:True), which CUDA IPC handles cannot share; unset it for kvloft"
        )
    raise ValueError(f"unrecognised CUDA IPC handle from torch ({len(raw)} bytes)")


def ipc_region(tensor: Any) -> tuple[bytes, int]:
    """``(handle, offset)`` of a CUDA tensor: the IPC handle of its allocation and the byte
    offset of its first element in it."""
    storage = tensor.untyped_storage()
    shared = storage._share_cuda_()
    handle, storage_offset = shared[1], shared[3]
    return cuda_ipc_handle(handle), int(storage_offset) + tensor.storage_offset() * tensor.element_size()


def cuda_layers(tensors: Sequence[Any], num_blocks: int) -> tuple[list[LayerMemory], list[tuple[bytes, int]], bytes]:
    """The registration of per-layer KV-cache tensors on one GPU: their layouts (``base``
    set to 0: the server uses the IPC offset), IPC regions and the GPU's UUID."""
    from .vllm.layout import TensorGeometry, describe

    layers: list[LayerMemory] = []
    ipc: list[tuple[bytes, int]] = []
    devices = {t.device for t in tensors}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        raise ValueError(f"the KV-cache tensors must all be on one CUDA device, got {sorted(map(str, devices))}")
    for t in tensors:
        g = TensorGeometry.of(t)
        described = describe(g, num_blocks)
        layers.append(LayerMemory(0, described.num_blocks, described.block_stride, described.segments,
                                  described.segment_stride, described.segment_bytes))
        ipc.append(ipc_region(t))
    return layers, ipc, gpu_uuid(next(iter(devices)))
