"""`tunelab plan` of task preference (issue 15): pairs batched as the task collates them (chosen and
rejected rows side by side), the measured steps prepared as a run prepares them (full fine-tuning's
cached reference log-probs), and the adapter-off reference forward counted under LoRA."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_chat_tokenizer_build, tiny_llama_build, write_jsonl
from test_preference import PAIRS
from tunelab.cli import app
from tunelab.config import config_from_dict
from tunelab.distributed import ALONE
from tunelab.plan import planner

pytestmark = pytest.mark.e2e
torch.set_num_threads(1)  # hidden-32 models: a second thread only waits for its core on a shared 2-core box


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plan_pref_model")
    tok = tiny_chat_tokenizer_build()
    tiny_llama_build(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def raw(model_dir, train, method="full") -> dict:
    out = {"task": "preference", "model": {"name": str(model_dir), "max_length": 64},
           "data": {"train": str(train), "eval_split": 0.25}, "method": method,
           "optim": {"lr": 1e-3, "weight_decay": 0.0}, "train": {"epochs": 1, "batch_size": 2},
           "early_stopping": {"enabled": False}}
    if method == "lora":
        out["lora"] = {"r": 4}
    return out


def test_profile_matches_the_collated_pair_batches(model_dir, tmp_path):
    """Rows x width and answer tokens of every micro-batch, against the task's own collate."""
    from tunelab.data.batching import epoch_batches
    from tunelab.compose import setup_task

    write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    cfg = config_from_dict(raw(model_dir, tmp_path / "pairs.jsonl"))
    prof = planner.data_profile(cfg)
    task = setup_task(cfg)
    if task.prepare is not None:  # full: the cached reference log-probs the collate looks up
        task.prepare(task.model, tmp_path, ALONE)
    real = []
    for idx in epoch_batches(task.train.lengths, cfg.train.batch_size, seed=cfg.train.seed, epoch=0):
        b = task.train.collate(idx)
        real.append((b["input_ids"].shape[0], b["input_ids"].shape[1], int((b["labels"][:, 1:] != -100).sum())))
    assert prof["shapes"] == real
    assert prof["units"] == task.info["train_rows"] and all(r == 2 * len(i) for (r, _, _), i in zip(
        prof["shapes"], epoch_batches(task.train.lengths, cfg.train.batch_size, seed=cfg.train.seed, epoch=0)))


def test_plan_of_full_and_lora_preference_runs_and_counts_the_reference(model_dir, tmp_path):
    """The full fine-tune's plan used to stop with 'reference log-probs were not prepared'; LoRA's
    per-step FLOPs add the adapter-off forward: 2 x total params x padded tokens."""
    import yaml

    write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump(raw(model_dir, tmp_path / "pairs.jsonl")))
    res = CliRunner().invoke(app, ["plan", str(path), "--json", "--measure-steps", "1", "--no-suggestions"])
    assert res.exit_code == 0, res.output
    full = json.loads(res.output)
    assert full["time"]["reference_seconds"] > 0 and full["data"]["units"] == 6  # 8 pairs, 2 held out
    assert full["largest_micro_batch"]["rows"] == 2 * 2
    cfg = config_from_dict(raw(model_dir, tmp_path / "pairs.jsonl", "lora"))
    prof = planner.data_profile(cfg)
    est = planner.estimate(cfg, prof, 0)
    policy = [planner.shape_cost(planner.fit_costs(planner.meta_model(cfg, None), "preference",
                                                   max(w for _, w, _ in prof["shapes"]), False, None)["flops"], *s)
              for s in prof["shapes"]]
    extra = [f - p for f, p in zip(est["flops_per_batch"], policy)]
    assert extra == pytest.approx([2 * est["params"]["total_params"] * r * w for r, w, _ in prof["shapes"]])
