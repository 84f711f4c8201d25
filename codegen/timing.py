"""Timing primitives for backend auto and the benchmarks (the candidates themselves are built in measure.py): CUDA-event medians after an L2 flush (or CUDA
graph replays), wall-clock blocks on the CPU (optionally with the caches evicted), and candidates
taking turns over rounds so a drift falls on all of them alike."""
from __future__ import annotations

import math
import statistics
import time

import torch

from sparsec.codegen import cpu_cache
from sparsec.errors import last_line

WARMUP, REPEATS = 5, 9
ROUNDS = 5  # backend auto on CUDA: candidates take turns, ROUNDS times (timed_in_rounds)
# On CPU too: another process taking a core for part of the measurement then slows every candidate,
# not only the one being timed (a helper's run saw dense at 8 ms for a 64 x 64 layer while two processes
# shared the 2 cores, timed to the end before the kernel's turn). Each turn is time_cpu of CPU_BLOCKS blocks.
CPU_ROUNDS, CPU_BLOCKS = 3, 3


def graph_replay(fn):
    """fn captured in a CUDA graph (kernel time without launch gaps), or fn when it cannot be captured."""
    try:
        g = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
            with torch.cuda.graph(g, stream=stream):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        return g.replay
    except Exception:  # noqa: BLE001 - some callables cannot be captured; time them eagerly
        return fn


L2_FLUSHES = ("clean", "dirty")
_L2_FLUSH: dict[int, torch.Tensor] = {}


def flush_l2(how: str = "clean") -> None:
    """Evict the L2 cache through a buffer several times its size, so the next run reads its weights
    from device memory, as a layer does in a model whose other layers' weights evicted them. (An
    H100's 50 MB L2 holds a whole 4096 x 4096 fp16 weight: timing repeated runs on it measures the cache.)

    "clean" reads the buffer: the L2 is left holding clean lines, which the timed run evicts for
    free, as after the previous layers of a model, which read their weights. "dirty" overwrites it
    (how the first H100 session flushed every run): the L2 is left full of dirty lines, and the timed
    run pays a write-back of as many bytes as it reads, up to the L2's size. That inflates the
    time of any memory-bound kernel and shrinks a smaller weight's gain: counting the write-back,
    cuBLAS's decode GEMMs on an H100 ran at 93-104% of the copy ceiling (47-74% without), and at
    14336 x 4096 a 2:4 layer moving its bytes as fast as cuBLAS could have shown at most 1.44x
    dense instead of 1.78x (bench/gpu_notes.md)."""
    device = torch.cuda.current_device()
    if device not in _L2_FLUSH:
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 << 20
        _L2_FLUSH[device] = torch.zeros(max(4 * l2, 256 << 20) // 4, dtype=torch.int32, device="cuda")
    if how == "clean":
        _L2_FLUSH[device].sum()  # reads every line; writes one number
    else:
        _L2_FLUSH[device].zero_()


def release_buffers() -> None:
    """Free the L2 flush buffer (at least 256 MB of GPU memory) and the CPU eviction buffer once a compile
    has measured its layers: kept for the process's life, they were memory the user's model never got."""
    _L2_FLUSH.clear()
    cpu_cache.release()


def time_cuda(fn, repeats: int = REPEATS, graph: bool = False, l2_flush: str = "clean") -> float:
    """Median seconds of fn() on the current CUDA stream, after warm-up, each run after an L2 flush
    (`l2_flush`, see flush_l2). graph=True replays fn from a CUDA graph where it captures: the GPU
    time of its kernels. Otherwise each run starts from an idle GPU, so the time includes getting
    the work there (Python, launches): what an eager caller waits."""
    if l2_flush not in L2_FLUSHES:
        raise ValueError(f"unknown L2 flush {l2_flush!r}; use one of {list(L2_FLUSHES)}")
    for _ in range(WARMUP):
        fn()
    torch.cuda.synchronize()
    run = graph_replay(fn) if graph else fn
    times = []
    for _ in range(repeats):
        flush_l2(l2_flush)
        if not graph:
            torch.cuda.synchronize()  # (else the launches would hide behind the flush)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def time_cpu(fn, block_s: float = 0.02, blocks: int = 7, cold: bool = False) -> float:
    """Seconds per call: the least single call over `blocks` blocks of repeated calls (a call longer
    than a block is a block alone). cold: the least of `blocks` single calls (at
    least 3), each after the CPU caches were evicted (codegen/cpu_cache.py).

    The least, not the median: on a shared machine another process takes the core for whole time
    slices, which only ever adds to a sample; with two processes on this project's 2 cores most
    samples of a short call held one (a 64 x 64 layer's median read 15 ms), and the median was that.
    The least disturbed sample is the call's own time, for every candidate alike. And the least single
    call of a block, not the block's mean: under heavier load a multi-threaded GEMM waits at its
    barrier for a descheduled thread in almost every block (a 64 x 64 layer read 6-16 ms per call,
    block after block), while single calls between time slices still run undisturbed."""
    fn()  # (a warm-up: lazy set-up, first-touch page faults)
    if cold:
        samples = []
        for _ in range(max(blocks, 3)):
            cpu_cache.evict()
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return min(samples)
    # Calls per block from the least of a quarter block of calls (at least 3), not from the first call: one
    # call held up by another process (33 ms for a 5 us call) made every block a single call, and with all
    # of a few held up too, the plan read 16-24 ms for that call and auto's choice was noise (2x dense).
    least, calls, start = math.inf, 0, time.perf_counter()
    while calls < 3 or (time.perf_counter() - start < block_s / 4 and least < block_s):
        before = time.perf_counter()
        fn()
        least = min(least, time.perf_counter() - before)
        calls += 1
    per_block = max(1, int(block_s / max(least, 1e-9)))
    for _ in range(blocks * per_block):
        start = time.perf_counter()
        fn()
        least = min(least, time.perf_counter() - start)
    return least


def timed_in_rounds(fns: dict, timer, rounds: int, failed: dict) -> dict[str, float]:
    """name -> the median over `rounds` rounds of timer(fn), the candidates taking turns in every
    round, so a drift while measuring (clocks ramping up from idle, another process) falls on every
    candidate alike instead of on whichever came first. (On the H100, 2026-11-23, timing each
    candidate to the end in turn measured dense, timed first, at 607 us against 98 us alone, and
    auto chose a kernel that was 0.7x dense.) A candidate that raises is named in `failed`."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if name in failed:
                continue
            try:
                with torch.no_grad():
                    samples[name].append(timer(fn))
            except Exception as e:  # noqa: BLE001 - a candidate that cannot run is not chosen, and is named
                failed[name] = last_line(e, 120)
    return {name: statistics.median(times) for name, times in samples.items() if name not in failed}
