"""tl_plugins.measure: peak extra memory against buffers of a known size, on both CPU methods (the
kernel's high-water mark and the sampler), nested measurements, CUDA where there is a device, and
median_time's runs."""

from __future__ import annotations

import mmap
import time
from types import SimpleNamespace

import pytest
import torch

from tl_plugins import measure
from tl_plugins.measure import KERNEL_HWM, SAMPLED_RSS, PeakMemory

MiB = 2**20


def _about(extra: int, mib: int) -> bool:
    """``extra`` bytes is a ``mib`` MiB buffer: the kernel's resident-set counters lag by up to 64 pages
    per thread, and the interpreter may allocate a few MiB beside the buffer."""
    return (mib - 1) * MiB <= extra < (mib + 8) * MiB


def _spike(mib: int, hold: float = 0.0) -> None:
    """Write every page of a fresh ``mib`` MiB mapping (as a tensor) and unmap it before returning.

    A mapping of its own, not malloc: a process that already held and freed large blocks (earlier
    tests loaded models) serves malloc'd buffers from memory that is resident already, so only fresh
    pages make a buffer of known size grow the resident set whatever ran before."""
    buf = mmap.mmap(-1, mib * MiB)
    x = torch.frombuffer(buf, dtype=torch.uint8)
    x.fill_(1)
    if hold:
        time.sleep(hold)
    del x
    buf.close()


def test_kernel_high_water_mark_sees_a_freed_buffer_exactly():
    with PeakMemory("cpu") as mem:
        _spike(64)
    if mem.method != KERNEL_HWM:
        pytest.skip("this kernel does not reset VmHWM through /proc/self/clear_refs")
    # the buffer was freed before the block ended: only a high-water mark sees it
    assert _about(mem.peak_extra, 64)
    assert mem.peak == mem.start + mem.peak_extra and mem.start > 0


def test_sampler_where_the_kernel_cannot_reset(monkeypatch):
    monkeypatch.setattr(measure, "_reset_hwm", lambda: False)
    with PeakMemory("cpu", interval=0.001) as mem:
        _spike(64, hold=0.2)  # held long enough for the sampler to see it
    assert mem.method == SAMPLED_RSS
    assert _about(mem.peak_extra, 64)


def test_nested_measurements_keep_the_outer_peak():
    with PeakMemory("cpu") as outer:
        _spike(96)
        with PeakMemory("cpu") as inner:  # resets the counter the outer one reads
            _spike(32)
        _spike(16)
    if outer.method != KERNEL_HWM:
        pytest.skip("this kernel does not reset VmHWM through /proc/self/clear_refs")
    assert _about(inner.peak_extra, 32)
    assert _about(outer.peak_extra, 96)


def test_peak_extra_helpers_agree_with_the_context_manager():
    extra = measure.peak_extra(lambda: _spike(48), "cpu")
    with PeakMemory("cpu") as mem:
        _spike(48)
    if mem.method != KERNEL_HWM:
        pytest.skip("this kernel does not reset VmHWM through /proc/self/clear_refs")
    assert _about(extra, 48) and _about(measure.peak_cpu_extra(lambda: _spike(48)), 48)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_allocator_peak():
    def run():
        x = torch.ones(16 * MiB // 4, device="cuda")
        del x

    with PeakMemory("cuda") as mem:
        run()
    assert mem.method == measure.CUDA_ALLOCATOR and mem.peak_extra == 16 * MiB
    assert measure.peak_extra(run, "cuda") == 16 * MiB


def test_median_time_runs_warmup_then_repeat_and_takes_the_median(monkeypatch):
    calls = []
    clock = iter([0.0, 1.0, 10.0, 13.0, 20.0, 22.0])  # runs of 1, 3 and 2 seconds
    monkeypatch.setattr(measure, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    assert measure.median_time(lambda: calls.append(1), repeat=3, warmup=2) == 2.0
    assert len(calls) == 5
    with pytest.raises(ValueError, match="repeat: got 0"):
        measure.median_time(lambda: None, repeat=0)
