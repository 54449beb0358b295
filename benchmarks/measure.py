"""One timer, peak-memory reader and machine description for every benchmark.

- `machine()`: what a result was measured on (architecture, CPU model, logical CPUs, Python,
  and, when torch is already loaded, torch's version, its thread count and the GPU), as a dict
  that results store and `describe` writes as one line.
- `now()`: the UTC minute a result was measured, as results store it.
- `Measure`: a context manager giving the wall and CPU seconds of its body and the peak memory
  (the process's peak resident memory on the CPU; `torch.cuda.max_memory_allocated`, reset on
  entry, on CUDA).
- `median_seconds(fn, repeats, device)`: the median wall time of calls of `fn` after one
  warm-up call, synchronising CUDA around each.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable


def now() -> str:
    """The current UTC minute, as `YYYY-MM-DD HH:MM UTC`."""
    return f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC"


def cpu_model() -> str:
    """The machine's CPU model, as /proc/cpuinfo (or the platform) names it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str = "cpu") -> dict:
    """The machine a result is measured on. torch's version, thread count and GPU are given
    only when torch is already imported (a benchmark that never loads it does not pay for it);
    the GPU only for a CUDA `device`."""
    out = {"arch": platform.machine(), "cpu": cpu_model(), "logical_cpus": os.cpu_count(),
           "python": platform.python_version()}
    torch = sys.modules.get("torch")
    if torch is not None:
        out["torch"] = torch.__version__
        out["torch_threads"] = torch.get_num_threads()
        if device.startswith("cuda") and torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return out


def describe(m: dict) -> str:
    """`machine()`'s dict as one line, e.g. `x86_64 (AMD EPYC 7B13), 2 logical CPUs, 2 torch
    threads, Python 3.11.7, torch 2.9.0, GPU NVIDIA H100`; keys it lacks are left out, keys it
    does not know are appended as `key value`."""
    known = ("arch", "cpu", "logical_cpus", "torch_threads", "python", "torch", "gpu")
    parts = []
    if "arch" in m:
        parts.append(m["arch"] + (f" ({m['cpu']})" if m.get("cpu") else ""))
    elif m.get("cpu"):
        parts.append(m["cpu"])
    if "logical_cpus" in m:
        parts.append(f"{m['logical_cpus']} logical CPUs")
    if "torch_threads" in m:
        parts.append(f"{m['torch_threads']} torch threads")
    if "python" in m:
        parts.append(f"Python {m['python']}")
    if "torch" in m:
        parts.append(f"torch {m['torch']}")
    if "gpu" in m:
        parts.append(f"GPU {m['gpu']}")
    parts += [f"{k} {v}" for k, v in m.items() if k not in known]
    return ", ".join(parts)


def peak_rss_mib() -> float:
    """The process's peak resident memory so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cuda(device: str):
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda


class Measure:
    """`with Measure(device) as m: ...`, then `m.seconds` (wall), `m.cpu_seconds` (this
    process), `m.peak_mib` (peak resident memory of the process on the CPU, which includes all
    that ran before; the CUDA peak allocated during the body on CUDA) and `m.start_mib` (the
    same reading on entry, so `m.peak_mib - m.start_mib` is what the body added)."""

    def __init__(self, device: str = "cpu", reset_peak: bool = True):
        self.device, self.reset_peak = device, reset_peak
        self.seconds = self.cpu_seconds = self.peak_mib = self.start_mib = 0.0

    def memory(self) -> float:
        cuda = _cuda(self.device)
        return cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mib()

    def __enter__(self) -> "Measure":
        cuda = _cuda(self.device)
        if cuda:
            cuda.synchronize()
            if self.reset_peak:
                cuda.reset_peak_memory_stats()
        self.start_mib = self.memory()
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        cuda = _cuda(self.device)
        if cuda:
            cuda.synchronize()
        self.seconds = time.perf_counter() - self._wall
        self.cpu_seconds = time.process_time() - self._cpu
        self.peak_mib = self.memory()


def rss_mib() -> float:
    """The process's resident memory now, in MiB (Linux's /proc/self/statm; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakGrowth:
    """`with PeakGrowth(device) as g: ...`, then `g.mib`: how far the memory in use rose above
    its level on entry during the body. On CUDA the allocator's peak (reset on entry); on a CPU
    the resident memory, sampled every `interval` seconds by a thread, which, unlike the
    process's lifetime peak, a body does not hide by staying under an earlier, higher peak.
    Memory that malloc freed but kept resident and the body reuses does not show as growth."""

    def __init__(self, device: str = "cpu", interval: float = 0.002):
        self.device, self.interval, self.mib = device, interval, 0.0

    def __enter__(self) -> "PeakGrowth":
        import threading

        cuda = _cuda(self.device)
        if cuda:
            cuda.synchronize()
            cuda.reset_peak_memory_stats()
            self._start = cuda.memory_allocated() / 2**20
            return self
        self._start = self._peak = rss_mib()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(self.interval):
                self._peak = max(self._peak, rss_mib())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        cuda = _cuda(self.device)
        if cuda:
            cuda.synchronize()
            self.mib = cuda.max_memory_allocated() / 2**20 - self._start
            return
        self._stop.set()
        self._thread.join()
        self.mib = max(self._peak, rss_mib()) - self._start


def median_seconds(fn: Callable[[], object], repeats: int, device: str = "cpu", warmup: int = 1) -> float:
    """The median wall time of `repeats` calls of `fn`, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        with Measure(device, reset_peak=False) as m:
            fn()
        times.append(m.seconds)
    return statistics.median(times)
