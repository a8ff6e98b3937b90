"""Measurement for every benchmark: median wall-clock time and peak extra memory, the same way for
every plugin (the registry of benchmarks and ``BenchResult`` live in ``tl_plugins.bench``).

What :class:`PeakMemory` measures, by device:

* **CUDA**: the caching allocator's peak (``torch.cuda.max_memory_allocated``) above what was allocated
  on entry. Tensors only, exact; the CUDA context and cached-but-free blocks are not counted.
* **CPU**: growth of the process's resident set (RSS) above its size on entry. On Linux the figure is
  the kernel's own high-water mark: writing ``5`` to ``/proc/self/clear_refs`` resets ``VmHWM`` to the
  current RSS, so ``VmHWM`` on exit is the exact peak, with no sampling to miss a short-lived buffer
  (``method == "kernel high-water mark"``). Where that is unavailable (not Linux, a kernel or sandbox
  without ``clear_refs``) a thread samples the RSS every ``interval`` seconds, which can miss a spike
  shorter than that and so gives a lower bound (``method == "sampled resident set"``).

Why the resident set on CPU, not ``tracemalloc`` or an allocator counter: torch allocates CPU tensors
outside Python's allocator, so ``tracemalloc`` does not see them, and torch keeps no peak counter for
its CPU allocator. The resident set counts everything the process touches (tensors, Python objects,
library scratch buffers such as oneDNN's), which is what a user's machine has to hold.

Two things can understate a CPU figure, and the benchmarks guard against both: glibc keeps freed memory
resident and raises its mmap threshold after large frees, so memory freed and allocated again does not
grow the RSS (:func:`fixed_mmap_threshold` pins the threshold), and a process that already held and
freed large tensors serves new ones from resident memory (figures that must be exact are measured in a
freshly spawned process, as ``tl-plugins bench topk`` does).

Measurements nest: an inner :class:`PeakMemory` resets the same high-water mark (or CUDA peak counter)
as the outer one, so the outer records the peak so far before the reset and takes the inner's peak on
its exit; the outer figure is the peak over its whole block.
"""

from __future__ import annotations

import gc
import os
import resource
import statistics
import threading
import time
from typing import Any, Callable, Optional

import torch

#: The three ways :class:`PeakMemory` can measure (its ``method`` attribute).
KERNEL_HWM = "kernel high-water mark"
SAMPLED_RSS = "sampled resident set"
CUDA_ALLOCATOR = "CUDA allocator"


def median_time(fn: Callable[[], Any], *, repeat: int = 5, warmup: int = 1, sync: bool = False) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeat`` runs after ``warmup`` runs.

    ``sync=True`` synchronises CUDA before and after each run (when CUDA is available), so a run's time
    includes its kernels and not only their launch.
    """
    if repeat < 1:
        raise ValueError(f"repeat: got {repeat!r}; accepted: an int >= 1")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_bytes() -> int:
    """Resident memory of this process now (bytes); the peak so far where the current figure is unreadable."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - non-Linux
        return process_peak_rss_bytes()


def process_peak_rss_bytes() -> int:
    """The resident-set high-water mark of this process (bytes): ``VmHWM`` on Linux, else ``ru_maxrss``.

    A :class:`PeakMemory` on the CPU resets it (Linux), so read it where no measurement is running,
    e.g. at the end of a process started to measure one thing (``tl-plugins bench load``).
    """
    try:
        return _status_kib("VmHWM") * 1024
    except (OSError, KeyError, ValueError):  # pragma: no cover - non-Linux
        scale = 1 if os.uname().sysname == "Darwin" else 1024  # bytes on macOS, KiB elsewhere
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _reset_hwm() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS; False where that is unavailable."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _status_kib("VmHWM") <= _status_kib("VmRSS") + 1024  # else the reset did not take
    except (OSError, KeyError, ValueError):
        return False


def fixed_mmap_threshold() -> bool:
    """Make glibc serve allocations >= 128 KiB with mmap and return them on free.

    By default glibc raises its mmap threshold after large frees (up to 32 MiB), so freed tensor
    memory stays resident and later allocations do not show in the resident set: peak-RSS figures
    would depend on what ran before. Returns False where mallopt is unavailable (non-glibc).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 128 * 1024) == 1
        libc.mallopt(m_trim_threshold, 128 * 1024)
        return bool(ok)
    except (OSError, AttributeError):
        return False


_active: list["PeakMemory"] = []  # the measurements running now, outermost first


class PeakMemory:
    """Context manager: peak memory of its block. ``start`` and ``peak`` are absolute bytes (resident set on
    the CPU, allocated tensor bytes on CUDA); ``peak_extra`` = ``peak - start``; ``method`` says how it was
    measured (see the module docstring).

    >>> with PeakMemory("cpu") as mem:
    ...     x = torch.ones(2**24); del x   # 64 MiB, freed before the block ends
    >>> mem.peak_extra >= 64 * 2**20  # with the kernel's high-water mark
    True
    """

    def __init__(self, device: str | torch.device = "cpu", *, interval: float = 0.001):
        self.device = str(device)
        self.interval = interval
        self.start = 0
        self.peak = 0
        self.method = ""
        self._seen = 0  # peak recorded before a nested measurement reset the counter
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def peak_extra(self) -> int:
        return self.peak - self.start

    def _counter(self) -> int:
        """The high-water counter this measurement reads, now (bytes)."""
        if self.method == CUDA_ALLOCATOR:
            return torch.cuda.max_memory_allocated(self.device)
        if self.method == KERNEL_HWM:
            return _status_kib("VmHWM") * 1024
        return self._seen

    def _shares_counter(self, other: "PeakMemory") -> bool:
        return self.method == other.method and (self.method != CUDA_ALLOCATOR or self.device == other.device)

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.startswith("cuda"):
            self.method = CUDA_ALLOCATOR
            torch.cuda.synchronize(self.device)
            for outer in _active:
                if outer._shares_counter(self):
                    outer._seen = max(outer._seen, outer._counter())
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = self._seen = torch.cuda.memory_allocated(self.device)
        else:
            hwm_before = {id(o): o._counter() for o in _active if o.method == KERNEL_HWM}
            if _reset_hwm():
                self.method = KERNEL_HWM
                for outer in _active:
                    if id(outer) in hwm_before:
                        outer._seen = max(outer._seen, hwm_before[id(outer)])
                self.start = self._seen = _status_kib("VmRSS") * 1024
            else:
                self.method = SAMPLED_RSS
                self.start = self._seen = rss_bytes()
                self._stop.clear()
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        _active.append(self)
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._seen = max(self._seen, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        if self.method == CUDA_ALLOCATOR:
            torch.cuda.synchronize(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._seen = max(self._seen, rss_bytes())
        self.peak = max(self._seen, self._counter())
        _active.remove(self)
        for outer in _active:
            if outer._shares_counter(self):
                outer._seen = max(outer._seen, self.peak)


def peak_cpu_extra(run: Callable[[], Any]) -> int:
    """Peak resident-set growth of ``run()`` (bytes), measured by :class:`PeakMemory` on the CPU."""
    with PeakMemory("cpu") as mem:
        run()
    return mem.peak_extra


def peak_cuda_extra(run: Callable[[], Any], device: str = "cuda") -> int:
    """Peak CUDA memory allocated by ``run()`` above what was allocated before (bytes)."""
    with PeakMemory(device) as mem:
        run()
    return mem.peak_extra


def peak_extra(run: Callable[[], Any], device: str = "cpu") -> int:
    """Peak extra memory of ``run()`` on ``device`` (bytes): the CUDA allocator's peak on a CUDA device,
    the resident set's elsewhere."""
    return peak_cuda_extra(run, device) if str(device).startswith("cuda") else peak_cpu_extra(run)


def load_average() -> str:
    """The machine's 1-, 5- and 15-minute load averages as ``"1.20 0.90 0.75"``, for the line a figure
    is printed with (a figure from a shared machine says how shared it was)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
