"""Exact resume vs an uninterrupted run, and accumulation == one large batch, through the real loop."""

import copy
import json

import pytest

from conftest import stop_after
import torch
from safetensors.torch import load_file

from tunelab.config import Config
from tunelab.compose import setup_task
from tunelab.run import run_training
from tunelab.train.early_stop import BestTracker
from tunelab.train.loop import LoopSettings, LoopState, train_loop
from contextlib import nullcontext




@pytest.mark.parametrize("grad_accum,stop_at", [(1, 5), (2, 3), (1, 8)])  # 8 = exactly an epoch end
@pytest.mark.e2e
def test_resume_is_bit_identical(toy_classification, tmp_path, grad_accum, stop_at):
    raw = copy.deepcopy(toy_classification["config"])
    raw["train"].update({"grad_accum": grad_accum, "eval_every": 3})
    raw["checkpoint"] = {"final": "last", "keep_last": 1}
    cfg = Config.model_validate(raw)
    full = run_training(cfg, tmp_path / "full", show_progress=False)
    assert full["status"] == "completed"

    cut = run_training(Config.model_validate(raw), tmp_path / "cut", show_progress=False,
                       should_stop=stop_after(stop_at))
    assert cut["status"] == "interrupted" and cut["steps"] == stop_at
    assert not (tmp_path / "cut" / "final").exists()
    resumed = run_training(Config.model_validate(raw), tmp_path / "cut", resume="auto", show_progress=False)
    assert resumed["status"] == "completed" and resumed["steps"] == full["steps"]

    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the metrics log continues without duplicated or missing steps
    import json

    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    full_rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "loss" in r) for r in rows] == [(r["step"], "loss" in r) for r in full_rows]
    assert [r.get("loss") for r in rows] == [r.get("loss") for r in full_rows]


class NullIO:
    def log(self, row):
        pass

    def save(self, state, tracker, is_best, metrics):
        pass

    def stop_requested(self):
        return False


def one_step_weights(raw, batch_size, grad_accum):
    cfg = Config.model_validate(raw)
    torch.manual_seed(0)
    task = setup_task(cfg)
    model = task.model
    for m in model.modules():  # dropout would make two runs differ for reasons other than batching
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    s = LoopSettings(batch_size=batch_size, grad_accum=grad_accum, total_steps=1, max_grad_norm=None, seed=0,
                     log_every=1, eval_every=None, save_every=None, early_stopping=False)
    train_loop(model, opt, sched, task, s, LoopState(), BestTracker("eval_accuracy"), NullIO(), nullcontext)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("n_rows,small,accum", [(4, 1, 4), (5, 2, 3)])  # 5 = 2 + 2 + 1: uneven micro-batches
@pytest.mark.parity
def test_accumulation_equals_one_large_batch(toy_classification, n_rows, small, accum):
    raw = copy.deepcopy(toy_classification["config"])
    raw["data"].update({"max_rows": n_rows, "eval": None, "eval_split": 0.0})
    raw["data"]["train"] = str(toy_classification["dir"] / "train.jsonl")
    big = one_step_weights(raw, n_rows, 1)
    acc = one_step_weights(raw, small, accum)
    moved = 0
    for k in big:
        assert torch.allclose(big[k], acc[k], atol=1e-6), k
        moved += 1
    assert moved > 0
    base = one_step_weights({**raw, "data": {**raw["data"], "max_rows": n_rows}}, n_rows, 1)
    assert all(torch.equal(base[k], big[k]) for k in big)  # deterministic reference


@pytest.mark.e2e
def test_early_stopping_state_survives_a_resume(toy_classification, tmp_path):
    """Nothing improves by 0.5: best at the first eval (step 3), bad evals at 6 and 8 (the epoch
    end), stop at 8. Stopped at step 7 (one bad eval counted) and resumed, it must still stop at 8."""
    raw = copy.deepcopy(toy_classification["config"])
    raw["train"].update({"epochs": 4, "eval_every": 3})
    raw["early_stopping"] = {"enabled": True, "patience": 2}
    raw["checkpoint"] = {"min_delta": 0.5, "save_every": 1}
    full = run_training(Config.model_validate(raw), tmp_path / "full", show_progress=False)
    assert full["status"] == "early_stopped" and full["steps"] == 8
    cut = run_training(Config.model_validate(raw), tmp_path / "cut", show_progress=False, should_stop=stop_after(7))
    assert cut["status"] == "interrupted" and cut["steps"] == 7
    resumed = run_training(Config.model_validate(raw), tmp_path / "cut", resume="auto", show_progress=False)
    assert resumed["status"] == "early_stopped" and resumed["steps"] == 8
    assert resumed["best"]["step"] == full["best"]["step"] == 3


@pytest.mark.parametrize("final", ["best", "last"])
@pytest.mark.e2e
def test_evaluation_time_is_kept_out_of_the_training_rate(toy_classification, tmp_path, final):
    """An evaluation that sleeps 0.4 s per call: the summary's eval_seconds holds that time, and
    samples_per_second is samples / (loop time - eval time), not samples / loop time. The final
    metrics come from the shipped weights' checkpoint: no third evaluation, same numbers as a fresh one."""
    import dataclasses
    import time

    import tunelab.run as run_mod

    raw = copy.deepcopy(toy_classification["config"])
    raw["train"].update({"epochs": 2, "eval_before": False})
    raw["checkpoint"] = {"final": final}
    calls = []
    real_setup = run_mod.setup_task

    def slow_setup(cfg, *a, **kw):
        task = real_setup(cfg, *a, **kw)
        inner = task.evaluate

        def evaluate(model):
            calls.append(1)
            time.sleep(0.4)
            return inner(model)
        return dataclasses.replace(task, evaluate=evaluate)

    mp = pytest.MonkeyPatch()
    mp.setattr(run_mod, "setup_task", slow_setup)
    try:
        summary = run_training(Config.model_validate(raw), tmp_path / "run", show_progress=False)
    finally:
        mp.undo()
    evals = 2  # one per epoch end; the final metrics are the stored evaluation of the shipped weights
    assert len(calls) == evals
    assert summary["eval_seconds"] >= 0.4 * evals
    secs = summary["train_seconds"]  # rounded to 1 ms in the summary
    assert summary["samples"] / (secs + 6e-4) <= summary["samples_per_second"] <= summary["samples"] / (secs - 6e-4)
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    loop_seconds = max(r["elapsed"] for r in metrics if "elapsed" in r)
    assert summary["train_seconds"] < loop_seconds - 0.4 * (evals - 1)  # the last train row precedes the last eval
    shipped = summary["final_weights"]
    step = summary["steps"] if shipped == "last" else summary["best"]["step"]
    from tunelab.evaluate.saved_model import evaluate_saved_classifier

    fresh = evaluate_saved_classifier(tmp_path / "run" / "final", raw["data"]["eval"], max_length=32)
    assert fresh["accuracy"] == summary["final"]["accuracy"] and fresh["confusion_matrix"] == summary["final"]["confusion_matrix"]
    assert fresh["loss"] == pytest.approx(summary["final"]["loss"], rel=1e-5)
    assert step in (8, 16)  # an epoch end: 64 rows / batch 8 = 8 steps per epoch


@pytest.mark.e2e
def test_resume_auto_without_a_checkpoint_starts_over_cleanly(toy_classification, tmp_path):
    """A run killed before its first checkpoint left rows behind: --resume auto finds nothing to
    resume, so the run starts over and its metrics.jsonl holds only the new run's rows."""
    raw = copy.deepcopy(toy_classification["config"])
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 99, "loss": 9.9, "elapsed": 1.0}) + "\n", encoding="utf-8")
    (out / "tensorboard").mkdir()
    stale = out / "checkpoints" / "step-000099"  # a save cut short: no manifest, so not resumable
    stale.mkdir(parents=True)
    (stale / "weights.safetensors").write_bytes(b"cut")
    summary = run_training(Config.model_validate(raw), out, resume="auto", show_progress=False)
    assert (out / "checkpoints.unusable" / "step-000099").is_dir()  # set aside, not weighed by retention
    assert summary["best"]["checkpoint"] and (out / "checkpoints" / summary["best"]["checkpoint"]).is_dir()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["status"] == "completed"
    assert not any(r.get("step") == 99 for r in rows)
    assert rows[0].get("before_training") is True
    assert not (out / "tensorboard").exists()  # no logger asked for one in this config


@pytest.mark.e2e
def test_final_best_under_gradual_unfreezing_ships_the_best_steps_weights(toy_classification, tmp_path):
    """Blocks unfrozen after the best step must not leak into final/: the best checkpoint holds
    every parameter the optimizer owns, so final/ is that step's model and the summary's stored
    evaluation is the evaluation of final/."""
    from safetensors.torch import load_file

    from tunelab.evaluate.saved_model import evaluate_saved_classifier

    raw = copy.deepcopy(toy_classification["config"])
    raw["unfreeze"] = {"every": 2, "unit": "steps"}
    raw["train"].update({"eval_every": 2, "epochs": 2, "eval_before": False})
    # an improvement bar no later evaluation can clear: the first evaluation (before most blocks
    # unfreeze) stays the best (eval_loss with mode max did this until such a config was refused)
    raw["checkpoint"] = {"final": "best", "metric": "eval_loss", "mode": "min", "min_delta": 1e6}
    raw["early_stopping"] = {"enabled": False}
    out = tmp_path / "run"
    s = run_training(Config.model_validate(raw), out, show_progress=False)
    assert s["best"]["step"] < s["steps"] - 4  # blocks were unfrozen (and trained) after the best step
    best = load_file(str(out / "checkpoints" / s["final_weights"] / "weights.safetensors"))
    final = load_file(str(out / "final" / "model.safetensors"))
    assert set(final) <= set(best)
    assert all(torch.equal(final[k], best[k]) for k in final)
    fresh = evaluate_saved_classifier(out / "final", raw["data"]["eval"], max_length=32)
    assert fresh["loss"] == pytest.approx(s["final"]["loss"], rel=1e-5)


@pytest.mark.e2e
def test_resume_auto_with_bad_input_leaves_the_run_dir_as_it_was(toy_classification, tmp_path):
    """No checkpoint to resume and a config that fails to load its model: exit as bad input, and
    the previous attempt's files are still there (start-over happens only once setup succeeded)."""
    from tunelab.errors import InputError

    raw = copy.deepcopy(toy_classification["config"])
    raw["model"]["name"] = str(tmp_path / "no-such-model")
    out = tmp_path / "run"
    out.mkdir()
    old = json.dumps({"step": 3, "loss": 1.0, "elapsed": 1.0}) + "\n"
    (out / "metrics.jsonl").write_text(old, encoding="utf-8")
    with pytest.raises(InputError):
        run_training(Config.model_validate(raw), out, resume="auto", show_progress=False)
    assert (out / "metrics.jsonl").read_text() == old


@pytest.mark.e2e
def test_a_resume_on_another_eval_file_does_not_reuse_the_stored_evaluation(toy_classification, tmp_path):
    """Cut at step 10, resumed from that checkpoint with a different eval file: the final metrics
    are those of final/ on the new file, not the checkpoint's evaluation on the old one."""
    from conftest import sentiment_rows, write_jsonl
    from tunelab.evaluate.saved_model import evaluate_saved_classifier

    raw = copy.deepcopy(toy_classification["config"])
    # no later evaluation can beat the first by 100: the step-4 checkpoint stays the best, so final/
    # ships weights whose stored evaluation was made on the old eval file
    raw["checkpoint"] = {"final": "best", "min_delta": 100}
    raw["train"].update({"eval_every": 4, "eval_before": False})
    out = tmp_path / "run"
    run_training(Config.model_validate(raw), out, show_progress=False, should_stop=stop_after(10))
    rows = sentiment_rows(40, seed=9)
    other = write_jsonl(tmp_path / "other_eval.jsonl", rows[:5] + [r for r in rows if r["label"] == "pos"][:20])
    raw["data"]["eval"] = str(other)
    checkpoint = max((out / "checkpoints").glob("step-*"))
    s = run_training(Config.model_validate(raw), out, resume=str(checkpoint), show_progress=False)
    assert s["best"]["step"] < 10
    fresh = evaluate_saved_classifier(out / "final", other, max_length=32)
    assert sum(sum(row) for row in s["final"]["confusion_matrix"]) == fresh["rows"] == 25
    assert s["final"]["loss"] == pytest.approx(fresh["loss"], rel=1e-5)
