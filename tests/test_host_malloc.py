"""train.malloc_mmap_threshold (tunelab/host_malloc.py): with glibc's dynamic threshold, blocks freed
out of order stay resident as heap; fixed, each goes back to the OS on free. Measured in a child
process (the allocator setting is per process), on malloc directly; and the run sets it first."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import ctypes, json, sys
    from tunelab.host_malloc import set_mmap_threshold

    def rss():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))

    fixed = set_mmap_threshold(json.loads(sys.argv[1]))
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    big = libc.malloc(8 << 20); ctypes.memset(big, 1, 8 << 20); libc.free(big)  # the dynamic threshold rises to 8 MiB
    before = rss()
    blocks = [libc.malloc(1 << 20) for _ in range(200)]  # 200 MiB in 1 MiB blocks, each written
    for b in blocks:
        ctypes.memset(b, 1, 1 << 20)
    for b in blocks[:-1]:  # all freed but the last, which pins the heap's top
        libc.free(b)
    print(json.dumps({"fixed": fixed, "kept_mb": (rss() - before) / 2**20}))
""")


def _child(threshold, env=None) -> dict:
    import os

    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(threshold)], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, check=True)
    return json.loads(out.stdout)


@pytest.mark.unit
def test_a_fixed_threshold_returns_freed_blocks_to_the_os():
    dynamic, fixed = _child(None), _child(131072)
    assert dynamic["fixed"] is None and fixed["fixed"] == 131072
    assert dynamic["kept_mb"] > 150  # the freed 199 MiB stay resident as heap below the last block
    assert fixed["kept_mb"] < 10  # each block was its own mapping, unmapped on free
    # the environment's own setting wins: nothing is set over it (and glibc applies it: blocks return)
    env = _child(131072, {"MALLOC_MMAP_THRESHOLD_": "65536"})
    assert env["fixed"] is None and env["kept_mb"] < 10


@pytest.mark.unit
def test_the_key_is_checked():
    from tunelab.config import Config

    base = {"task": "classification", "model": {"name": "minilm"}, "data": {"train": "x.jsonl"}}
    assert Config.model_validate(base).train.malloc_mmap_threshold is None
    with pytest.raises(ValueError, match="malloc_mmap_threshold"):
        Config.model_validate({**base, "train": {"malloc_mmap_threshold": 64 * 2**20}})


@pytest.mark.unit
def test_the_run_sets_it_before_anything_loads(monkeypatch, toy_classification, tmp_path):
    import tunelab.run as run
    from tunelab.config import Config

    class Seen(Exception):
        pass

    def record(value):
        raise Seen(value)

    monkeypatch.setattr(run, "set_mmap_threshold", record)
    monkeypatch.setattr(run, "prepare_data", lambda cfg: pytest.fail("data prepared before the threshold was set"))
    raw = {**toy_classification["config"], "train": {**toy_classification["config"].get("train", {}),
                                                     "malloc_mmap_threshold": 262144}}
    with pytest.raises(Seen) as e:
        run.run_training(Config.model_validate(raw), tmp_path / "run", show_progress=False)
    assert e.value.args == (262144,)
