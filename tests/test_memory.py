"""Query chunk sizes from a memory budget; peak reporting; the CPU heap and BLAS threads."""

import ctypes
import subprocess
import sys

import mlx.core as mx
import pytest

from mlx_omnimatte import memory as M
from mlx_omnimatte.errors import OmnimatteError


def test_query_chunk_fits_budget():
    # 12 heads x 32,768 keys, fp32: (4 + 4) bytes per score -> 3 MiB per query row
    per_row = 12 * 32768 * 8
    assert M.query_chunk(1 << 30, 12, 32768, mx.float32) == 320  # 341 rows fit, rounded to 64
    assert M.query_chunk(1 << 30, 12, 32768, mx.float32) * per_row <= 1 << 30
    # bf16 scores take less: more rows
    assert M.query_chunk(1 << 30, 12, 32768, mx.bfloat16) == 448  # 455 fit
    # batch 2 halves it; tiny budgets give single rows, never 0
    assert M.query_chunk(1 << 30, 12, 32768, mx.float32, batch=2) == 128
    assert M.query_chunk(per_row * 5, 12, 32768, mx.float32) == 5
    assert M.query_chunk(10, 12, 32768, mx.float32) == 1
    # capped at the query length
    assert M.query_chunk(1 << 40, 12, 32768, mx.float32, query_len=1000) == 1000


def test_attention_chunk_per_device():
    chunk = M.attention_chunk(12, 32768, 32768, mx.float32)
    if M.fused_attention():
        assert chunk == 32768  # fused kernel: no score matrix, no chunking
    else:
        assert chunk == M.query_chunk(M.DEFAULT_ATTENTION_BUDGET, 12, 32768, mx.float32)
    assert M.attention_chunk(12, 32768, 32768, mx.float32, budget_bytes=12 * 32768 * 8 * 64) == 64


def test_bad_budget():
    with pytest.raises(OmnimatteError, match="budget 0"):
        M.query_chunk(0, 12, 100)
    with pytest.raises(OmnimatteError, match="budget -5"):
        M.query_chunk(-5, 12, 100)


def test_stage_peaks():
    from mlx_omnimatte.progress import quiet

    from mlx_omnimatte.progress import stage

    report = quiet()
    with stage(report, "alloc", 1) as tick:
        a = mx.zeros((1024, 1024))  # 4 MiB
        mx.eval(a)
        tick()
    with stage(report, "small"):
        mx.eval(mx.zeros((8,)))
    assert len(report.records) == 2
    (n1, s1, p1), (n2, _, p2) = [(r.name, r.seconds, r.peak_bytes) for r in report.records]
    assert n1 == "alloc" and p1 >= 4 << 20 and s1 >= 0
    assert report.peak == max(p1, p2)
    assert report.lines()[0].startswith("alloc: peak ") and "MiB" in report.lines()[0]
    assert M.format_bytes(512) == "512 B" and M.format_bytes(3 << 30) == "3.00 GiB"


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the CPU's buffer cache")
def test_buffer_cache_keeps_freed_buffers_inside_only():
    """Inside, a freed 64 MiB buffer stays for reuse (MLX's CPU default of 32
    MiB would return it); after, the limit is the previous one, the cache empty."""
    before = mx.set_cache_limit(32 << 20)
    try:
        with M.buffer_cache(256 << 20):
            a = mx.ones((16 << 20,))  # 64 MiB
            mx.eval(a)
            del a
            assert mx.get_cache_memory() >= 64 << 20
        assert mx.get_cache_memory() == 0
        assert mx.set_cache_limit(32 << 20) == 32 << 20
    finally:
        mx.set_cache_limit(before)


_HEAP_CHECK = """
import ctypes
from mlx_omnimatte import memory as M

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc, size = ctypes.CDLL(None), 64 << 20
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def mapped_after_malloc(n):
    p = libc.malloc(n)
    mapped = libc.mallinfo2().hblkhd
    libc.free(p)
    return mapped

base = mapped_after_malloc(0)
assert mapped_after_malloc(size) >= base + size, "glibc's default: mapped on its own"
with M.kept_heap():
    assert mapped_after_malloc(size) < base + size, "inside: from the heap"
    heap = libc.mallinfo2().arena
    assert heap >= size, "freed, kept"
    with M.kept_heap():
        pass
    assert mapped_after_malloc(size) < base + size, "nested: the outer block holds"
assert libc.mallinfo2().arena < heap - size // 2, "after: the heap's top given back"
assert mapped_after_malloc(size) >= base + size, "after: mapped again"
print("ok")
"""


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2") or mx.default_device() != mx.cpu,
                    reason="glibc's malloc on the CPU")
def test_kept_heap_serves_big_blocks_from_the_heap_and_keeps_them_inside_only():
    """glibc maps a 64 MiB block on its own and unmaps it when freed; inside
    (nested blocks too) it comes from the heap, which stays that large once
    freed; after, blocks are mapped again and the heap's unused top given
    back. In a fresh process: where a block comes from depends on what the
    process's heap already holds free."""
    out = subprocess.run([sys.executable, "-c", _HEAP_CHECK], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def _openblas():
    try:
        lib = ctypes.CDLL(None)
        return lib if hasattr(lib, "openblas_get_num_threads") else None
    except OSError:
        return None


@pytest.mark.skipif(_openblas() is None, reason="OpenBLAS serving MLX's matmuls (scripts/test.sh preloads it)")
def test_blas_threads_sets_openblas_within_the_block_only():
    lib = _openblas()
    before = lib.openblas_get_num_threads()
    lib.openblas_set_num_threads(2)
    try:
        with M.blas_threads(1):
            assert lib.openblas_get_num_threads() == 1
        assert lib.openblas_get_num_threads() == 2
    finally:
        lib.openblas_set_num_threads(before)
