"""Client-side configuration: where to find the server."""

from __future__ import annotations

import os

#: Environment variable naming the server's Unix socket.
SOCKET_ENV = "KVLOFT_SOCKET"
#: Socket path used when neither an explicit path nor ``KVLOFT_SOCKET`` is given.
DEFAULT_SOCKET_PATH = "/tmp/kvloft.sock"


def default_socket_path() -> str:
    """Return the socket path a client uses by default.

    ``$KVLOFT_SOCKET`` when it is set and not empty, otherwise ``/tmp/kvloft.sock``
    (the default of ``kvloft serve``).
    """
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET_PATH
