"""glibc malloc's mmap threshold for a training process (`train.malloc_mmap_threshold`).

Why tunelab sets an allocator knob: torch's CPU allocator hands every tensor to malloc, and glibc
serves a block at or above its mmap threshold with its own mmap, returned to the OS on free. The
threshold starts at 128 KiB but is *dynamic*: each time a mmapped block is freed it rises to that
block's size (up to 32 MiB on 64-bit), after which blocks below it come from the heap, and a heap
returns memory only from its top. A training step frees many activations of a few MiB in no
particular order, so after the first steps they stay resident as fragmented heap: on a SmolLM2-135M
full fine-tune (fp32, 4 x 512 tokens) the process peaked ~800 MB higher with the dynamic threshold
than with it fixed (benchmarks/results/optim_memory.json, MALLOC_MMAP_THRESHOLD_=131072). Fixing it
(mallopt(M_MMAP_THRESHOLD), which also turns the dynamic rise off) makes each such block its own
mapping again, paid for with page faults when it is written (benchmarks/malloc_threshold.py
measures both). The environment variable MALLOC_MMAP_THRESHOLD_, read by glibc at start-up, wins:
a user who set it gets exactly that.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("tunelab")

M_MMAP_THRESHOLD = -3  # malloc.h
MAX_THRESHOLD = 32 * 2**20  # glibc's HEAP_MAX_SIZE / 2 on 64-bit: mallopt refuses more


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def set_mmap_threshold(threshold: int | None) -> int | None:
    """Fix glibc's mmap threshold at `threshold` bytes for this process; the value in force after the
    call (None: left to glibc, i.e. `threshold` is None, the environment sets it, or this is not glibc)."""
    if threshold is None:
        return None
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        log.debug("malloc: MALLOC_MMAP_THRESHOLD_=%s from the environment kept", os.environ["MALLOC_MMAP_THRESHOLD_"])
        return None
    libc = _libc()
    if libc is None or not libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(threshold)):
        log.debug("malloc: mmap threshold not set (not glibc, or refused)")
        return None
    return threshold
