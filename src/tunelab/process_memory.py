"""What this process holds in memory: its peak, its resident set now, and what the machine has left.

One reader for the run (summary.json's peaks, the metrics rows' memory_mb) and for the planner
(its runtime baseline and the available memory), below both, so neither imports the other.
"""

from __future__ import annotations

import resource

import torch


def _proc_bytes(path: str, key: str) -> int | None:
    """A "Key:   N kB" line of a Linux /proc file, in bytes; None where there is no such file or line."""
    try:
        with open(path) as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
    except (OSError, StopIteration):
        return None


def runtime_bytes() -> int:
    """This process's resident memory now (VmRSS): the interpreter with torch and transformers imported."""
    return _proc_bytes("/proc/self/status", "VmRSS") or 0


def available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return _proc_bytes("/proc/meminfo", "MemAvailable")


def peak_memory_mb(device: torch.device) -> float:
    """The process's peak so far: the CUDA allocator's maximum on a GPU; on the CPU the resident set's
    high-water mark (ru_maxrss = VmHWM, what /usr/bin/time -v reports at exit)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def memory_now_mb(device: torch.device) -> float:
    """Memory held now, for the metrics rows' `memory_mb`: what the CUDA caching allocator reserves on a
    GPU, the process's resident set on the CPU (the report plots it over time)."""
    if device.type == "cuda":
        return torch.cuda.memory_reserved(device) / 2**20
    return runtime_bytes() / 2**20
