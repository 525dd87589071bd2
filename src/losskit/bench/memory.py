"""Peak extra memory of one fwd+bwd step, and the copy bandwidth that sets the floor (docs/losses.md, "Benchmarks").

CPU (Linux): reset the process's peak RSS by writing ``5`` to ``/proc/self/clear_refs``, run the step, and take
``VmHWM`` minus the ``VmRSS`` read just before. Freed heap memory is handed back to the kernel first
(``malloc_trim``), so a previous entry's free-but-resident pages cannot absorb this entry's allocations and hide
them. GPU: ``max_memory_allocated() - memory_allocated()`` around the step, after ``empty_cache``.

Both include the gradient written for the input; for in-place entries the caller makes the fresh clone before the
measurement starts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import statistics
import sys
from collections.abc import Callable
from typing import Any

import torch

from losskit.bench.timing import CudaEventTimer, HostTimer

MIB = 1024**2
GIB = 1024**3

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _read_status_kib(field: str) -> int:
    with open(_STATUS) as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{_STATUS} has no {field} line")


def rss_supported() -> bool:
    """True where the procfs peak-RSS method works (Linux with a writable ``clear_refs``)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        _read_status_kib("VmHWM")
        with open(_CLEAR_REFS, "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def _malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    if name is None:
        return
    libc = ctypes.CDLL(name)
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def host_peak_extra_bytes(step: Callable[[], Any]) -> int:
    """Peak RSS growth of the process while ``step()`` runs, in bytes (Linux procfs method, see module doc)."""
    _malloc_trim()
    before = _read_status_kib("VmRSS")
    with open(_CLEAR_REFS, "w") as fh:
        fh.write("5")
    step()
    peak = _read_status_kib("VmHWM")
    return max(0, peak - before) * 1024


def cuda_peak_extra_bytes(step: Callable[[], Any]) -> int:
    """Peak CUDA allocation above the allocation level before ``step()``, in bytes (caching allocator stats)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return max(0, torch.cuda.max_memory_allocated() - before)


def copy_bandwidth(nbytes: int, device: torch.device | str, *, reps: int = 5) -> float:
    """Copy bandwidth in bytes per second, counting the read and the write (2·nbytes per copy).

    Median over ``reps`` copies after one warm-up copy. CPU uses ``perf_counter``; CUDA uses events.
    """
    device = torch.device(device)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(1)  # touch every page so the first timed copy does not pay for page faults
    dst = torch.empty_like(src)
    dst.fill_(0)
    timer = CudaEventTimer() if device.type == "cuda" else HostTimer()
    times_ms = [timer(lambda: dst.copy_(src)) for _ in range(reps + 1)][1:]  # the first copy is the warm-up
    return 2 * nbytes / (statistics.median(times_ms) / 1e3)


def floor_ms(num_rows: int, num_classes: int, element_bytes: int, bandwidth: float) -> float:
    """Memory floor of a fwd+bwd: read the logits once and write their gradient once, at ``bandwidth`` B/s.

    ``floor = 2 · N · V · element_bytes / bandwidth``, in milliseconds.
    """
    return 2 * num_rows * num_classes * element_bytes / bandwidth * 1e3
