"""A kvloft connection that survives kvloft going away.

The connector must keep vLLM serving whether kvloft is up, down or restarting: while the link is
down every lookup is a miss and every save is skipped. :class:`Link` opens the connection on
first use, registers the instance (and, on a worker, its KV memory), and when kvloft goes away
it waits before the next attempt, doubling the wait up to a bound, so a dead server costs one
failed ``connect`` per back-off period and not one per scheduler step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..client import Client
from ..errors import ConnectionLost, KvloftError, ProtocolMismatch, RequestTimeout, ServerError, ServerUnavailable
from ..namespace import Namespace
from ..store import LayerMemory

log = logging.getLogger("vllm.kvloft")

#: Errors that mean "kvloft is not reachable now": the link goes down and retries later.
UNREACHABLE = (ServerUnavailable, ConnectionLost, RequestTimeout, OSError)


@dataclass(frozen=True)
class Memory:
    """A worker's registration: its rank and KV memory."""

    rank: int
    layers: Sequence[LayerMemory]
    device: str = "cpu"
    #: With a ``cuda:N`` device: the GPU's UUID and one ``(IPC handle, offset)`` per layer.
    gpu_uuid: bytes | None = None
    ipc: Sequence[tuple[bytes, int]] | None = None


class Link:
    """One process's connection to kvloft, opened on demand and re-opened with back-off.

    Args:
        socket_path: the server's socket.
        instance: the engine id every process of the engine registers.
        namespace: the engine's namespace; ``None`` until it is known (the link stays down).
        memory: the worker's rank and KV memory, or ``None`` for the scheduler.
        timeout: seconds for connecting and for each reply.
        backoff: ``(initial, max)`` seconds between attempts while kvloft is unreachable.
        client_name: the name kvloft logs for this connection.
        clock: monotonic clock (tests replace it).
    """

    def __init__(
        self,
        socket_path: str,
        instance: str,
        namespace: Namespace | None,
        memory: Memory | None = None,
        timeout: float = 1.0,
        backoff: tuple[float, float] = (0.5, 10.0),
        client_name: str = "vllm",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.socket_path = socket_path
        self.instance = instance
        self.namespace = namespace
        self.memory = memory
        self.timeout = timeout
        self.backoff = backoff
        self.client_name = client_name
        self._clock = clock
        self._client: Client | None = None
        self._next_attempt = 0.0
        self._delay = backoff[0]
        self._was_up = False
        #: Connections opened (1 for the first, then one per reconnection).
        self.connects = 0
        #: Times the link went down.
        self.drops = 0
        #: The kvloft server's hello reply on the current connection.
        self.server_info: dict | None = None

    @property
    def up(self) -> bool:
        """Whether a registered connection is open now."""
        return self._client is not None and self._client.connected

    def client(self) -> Client | None:
        """The registered client, connecting first when the back-off allows; ``None`` while
        kvloft is unreachable or the namespace is not known yet.

        Raises :class:`ProtocolMismatch` (kvloft speaks another protocol version) and
        :class:`ServerError` (kvloft refused the registration: a configuration error) so they
        are not mistaken for a passing outage.
        """
        if self._client is not None and self._client.connected:
            return self._client
        if self._client is not None:
            self._down("the connection closed")
        if self.namespace is None or self._clock() < self._next_attempt:
            return None
        client = Client(self.socket_path, timeout=self.timeout, client_name=self.client_name)
        try:
            self.server_info = client.connect()
            client.register_instance(self.instance, self.namespace)
            if self.memory is not None:
                m = self.memory
                client.register_memory(m.rank, m.layers, m.device, gpu_uuid=m.gpu_uuid, ipc=m.ipc)
        except (ProtocolMismatch, ServerError):
            # A configuration error, not an outage: raised to the caller, and not retried before
            # the back-off, so a refused registration is reported once per period, not per step.
            client.close()
            self._next_attempt = self._clock() + self._delay
            self._delay = min(self._delay * 2, self.backoff[1])
            raise
        except UNREACHABLE as e:
            client.close()
            self._schedule_retry(str(e))
            return None
        self._client = client
        self.connects += 1
        self._delay = self.backoff[0]
        if self.connects > 1:
            log.info("kvloft: reconnected to %s", self.socket_path)
        self._was_up = True
        return client

    def fail(self, error: BaseException) -> None:
        """Marks the link down after ``error`` from a request on it; the next :meth:`client`
        reconnects after the back-off."""
        self._down(str(error))

    def close(self) -> None:
        """Closes the connection (leases taken on it end)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def _down(self, why: str) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self.drops += 1
        self._schedule_retry(why)

    def _schedule_retry(self, why: str) -> None:
        if self._was_up or self.connects == 0 and self._delay == self.backoff[0]:
            log.warning(
                "kvloft at %s is unreachable (%s): serving without it (no hits, no saves); retrying in %.1f s",
                self.socket_path,
                why,
                self._delay,
            )
        self._was_up = False
        self._next_attempt = self._clock() + self._delay
        self._delay = min(self._delay * 2, self.backoff[1])


def is_unreachable(error: BaseException) -> bool:
    """Whether ``error`` means kvloft is not reachable now (the link should go down and retry)
    rather than a refused request."""
    if isinstance(error, ServerError):
        return error.code == "shutting_down"
    return isinstance(error, UNREACHABLE)
