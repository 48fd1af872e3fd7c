"""Pitched (2D) copy-engine copies between registered host slots and GPU memory: GB/s by row width.

    python3 scripts/device/dma2d_probe.py      # needs cupy and a GPU

512 slots of 512 KiB (32 layers x 16 KiB) in mmap'd host memory registered with the driver, like
kvloft's pool arena; one band (a layer) of every slot is copied as one cudaMemcpy2DAsync, the
shape of decision 57's layer-wise copies. Medians of CUDA-event timings.
"""
import ctypes, mmap, numpy as np, cupy as cp
rt = cp.cuda.runtime
S = 512 << 10          # slot bytes (32 layers x 16 KiB)
N = 512                # slots
host_bytes = S * N
# registered (not cudaHostAlloc) host memory, like kvloft's pool arena: mmap + cudaHostRegister
buf = mmap.mmap(-1, host_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
arr = np.frombuffer(buf, dtype=np.uint8); arr[:] = 1
hptr = arr.ctypes.data
rt.hostRegister(hptr, host_bytes, 0)
dev = cp.empty(host_bytes, dtype=cp.uint8)
s = cp.cuda.Stream(non_blocking=True)
e0, e1 = cp.cuda.Event(), cp.cuda.Event()
def timeit(fn, reps=20):
    ts = []
    for _ in range(reps):
        e0.record(s); fn(); e1.record(s); e1.synchronize()
        ts.append(cp.cuda.get_elapsed_time(e0, e1) / 1e3)
    ts.sort(); return ts[len(ts)//2]
H2D, D2H = 1, 2
print(f"{'case':<34} {'MiB':>6} {'ms':>8} {'GB/s':>7}")
for h2d in (True, False):
    d = "h2d" if h2d else "d2h"
    tot = 32 << 20
    t = timeit(lambda: rt.memcpyAsync(dev.data.ptr, hptr, tot, H2D, s.ptr) if h2d else rt.memcpyAsync(hptr, dev.data.ptr, tot, D2H, s.ptr))
    print(f"{d+' contiguous':<34} {tot>>20:>6} {t*1e3:8.3f} {tot/t/1e9:7.1f}")
    for width in (4096, 8192, 16384, 65536):
        rows = N
        def f():
            if h2d:
                rt.memcpy2DAsync(dev.data.ptr, width, hptr + width, S, width, rows, H2D, s.ptr)
            else:
                rt.memcpy2DAsync(hptr + width, S, dev.data.ptr, width, width, rows, D2H, s.ptr)
        t = timeit(f)
        b = width * rows
        print(f"{d+f' 2d width {width>>10}K x {rows} rows':<34} {b/2**20:6.1f} {t*1e3:8.3f} {b/t/1e9:7.1f}")
    # one layer of 512 blocks as 8 runs of 64 slots (8 2D copies)
    def g():
        for r in range(8):
            off = r * 64
            if h2d:
                rt.memcpy2DAsync(dev.data.ptr + off * 16384, 16384, hptr + off * S, S, 16384, 64, H2D, s.ptr)
            else:
                rt.memcpy2DAsync(hptr + off * S, S, dev.data.ptr + off * 16384, 16384, 16384, 64, D2H, s.ptr)
    t = timeit(g)
    print(f"{d+' 2d 16K, 8 runs of 64':<34} {8.0:6.1f} {t*1e3:8.3f} {8*2**20/t/1e9:7.1f}")
    # 32 layers back to back, each 2D 16K x 512 (a whole 256 MiB load layer by layer)
    def all_layers():
        for l in range(32):
            if h2d:
                rt.memcpy2DAsync(dev.data.ptr + l * (16384 * N), 16384, hptr + l * 16384, S, 16384, N, H2D, s.ptr)
            else:
                rt.memcpy2DAsync(hptr + l * 16384, S, dev.data.ptr + l * (16384 * N), 16384, 16384, N, D2H, s.ptr)
    t = timeit(all_layers, reps=7)
    print(f"{d+' 32 layers 2d 16K x 512':<34} {256:6d} {t*1e3:8.3f} {256*2**20/t/1e9:7.1f}")
    tot = 256 << 20
    t = timeit(lambda: rt.memcpyAsync(dev.data.ptr, hptr, tot, H2D, s.ptr) if h2d else rt.memcpyAsync(hptr, dev.data.ptr, tot, D2H, s.ptr), reps=7)
    print(f"{d+' contiguous 256 MiB':<34} {256:6d} {t*1e3:8.3f} {tot/t/1e9:7.1f}")
import time
t0 = time.perf_counter()
for l in range(32):
    rt.memcpy2DAsync(dev.data.ptr + l * (16384 * N), 16384, hptr + l * 16384, S, 16384, N, H2D, s.ptr)
t1 = time.perf_counter(); s.synchronize()
print(f"CPU time to queue 32 2D copies: {(t1-t0)*1e6:.0f} us")
