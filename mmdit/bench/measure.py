"""Timing, peak memory and matmul peak, measured the same way for every side of a comparison."""

from __future__ import annotations

import ctypes
import multiprocessing
import re
import statistics
import sys
import time
from contextlib import contextmanager

import torch


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds for one call, with the device drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def alternate(fns: dict, device: torch.device, rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function over `rounds` rounds, run in turn (a, b, a, b, ...) so drifts of a noisy
    machine (frequency, other load) hit every side alike. Returns every round's time per function."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return times


def paired_ratio(slow: list[float], fast: list[float]) -> float:
    """Median over rounds of slow/fast within each round: neighbours in time share the machine's state, so this
    is steadier than a ratio of medians on a machine whose speed drifts."""
    return statistics.median(a / b for a, b in zip(slow, fast))


def matmul_peak(device: torch.device, dtype: torch.dtype, sizes=(1024, 2048, 3072), reps: int = 5) -> float:
    """This machine's dense-matmul rate in FLOP/s: the best of square matmuls of a few sizes."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        seconds = min(alternate({"mm": lambda: a @ b}, device, reps)["mm"])
        best = max(best, 2 * n**3 / seconds)
    return best


def _rss_kib() -> tuple[int, int]:
    status = open("/proc/self/status").read()
    return tuple(int(re.search(rf"{k}:\s+(\d+)", status).group(1)) for k in ("VmRSS", "VmHWM"))


def cpu_peak_supported() -> bool:
    try:
        _rss_kib()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except (OSError, AttributeError):
        return False


def peak_step_memory(fn, device: torch.device) -> int | None:
    """Peak memory of one call of fn above the level before it (fn runs once before, so buffers that persist
    between calls, such as optimiser state, are in the baseline). On CPU call it in a process of its own,
    after track_freed_memory(): see measure_in_subprocess."""
    fn()
    with peak_memory(device) as mem:
        fn()
    return mem["bytes"]


def track_freed_memory():
    """Make freed tensor memory go back to the OS at once, so resident memory tracks live tensors: glibc's
    malloc otherwise raises its mmap threshold after frees and keeps large blocks in the heap. This slows
    allocation, so it is set only in processes that measure memory, never in timed ones."""
    if sys.platform.startswith("linux"):
        M_MMAP_THRESHOLD = -3
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 * 1024)


def measure_in_subprocess(target, *args):
    """Run target(*args) -> picklable result in a fresh (spawned) interpreter; None if it fails. Forking would
    inherit a used OpenMP pool, which deadlocks."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_put_result, args=(queue, target, args))
    child.start()
    result = queue.get()
    child.join()
    return result


def _put_result(queue, target, args):
    try:
        queue.put(target(*args))
    except Exception as e:  # report, do not hang the parent
        print(f"memory measurement failed: {e}", file=sys.stderr)
        queue.put(None)


@contextmanager
def peak_memory(device: torch.device):
    """Yields a dict whose 'bytes' is set on exit to the peak memory above the level at entry.

    CUDA: the caching allocator's peak. CPU (Linux): the process's peak resident set (VmHWM, reset through
    /proc/self/clear_refs) minus the resident set at entry. None where neither is available.
    """
    result = {"bytes": None}
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield result
        synchronize(device)
        result["bytes"] = torch.cuda.max_memory_allocated(device) - base
    elif cpu_peak_supported():
        base = _rss_kib()[0]
        yield result
        result["bytes"] = (_rss_kib()[1] - base) * 1024
    else:
        yield result
