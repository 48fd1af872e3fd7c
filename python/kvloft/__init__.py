"""kvloft: Python client for the kvloft KV-cache storage engine.

Talks to a running ``kvloft serve`` over its Unix socket (protocol v1)::

    import kvloft

    with kvloft.Client() as client:          # $KVLOFT_SOCKET or /tmp/kvloft.sock
        print(client.stats()["shards"])

A worker of an inference engine registers its instance and KV memory, then saves and loads
blocks by hash::

    client.register_instance("engine-0", kvloft.Namespace(model="m", dtype="bfloat16",
                             num_layers=32, num_kv_heads=8, head_size=128, block_size=16))
    client.register_memory(0, layers)        # list[kvloft.LayerMemory]
    client.save([(block_hash, block_id), ...])
    hit = client.lookup(block_hashes)
    client.load(hit.lease, block_ids[: hit.hits])
"""

from .client import DEFAULT_EVENT_TIMEOUT, Client, Event
from .config import DEFAULT_SOCKET_PATH, default_socket_path
from .errors import (
    BadBody,
    ConnectionLost,
    EventLost,
    KvloftError,
    LoadFailed,
    ProtocolError,
    ProtocolMismatch,
    RequestTimeout,
    ServerError,
    ServerUnavailable,
)
from .host import HostKVCache, grant_access
from .namespace import Namespace
from .protocol import MAX_BATCH_BLOCKS, MAX_HASH_BYTES, MAX_LAYERS, PROTOCOL_VERSION, ErrorCode, FrameError
from .store import LayerMemory, LookupResult

__version__ = "0.1.0"

__all__ = [
    "BadBody",
    "Client",
    "ConnectionLost",
    "DEFAULT_EVENT_TIMEOUT",
    "DEFAULT_SOCKET_PATH",
    "ErrorCode",
    "Event",
    "EventLost",
    "FrameError",
    "HostKVCache",
    "KvloftError",
    "LayerMemory",
    "LoadFailed",
    "LookupResult",
    "MAX_BATCH_BLOCKS",
    "MAX_HASH_BYTES",
    "MAX_LAYERS",
    "Namespace",
    "PROTOCOL_VERSION",
    "ProtocolError",
    "ProtocolMismatch",
    "RequestTimeout",
    "ServerError",
    "ServerUnavailable",
    "__version__",
    "default_socket_path",
    "grant_access",
]
