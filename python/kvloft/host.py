"""The host backend: KV caches in the worker's CPU memory.

The server copies blocks straight out of and into the worker's memory with
``process_vm_readv`` / ``process_vm_writev``. The kernel allows that when the server runs as
the same user and, under Yama (``/proc/sys/kernel/yama/ptrace_scope`` = 1, the default of
most distributions), only if the worker named the server as its ptracer with
``prctl(PR_SET_PTRACER, server_pid)``: :func:`grant_access` does that, and
:meth:`kvloft.Client.register_memory` calls it for ``device="cpu"`` with the pid from the
server's hello reply. A worker must also stay dumpable (no ``PR_SET_DUMPABLE`` 0).

:class:`HostKVCache` is a real CPU KV cache laid out like vLLM's, for tests and tools.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import sys
from collections.abc import Iterable
from types import TracebackType

from .store import LayerMemory

#: ``PR_SET_PTRACER`` from ``<linux/prctl.h>`` (``0x59616d61``, "Yama").
PR_SET_PTRACER = 0x59616D61
#: ``PR_SET_PTRACER_ANY``: any process may trace this one. Never used by this package.
PR_SET_PTRACER_ANY = (1 << 64) - 1

_libc: ctypes.CDLL | None = None


def _prctl() -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fn = _libc.prctl
    fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    fn.restype = ctypes.c_int
    return fn


def grant_access(server_pid: int) -> bool:
    """Let process ``server_pid`` read and write this process's memory (Yama's ptracer).

    Calls ``prctl(PR_SET_PTRACER, server_pid)``. Returns ``True`` when the grant was set and
    ``False`` when there is nothing to grant: not Linux, or Yama is not active (the kernel
    answers ``EINVAL``; then the usual same-user rule applies). Raises :class:`OSError` for
    any other failure, and :class:`ValueError` for a pid that is not positive.

    A process has one such ptracer: a later call (for another server) replaces it. The grant
    also covers the process's threads, and stays until the server exits.
    """
    if isinstance(server_pid, bool) or not isinstance(server_pid, int) or server_pid <= 0:
        raise ValueError(f"server_pid must be a positive process id, got {server_pid!r}")
    if not sys.platform.startswith("linux"):
        return False
    prctl = _prctl()
    if prctl(PR_SET_PTRACER, server_pid, 0, 0, 0) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EINVAL:
        return False  # no Yama in this kernel: nothing to grant
    raise OSError(err, f"prctl(PR_SET_PTRACER, {server_pid}) failed: {os.strerror(err)}")


def pattern(seed: int | str | bytes, size: int) -> bytes:
    """``size`` deterministic pseudo-random bytes derived from ``seed`` (SHAKE-256).

    The same seed gives the same bytes in every process and on every machine, so a test can
    regenerate what it expects to load instead of carrying it over.
    """
    if isinstance(seed, int):
        key = b"kvloft-int:%d" % seed
    elif isinstance(seed, str):
        key = b"kvloft-str:" + seed.encode()
    else:
        key = b"kvloft-bytes:" + bytes(seed)
    return hashlib.shake_256(key).digest(size)


class HostKVCache:
    """A CPU KV cache shaped like vLLM's: per layer one buffer ``[segments, num_blocks,
    block_bytes]`` (``segments`` = 2 for K and V).

    Each layer is an anonymous ``mmap`` (page aligned, zeroed); :meth:`layers` describes them
    for :meth:`kvloft.Client.register_memory`. A block's bytes, in :meth:`read_block` order,
    are layer 0 segment 0, layer 0 segment 1, layer 1 segment 0, ... — :attr:`slice_bytes`
    in all, the size of this rank's slice of one block.

    Close it (or use it as a context manager) only after the server no longer needs it.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_bytes: int, segments: int = 2) -> None:
        for name, value in (
            ("num_layers", num_layers),
            ("num_blocks", num_blocks),
            ("block_bytes", block_bytes),
            ("segments", segments),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_bytes = block_bytes
        self.segments = segments
        #: Bytes of one layer's buffer.
        self.layer_bytes = segments * num_blocks * block_bytes
        self._maps: list[mmap.mmap] = []
        self._views: list[ctypes.Array[ctypes.c_char]] = []
        try:
            for _ in range(num_layers):
                m = mmap.mmap(-1, self.layer_bytes)
                self._maps.append(m)
                self._views.append((ctypes.c_char * self.layer_bytes).from_buffer(m))
        except BaseException:
            self.close()
            raise

    # -- description ------------------------------------------------------------------

    @property
    def slice_bytes(self) -> int:
        """Bytes of one block over every layer and segment (the server's ``slice_bytes``)."""
        return self.num_layers * self.segments * self.block_bytes

    def address(self, layer: int) -> int:
        """Address of the buffer of ``layer`` (its block 0, segment 0)."""
        return ctypes.addressof(self._views[layer])

    def layers(self) -> list[LayerMemory]:
        """One :class:`kvloft.LayerMemory` per layer, for ``register_memory``."""
        return [
            LayerMemory(
                base=self.address(layer),
                num_blocks=self.num_blocks,
                block_stride=self.block_bytes,
                segments=self.segments,
                segment_stride=self.num_blocks * self.block_bytes,
                segment_bytes=self.block_bytes,
            )
            for layer in range(self.num_layers)
        ]

    # -- block contents ---------------------------------------------------------------

    def _offsets(self, block_id: int) -> Iterable[tuple[mmap.mmap, int]]:
        if isinstance(block_id, bool) or not isinstance(block_id, int) or not 0 <= block_id < self.num_blocks:
            raise IndexError(f"block id {block_id!r} is outside 0..{self.num_blocks - 1}")
        if not self._maps:
            raise ValueError("the HostKVCache is closed")
        for m in self._maps:
            for s in range(self.segments):
                yield m, (s * self.num_blocks + block_id) * self.block_bytes

    def write_block(self, block_id: int, data: bytes) -> None:
        """Write :attr:`slice_bytes` bytes into a block, in :meth:`read_block` order."""
        if len(data) != self.slice_bytes:
            raise ValueError(f"a block holds {self.slice_bytes} bytes, got {len(data)}")
        view = memoryview(data)
        pos = 0
        for m, off in self._offsets(block_id):
            m[off : off + self.block_bytes] = view[pos : pos + self.block_bytes]
            pos += self.block_bytes

    def read_block(self, block_id: int) -> bytes:
        """A block's bytes over every layer and segment."""
        return b"".join(m[off : off + self.block_bytes] for m, off in self._offsets(block_id))

    def expected(self, seed: int | str | bytes) -> bytes:
        """The bytes :meth:`fill_block` writes for ``seed``."""
        return pattern(seed, self.slice_bytes)

    def fill_block(self, block_id: int, seed: int | str | bytes) -> bytes:
        """Fill a block with deterministic pseudo-random bytes from ``seed``; returns them."""
        data = self.expected(seed)
        self.write_block(block_id, data)
        return data

    def poison(self, block_ids: Iterable[int], byte: int = 0xA5) -> None:
        """Overwrite blocks with one repeated byte, so stale contents cannot pass a check."""
        junk = bytes([byte]) * self.slice_bytes
        for b in block_ids:
            self.write_block(b, junk)

    # -- lifetime ---------------------------------------------------------------------

    def close(self) -> None:
        """Unmap the buffers; the registered addresses become invalid."""
        self._views.clear()
        maps, self._maps = self._maps, []
        for m in maps:
            m.close()

    def __enter__(self) -> HostKVCache:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<kvloft.HostKVCache layers={self.num_layers} blocks={self.num_blocks} "
            f"block_bytes={self.block_bytes} segments={self.segments}>"
        )
