"""The host backend's client side: the access grant and the CPU KV cache helper. A child
process reads the cache with process_vm_readv, as the server does, at the offsets the
LayerMemory description gives."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import subprocess
import sys
import textwrap

import pytest
from support import python_env

import kvloft
from kvloft import HostKVCache, LayerMemory
from kvloft.host import PR_SET_PTRACER, grant_access, pattern


def test_cache_is_laid_out_like_vllm_cpu_kv_cache() -> None:
    with HostKVCache(num_layers=3, num_blocks=10, block_bytes=256) as cache:
        layers = cache.layers()
        assert len(layers) == 3 and cache.slice_bytes == 3 * 2 * 256
        for i, layer in enumerate(layers):
            assert layer == LayerMemory(
                base=cache.address(i),
                num_blocks=10,
                block_stride=256,
                segments=2,
                segment_stride=10 * 256,
                segment_bytes=256,
            )
            assert layer.base % 4096 == 0  # anonymous mmap: page aligned
        assert len({layer.base for layer in layers}) == 3
        # Segment s of block b is at base + b * block_stride + s * segment_stride.
        data = cache.fill_block(7, "seed")
        for i, layer in enumerate(layers):
            for s in range(2):
                addr = layer.base + 7 * layer.block_stride + s * layer.segment_stride
                got = ctypes.string_at(addr, layer.segment_bytes)
                start = (i * 2 + s) * 256
                assert got == data[start : start + 256]
        assert cache.read_block(7) == data == cache.expected("seed")
        assert cache.read_block(6) == bytes(cache.slice_bytes)  # neighbours untouched
        assert cache.read_block(8) == bytes(cache.slice_bytes)


def test_fill_read_poison() -> None:
    with HostKVCache(num_layers=2, num_blocks=4, block_bytes=64, segments=1) as cache:
        assert cache.layers()[0].segments == 1 and cache.slice_bytes == 128
        a = cache.fill_block(0, b"\x01" * 32)
        b = cache.fill_block(1, 12345)
        assert a != b and len(a) == len(b) == 128
        cache.poison([0, 1], byte=0xDB)
        assert cache.read_block(0) == cache.read_block(1) == b"\xdb" * 128
        cache.write_block(2, a)
        assert cache.read_block(2) == a
        with pytest.raises(IndexError):
            cache.read_block(4)
        with pytest.raises(ValueError):
            cache.write_block(0, b"short")
    with pytest.raises(ValueError):
        HostKVCache(num_layers=0, num_blocks=1, block_bytes=1)


def test_pattern_is_deterministic_across_processes() -> None:
    assert pattern("x", 100) == pattern("x", 100)
    assert pattern("x", 100) != pattern("y", 100)
    assert pattern(1, 50) != pattern("1", 50) != pattern(b"1", 50)
    code = "import kvloft.host as h, sys; sys.stdout.write(h.pattern(b'abc', 4096).hex())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=python_env(), check=True)
    assert bytes.fromhex(out.stdout) == pattern(b"abc", 4096)


def test_grant_access() -> None:
    assert PR_SET_PTRACER == 0x59616D61
    assert grant_access(os.getpid()) in (True, False)  # False: no Yama on this kernel
    for bad in (0, -5, "1", True):
        with pytest.raises(ValueError):
            grant_access(bad)  # type: ignore[arg-type]


def test_yama_einval_is_ignored_and_other_errors_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    import kvloft.host as host

    def failing(err: int):
        def prctl(*args: int) -> int:
            assert args[0] == PR_SET_PTRACER and args[1] == 77
            ctypes.set_errno(err)
            return -1

        return lambda: prctl

    monkeypatch.setattr(host, "_prctl", failing(errno.EINVAL))
    assert grant_access(77) is False
    monkeypatch.setattr(host, "_prctl", failing(errno.EPERM))
    with pytest.raises(OSError) as e:
        grant_access(77)
    assert e.value.errno == errno.EPERM


READER = textwrap.dedent(
    """
    import ctypes, hashlib, os, sys

    class iovec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

    libc = ctypes.CDLL(None, use_errno=True)
    pid = int(sys.argv[1])
    sys.stdin.readline()  # the parent granted access
    digest = hashlib.sha256()
    for spec in sys.argv[2:]:
        addr, n = (int(x) for x in spec.split(":"))
        buf = ctypes.create_string_buffer(n)
        local, remote = iovec(ctypes.addressof(buf), n), iovec(addr, n)
        got = libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if got != n:
            err = ctypes.get_errno()
            print(f"process_vm_readv: {os.strerror(err)} ({err}), got {got}", file=sys.stderr)
            sys.exit(3)
        digest.update(buf.raw)
    print(digest.hexdigest())
    """
)


def test_another_process_reads_a_block_after_the_grant() -> None:
    """What the server's host backend does: read one block's segments from this process."""
    with HostKVCache(num_layers=2, num_blocks=8, block_bytes=4096) as cache:
        data = cache.fill_block(5, "remote")
        specs = []
        for layer in cache.layers():
            for s in range(layer.segments):
                specs.append(f"{layer.base + 5 * layer.block_stride + s * layer.segment_stride}:{layer.segment_bytes}")
        child = subprocess.Popen(
            [sys.executable, "-c", READER, str(os.getpid()), *specs],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            kvloft.grant_access(child.pid)
            out, err = child.communicate("go\n", timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert child.returncode == 0, err
        assert out.strip() == hashlib.sha256(data).hexdigest()
