"""Which malloc a training process runs on (`train.host_allocator`), and starting `tunelab train` on it.

Why tunelab picks the process's allocator: torch's CPU allocator hands every tensor to malloc, and
glibc's keeps what a training step frees as fragmented heap (its dynamic mmap threshold rises to 32
MiB after the first frees, and a heap returns memory only from its top; see host_malloc.py).
tcmalloc's and jemalloc's size classes and page handling do not fragment that way, and serve the
step's many mid-sized tensors faster. Measured on SmolLM2-135M full chat SFT, bf16 weights + 8-bit
moments, 8 steps of 4 x 512 tokens, 2 runs each alternating, identical losses
(benchmarks/results/host_allocator.json): glibc 3,744 MB train peak at 313 tokens/s; jemalloc 3,168
MB at 327 (and it gives the freed optimizer state back after training); tcmalloc 3,108 MB at 366
(whole process 3,306 MB: it keeps what it freed). Intel's `ipexrun` launcher and PyTorch's CPU
tuning guide preload one of them for the same reasons.

An allocator is chosen when a process starts (the dynamic loader binds malloc before Python runs),
so the switch works by re-executing: `tunelab train` (the real program, not an in-process caller)
resolves `train.host_allocator`, and when the library it names is not the one loaded, replaces
itself (os.execve, same pid, same arguments and descriptors) with LD_PRELOAD set; DDP workers
inherit the environment. `auto` (the default) means tcmalloc when the machine has it (Debian/Ubuntu
`libtcmalloc-minimal4`, conda `gperftools`), else jemalloc (`libjemalloc2`, conda `jemalloc`), else
glibc; naming one that is missing is a config error. tcmalloc's report of allocations over 1 GB on
stderr is raised out of the way (TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD, unless set).
The Python API (tunelab.run.run_training) runs on whatever its process started with: start Python
with LD_PRELOAD=<path> to get the same. Nothing numeric depends on the allocator.
"""

from __future__ import annotations

import ctypes.util
import logging
import os
import sys
import sysconfig
from pathlib import Path

log = logging.getLogger("tunelab")

LIBRARIES = {  # allocator -> its shared objects, most specific first
    "jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so"),
}
AUTO_ORDER = ("tcmalloc", "jemalloc")  # train.host_allocator auto: the fastest measured first
REEXEC_MARK = "TUNELAB_HOST_ALLOCATOR_EXEC"  # set in the re-executed process: never exec twice


def _search_dirs() -> list[Path]:
    dirs = [Path(sys.prefix) / "lib", Path(sys.base_prefix) / "lib"]
    if os.environ.get("CONDA_PREFIX"):
        dirs.append(Path(os.environ["CONDA_PREFIX"]) / "lib")
    multiarch = sysconfig.get_config_var("MULTIARCH")
    for root in ("/usr/lib", "/lib", "/usr/local/lib"):
        if multiarch:
            dirs.append(Path(root) / multiarch)
        dirs.append(Path(root))
    dirs += [Path("/usr/lib64"), Path("/lib64")]
    return dirs


def find_library(name: str) -> str | None:
    """The path of allocator `name`'s shared object on this machine, or None."""
    if name not in LIBRARIES:
        return None
    for d in _search_dirs():
        for so in LIBRARIES[name]:
            if (d / so).is_file():
                return str(d / so)
    found = ctypes.util.find_library(name.removesuffix("_minimal"))  # ldconfig's cache: a soname
    return found or None


def in_use() -> str:
    """The allocator this process runs on: 'jemalloc', 'tcmalloc' (mapped into it) or 'glibc'."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "glibc"
    for name in LIBRARIES:
        if f"lib{name}" in maps:
            return name
    return "glibc"


def wanted(setting: str) -> tuple[str, str | None]:
    """(allocator, library path) that `train.host_allocator: setting` asks for on this machine;
    raises LookupError when it names an allocator the machine does not have."""
    if setting == "glibc":
        return "glibc", None
    if setting == "auto":
        for name in AUTO_ORDER:
            path = find_library(name)
            if path:
                return name, path
        return "glibc", None
    path = find_library(setting)
    if path is None:
        raise LookupError(f"train.host_allocator {setting}: no {LIBRARIES[setting][0]} on this machine (searched "
                          f"the Python prefix, conda and the system library folders); install it (Debian/Ubuntu: "
                          f"apt install {'libjemalloc2' if setting == 'jemalloc' else 'libtcmalloc-minimal4'}) "
                          "or set train.host_allocator auto")
    return setting, path


def reexec_plan(setting: str, environ: dict | None = None) -> dict | None:
    """The environment to re-execute this process with so it runs on `setting`'s allocator, or None
    when it already does (or already tried: a preload the loader ignored is not retried)."""
    environ = dict(os.environ if environ is None else environ)
    name, path = wanted(setting)
    current = in_use()
    if name == current or environ.get(REEXEC_MARK):
        return None
    if name == "glibc":  # another allocator was preloaded by the caller; taking it out is the caller's
        return None
    preload = [p for p in environ.get("LD_PRELOAD", "").replace(":", " ").split() if p]
    environ["LD_PRELOAD"] = " ".join([path] + preload)
    environ[REEXEC_MARK] = name
    if name == "tcmalloc":  # its "tcmalloc: large alloc" lines would break the one-line error contract
        environ.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(2**50))
    return environ


def reexec(setting: str) -> None:
    """Replace this process with itself on `setting`'s allocator (returns only when nothing is to be done)."""
    env = reexec_plan(setting)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)


def note(setting: str) -> str:
    """The allocator this process runs on, logged once at the start of training (and a hint when a
    setting the process could not honour asked for another)."""
    current = in_use()
    try:
        name, path = wanted(setting)
    except LookupError as e:
        log.warning("%s", e)
        return current
    if name != current and setting != "auto":
        log.warning("train.host_allocator %s: this process runs on %s (only the `tunelab train` command "
                    "re-executes itself; from Python start it with LD_PRELOAD=%s)", setting, current, path or "")
    else:
        log.debug("host allocator: %s", current)
    return current


def release_free_memory() -> str:
    """Hand the memory the allocator holds free back to the OS (training is over, the report phase
    begins): glibc `malloc_trim(0)` (free pages inside the heap too, not only its top), tcmalloc
    `MallocExtension_ReleaseFreeMemory`, jemalloc a purge of every arena. Without it the freed
    activations and optimizer state stay resident, and what the report phase allocates comes on top
    (tcmalloc: a whole-process peak 200 MB above the training peak in benchmarks/host_allocator.py).
    Returns the allocator that was asked; never raises."""
    name = in_use()
    try:
        if name == "tcmalloc":
            ctypes.CDLL(None).MallocExtension_ReleaseFreeMemory()
        elif name == "jemalloc":
            libc = ctypes.CDLL(None)
            libc.mallctl(b"arena.4096.purge", None, None, None, ctypes.c_size_t(0))  # MALLCTL_ARENAS_ALL
        else:
            ctypes.CDLL(None).malloc_trim(ctypes.c_size_t(0))
    except (OSError, AttributeError):  # not glibc, or a build without the entry point: nothing to hand back
        log.debug("host allocator %s: free memory not released", name)
    return name
