"""Weighted mixing of training sources (data.mixing, data.train as a list): exact shares without
replacement, shares within sampling error with replacement, both fixed by the seed; replay as the
two-source case; per-source counts and eval losses in a run; resume mid-epoch bit-identical."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from conftest import stop_after, write_jsonl
from tiny_models import conversations, tiny_llama_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _per_source(subset: list[int], offsets: list[int]) -> list[list[int]]:
    return [[i - a for i in subset if a <= i < b] for a, b in zip(offsets, offsets[1:])]


@pytest.mark.unit
def test_without_replacement_gives_exact_shares_and_cycles_every_row():
    from tunelab.data.mixing import mix_schedule

    sizes, weights = [60, 25, 200], [2.0, 1.0, 1.0]
    subset, size, counts = mix_schedule(sizes, weights, seed=3)
    assert counts == [60, 30, 30] and size == 120  # one pass over the first; the others by weight
    offsets = [0, 60, 85, 285]
    seen_big = set()
    for epoch in range(7):
        first, small, big = _per_source(subset(epoch), offsets)
        assert sorted(first) == list(range(60))
        assert len(small) == 30 and set(small) == set(range(25))  # a full pass, then 5 rows again
        assert max(Counter(small).values()) == 2
        assert len(big) == 30 and len(set(big)) == 30  # never a row twice within an epoch
        seen_big |= set(big)
    assert seen_big == set(range(200))  # 7 x 30 >= 200: every row once before any repeats
    assert subset(4) == mix_schedule(sizes, weights, seed=3)[0](4)  # a pure function of (seed, epoch)
    assert subset(4) != mix_schedule(sizes, weights, seed=4)[0](4) and subset(4) != subset(5)


@pytest.mark.unit
def test_with_replacement_shares_within_sampling_error_and_fixed_by_seed():
    from tunelab.data.mixing import mix_schedule

    sizes, weights = [40, 30, 10], [2.0, 1.0, 1.0]
    subset, size, _ = mix_schedule(sizes, weights, seed=0, sampling="with_replacement")
    epochs = 300
    counts = Counter()
    for e in range(epochs):
        rows = subset(e)
        assert len(rows) == size == 80
        for s, part in enumerate(_per_source(rows, [0, 40, 70, 80])):
            counts[s] += len(part)
    n = epochs * size
    for s, w in enumerate(weights):
        p = w / sum(weights)
        assert abs(counts[s] / n - p) < 4 * math.sqrt(p * (1 - p) / n), (s, counts[s] / n)
    assert subset(7) == mix_schedule(sizes, weights, seed=0, sampling="with_replacement")[0](7)
    assert subset(7) != mix_schedule(sizes, weights, seed=1, sampling="with_replacement")[0](7)


@pytest.mark.unit
def test_replay_schedule_is_the_two_source_mix():
    from tunelab.data.batching import replay_schedule

    subset, size = replay_schedule(n_train=60, n_replay=50, ratio=0.25, seed=9)
    # the hand formula replay always had: every training row, then k replay rows cycling one shuffle
    k = round(0.25 / 0.75 * 60)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(9 + 7)).tolist()
    for epoch in range(4):
        assert subset(epoch) == list(range(60)) + [60 + perm[(epoch * k + j) % 50] for j in range(k)]
    assert size == 60 + k


@pytest.mark.unit
def test_source_lists_config_rules(tmp_path):
    from tunelab.config import load_config
    from tunelab.errors import InputError

    write_jsonl(tmp_path / "a.jsonl", conversations(4))

    def cfg(task="chat", **data):
        (tmp_path / "c.yaml").write_text(yaml.safe_dump({"task": task, "model": {"name": "x"}, "data": data}))
        return load_config(tmp_path / "c.yaml")

    ok = cfg(train=[{"path": "a.jsonl", "weight": 3}, {"path": "a.jsonl", "name": "again"}])
    assert [s.path for s in ok.data.train] == [str(tmp_path / "a.jsonl")] * 2  # paths resolved like a file's
    # every task mixes sources: classification and preference lists load (they were refused before the wiring)
    assert cfg(task="classification", train=[{"path": "a.jsonl", "format": "jsonl"}]).data.train[0].format == "jsonl"
    assert len(cfg(task="preference", train="a.jsonl", eval=[{"path": "a.jsonl", "name": "x"},
                                                               {"path": "a.jsonl", "format": "preference"}]).data.eval) == 2
    for data, task, field in ((dict(train=[{"path": "a.jsonl", "format": "openai"}]), "classification",
                               "data.train[0].format"),
                              (dict(train=[{"path": "a.jsonl", "format": "jsonl"}]), "preference", "data.train[0].format"),
                              (dict(train="a.jsonl", eval=[{"path": "a.jsonl", "format": "preference"}]), "chat",
                               "data.eval[0].format"),
                              (dict(train=[{"path": "a.jsonl", "format": "csv"}]), "chat", "data.train[0].format"),
                              (dict(train=[{"path": "a.jsonl"}, {"path": "a.jsonl"}]), "chat", "data.train"),
                              (dict(train=[{"path": "a.jsonl", "weight": 0}]), "chat", "weight"),
                              (dict(train="a.jsonl", mix_sampling="with_replacement"), "chat", "data.mix_sampling")):
        with pytest.raises(InputError) as err:
            cfg(task=task, **data)
        assert field in str(err.value), (data, str(err.value))


@pytest.mark.unit
def test_a_source_takes_the_formats_data_format_takes_for_every_task(tmp_path):
    """One format table (config.TASK_FORMATS): for each task, a format is accepted as data.format exactly when
    it is accepted as a source's format (data.train / data.eval lists), and the table names what loads."""
    import typing

    from tunelab.config import TASK_FORMATS, DataSource, load_config
    from tunelab.errors import InputError

    write_jsonl(tmp_path / "a.jsonl", conversations(2))

    def loads(task: str, data: dict) -> bool:
        (tmp_path / "c.yaml").write_text(yaml.safe_dump({"task": task, "model": {"name": "x"}, "data": data}))
        try:
            load_config(tmp_path / "c.yaml")
        except InputError:
            return False
        return True

    formats = typing.get_args(DataSource.model_fields["format"].annotation)
    for task, allowed in TASK_FORMATS.items():
        for f in formats:
            top = loads(task, {"train": "a.jsonl", "format": f})
            assert top == (f == "auto" or f in allowed), (task, f)
            for key in ("train", "eval"):
                listed = {"train": "a.jsonl", key: [{"path": "a.jsonl", "format": f}]}
                assert loads(task, listed) == top, (task, key, f)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return tiny_llama_folder(tmp_path_factory.mktemp("tiny_llama"))


def _mix_cfg(tmp_path: Path, model: Path, data: dict | None = None, **top):
    from tunelab.config import load_config

    rows = conversations(30)
    write_jsonl(tmp_path / "domain.jsonl", rows[:12])
    write_jsonl(tmp_path / "general.jsonl", rows[12:])
    cfg = {"task": "chat", "model": {"name": str(model), "max_length": 64},
           "data": {"train": [{"path": "domain.jsonl", "weight": 2}, {"path": "general.jsonl", "weight": 1}],
                    "eval_split": 0.2, **(data or {})},
           "optim": {"lr": 3e-3}, "schedule": {"name": "constant", "warmup_steps": 0},
           "train": {"max_steps": 8, "batch_size": 2, "log_every": 1, "seed": 2, "eval_every": 4},
           "eval": {"generate": {"n": 0}}, "early_stopping": {"enabled": False}, **top}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return load_config(tmp_path / "c.yaml")


@pytest.mark.e2e
def test_mixed_run_reports_each_source_and_resumes_mid_epoch_bit_identical(tmp_path, tiny_llama):
    from safetensors.torch import load_file

    from tunelab.run import run_training

    cfg = _mix_cfg(tmp_path, tiny_llama)
    whole = run_training(cfg, tmp_path / "whole", show_progress=False)
    sources = whole["data"]["sources"]
    assert [s["name"] for s in sources] == ["domain", "general"]
    domain, general = sources
    assert domain["planned_units_per_epoch"] == domain["units"]  # an epoch is one pass over the first source
    assert general["planned_units_per_epoch"] == round(domain["units"] * 1 / 2)
    assert whole["data"]["mix_sampling"] == "without_replacement"
    # what each source actually gave: the 8 steps' windows walked here, each unit's source by its index
    from tunelab.compose import setup_task
    from tunelab.train.loop import epoch_windows

    task = setup_task(cfg)
    seen_units, seen_rows, windows = [0, 0], [0, 0], []
    for epoch in range(8):
        windows += epoch_windows(task, 2, 2, epoch, 1)
    for window in windows[:8]:
        for unit in (u for micro in window for u in micro):
            k = 0 if unit < domain["units"] else 1
            seen_units[k] += 1
            seen_rows[k] += task.train.unit_rows[unit]
    assert [s["units_seen"] for s in sources] == seen_units and sum(seen_units) == whole["samples"] == 16
    assert [s["rows_seen"] for s in sources] == seen_rows and seen_rows[0] > seen_units[0]  # packs hold several

    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_domain_loss" in r]
    assert evals and all("eval_general_loss" in r for r in evals)
    final = whole["final"]
    assert whole["data"]["eval"]["supervised_tokens"] == final["supervised_tokens"]  # both sources' held-out rows
    # eval_loss over both = each source's loss weighted by its supervised tokens: recompute from the parts
    assert min(final["domain_loss"], final["general_loss"]) <= final["loss"] <= max(final["domain_loss"],
                                                                                      final["general_loss"])

    stopped = run_training(cfg, tmp_path / "resumed", show_progress=False, should_stop=stop_after(3))
    assert stopped["status"] != "completed" and stopped["steps"] == 3
    per_epoch = -(-(domain["planned_units_per_epoch"] + general["planned_units_per_epoch"]) // 2)
    assert 3 % per_epoch != 0  # stopped inside an epoch
    resumed = run_training(cfg, tmp_path / "resumed", show_progress=False, resume="auto")
    assert resumed["status"] == "completed"
    a, b = load_file(tmp_path / "whole" / "final" / "model.safetensors"), load_file(
        tmp_path / "resumed" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [(s["units_seen"], s["rows_seen"]) for s in resumed["data"]["sources"]] == [
        (s["units_seen"], s["rows_seen"]) for s in sources]  # the counts travel in the checkpoints


@pytest.mark.e2e
def test_eval_sources_each_get_their_loss_and_replay_is_a_source(tmp_path, tiny_llama):
    from tunelab.compose import setup_task

    write_jsonl(tmp_path / "ev_a.jsonl", conversations(4))
    write_jsonl(tmp_path / "ev_b.jsonl", conversations(7)[4:])
    cfg = _mix_cfg(tmp_path, tiny_llama, {"eval": [{"path": "ev_a.jsonl", "name": "a"}, {"path": "ev_b.jsonl",
                                                                                          "name": "b"}]})
    task = setup_task(cfg)
    got = task.evaluate(task.model)
    from tunelab.evaluate.lm import lm_metrics
    from tunelab.tasks.causal_lm import eval_batches
    from tunelab.tasks.lm_data import read_and_encode

    parts = {}
    for name in ("a", "b"):  # each eval file alone, through the plain path: the reference
        _, table, _, _ = read_and_encode(str(tmp_path / f"ev_{name}.jsonl"), cfg.data, task.tokenizer, 64, "chat")
        parts[name] = lm_metrics(task.model, eval_batches(table, 0, True, 64, 8))
        assert abs(got[f"{name}_loss"] - parts[name]["loss"]) < 1e-6
    n = sum(p["supervised_tokens"] for p in parts.values())
    assert abs(got["loss"] - sum(p["loss"] * p["supervised_tokens"] for p in parts.values()) / n) < 1e-6
    assert "eval_a_loss" in task.info["metric_names"]

    task = setup_task(_mix_cfg(tmp_path, tiny_llama, {"train": "domain.jsonl"},
                               regularization={"replay_data": "general.jsonl", "replay_ratio": 0.25}))
    names = [s["name"] for s in task.info["sources"]]
    assert names == ["domain", "replay"]
    d, r = task.info["sources"]
    assert r["planned_units_per_epoch"] == round(d["units"] * 0.25 / 0.75) and task.train.epoch_size == d["units"] + r[
        "planned_units_per_epoch"]


@pytest.mark.unit
def test_preference_refuses_replay_data_where_it_would_ignore_it(tmp_path):
    """The preference setup mixes no replay rows: a config that asks for them is refused, never silently run."""
    from tunelab.config import load_config
    from tunelab.errors import InputError

    (tmp_path / "p.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n', encoding="utf-8")
    raw = {"task": "preference", "model": {"name": "x"}, "data": {"train": "p.jsonl"},
           "regularization": {"replay_data": "p.jsonl", "replay_ratio": 0.2}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    with pytest.raises(InputError) as err:
        load_config(tmp_path / "c.yaml")
    assert "regularization.replay_data" in str(err.value) and "preference" in str(err.value)
