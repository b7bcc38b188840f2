"""Memory budgets and attention chunk sizes (stage peaks: `progress.py`).

Attention is the one place where memory grows with the square of the token
count. On Metal, ``mx.fast.scaled_dot_product_attention`` runs a fused
(flash-style) kernel for unmasked attention with head dims 64..256 (128 for
Wan): it never holds the score matrix, so splitting the queries would only
add launches. The CPU path, MLX's CUDA backend (fused only for a single
query), and any call with an array mask fall back to matmul -> softmax ->
matmul and materialize ``batch * heads * Lq * Lk`` scores (measured here:
~1.05-1.25x that many elements of the input dtype at peak). There the
queries are cut into chunks whose scores fit a byte budget.
"""

from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager

import mlx.core as mx

from .errors import OmnimatteError

GB = 1 << 30

# Bytes the materialized scores of one attention call may take when no budget
# is given (CPU / non-Metal). For a 2 x 32,760-token 1.3B step (12 heads,
# float32) that is chunks of 128 queries, each still ~50 GFLOP of work.
DEFAULT_ATTENTION_BUDGET = 1 << 30

# Scores are held in the input dtype, and the softmax works in float32:
# per score element budget itemsize + 4 bytes (conservative vs. the measured peak).
_SOFTMAX_BYTES = 4


# Freed buffers MLX keeps for reuse on the CPU while a DiT runs. Its CPU
# default is 32 MiB, so every attention chunk's scores and every FFN hidden
# (~1 GB each at 32,760 tokens) came back as fresh pages: ~123k page faults a
# chunk, a third of a forward's time in the kernel (parity/bench_dit_gemm.py).
CPU_BUFFER_CACHE = 4 * GB


@contextmanager
def buffer_cache(limit: int = CPU_BUFFER_CACHE):
    """Within the block, MLX on the CPU keeps up to `limit` bytes of freed
    buffers for reuse; after it, the previous limit, the cache emptied."""
    if mx.default_device().type != mx.DeviceType.cpu:
        yield
        return
    previous = mx.set_cache_limit(limit)
    try:
        yield
    finally:
        mx.set_cache_limit(previous)
        mx.clear_cache()


# glibc's malloc gives every freed block over its mmap threshold (32 MiB at
# most) back to the kernel and trims its heap's top past 128 KiB, so MLX's
# large CPU buffers (and torch's) came back as fresh zeroed pages: at a
# 672x384, batch-16 U-Net iteration half the CPU time was the kernel
# clearing pages (parity/bench_optimize.py). Kept, the heap is reused.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_KEPT_HEAP = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_TOP_PAD, 256 << 20))  # -1: never trim
_GLIBC_DEFAULTS = ((_M_MMAP_MAX, 65536), (_M_TRIM_THRESHOLD, 128 << 10), (_M_TOP_PAD, 128 << 10))
_heap_depth = [0]


def _libc():
    """The process's C library where it is glibc (mallopt, malloc_trim), else None."""
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _mallopt(libc, options) -> None:
    for option, value in options:
        libc.mallopt(ctypes.c_int(option), ctypes.c_int(value))


@contextmanager
def kept_heap():
    """Within the block (nested blocks: the outermost), glibc keeps freed
    memory for reuse: no mmap'd blocks, no trimming. After it, glibc's
    defaults and the unused heap given back. Elsewhere (macOS, Metal's
    allocator, musl) nothing changes."""
    libc = _libc() if mx.default_device().type == mx.DeviceType.cpu else None
    outermost = libc is not None and not _heap_depth[0]
    if outermost:
        _mallopt(libc, _KEPT_HEAP)
    _heap_depth[0] += 1
    try:
        yield
    finally:
        _heap_depth[0] -= 1
        if outermost:
            _mallopt(libc, _GLIBC_DEFAULTS)
            libc.malloc_trim(ctypes.c_size_t(0))


@contextmanager
def blas_threads(n: int):
    """OpenBLAS (where it serves MLX's matmuls in this process) on ``n``
    threads within the block: the U-Net's batch parts each run their own
    matmuls on their own stream, and two-thread GEMMs on both oversubscribe
    the cores (~20% slower at 672x384). Elsewhere (Accelerate, the GPU)
    nothing changes."""
    try:
        lib = ctypes.CDLL(None)
        get, set_ = lib.openblas_get_num_threads, lib.openblas_set_num_threads
    except (OSError, AttributeError):
        yield
        return
    before = get()
    set_(ctypes.c_int(n))
    try:
        yield
    finally:
        set_(ctypes.c_int(before))


# MLX's CPU backend runs a stream's ops one at a time, elementwise ones on a
# single core: work split across streams is what keeps both cores busy
# (the U-Net's batch parts, attention's head groups).
CPU_STREAMS = 2
_streams: dict[str, list] = {}  # per device: stream k (the first, the device's default stream)


def streams(n: int, device=None) -> list:
    """``n`` streams of ``device`` (default: the default device), the same ones each call."""
    device = device or mx.default_device()
    pool = _streams.setdefault(str(device), [mx.default_stream(device)])
    while len(pool) < n:
        pool.append(mx.new_stream(device))
    return pool[:n]


def fused_attention(device=None) -> bool:
    """Whether unmasked SDPA runs a fused kernel (no score matrix): Metal GPUs."""
    device = device or mx.default_device()
    return device.type == mx.gpu and mx.metal.is_available()


def query_chunk(budget_bytes: int, heads: int, key_len: int, dtype=mx.float32, batch: int = 1,
                query_len: int | None = None, multiple: int = 64) -> int:
    """Number of query rows whose attention scores (``batch x heads x rows x
    key_len``, plus the float32 softmax) fit in ``budget_bytes``.

    Rounded down to a multiple of ``multiple`` (kernel-friendly tiles) when at
    least that many rows fit; never below 1; at most ``query_len`` when given.
    """
    if not budget_bytes or budget_bytes <= 0:
        raise OmnimatteError(f"attention memory budget {budget_bytes!r}: must be a positive number of bytes")
    per_row = batch * heads * key_len * (dtype.size + _SOFTMAX_BYTES)
    rows = max(1, int(budget_bytes) // max(1, per_row))
    if rows >= multiple:
        rows -= rows % multiple
    return rows if query_len is None else max(1, min(rows, query_len))


def attention_chunk(heads: int, key_len: int, query_len: int, dtype=mx.float32, batch: int = 1,
                    budget_bytes: int | None = None) -> int:
    """Query chunk for one attention call: all queries at once where SDPA is
    fused and no budget is asked for, else ``query_chunk`` of the budget."""
    if budget_bytes is None:
        if fused_attention():
            return query_len
        budget_bytes = DEFAULT_ATTENTION_BUDGET
    return query_chunk(budget_bytes, heads, key_len, dtype, batch, query_len)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def machine_memory() -> int:
    """Unified memory on a Mac (what Metal may use), else physical RAM."""
    try:
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        if info.get("memory_size"):
            return int(info["memory_size"])
    except (RuntimeError, AttributeError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
