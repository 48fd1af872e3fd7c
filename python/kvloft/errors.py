"""Exceptions raised by the kvloft client.

Every exception the package raises on purpose derives from :class:`KvloftError`::

    KvloftError
    ├── ServerUnavailable   no server listens at the socket path
    ├── ConnectionLost      the server closed or reset the connection
    ├── RequestTimeout      no reply within the client's timeout (also a TimeoutError)
    ├── ServerError         the server answered with an error frame (.code, .message)
    ├── LoadFailed          a load completed with an error: recompute those blocks
    ├── EventLost           a completion was dropped from the full event queue
    └── ProtocolError       the bytes from the server are not valid protocol v1
        ├── ProtocolMismatch    client and server speak different protocol versions
        ├── BadBody             a body is not a MessagePack map
        └── FrameError          a frame is malformed (see kvloft.protocol)
"""

from __future__ import annotations


class KvloftError(Exception):
    """Base class of every error raised by the kvloft client."""


class ServerUnavailable(KvloftError):
    """No kvloft server could be reached at the socket path.

    Raised when the socket file is missing, nobody listens on it (a stale socket from a
    server that died), or it cannot be opened. The message names the path that was tried
    and how to start a server.
    """

    def __init__(self, socket_path: str, reason: str) -> None:
        self.socket_path = socket_path
        self.reason = reason
        super().__init__(
            f"no kvloft server at {socket_path}: {reason}; start one with "
            f"`kvloft serve --socket {socket_path}`, or point the client at a running server "
            f"with the socket_path argument or the KVLOFT_SOCKET environment variable"
        )


class ConnectionLost(KvloftError):
    """The server closed or reset the connection.

    The client drops the connection; its next request connects again (and sends hello).
    """


class RequestTimeout(KvloftError, TimeoutError):
    """The server did not answer within the client's timeout."""


class ServerError(KvloftError):
    """The server answered a request with an error frame.

    Attributes:
        code: machine-readable cause in snake_case, e.g. ``"hello_required"``; compare it
            with :class:`kvloft.protocol.ErrorCode` members or plain strings.
        message: what went wrong and how to fix it, written by the server for people.
        request_id: id of the failed request (0 for a connection-level error).
    """

    def __init__(self, code: str, message: str, request_id: int = 0) -> None:
        self.code = code
        self.message = message
        self.request_id = request_id
        super().__init__(f"{code}: {message}")


class ProtocolError(KvloftError):
    """The server sent something that is not valid kvloft protocol v1."""


class ProtocolMismatch(ProtocolError):
    """Client and server speak different protocol versions.

    Attributes:
        client_version: the version this client speaks.
        server_version: the version the server speaks, or ``None`` when the server only
            refused ours without saying its own.
    """

    def __init__(self, client_version: int, server_version: int | None, detail: str = "") -> None:
        self.client_version = client_version
        self.server_version = server_version
        theirs = "an unknown protocol version" if server_version is None else f"protocol {server_version}"
        text = (
            f"the kvloft server speaks {theirs}, this client speaks protocol {client_version}; "
            f"upgrade the older side"
        )
        if detail:
            text += f" ({detail})"
        super().__init__(text)


class BadBody(ProtocolError):
    """A frame body is not a MessagePack map."""


class LoadFailed(KvloftError):
    """A ``load`` finished with an error (its ``load_done`` event carries ``error``).

    None of the destination blocks may be used: the caller must recompute them. The lease
    is spent or released by the server; look up again to retry.

    Attributes:
        request_id: id of the ``load`` request.
        error: the server's reason.
        loaded: blocks the server reports as copied (still not usable).
        requested: destination blocks the load named, when known.
        body: the whole ``load_done`` event body.
    """

    def __init__(self, request_id: int, error: str, loaded: int, requested: int | None, body: dict) -> None:
        self.request_id = request_id
        self.error = error
        self.loaded = loaded
        self.requested = requested
        self.body = body
        of = f" of {requested}" if requested is not None else ""
        super().__init__(
            f"load {request_id} failed after {loaded}{of} blocks: {error}; "
            f"recompute these blocks (do not use their contents)"
        )


class EventLost(KvloftError):
    """The completion event of a request was dropped because the client's event queue
    (``max_events``) was full. Treat a lost ``load`` as failed; raise ``max_events`` or
    collect completions sooner."""
