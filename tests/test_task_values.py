"""Task values: a step that changes part of a task builds a new TaskRun (dataclasses.replace) and
carries every other field; nothing patches a task in place."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from conftest import sentiment_rows, write_jsonl
from tunelab.config import Config
from tunelab.run import run_training

pytestmark = pytest.mark.e2e


def test_feature_cache_keeps_the_replay_mixing(toy_classification, tmp_path):
    """64 training rows + 16 replay rows per epoch (ratio 0.2) = 80 = 10 batches of 8, for 2 epochs, as
    without feature caching (test_techniques.py::test_replay_data_is_mixed_into_each_epoch); the cache
    rebuilt the training set without its epoch schedule and trained on all 104 rows each epoch."""
    replay = write_jsonl(tmp_path / "replay.jsonl", sentiment_rows(40, seed=11))
    raw = copy.deepcopy(toy_classification["config"])
    raw["method"] = "feature_extraction"
    raw["feature_extraction"] = {"cache_features": True}
    raw["regularization"] = {"replay_data": str(replay), "replay_ratio": 0.2}
    s = run_training(Config.model_validate(raw), tmp_path / "run", show_progress=False)
    assert s["data"]["feature_cache"]["train"][0] == 104  # the cache holds train + replay rows
    assert s["samples"] == 160 and s["steps"] == 20


@pytest.mark.unit
def test_task_values_are_frozen_and_cache_features_leaves_its_input_alone(toy_classification):
    from tunelab.models.adapt import apply_method
    from tunelab.compose import setup_task
    from tunelab.tasks.feature_cache import cache_features

    raw = copy.deepcopy(toy_classification["config"])
    raw["method"] = "feature_extraction"
    cfg = Config.model_validate(raw)
    task = setup_task(cfg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.evaluate = None
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.train.collate = None
    model = apply_method(task.model, cfg.method, task=cfg.task, freeze_cfg=cfg.freeze, lora=cfg.lora)
    collate, info = task.train.collate, dict(task.info)
    cached = cache_features(task, model, task.eval_batches(), 16)
    assert task.train.collate is collate and task.info == info  # the input is unchanged
    assert cached.train.collate is not collate and "feature_cache" in cached.info
    assert cached.tokenizer is task.tokenizer and cached.save_final is task.save_final
