"""kvloft: Python client for the kvloft KV-cache storage engine.

Talks to a running ``kvloft serve`` over its Unix socket (protocol v1)::

    import kvloft

    with kvloft.Client() as client:          # $KVLOFT_SOCKET or /tmp/kvloft.sock
        print(client.stats()["shards"])
"""

from .client import Client, Event
from .config import DEFAULT_SOCKET_PATH, default_socket_path
from .errors import (
    BadBody,
    ConnectionLost,
    KvloftError,
    ProtocolError,
    ProtocolMismatch,
    RequestTimeout,
    ServerError,
    ServerUnavailable,
)
from .protocol import PROTOCOL_VERSION, ErrorCode, FrameError

__version__ = "0.1.0"

__all__ = [
    "BadBody",
    "Client",
    "ConnectionLost",
    "DEFAULT_SOCKET_PATH",
    "ErrorCode",
    "Event",
    "FrameError",
    "KvloftError",
    "PROTOCOL_VERSION",
    "ProtocolError",
    "ProtocolMismatch",
    "RequestTimeout",
    "ServerError",
    "ServerUnavailable",
    "__version__",
    "default_socket_path",
]
