"""train.host_allocator: which malloc `tunelab train` runs on (tunelab/host_allocator.py).

The choice is made by re-executing the real process with LD_PRELOAD; these tests check the decision
(what is asked for, found, already loaded, already tried), and in real processes that the run
reports the allocator it ran on, that glibc can be kept, and that a missing one named in the config
is one located line with exit 2.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from conftest import sentiment_rows, write_jsonl
from tunelab import host_allocator as ha
from tunelab.config import Config


def test_auto_takes_jemalloc_only_where_the_machine_has_it(monkeypatch):
    monkeypatch.setattr(ha, "find_library", lambda name: None)
    assert ha.wanted("auto") == ("glibc", None)
    monkeypatch.setattr(ha, "find_library", lambda name: f"/opt/lib/lib{name}.so.2")
    assert ha.wanted("auto") == ("tcmalloc", "/opt/lib/libtcmalloc.so.2")  # the fastest measured first
    assert ha.wanted("jemalloc") == ("jemalloc", "/opt/lib/libjemalloc.so.2")
    monkeypatch.setattr(ha, "find_library", lambda name: "/opt/lib/libjemalloc.so.2" if name == "jemalloc" else None)
    assert ha.wanted("auto") == ("jemalloc", "/opt/lib/libjemalloc.so.2")
    assert ha.wanted("glibc") == ("glibc", None)


def test_a_named_allocator_the_machine_lacks_is_refused_naming_the_field(monkeypatch):
    monkeypatch.setattr(ha, "find_library", lambda name: None)
    with pytest.raises(LookupError, match=r"train.host_allocator tcmalloc: no libtcmalloc_minimal.so.4"):
        ha.wanted("tcmalloc")


def test_reexec_plan_prepends_the_library_once(monkeypatch):
    monkeypatch.setattr(ha, "find_library", lambda name: "/opt/lib/libjemalloc.so.2" if name == "jemalloc" else None)
    monkeypatch.setattr(ha, "in_use", lambda: "glibc")
    env = ha.reexec_plan("auto", {"LD_PRELOAD": "/x/libother.so", "PATH": "/bin"})
    assert env["LD_PRELOAD"] == "/opt/lib/libjemalloc.so.2 /x/libother.so"
    assert env[ha.REEXEC_MARK] == "jemalloc" and env["PATH"] == "/bin"
    assert "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD" not in env
    # a process that was already re-executed (the loader ignored the preload) is not re-executed again
    assert ha.reexec_plan("auto", env) is None
    # nothing to do when the allocator asked for is the one loaded, or glibc is asked for
    monkeypatch.setattr(ha, "in_use", lambda: "jemalloc")
    assert ha.reexec_plan("jemalloc", {}) is None
    assert ha.reexec_plan("glibc", {}) is None
    monkeypatch.setattr(ha, "find_library", lambda name: f"/opt/lib/lib{name}.so.4")
    monkeypatch.setattr(ha, "in_use", lambda: "glibc")
    tc = ha.reexec_plan("auto", {})
    assert tc["LD_PRELOAD"] == "/opt/lib/libtcmalloc.so.4" and int(tc["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 2**40


def test_in_use_reads_this_process_maps():
    maps = open("/proc/self/maps").read() if os.path.exists("/proc/self/maps") else ""
    expect = next((n for n in ("jemalloc", "tcmalloc") if f"lib{n}" in maps), "glibc")
    assert ha.in_use() == expect


def test_the_config_field_and_its_choices():
    assert Config.model_validate({"task": "classification", "model": {"name": "m"},
                                  "data": {"train": "t.jsonl"}}).train.host_allocator == "auto"
    with pytest.raises(Exception, match="host_allocator"):
        Config.model_validate({"task": "classification", "model": {"name": "m"}, "data": {"train": "t.jsonl"},
                               "train": {"host_allocator": "mimalloc"}})


def _train_in_a_process(tmp_path, tiny_bert, allocator: str | None, command: tuple = ("train", "--no-progress")):
    write_jsonl(tmp_path / "train.jsonl", sentiment_rows(16, seed=1))
    cfg = {"task": "classification", "model": {"name": str(tiny_bert), "max_length": 16},
           "data": {"train": str(tmp_path / "train.jsonl"), "eval_split": 0},
           "train": {"max_steps": 2, "batch_size": 8, "eval_before": False},
           "early_stopping": {"enabled": False}}
    if allocator:
        cfg["train"]["host_allocator"] = allocator
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", ha.REEXEC_MARK)}
    env["TUNELAB_DATA_CACHE"] = str(tmp_path / "cache")
    out = ["--output-dir", str(tmp_path / "run")] if command[0] == "train" else []
    return subprocess.run([sys.executable, "-m", "tunelab.cli", command[0], str(tmp_path / "cfg.yaml"), *command[1:],
                           *out], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)


@pytest.mark.parametrize("allocator", [None, "glibc"])
def test_the_run_reports_the_allocator_it_ran_on(tmp_path, tiny_bert, allocator):
    proc = _train_in_a_process(tmp_path, tiny_bert, allocator)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    expect = "glibc" if allocator == "glibc" else ha.wanted("auto")[0]
    assert summary["host_allocator"] == expect


@pytest.mark.parametrize("allocator", [None, "glibc"])
def test_plan_measures_its_steps_on_the_allocator_train_would_run_on(tmp_path, tiny_bert, allocator):
    """A step's peak depends on the malloc (glibc's fragmented heap: a DPO LoRA step 4.9 GB against
    tcmalloc's 3.1): `tunelab plan` re-executes as `train` does, and says which one it measured on."""
    proc = _train_in_a_process(tmp_path, tiny_bert, allocator, ("plan", "--json", "--measure-steps", "1",
                                                                 "--no-suggestions"))
    assert proc.returncode == 0, proc.stderr
    memory = json.loads(proc.stdout)["memory_mb"]
    expect = "glibc" if allocator == "glibc" else ha.wanted("auto")[0]
    assert memory["host_allocator"] == expect and memory["peak_basis"].endswith(f"on {expect}")


def test_a_missing_allocator_named_in_the_config_is_one_located_line(tmp_path, tiny_bert):
    missing = next((n for n in ("tcmalloc", "jemalloc") if ha.find_library(n) is None), None)
    if missing is None:
        pytest.skip("this machine has both jemalloc and tcmalloc")
    proc = _train_in_a_process(tmp_path, tiny_bert, missing)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(r"cfg\.yaml:\d+.*train\.host_allocator", lines[0]), proc.stderr
    assert not (tmp_path / "run").exists()


RELEASE_SCRIPT = r"""
import ctypes, sys
from tunelab.host_allocator import release_free_memory
from tunelab.process_memory import runtime_bytes
libc = ctypes.CDLL(None)
if hasattr(libc, "mallopt"):
    libc.mallopt(-3, ctypes.c_int(32 * 2**20))  # M_MMAP_THRESHOLD: 1 MiB blocks come from the heap
base = runtime_bytes()
blocks = [bytearray(2**20) for _ in range(400)]
del blocks[:-1]  # all freed but the last: the heap's top stays in use, so only a trim inside it helps
held = runtime_bytes()
name = release_free_memory()
print(name, (held - base) / 2**20, (runtime_bytes() - base) / 2**20)
"""


@pytest.mark.parametrize("allocator", ["glibc", "jemalloc", "tcmalloc"])
def test_release_hands_freed_memory_back(allocator):
    """After training, what the allocator keeps free goes back to the OS (run.save calls this before the
    report): 400 MiB allocated and freed but the last block leave < 80 MiB resident after the release."""
    path = None if allocator == "glibc" else ha.find_library(allocator)
    if allocator != "glibc" and path is None:
        pytest.skip(f"no {allocator} on this machine")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", ha.REEXEC_MARK)}
    if path:
        env["LD_PRELOAD"] = path
    proc = subprocess.run([sys.executable, "-c", RELEASE_SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    name, held_mb, after_mb = proc.stdout.split()
    assert name == allocator
    if allocator != "jemalloc":  # jemalloc returns blocks this size on free by itself
        assert float(held_mb) > 300, proc.stdout  # the premise: freed memory stays resident until released
    assert float(after_mb) < 80, proc.stdout
