"""The namespace of a vLLM engine: everything that changes the bytes of its KV blocks.

Computed by each worker from its configuration and its real KV-cache tensors, and handed to the
scheduler through vLLM's connector handshake, so every process of the engine registers the same
namespace. Nothing here depends on Python's hash seed: two processes, or two hosts, with the
same model and cache settings compute the same namespace.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from ..namespace import Namespace


def model_identity(model: str, revision: str | None) -> str:
    """``model@revision``; for a local directory the path plus a fingerprint of its
    ``config.json`` and weight files (names and sizes), so a rebuilt model at the same path is a
    new namespace rather than a source of wrong KV."""
    ident = f"{model}@{revision or ''}"
    path = Path(model)
    if path.is_dir():
        h = hashlib.sha256()
        config = path / "config.json"
        if config.is_file():
            h.update(config.read_bytes())
        for f in sorted(path.iterdir()):
            if f.suffix in (".safetensors", ".bin", ".pt", ".gguf") and f.is_file():
                h.update(f"{f.name}:{f.stat().st_size}\n".encode())
        ident = f"{os.path.abspath(model)}#{h.hexdigest()[:16]}"
    if len(ident.encode()) > 256:
        ident = f"{ident[:180]}#{hashlib.sha256(ident.encode()).hexdigest()[:32]}"
    return ident


def attention_layout(layout_name: str | None, use_mla: bool) -> str:
    """kvloft's layout name for vLLM's ``KVCacheLayout`` (``LBHNC``: layer, block, heads,
    tokens, channels): ``mla``, ``cross_layer`` (layers inside a block), ``hnd`` (heads before
    tokens) or ``nhd``."""
    if use_mla:
        return "mla"
    name = (layout_name or "LBNHC").upper()
    # vLLM's legacy names for the layer-outermost layouts (its ``_LAYOUT_COMPAT_ALIASES``).
    name = {"NHD": "LBNHC", "HND": "LBHNC"}.get(name, name)
    if not name.startswith("L"):
        return "cross_layer"
    rest = name[1:].replace("B", "")
    return "hnd" if rest.index("H") < rest.index("N") else "nhd"


def engine_namespace(vllm_config: Any, num_layers: int, block_shape: str, device_type: str) -> Namespace:
    """The namespace of the engine ``vllm_config`` describes, whose worker registered
    ``num_layers`` KV-cache layers with blocks of ``block_shape``."""
    mc = vllm_config.model_config
    cc = vllm_config.cache_config
    pc = vllm_config.parallel_config
    layout_name = getattr(cc, "kv_cache_layout", None)
    variant_parts = [
        "vllm",
        device_type,
        str(layout_name or "default"),
        block_shape,
        f"hash={cc.prefix_caching_hash_algo}",
    ]
    quant = getattr(mc, "quantization", None)
    if quant:
        variant_parts.append(f"quant={quant}")
    return Namespace(
        model=model_identity(mc.model, getattr(mc, "revision", None)),
        dtype=str(mc.dtype).removeprefix("torch."),
        kv_dtype=str(cc.cache_dtype),
        num_layers=num_layers,
        num_kv_heads=mc.get_total_num_kv_heads(),
        head_size=mc.get_head_size(),
        block_size=cc.block_size,
        layout=attention_layout(layout_name, bool(getattr(mc, "use_mla", False))),
        tp_size=pc.tensor_parallel_size,
        pp_size=pc.pipeline_parallel_size,
        group=0,
        variant="/".join(variant_parts),
    )
