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


class LayerEvents:
    """A GPU worker's CUDA events for layer-wise transfers (the connector's ``load_mode =
    "sync"`` and its per-layer saves).

    Loads: kvloft records one event per layer behind that layer's copy and announces their IPC
    handles (``load_layers``); :meth:`adopt_load` opens them (each handle once) and
    :meth:`wait_load` makes the current stream wait, on the GPU, for one layer's copy. kvloft
    re-records the connection's events for each layer-wise load, and a load's copy starts only
    after the connection's earlier copies on that GPU ended, so after the step's last
    announcement, event ``i`` covers layer ``i`` of every load of the step.

    Saves: :meth:`record_save` records interprocess event ``i`` on the current stream once
    layer ``i``'s KV is written; :meth:`save_order` then hands the save its per-layer events
    when every layer recorded one this step, and otherwise one event recorded now (after
    everything the stream queued), so a save never reads a layer before it is written.
    """

    #: Opened load events kept across reconnections (each connection has its own handles).
    MAX_OPENED_FACTOR = 4

    def __init__(self, num_layers: int, device: Any = None) -> None:
        import torch

        self._torch = torch
        self.num_layers = num_layers
        self._device = torch.cuda.current_device() if device is None else device
        self._opened: dict[bytes, Any] = {}
        self._load: list[Any] = []
        self._save = [torch.cuda.Event(interprocess=True) for _ in range(num_layers)]
        self._save_handles = [bytes(e.ipc_handle()) for e in self._save]
        self._recorded = [False] * num_layers
        self._step = torch.cuda.Event(interprocess=True)
        self._step_handle = bytes(self._step.ipc_handle())

    # -- loads ----------------------------------------------------------------------

    def clear_load(self) -> None:
        """Forgets the previous step's load events (a step whose loads all failed waits for none)."""
        self._load = []

    def adopt_load(self, handles: Sequence[bytes]) -> None:
        """Takes a layer-wise load's announced event handles, one per layer."""
        if len(handles) != self.num_layers:
            raise ValueError(f"kvloft announced {len(handles)} layer events for {self.num_layers} layers")
        if len(self._opened) > self.MAX_OPENED_FACTOR * self.num_layers:
            self._opened.clear()
        events = []
        for h in handles:
            h = bytes(h)
            event = self._opened.get(h)
            if event is None:
                event = self._opened[h] = self._torch.cuda.Event.from_ipc_handle(self._device, h)
            events.append(event)
        self._load = events

    @property
    def loading(self) -> bool:
        """Whether this step has load events to wait on."""
        return bool(self._load)

    def wait_load(self, layer: int | None) -> None:
        """The current stream waits (on the GPU) for layer ``layer``'s copy; ``None``: every layer's."""
        if not self._load:
            return
        stream = self._torch.cuda.current_stream()
        if layer is None or not 0 <= layer < len(self._load):
            for event in self._load:
                stream.wait_event(event)
        else:
            stream.wait_event(self._load[layer])

    # -- saves ----------------------------------------------------------------------

    def record_save(self, layer: int | None) -> None:
        """Layer ``layer``'s KV for this step is queued on the current stream."""
        if layer is not None and 0 <= layer < self.num_layers:
            self._save[layer].record(self._torch.cuda.current_stream())
            self._recorded[layer] = True

    def save_order(self) -> tuple[bytes | None, list[bytes] | None]:
        """``(after_event, layer_events)`` for this step's save, and a fresh step: the per-layer
        events when every layer recorded one, else one event recorded now."""
        complete = all(self._recorded)
        self._recorded = [False] * self.num_layers
        if complete:
            return None, list(self._save_handles)
        self._step.record(self._torch.cuda.current_stream())
        return self._step_handle, None

    def reset_saves(self) -> None:
        """Forgets this step's recorded layers (a step with nothing to save)."""
        self._recorded = [False] * self.num_layers
