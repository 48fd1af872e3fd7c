"""Protocol v1 over the Unix socket: framing and message bodies.

This mirrors ``engine/src/protocol.rs`` byte for byte. A frame is a 4-byte little-endian
length ``L``, then ``L`` bytes: a 12-byte header and a MessagePack body.

======  ===========  ============================================================
offset  size         field
======  ===========  ============================================================
0       4            ``L``, bytes after this field (header + body), at most
                     :data:`MAX_FRAME_BYTES`
4       2            magic ``b"KL"``
6       1            header version, :data:`PROTOCOL_VERSION`
7       1            kind: 1 request, 2 reply, 3 error, 4 event
8       8            request id, little-endian; replies and errors echo the request's
16      ``L - 12``   body: a MessagePack map
======  ===========  ============================================================

Request and reply bodies carry their operation under the key ``"op"``. Unknown keys in a
body are ignored by the server, so a newer client may send optional fields.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack

from .errors import BadBody, ProtocolError

#: The protocol version this client speaks, in the header and in ``hello``.
PROTOCOL_VERSION = 1
#: Frame magic.
MAGIC = b"KL"
#: Bytes of the length prefix.
LEN_BYTES = 4
#: Bytes of the header after the length prefix.
HEADER_BYTES = 12
#: Largest accepted ``L`` (header + body). A frame announcing more is refused and the
#: connection closed, since the stream position can no longer be trusted.
MAX_FRAME_BYTES = 16 << 20
#: Largest request id (ids are u64 on the wire).
MAX_REQUEST_ID = (1 << 64) - 1
#: Most blocks (or hashes) one ``lookup``, ``save`` or ``load`` may carry; split larger
#: batches.
MAX_BATCH_BLOCKS = 65_536
#: Most layers one ``register_memory`` may describe.
MAX_LAYERS = 4_096
#: Longest block hash, in bytes (vLLM's SHA-256 block hashes are 32). Hashes are at least 1
#: byte long and travel as MessagePack ``bin``.
MAX_HASH_BYTES = 32
#: Every operation name protocol v1 defines, as on the wire (``Request::OPS``).
OPS = (
    "hello",
    "register_instance",
    "register_memory",
    "lookup",
    "save",
    "load",
    "release",
    "stats",
    "attach_mailbox",  # not used by this client (the Rust client attaches mailboxes)
    "ring",
)
#: Event bodies' ``"op"``: completion of a ``save`` and of a ``load``.
EVENT_SAVE_DONE = "save_done"
EVENT_LOAD_DONE = "load_done"
#: Sent before ``load_done`` by a ``layerwise`` load once every layer's copy is queued.
EVENT_LOAD_LAYERS = "load_layers"

# Length prefix, then the header: magic, version, kind, request id.
_PREFIX = struct.Struct("<I")
_HEADER = struct.Struct("<2sBBQ")


class FrameKind(enum.IntEnum):
    """What a frame carries."""

    #: Client to server.
    REQUEST = 1
    #: Server to client: the answer to the request with the same id.
    REPLY = 2
    #: Server to client: the request with the same id failed; the body is ``{code, message}``.
    ERROR = 3
    #: Server to client: an asynchronous completion of the request with the same id.
    EVENT = 4


class ErrorCode(str, enum.Enum):
    """Machine-readable causes in error frames (``ErrorReply.code`` on the Rust side).

    A server may send codes this client does not know yet; :class:`kvloft.ServerError`
    therefore keeps the code as a plain string, which compares equal to these members.
    """

    #: The frame could not be read; the server closes the connection when the stream is out
    #: of step (bad magic, bad length).
    BAD_FRAME = "bad_frame"
    #: Header or ``hello`` protocol version differs from the server's.
    UNSUPPORTED_VERSION = "unsupported_version"
    #: The body is not valid MessagePack for the operation.
    BAD_REQUEST = "bad_request"
    #: The ``op`` is not one the server knows.
    UNKNOWN_OP = "unknown_op"
    #: A request came before ``hello``.
    HELLO_REQUIRED = "hello_required"
    #: The request needs ``register_instance`` first on this connection.
    NOT_REGISTERED = "not_registered"
    #: The request needs ``register_memory`` first on this connection (only workers save
    #: and load).
    NO_MEMORY = "no_memory"
    #: The connection already registered; open another connection for another instance or
    #: rank.
    ALREADY_REGISTERED = "already_registered"
    #: Registrations of one instance disagree (namespace, slice size, rank out of range).
    MISMATCH = "mismatch"
    #: An engine block id is outside the registered memory.
    BLOCK_OUT_OF_RANGE = "block_out_of_range"
    #: The lease does not exist: it expired, was released or fully loaded. Look up again.
    UNKNOWN_LEASE = "unknown_lease"
    #: The lease belongs to another instance.
    LEASE_NOT_OWNED = "lease_not_owned"
    #: A batch, hash or table exceeds its bound; the message names the limit.
    TOO_LARGE = "too_large"
    #: The server could not read or write the client's memory (host backend: grant access
    #: with PR_SET_PTRACER, see :func:`kvloft.host.grant_access`, or run as the same user).
    MEMORY_ACCESS = "memory_access"
    #: The server is shutting down; reconnect later.
    SHUTTING_DOWN = "shutting_down"
    #: The server failed internally.
    INTERNAL = "internal"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Frame:
    """One decoded frame; the body is left as MessagePack bytes (see :meth:`message`)."""

    #: Request, reply, error or event.
    kind: FrameKind
    #: The request id (echoed by replies, errors and events).
    request_id: int
    #: MessagePack body.
    body: bytes

    def message(self) -> dict[str, Any]:
        """Decode the body as a MessagePack map; raises :class:`kvloft.errors.BadBody`."""
        return unpack_body(self.body)


# ---------------------------------------------------------------------------------------
# Frame errors, mirroring the Rust `FrameError`.
# ---------------------------------------------------------------------------------------


class FrameError(ProtocolError):
    """Bytes on the socket are not a valid frame.

    :attr:`fatal` says whether the connection can go on (the frame was skipped) or must be
    closed (the stream is out of step).
    """

    #: Whether the connection must be closed after this error.
    fatal: bool = True
    #: Request id of the skipped frame, for non-fatal errors; 0 otherwise.
    request_id: int = 0


class FrameTooLarge(FrameError):
    """The length prefix announces more than :data:`MAX_FRAME_BYTES`; fatal."""

    def __init__(self, length: int, max_bytes: int = MAX_FRAME_BYTES) -> None:
        self.length = length
        self.max_bytes = max_bytes
        super().__init__(f"frame of {length} bytes exceeds the limit of {max_bytes} bytes; split the request")


class FrameTooShort(FrameError):
    """The length prefix is smaller than a header; fatal."""

    def __init__(self, length: int) -> None:
        self.length = length
        super().__init__(f"frame length {length} is shorter than the {HEADER_BYTES}-byte header")


class BadMagic(FrameError):
    """The magic bytes are wrong: the peer does not speak this protocol; fatal."""

    def __init__(self, found: bytes) -> None:
        self.found = bytes(found)
        super().__init__(f"bad frame magic {self.found!r}; the peer is not a kvloft server")


class UnsupportedFrameVersion(FrameError):
    """The header version is not ours; the frame was skipped (not fatal)."""

    fatal = False

    def __init__(self, found: int, request_id: int) -> None:
        self.found = found
        self.request_id = request_id
        super().__init__(
            f"frame header version {found} is not supported (this client speaks "
            f"{PROTOCOL_VERSION}); upgrade the older side"
        )


class UnknownFrameKind(FrameError):
    """The kind byte is unknown; the frame was skipped (not fatal)."""

    fatal = False

    def __init__(self, found: int, request_id: int) -> None:
        self.found = found
        self.request_id = request_id
        super().__init__(f"unknown frame kind {found}")


# ---------------------------------------------------------------------------------------
# Bodies.
# ---------------------------------------------------------------------------------------


def pack_body(body: dict[str, Any]) -> bytes:
    """Serialise a message body as a MessagePack map (str as str, bytes as bin)."""
    if not isinstance(body, dict):
        raise TypeError(f"a frame body must be a dict, not {type(body).__name__}")
    return msgpack.packb(body, use_bin_type=True)


def unpack_body(body: bytes) -> dict[str, Any]:
    """Deserialise a message body; raises :class:`BadBody` unless it is one MessagePack map."""
    try:
        value = msgpack.unpackb(body, raw=False)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise BadBody(f"frame body is not valid MessagePack: {e}") from e
    if not isinstance(value, dict):
        raise BadBody(f"frame body is a MessagePack {type(value).__name__}, not a map")
    return value


# ---------------------------------------------------------------------------------------
# Encoding and decoding.
# ---------------------------------------------------------------------------------------


def encode_raw(kind: int, request_id: int, body: bytes) -> bytes:
    """Return one frame around an already serialised body.

    Raises :class:`FrameTooLarge` when the frame would exceed :data:`MAX_FRAME_BYTES`, and
    :class:`ValueError` for a kind or request id that does not fit its header field.
    """
    if not 0 <= kind <= 0xFF:
        raise ValueError(f"frame kind {kind} does not fit in a byte")
    if not 0 <= request_id <= MAX_REQUEST_ID:
        raise ValueError(f"request id {request_id} does not fit in a u64")
    length = HEADER_BYTES + len(body)
    if length > MAX_FRAME_BYTES:
        raise FrameTooLarge(length)
    return _PREFIX.pack(length) + _HEADER.pack(MAGIC, PROTOCOL_VERSION, int(kind), request_id) + bytes(body)


def encode_frame(kind: int, request_id: int, body: dict[str, Any]) -> bytes:
    """Return one frame: length prefix, header and ``body`` as a MessagePack map.

    Matches the Rust ``encode(out, kind, request_id, &to_body(value))``.
    """
    return encode_raw(kind, request_id, pack_body(body))


def frame_len(buf: bytes | bytearray | memoryview) -> int | None:
    """Return ``L`` (header + body bytes, prefix excluded) of the first frame in ``buf``.

    ``None`` until the prefix and the magic have arrived. Raises :class:`FrameTooLarge`,
    :class:`FrameTooShort` (as soon as the prefix is there) or :class:`BadMagic`.
    """
    if len(buf) < LEN_BYTES:
        return None
    (length,) = _PREFIX.unpack_from(buf, 0)
    if length > MAX_FRAME_BYTES:
        raise FrameTooLarge(length)
    if length < HEADER_BYTES:
        raise FrameTooShort(length)
    if len(buf) < LEN_BYTES + 2:
        return None
    magic = bytes(buf[LEN_BYTES : LEN_BYTES + 2])
    if magic != MAGIC:
        raise BadMagic(magic)
    return length


def decode(buf: bytes | bytearray | memoryview) -> tuple[Frame, int] | None:
    """Decode the first frame in ``buf``.

    Returns ``None`` while the frame is incomplete, otherwise the frame and how many bytes
    it used (prefix included). A non-fatal :class:`FrameError` (version, kind) means the
    caller should drop ``LEN_BYTES + frame_len(buf)`` bytes and go on; :class:`FrameDecoder`
    does that itself.
    """
    length = frame_len(buf)
    if length is None:
        return None
    total = LEN_BYTES + length
    if len(buf) < total:
        return None
    _magic, version, kind, request_id = _HEADER.unpack_from(buf, LEN_BYTES)
    if version != PROTOCOL_VERSION:
        raise UnsupportedFrameVersion(version, request_id)
    try:
        frame_kind = FrameKind(kind)
    except ValueError:
        raise UnknownFrameKind(kind, request_id) from None
    body = bytes(buf[LEN_BYTES + HEADER_BYTES : total])
    return Frame(frame_kind, request_id, body), total


class FrameDecoder:
    """Incremental frame decoder for a byte stream.

    Feed it bytes as they arrive and iterate over the complete frames::

        decoder = FrameDecoder()
        for frame in decoder.feed(sock.recv(65536)):
            ...

    :meth:`feed` stores the bytes at once; the frames are decoded as the returned iterator
    is consumed. A non-fatal :class:`FrameError` (unsupported version, unknown kind) is
    raised with its frame already dropped: call :meth:`frames` to go on with the next one.
    After a fatal one (too large, too short, bad magic) the stream is out of step and every
    later call raises the same error.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._fatal: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet decoded (a partial frame)."""
        return len(self._buf)

    @property
    def failed(self) -> FrameError | None:
        """The fatal error that stopped this decoder, if any."""
        return self._fatal

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[Frame]:
        """Append ``data`` and return an iterator over the frames now complete."""
        self._buf += data
        return self.frames()

    def frames(self) -> Iterator[Frame]:
        """Yield the complete frames in the buffer, leaving a partial one buffered."""
        while True:
            frame = self.next_frame()
            if frame is None:
                return
            yield frame

    def next_frame(self) -> Frame | None:
        """Decode and remove the next complete frame; ``None`` when none is complete."""
        if self._fatal is not None:
            raise self._fatal
        try:
            decoded = decode(self._buf)
        except FrameError as e:
            if e.fatal:
                self._fatal = e
            else:
                # frame_len succeeded for this frame, so its length is known: skip it.
                del self._buf[: LEN_BYTES + (frame_len(self._buf) or 0)]
            raise
        if decoded is None:
            return None
        frame, used = decoded
        del self._buf[:used]
        return frame
