"""Resuming with another number of processes (distributed.reshard): an fsdp run of 2 processes
continued by 1 process, and that 1-process run continued by 2 fsdp processes, each with the same
micro-batches per step (world_size x grad_accum), end where the uninterrupted run ends (within the
parity bound of tests/test_sharding.py: the sums run in another order); other windows and ZeRO
checkpoints are refused with the fix. Three CLI runs in all (~100 s of CPU on 2 cores)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import sentiment_rows, write_jsonl

pytestmark = pytest.mark.multiprocess


def write_config(folder: Path) -> Path:
    from test_sharding import no_dropout_bert

    bert = no_dropout_bert(folder / "bert")  # no dropout: a micro-batch computes the same on any process
    write_jsonl(folder / "train.jsonl", sentiment_rows(24, seed=1))
    write_jsonl(folder / "eval.jsonl", sentiment_rows(8, seed=2))
    cfg = {"model": {"name": str(bert), "max_length": 32},
           "data": {"train": str(folder / "train.jsonl"), "eval": str(folder / "eval.jsonl")},
           "optim": {"lr": 3e-3, "head_lr_multiplier": 1.0}, "schedule": {"name": "linear", "warmup_steps": 1},
           # 2 processes x 4 examples x grad_accum 1 = 8 a step, 3 steps an epoch, 2 epochs
           "train": {"epochs": 2, "batch_size": 4, "seed": 3, "log_every": 1, "eval_every": 2, "eval_before": False},
           "checkpoint": {"final": "last", "keep_last": 10}, "early_stopping": {"enabled": False},
           "distributed": {"strategy": "fsdp"}}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(config: Path, out: Path, *extra: str) -> str:
    from test_distributed import start

    proc = start(config, out, *extra)
    _, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 0, stderr[-3000:]
    return stderr


def stopped_at(src: Path, dst: Path, step: int) -> Path:
    """A copy of a finished run dir as a run stopped right after its step-`step` checkpoint leaves it."""
    from tunelab.train.checkpoint import checkpoint_name

    shutil.copytree(src, dst)
    for name in ("final", "summary.json", "report.html"):
        p = dst / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    for ck in (dst / "checkpoints").iterdir():
        if ck.name > checkpoint_name(step):
            shutil.rmtree(ck)
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted run (2 fsdp processes x grad_accum 1), and its chain of resharded resumes:
    stopped after step 2 and continued by 1 process x grad_accum 2 ('one', which writes whole
    checkpoints), that one stopped after step 4 and continued by 2 fsdp processes ('two_again')."""
    folder = tmp_path_factory.mktemp("reshard")
    config = write_config(folder)
    run(config, folder / "two", "--nproc", "2")
    one = stopped_at(folder / "two", folder / "one", 2)
    one_err = run(config, one, "--resume", "auto", "--set", "train.grad_accum=2")
    two_again = stopped_at(one, folder / "two_again", 4)
    return {"config": config, "two": folder / "two", "one": one, "one_err": one_err, "two_again": two_again,
            "two_again_err": run(config, two_again, "--resume", "auto", "--nproc", "2")}


def final_diff(a: Path, b: Path) -> float:
    x, y = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


def assert_continues(resumed: Path, reference: Path, stderr: str) -> None:
    """The resumed run logged the same rows as the uninterrupted one, the same losses (relative 1e-6) and
    ends at its weights within the parity bound 1e-5 (the steps moved them by > 5e-3: checked below)."""
    from test_distributed import row_keys, rows_of

    assert "resharding: the checkpoint was written by" in stderr
    assert row_keys(resumed) == row_keys(reference)
    for a, b in zip(rows_of(resumed), rows_of(reference)):
        for key in ("loss", "eval_loss"):
            if key in b:
                assert abs(a[key] - b[key]) <= 1e-6 * abs(b[key]), (key, a, b)
        if "samples" in b:
            assert a["samples"] == b["samples"]  # every example once, none twice
    assert final_diff(resumed, reference) <= 1e-5
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["status"] == "completed"


@pytest.mark.parity
def test_the_steps_moved_the_weights_far_beyond_the_bound(runs):
    base = load_file(str(next((runs["config"].parent / "bert").glob("*.safetensors"))))
    final = load_file(str(runs["two"] / "final" / "model.safetensors"))
    assert max((final[k] - base[k]).abs().max().item() for k in final if k in base) > 5e-3


@pytest.mark.parity
def test_fsdp_run_of_two_processes_continues_in_one(runs):
    """DCP's shards read whole into one process (no process group); grad_accum 2 keeps 8 examples a step."""
    assert (runs["two"] / "checkpoints" / "step-000002" / "shards" / ".metadata").is_file()
    assert_continues(runs["one"], runs["two"], runs["one_err"])
    assert (runs["one"] / "checkpoints" / "step-000004" / "weights.safetensors").is_file()  # one process: whole files
    assert json.loads((runs["one"] / "checkpoints" / "step-000004" / "state.json").read_text())["loop"]["world_size"] == 1


@pytest.mark.parity
def test_one_process_run_continues_as_two_fsdp_processes(runs):
    """Whole weights.safetensors + optimizer.pt cut into each fsdp process's shards."""
    out = runs["two_again"]
    assert_continues(out, runs["two"], runs["two_again_err"])
    assert (out / "checkpoints" / "step-000006" / "shards" / ".metadata").is_file()
    assert json.loads((out / "checkpoints" / "step-000006" / "state.json").read_text())["loop"]["world_size"] == 2


@pytest.mark.e2e
def test_another_window_is_refused_with_the_grad_accum_that_keeps_it(runs, tmp_path):
    from typer.testing import CliRunner

    from tunelab.cli import app

    out = stopped_at(runs["two"], tmp_path / "refused", 2)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    res = CliRunner().invoke(app, ["train", str(runs["config"]), "-o", str(out), "--resume", "auto", "--no-progress"])
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert "trained with 2 process(es)" in line and "--nproc 2" in line and "--set train.grad_accum=2" in line
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing touched


def fake_checkpoint(folder: Path, world_size: int, *, zero: bool) -> Path:
    """Just what check_resume_layout reads: the loop state and the kind of shards folder."""
    ck = folder / "checkpoints" / "step-000002"
    (ck / "shards").mkdir(parents=True)
    if not zero:
        (ck / "shards" / ".metadata").write_bytes(b"")
    (ck / "state.json").write_text(json.dumps({"loop": {"step": 2, "world_size": world_size}}))
    (folder / "config.yaml").write_text(yaml.safe_dump({"train": {"batch_size": 4, "grad_accum": 1}}))
    return ck


def check_resume_layout(checkpoint: Path, cfg, world_size: int) -> str | None:
    """distributed.reshard.check_resume_layout as run_training calls it, for a checkpoint and a config."""
    from tunelab.distributed.reshard import check_resume_layout as check
    from tunelab.train.checkpoint import ResumePoint

    return check(ResumePoint.at(checkpoint), world_size, strategy=cfg.distributed.strategy, train=cfg.train)


@pytest.mark.unit
def test_zero_checkpoints_continue_only_with_their_world_size(tmp_path):
    from tunelab.config import Config
    from tunelab.errors import InputError

    ck = fake_checkpoint(tmp_path / "z", 2, zero=True)
    zero2 = Config.model_validate({"model": {"name": "x"}, "data": {"train": "t.jsonl"},
                                   "train": {"batch_size": 4, "grad_accum": 1}, "distributed": {"strategy": "zero2"}})
    assert check_resume_layout(ck, zero2, 2) is None  # the same world size: as before
    with pytest.raises(InputError, match="use a number of processes that divides 2"):
        check_resume_layout(ck, zero2, 3)  # another: the same window rule as fsdp (then DeepSpeed's universal checkpoint)
    with pytest.raises(InputError, match=r"ZeRO run was trained with 2 processes.*continue under ZeRO only.*--nproc 2 or more"):
        check_resume_layout(ck, zero2.model_copy(update={"train": zero2.train.model_copy(update={"grad_accum": 2})}), 1)
    fsdp = zero2.model_copy(update={"distributed": zero2.distributed.model_copy(update={"strategy": "fsdp"})})
    with pytest.raises(InputError, match="cannot continue under 'fsdp'"):
        check_resume_layout(ck, fsdp, 2)
    dcp = fake_checkpoint(tmp_path / "f", 2, zero=False)
    with pytest.raises(InputError, match="cannot continue under 'zero2'"):
        check_resume_layout(dcp, zero2, 2)
    one = fsdp.model_copy(update={"train": fsdp.train.model_copy(update={"grad_accum": 2})})
    assert "continuing with 1 x 2" in check_resume_layout(dcp, one, 1)
    with pytest.raises(InputError, match="use a number of processes that divides 2"):
        check_resume_layout(dcp, fsdp, 3)
    with pytest.raises(InputError, match=r"--set train.batch_size=4"):
        check_resume_layout(dcp, fsdp.model_copy(update={"train": fsdp.train.model_copy(update={"batch_size": 2})}), 1)


@pytest.mark.parity
def test_zero2_run_of_two_processes_continues_as_three(tmp_path):
    """A ZeRO checkpoint of 2 processes resharded for 3 through DeepSpeed's universal checkpoint
    (ds_to_universal on rank 0, load_universal on every process): 2 x grad_accum 3 = 3 x 2 micro-batches
    a step, the end within the parity bound of the uninterrupted 2-process run (packed chat SFT on a
    tiny Llama: its parameter groups are large enough for 3 partitions each, see
    ZeroReplicas.partition_without_parameters). torchrun directly: the CLI's --nproc stops at the 2
    cores, three gloo processes of a tiny model run on them anyway."""
    import subprocess
    import sys

    from tiny_models import conversations, tiny_llama_folder

    write_jsonl(tmp_path / "chat.jsonl", conversations(48))
    cfg = {"task": "chat", "model": {"name": str(tiny_llama_folder(tmp_path / "llama")), "max_length": 64},
           "data": {"train": str(tmp_path / "chat.jsonl"), "eval_split": 0.0, "packing": True},
           "optim": {"lr": 3e-3}, "schedule": {"name": "linear", "warmup_steps": 1},
           "train": {"max_steps": 4, "batch_size": 1, "grad_accum": 3, "seed": 3, "log_every": 1, "eval_before": False},
           "checkpoint": {"final": "last", "keep_last": 10, "save_every": 2}, "early_stopping": {"enabled": False},
           "distributed": {"strategy": "zero2"}}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run(config, tmp_path / "two", "--nproc", "2")
    out = stopped_at(tmp_path / "two", tmp_path / "three", 2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3", "-m", "tunelab.cli",
           "train", str(config), "-o", str(out), "--no-progress", "--resume", "auto", "--set", "train.grad_accum=2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_continues(out, tmp_path / "two", res.stderr)
    assert not list((out / "checkpoints").glob(".tmp-universal-*"))  # the converted copy is removed
    assert len(list((out / "checkpoints" / "step-000004" / "shards" / "zero").glob("*optim_states.pt"))) == 3
