"""The ``vllm.general_plugins`` entry point: makes ``"kv_connector": "KvloftConnector"`` resolve
without ``kv_connector_module_path``. vLLM loads it in every process it starts."""

from __future__ import annotations


def register() -> None:
    """Registers ``KvloftConnector`` with vLLM's connector factory (once per process)."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    try:
        KVConnectorFactory.register_connector("KvloftConnector", "kvloft.vllm.connector", "KvloftConnector")
    except ValueError:
        pass  # already registered in this process
