"""Blocking Unix-socket client for a kvloft server."""

from __future__ import annotations

import collections
import os
import select
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from .config import default_socket_path
from .errors import (
    ConnectionLost,
    EventLost,
    LoadFailed,
    ProtocolError,
    ProtocolMismatch,
    RequestTimeout,
    ServerError,
    ServerUnavailable,
)
from .host import grant_access
from .namespace import Namespace, check_u32
from .protocol import (
    EVENT_LOAD_DONE,
    EVENT_LOAD_LAYERS,
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
from .store import (
    LayerMemory,
    LookupResult,
    hashes_to_wire,
    layers_to_wire,
    lease_to_wire,
    pack_block_ids,
    pack_save,
    save_blocks_to_wire,
)

#: Bytes asked of the socket per read.
_RECV_BYTES = 1 << 16
#: Default seconds :meth:`Client.save`, :meth:`Client.load` and :meth:`Client.wait_event` wait
#: for a completion event.
DEFAULT_EVENT_TIMEOUT = 60.0
#: Longest a waiter holds the client's lock while it waits for the socket, so other threads'
#: requests go through meanwhile.
_WAIT_SLICE_S = 0.05
#: Bound of the table of save/load requests whose completion has not been collected.
_MAX_INFLIGHT = 1 << 16


@dataclass(frozen=True)
class _Inflight:
    """A save or load sent through the API whose completion event is not collected yet."""

    op: str
    blocks: int
    generation: int


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
        max_events: bound of the queue that keeps event frames until :meth:`events` or
            :meth:`wait_event` takes them; when it is full the oldest event is dropped and
            counted in :attr:`events_dropped` (its waiter gets :class:`EventLost`).

    The client connects on :meth:`connect`, on entering a ``with`` block, or lazily on the
    first request, and always sends ``hello`` first. If the server closes the connection,
    the call in progress raises :class:`ConnectionLost` and the next call connects again.
    One lock serialises requests, so a client may be shared between threads (each request
    waits for the one before it); a thread waiting for a completion event lets other
    threads' requests through.

    A connection remembers its :meth:`register_instance` and :meth:`register_memory`; when
    the client connects again (after :class:`ConnectionLost` or :meth:`close`), it repeats
    them on the new connection before the next request. Leases and uncollected completions
    belong to the connection and are gone with it.
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
        self._dropped_ids: collections.deque[int] = collections.deque(maxlen=max(64, max_events))
        self._inflight: collections.OrderedDict[int, _Inflight] = collections.OrderedDict()
        self._generation = 0
        self._next_id = 1
        self._registration: tuple[str, Namespace] | None = None
        self._memory: tuple[int, list[LayerMemory], str, bytes | None, list[tuple[bytes, int]] | None] | None = None
        #: Outcome of the last host-backend access grant (:func:`kvloft.host.grant_access`):
        #: ``True`` granted, ``False`` nothing to grant (no Yama), ``None`` not attempted.
        self.access_granted: bool | None = None

    # -- connection ------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether a socket to the server is open."""
        return self._sock is not None

    @property
    def server_pid(self) -> int | None:
        """The server's process id from its hello reply (``None`` before hello, or from a
        server that does not say)."""
        pid = (self.server_info or {}).get("pid")
        return int(pid) if pid else None

    def connect(self, hello: bool = True) -> dict[str, Any] | None:
        """Open the connection (if not open yet) and, by default, say hello.

        Returns the server's ``hello`` reply (``protocol``, ``server_version``, ``shards``),
        or ``None`` with ``hello=False``, which leaves the connection unannounced: the
        server then answers every request but ``hello`` with a ``hello_required`` error.

        Raises :class:`ServerUnavailable` when no server listens at the socket path and
        :class:`ProtocolMismatch` when the server speaks another protocol version.
        """
        with self._lock:
            opened = self._sock is None
            self._open_locked()
            if hello:
                reply = self._hello_locked()
                if opened:
                    self._replay_locked()
                return reply
            return None

    def hello(self) -> dict[str, Any]:
        """Send ``hello`` (connecting first if needed) and return the server's reply."""
        with self._lock:
            opened = self._sock is None
            self._open_locked()
            reply = self._hello_locked()
            if opened:
                self._replay_locked()
            return reply

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
            self._ensure_locked()
            return self._roundtrip_locked({"op": op, **fields})

    def stats(self) -> dict[str, Any]:
        """Return the server's figures (``StatsReply``): version, pid, uptime, shards."""
        return self.request("stats")

    # -- store operations -------------------------------------------------------------

    def register_instance(self, instance: str, namespace: Namespace) -> dict[str, Any]:
        """Join inference instance ``instance`` (its engine id) with its namespace.

        Every connection of an engine (scheduler and each worker) sends it once. Returns the
        reply: ``namespace_id`` (32 hex digits, stable across processes, hosts and restarts)
        and ``slices_per_block`` (``tp_size * pp_size``). Errors (:class:`ServerError`):
        ``already_registered`` on a connection that registered, ``mismatch`` when another
        connection registered the same instance with another namespace.
        """
        if not isinstance(instance, str) or not instance:
            raise ValueError(f"instance must be a non-empty string (the engine id), got {instance!r}")
        if not isinstance(namespace, Namespace):
            raise TypeError(f"namespace must be a kvloft.Namespace, not {type(namespace).__name__}")
        with self._lock:
            self._ensure_locked(replay=False)
            reply = self._register_instance_locked(instance, namespace)
            self._registration = (instance, namespace)
            self._memory = None
            return reply

    def register_memory(
        self,
        rank: int,
        layers: Sequence[LayerMemory],
        device: str = "cpu",
        gpu_uuid: bytes | None = None,
        ipc: Sequence[tuple[bytes, int]] | None = None,
    ) -> dict[str, Any]:
        """Hand over where this worker's KV cache lives; the connection becomes rank ``rank``.

        ``rank`` is ``pp_rank * tp_size + tp_rank``; ``layers`` has one
        :class:`LayerMemory` per layer, in layer order; ``device`` is ``"cpu"`` (the server's
        host backend reads and writes this process's memory) or ``"cuda:N"``. For ``"cpu"``
        this first grants the server access to this process's memory
        (:func:`kvloft.host.grant_access` with the pid from the hello reply). Returns the
        reply: ``slice_bytes``, this rank's bytes of one block. Needs
        :meth:`register_instance` first (``not_registered``); ``mismatch`` when the rank is
        out of range or the slice size disagrees with the instance's other ranks.

        For ``"cuda:N"`` (the server's ``cuda`` backend, on the same machine): ``gpu_uuid`` is
        the GPU's 16-byte UUID and ``ipc`` has one ``(handle, offset)`` per layer, the 64-byte
        CUDA IPC handle of the allocation the layer lives in and the byte offset of its block 0
        in it; each layer's ``base`` is then ignored (:func:`kvloft.gpu.cuda_layers` builds all
        of it from torch tensors).
        """
        rank = check_u32("rank", rank)
        layers = list(layers) if not isinstance(layers, LayerMemory) else layers
        layers_to_wire(layers)  # checks before anything is sent
        if not isinstance(device, str) or not device:
            raise ValueError(f"device must be 'cpu' or 'cuda:N', got {device!r}")
        ipc_list = None
        if device.startswith("cuda"):
            if not isinstance(gpu_uuid, (bytes, bytearray)) or len(gpu_uuid) != 16:
                raise ValueError("a cuda registration needs gpu_uuid: the GPU's 16-byte UUID")
            ipc_list = [(bytes(h), int(o)) for h, o in (ipc or [])]
            if len(ipc_list) != len(layers) or any(len(h) != 64 or o < 0 for h, o in ipc_list):
                raise ValueError("a cuda registration needs one (64-byte IPC handle, offset >= 0) per layer")
            gpu_uuid = bytes(gpu_uuid)
        with self._lock:
            self._ensure_locked(replay_memory=False)
            reply = self._register_memory_locked(rank, layers, device, gpu_uuid, ipc_list)
            self._memory = (rank, layers, device, gpu_uuid, ipc_list)
            return reply

    def lookup(self, hashes: Iterable[bytes]) -> LookupResult:
        """How many leading ``hashes`` are stored, and a lease that pins those blocks.

        ``hashes`` are the prompt's chained block hashes, first block first, each 1 to 32
        bytes (at most :data:`kvloft.protocol.MAX_BATCH_BLOCKS`). Hits stop at the first
        hash that is not stored. The lease (0 when there is no hit) holds the hits until the
        instance's ranks load them, :meth:`release`, expiry (``lease_ttl_s``), or this
        connection closes. Needs :meth:`register_instance` first.
        """
        wire = hashes_to_wire(hashes)
        lengths = {len(h) for h in wire}
        if len(lengths) == 1:
            # One packed byte string: far cheaper to encode and decode than a list of hashes.
            packed = {"hash_bytes": lengths.pop(), "bytes": b"".join(wire)}
            reply = self.request("lookup", packed=packed)
        else:
            reply = self.request("lookup", hashes=wire)
        return LookupResult(
            hits=_int_field(reply, "hits"),
            lease=_int_field(reply, "lease"),
            lease_ttl_s=_int_field(reply, "lease_ttl_s", 0),
        )

    def save(
        self,
        blocks: Iterable[tuple[bytes, int]],
        wait: bool = True,
        timeout: float | None = DEFAULT_EVENT_TIMEOUT,
        after_event: bytes | None = None,
        layer_events: Sequence[bytes] | None = None,
    ) -> Any:
        """Copy this rank's slices of engine blocks into the store.

        ``blocks`` are ``(hash, block_id)`` pairs: the block hash and the engine block of the
        registered memory that holds it. With ``wait`` (the default), returns the
        ``save_done`` event body: ``saved``, ``present`` (already stored), ``failed`` and
        ``error`` (why some failed; the engine goes on without them). The engine blocks must
        not change until then. With ``wait=False`` returns the request id at once; collect
        the completion with :meth:`wait_event`. Needs :meth:`register_memory` first
        (``no_memory``). With GPU memory, ``after_event`` is the IPC handle of a CUDA event
        (``torch.cuda.Event(interprocess=True).ipc_handle()``) recorded after the kernels that
        wrote the blocks: the server's copy waits for it on the GPU, so the worker need not
        synchronize first. ``layer_events`` (instead of ``after_event``) is one such handle per
        registered layer, each recorded after the kernels that wrote that layer: layer ``i`` is
        copied as soon as its event fires (a layer-wise save).
        """
        blocks = blocks if isinstance(blocks, list) else list(blocks)
        extra: dict[str, Any] = {}
        if after_event is not None:
            if not isinstance(after_event, (bytes, bytearray)) or len(after_event) != 64:
                raise ValueError("after_event must be a 64-byte CUDA IPC event handle")
            extra["after_event"] = bytes(after_event)
        if layer_events is not None:
            handles = [bytes(h) for h in layer_events]
            if after_event is not None or not handles or any(len(h) != 64 for h in handles):
                raise ValueError("layer_events must be one 64-byte CUDA IPC event handle per layer, without after_event")
            extra["layer_events"] = handles
        packed = pack_save(blocks)
        if packed is not None:
            count = len(packed["block_ids"]) // 4
            return self._submit_and_wait("save", count, {"op": "save", "packed": packed, **extra}, wait, timeout)
        wire = save_blocks_to_wire(blocks)
        return self._submit_and_wait("save", len(wire), {"op": "save", "blocks": wire, **extra}, wait, timeout)

    def load(
        self,
        lease: int | LookupResult,
        block_ids: Iterable[int],
        wait: bool = True,
        timeout: float | None = DEFAULT_EVENT_TIMEOUT,
        layerwise: bool = False,
    ) -> Any:
        """Copy a lease's first ``len(block_ids)`` hits into these engine blocks, in order.

        With ``wait`` (the default), returns the ``load_done`` event body (``loaded``,
        ``error``) and raises :class:`LoadFailed` when it carries an error, or reports fewer
        blocks than asked: then none of the destination blocks may be used, recompute them.
        With ``wait=False`` returns the request id; :meth:`wait_event` collects the
        completion (and raises :class:`LoadFailed` the same way). A refused request raises
        :class:`ServerError` (``unknown_lease``, ``lease_not_owned``, ``block_out_of_range``,
        ``no_memory``) and leaves the destination blocks untouched.

        ``layerwise`` (GPU memory, with ``wait=False``): the server copies layer by layer and,
        as soon as every layer's copy is queued, sends one CUDA event per layer;
        :meth:`wait_layers` returns their handles. A stream that waits on event ``i``
        (``torch.cuda.Event.from_ipc_handle``) may read layer ``i`` while later layers are
        still being copied. The completion comes after, as for any load.
        """
        wire_lease = lease_to_wire(lease)
        packed = pack_block_ids(block_ids)
        body: dict[str, Any] = {"op": "load", "lease": wire_lease, "block_ids_packed": packed}
        if layerwise:
            if wait:
                raise ValueError("a layerwise load is collected with wait_layers: pass wait=False")
            body["layerwise"] = True
        return self._submit_and_wait("load", len(packed) // 4, body, wait, timeout)

    def wait_layers(self, request_id: int, timeout: float | None = DEFAULT_EVENT_TIMEOUT) -> list[bytes]:
        """The per-layer CUDA event handles of ``layerwise`` load ``request_id``, once the server
        has queued every layer's copy (the connection's loads reuse the same handles: open each
        once). Raises :class:`LoadFailed` when the load failed before its copies were queued
        (its ``load_done`` came instead), and :class:`RequestTimeout` as :meth:`wait_event`.
        The ``load_done`` stays queued for :meth:`wait_event`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                for i, event in enumerate(self._events):
                    if event.request_id != request_id:
                        continue
                    if event.body.get("op") == EVENT_LOAD_LAYERS:
                        del self._events[i]
                        return [bytes(h) for h in event.body.get("events") or []]
                    if event.body.get("op") == EVENT_LOAD_DONE:
                        # Failed before queueing (raises), or nothing to wait for (kept for wait_event).
                        try:
                            self._complete(event, self._inflight.get(request_id))
                        except LoadFailed:
                            del self._events[i]
                            self._inflight.pop(request_id, None)
                            raise
                        return []
                if self._sock is None:
                    raise ConnectionLost(f"the connection to {self.socket_path} closed before load {request_id} was queued")
                remaining = _WAIT_SLICE_S if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    raise RequestTimeout(f"load {request_id} was not queued within {timeout} s")
                self._read_some_locked(max(0.0, min(remaining, _WAIT_SLICE_S)))

    def release(self, lease: int | LookupResult) -> None:
        """Give up a lease without loading (the rest of) it.

        Raises :class:`ServerError` ``unknown_lease`` when it expired, was released or fully
        loaded, and ``lease_not_owned`` when it belongs to another instance.
        """
        self.request("release", lease=lease_to_wire(lease))

    def wait_event(self, request_id: int, timeout: float | None = DEFAULT_EVENT_TIMEOUT) -> dict[str, Any]:
        """Wait for the completion event of request ``request_id`` and return its body.

        Events of other requests that arrive meanwhile stay queued for their own waiters
        (up to ``max_events``). ``timeout`` is in seconds (``None``: no limit); on
        :class:`RequestTimeout` the request is still in flight and may be waited for again.
        A ``load_done`` with an error raises :class:`LoadFailed`. Raises
        :class:`ConnectionLost` when the connection that carried the request closed before
        the event came (it never will), and :class:`EventLost` when the event was dropped
        from the full queue.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        polled = False
        while True:
            with self._lock:
                event = self._take_event_locked(request_id)
                if event is not None:
                    return self._complete(event, self._inflight.pop(request_id, None))
                if request_id in self._dropped_ids:
                    self._inflight.pop(request_id, None)
                    raise EventLost(
                        f"the completion of request {request_id} was dropped because the event "
                        f"queue (max_events={self._events.maxlen}) was full"
                    )
                info = self._inflight.get(request_id)
                if self._sock is None or (info is not None and info.generation != self._generation):
                    self._inflight.pop(request_id, None)
                    what = f"{info.op} " if info is not None else ""
                    raise ConnectionLost(
                        f"the connection to {self.socket_path} that carried {what}request {request_id} "
                        f"closed before its completion came"
                    )
                if deadline is None:
                    slice_s = _WAIT_SLICE_S
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 and polled:
                        raise RequestTimeout(
                            f"no completion of request {request_id} from {self.socket_path} within {timeout} s"
                        )
                    slice_s = max(0.0, min(remaining, _WAIT_SLICE_S))
                self._read_some_locked(slice_s)
                polled = True

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
            for event in taken:
                if event.body.get("op") != EVENT_LOAD_LAYERS:  # its load_done is still to come
                    self._inflight.pop(event.request_id, None)
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
        self._generation += 1
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

    def _ensure_locked(self, replay: bool = True, replay_memory: bool = True) -> None:
        """Connect and say hello when not connected, then repeat the registrations."""
        if self._sock is not None:
            return
        self._open_locked()
        self._hello_locked()
        if replay:
            self._replay_locked(replay_memory)

    def _replay_locked(self, memory: bool = True) -> None:
        if self._registration is None:
            return
        self._register_instance_locked(*self._registration)
        if memory and self._memory is not None:
            self._register_memory_locked(*self._memory)

    def _register_instance_locked(self, instance: str, namespace: Namespace) -> dict[str, Any]:
        return self._roundtrip_locked(
            {"op": "register_instance", "instance": instance, "namespace": namespace.to_wire()}
        )

    def _register_memory_locked(
        self,
        rank: int,
        layers: list[LayerMemory],
        device: str,
        gpu_uuid: bytes | None = None,
        ipc: list[tuple[bytes, int]] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"op": "register_memory", "rank": rank, "device": device, "layers": layers_to_wire(layers)}
        if device == "cpu":
            pid = self.server_pid
            if pid is not None:
                self.access_granted = grant_access(pid)
        else:
            body["gpu_uuid"] = gpu_uuid
            body["ipc"] = [{"handle": h, "offset": o} for h, o in ipc or []]
        return self._roundtrip_locked(body)

    def _submit(self, op: str, blocks: int, body: dict[str, Any]) -> int:
        """Send a save or load and note it as in flight; returns its request id."""
        with self._lock:
            self._ensure_locked()
            request_id, reply = self._exchange_locked(body)
            self._inflight[request_id] = _Inflight(op, blocks, self._generation)
            while len(self._inflight) > _MAX_INFLIGHT:
                self._inflight.popitem(last=False)
            return request_id

    def _submit_and_wait(
        self, op: str, blocks: int, body: dict[str, Any], wait: bool, timeout: float | None
    ) -> Any:
        request_id = self._submit(op, blocks, body)
        if not wait:
            return request_id
        return self.wait_event(request_id, timeout)

    def _take_event_locked(self, request_id: int) -> Event | None:
        for i, event in enumerate(self._events):
            if event.request_id == request_id:
                del self._events[i]
                return event
        return None

    @staticmethod
    def _complete(event: Event, info: _Inflight | None) -> dict[str, Any]:
        body = event.body
        if body.get("op") == EVENT_LOAD_DONE:
            error = body.get("error")
            loaded = body.get("loaded")
            requested = info.blocks if info is not None and info.op == "load" else None
            if error is None and requested is not None and loaded != requested:
                error = f"the server reports {loaded} blocks loaded, not the {requested} asked for"
            if error is not None:
                count = loaded if isinstance(loaded, int) else 0
                raise LoadFailed(event.request_id, str(error), count, requested, body)
        return body

    def _read_some_locked(self, wait: float) -> None:
        """Wait up to ``wait`` seconds for bytes from the server and decode them."""
        assert self._sock is not None
        ready, _, _ = select.select([self._sock], [], [], wait)
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

    def _take_id(self) -> int:
        request_id = self._next_id
        self._next_id = 1 if request_id >= MAX_REQUEST_ID else request_id + 1
        return request_id

    def _roundtrip_locked(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._exchange_locked(body)[1]

    def _exchange_locked(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Send one request and return its id and reply body."""
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
                    return request_id, reply

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
                    self._dropped_ids.append(self._events[0].request_id if self._events else frame.request_id)
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


def _int_field(reply: dict[str, Any], name: str, default: int | None = None) -> int:
    value = reply.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"the {reply.get('op')!r} reply has no integer {name!r}: {reply!r}")
    return value
