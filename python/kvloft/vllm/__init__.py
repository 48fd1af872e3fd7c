"""kvloft's connector for vLLM: ``kvloft.vllm.KvloftConnector``.

Select it with::

    vllm serve MODEL --kv-transfer-config \\
        '{"kv_connector": "KvloftConnector", "kv_role": "kv_both", "kv_connector_module_path": "kvloft.vllm"}'

(with kvloft installed, the ``vllm.general_plugins`` entry point also registers the name
``KvloftConnector``, so ``kv_connector_module_path`` may be left out). Importing this package does
not import vLLM; :data:`KvloftConnector` is loaded on first access.
"""

from __future__ import annotations

from typing import Any

__all__ = ["KvloftConnector", "register"]


def __getattr__(name: str) -> Any:
    if name in ("KvloftConnector", "KvloftMetadata", "KvloftStats", "KvloftHandshake"):
        from . import connector

        return getattr(connector, name)
    raise AttributeError(f"module 'kvloft.vllm' has no attribute {name!r}")


def register() -> None:
    """vLLM plugin entry point (``vllm.general_plugins``): registers ``KvloftConnector`` with
    vLLM's connector factory."""
    from .plugin import register as _register

    _register()
