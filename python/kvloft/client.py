"""Blocking Unix-socket client for a kvloft server."""

from __future__ import annotations

import collections
import os
import select
import socket
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from .config import default_socket_path
from .errors import (
    ConnectionLost,
    ProtocolError,
    ProtocolMismatch,
    RequestTimeout,
    ServerError,
    ServerUnavailable,
)
from .protocol import (
    MAX_REQUEST_ID,
    PROTOCOL_VERSION,
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameError,
    FrameKind,
    UnsupportedFrameVersion,
    encode_frame,
)

#: Bytes asked of the socket per read.
_RECV_BYTES = 1 << 16


@dataclass(frozen=True)
class Event:
    """An asynchronous completion pushed by the server (an event frame)."""

    #: Id of the request this event completes.
    request_id: int
    #: The event body (a MessagePack map, decoded).
    body: dict[str, Any]


class Client:
    """A blocking connection to a kvloft server.

    Args:
        socket_path: the server's Unix socket; ``None`` means
            :func:`kvloft.config.default_socket_path` (``$KVLOFT_SOCKET`` or
            ``/tmp/kvloft.sock``).
        timeout: seconds to wait for connecting and for each reply.
        client_name: name the server logs for this connection (sent in ``hello``).
        max_events: bound of the queue that keeps event frames until :meth:`events` takes
            them; when it is full the oldest event is dropped and counted in
            :attr:`events_dropped`.

    The client connects on :meth:`connect`, on entering a ``with`` block, or lazily on the
    first request, and always sends ``hello`` first. If the server closes the connection,
    the call in progress raises :class:`ConnectionLost` and the next call connects again.
    One lock serialises requests, so a client may be shared between threads (each request
    waits for the one before it).
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        timeout: float | None = 5.0,
        client_name: str = "python",
        max_events: int = 1024,
    ) -> None:
        self.socket_path: str = os.fspath(socket_path) if socket_path is not None else default_socket_path()
        self.timeout = timeout
        self.client_name = client_name
        #: The server's ``hello`` reply on the current connection, or ``None``.
        self.server_info: dict[str, Any] | None = None
        #: Events dropped because the queue was full.
        self.events_dropped = 0
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._decoder = FrameDecoder()
        self._events: collections.deque[Event] = collections.deque(maxlen=max_events)
        self._next_id = 1

    # -- connection ------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether a socket to the server is open."""
        return self._sock is not None

    def connect(self, hello: bool = True) -> dict[str, Any] | None:
        """Open the connection (if not open yet) and, by default, say hello.

        Returns the server's ``hello`` reply (``protocol``, ``server_version``, ``shards``),
        or ``None`` with ``hello=False``, which leaves the connection unannounced: the
        server then answers every request but ``hello`` with a ``hello_required`` error.

        Raises :class:`ServerUnavailable` when no server listens at the socket path and
        :class:`ProtocolMismatch` when the server speaks another protocol version.
        """
        with self._lock:
            self._open_locked()
            if hello:
                return self._hello_locked()
            return None

    def hello(self) -> dict[str, Any]:
        """Send ``hello`` (connecting first if needed) and return the server's reply."""
        with self._lock:
            self._open_locked()
            return self._hello_locked()

    def close(self) -> None:
        """Close the connection; safe to call more than once."""
        with self._lock:
            self._drop_locked()

    def __enter__(self) -> Client:
        if not self.connected:
            self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "connected" if self.connected else "closed"
        return f"<kvloft.Client {self.socket_path} {state}>"

    # -- requests --------------------------------------------------------------------

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send the request ``{"op": op, **fields}`` and return the reply body.

        Connects (and says hello) first when not connected. The returned dict is the
        reply's MessagePack map, ``"op"`` included. Event frames that arrive meanwhile are
        queued for :meth:`events`.

        Raises :class:`ServerError` when the server answers with an error frame,
        :class:`RequestTimeout` when no reply comes within :attr:`timeout`,
        :class:`ConnectionLost` when the server closes the connection, and
        :class:`ProtocolError` when it sends bytes that are not protocol v1.
        """
        with self._lock:
            if self._sock is None:
                self._open_locked()
                self._hello_locked()
            return self._roundtrip_locked({"op": op, **fields})

    def stats(self) -> dict[str, Any]:
        """Return the server's figures (``StatsReply``): version, pid, uptime, shards."""
        return self.request("stats")

    def events(self, wait: float | None = 0.0) -> list[Event]:
        """Take the queued event frames, oldest first.

        Before draining, reads what the server has already sent. When no event is queued,
        ``wait`` is how long to wait for one to arrive (0 never blocks; ``None`` waits until
        something comes). Does nothing on the socket when not connected.
        """
        with self._lock:
            if self._sock is not None:
                self._poll_locked(wait)
            taken = list(self._events)
            self._events.clear()
            return taken

    # -- internals (caller holds the lock) --------------------------------------------

    def _open_locked(self) -> None:
        if self._sock is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except FileNotFoundError:
            sock.close()
            raise ServerUnavailable(self.socket_path, "the socket file does not exist") from None
        except ConnectionRefusedError:
            sock.close()
            raise ServerUnavailable(
                self.socket_path, "connection refused (a stale socket file: no server listens on it)"
            ) from None
        except socket.timeout:
            sock.close()
            raise ServerUnavailable(self.socket_path, f"no answer within {self.timeout} s") from None
        except OSError as e:
            sock.close()
            raise ServerUnavailable(self.socket_path, e.strerror or str(e)) from None
        self._sock = sock
        self._decoder = FrameDecoder()
        self.server_info = None

    def _drop_locked(self) -> None:
        sock, self._sock = self._sock, None
        self.server_info = None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _hello_locked(self) -> dict[str, Any]:
        body = {"op": "hello", "protocol": PROTOCOL_VERSION, "client": self.client_name, "pid": os.getpid()}
        try:
            reply = self._roundtrip_locked(body)
        except ServerError as e:
            if e.code == ErrorCode.UNSUPPORTED_VERSION:
                self._drop_locked()
                raise ProtocolMismatch(PROTOCOL_VERSION, None, e.message) from None
            raise
        except UnsupportedFrameVersion as e:
            self._drop_locked()
            raise ProtocolMismatch(PROTOCOL_VERSION, e.found, "in the frame header") from None
        server_version = reply.get("protocol")
        if server_version != PROTOCOL_VERSION:
            self._drop_locked()
            raise ProtocolMismatch(PROTOCOL_VERSION, server_version)
        self.server_info = reply
        return reply

    def _take_id(self) -> int:
        request_id = self._next_id
        self._next_id = 1 if request_id >= MAX_REQUEST_ID else request_id + 1
        return request_id

    def _roundtrip_locked(self, body: dict[str, Any]) -> dict[str, Any]:
        assert self._sock is not None
        request_id = self._take_id()
        data = encode_frame(FrameKind.REQUEST, request_id, body)
        try:
            self._sock.sendall(data)
        except socket.timeout:
            # Part of the frame may be on the wire: the stream is out of step.
            self._drop_locked()
            raise RequestTimeout(f"sending {body['op']!r} to {self.socket_path} timed out") from None
        except OSError as e:
            self._drop_locked()
            raise ConnectionLost(f"lost the connection to {self.socket_path} while sending: {e}") from None
        while True:
            for frame in self._read_frames_locked(request_id, f"the reply to {body['op']!r}"):
                if frame.request_id != request_id:
                    if frame.request_id == 0 and frame.kind is FrameKind.ERROR:
                        # An error addressed to no request is about the connection itself.
                        raise self._server_error(frame)
                    continue  # a late reply to a request that timed out
                if frame.kind is FrameKind.ERROR:
                    raise self._server_error(frame)
                if frame.kind is FrameKind.REPLY:
                    reply = frame.message()
                    if reply.get("op") != body["op"]:
                        raise ProtocolError(
                            f"request {request_id} ({body['op']!r}) got a reply for {reply.get('op')!r}"
                        )
                    return reply

    def _read_frames_locked(self, request_id: int, waiting_for: str) -> list[Frame]:
        """Read once from the socket and return the reply/error frames; queue events."""
        assert self._sock is not None
        try:
            data = self._sock.recv(_RECV_BYTES)
        except socket.timeout:
            raise RequestTimeout(
                f"no {waiting_for} from {self.socket_path} within {self.timeout} s"
            ) from None
        except OSError as e:
            self._drop_locked()
            raise ConnectionLost(f"lost the connection to {self.socket_path}: {e}") from None
        if not data:
            partial = self._decoder.buffered
            self._drop_locked()
            detail = f" in the middle of a frame ({partial} bytes buffered)" if partial else ""
            raise ConnectionLost(
                f"the kvloft server at {self.socket_path} closed the connection{detail} "
                f"while this client waited for {waiting_for}"
            )
        return self._decode_locked(data, request_id)

    def _decode_locked(self, data: bytes, request_id: int | None) -> list[Frame]:
        """Decode ``data``; queue events, return the other server frames.

        A skipped frame (unsupported header version, unknown kind) is raised when it
        carries ``request_id`` and ignored otherwise; a fatal frame error closes the
        connection.
        """
        out: list[Frame] = []
        self._decoder.feed(data)
        while True:
            try:
                frame = self._decoder.next_frame()
            except FrameError as e:
                if e.fatal:
                    self._drop_locked()
                    raise
                if request_id is not None and e.request_id == request_id:
                    raise
                continue
            if frame is None:
                return out
            if frame.kind is FrameKind.EVENT:
                if len(self._events) == self._events.maxlen:
                    self.events_dropped += 1
                self._events.append(Event(frame.request_id, frame.message()))
            elif frame.kind in (FrameKind.REPLY, FrameKind.ERROR):
                out.append(frame)
            # A request frame from the server has no meaning for a client: ignore it.

    def _poll_locked(self, wait: float | None) -> None:
        """Read and decode what the server has sent; while no event is queued, wait for one
        up to ``wait`` seconds (``None``: without limit)."""
        deadline = None if wait is None else time.monotonic() + wait
        while self._sock is not None:
            if self._events:
                timeout: float | None = 0.0
            elif deadline is None:
                timeout = None
            else:
                timeout = max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._sock], [], [], timeout)
            if not ready:
                return
            try:
                data = self._sock.recv(_RECV_BYTES)
            except OSError as e:
                self._drop_locked()
                raise ConnectionLost(f"lost the connection to {self.socket_path}: {e}") from None
            if not data:
                self._drop_locked()
                raise ConnectionLost(f"the kvloft server at {self.socket_path} closed the connection")
            for frame in self._decode_locked(data, None):
                if frame.request_id == 0 and frame.kind is FrameKind.ERROR:
                    raise self._server_error(frame)

    @staticmethod
    def _server_error(frame: Frame) -> ServerError:
        body = frame.message()
        return ServerError(str(body.get("code", "unknown")), str(body.get("message", "")), frame.request_id)
