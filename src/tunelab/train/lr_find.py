"""Learning-rate range test (Smith 2017, "Cyclical Learning Rates for Training Neural Networks",
section 3.3; fastai's `lr_find`): `optim.lr: auto` and `tunelab lr-find CONFIG`.

On the real model and data: `steps` optimizer steps with the lr growing exponentially from
`start_lr` to `end_lr` (every parameter group keeps its ratio to optim.lr: head multiplier,
layer-wise decay), the training loss of each step recorded and smoothed with a bias-corrected
exponential moving average (beta 0.98, as fastai). The sweep stops early once the smoothed loss
exceeds `diverge` x its minimum, or a step is not finite.

The rule that picks the lr (`pick_lr`): the lr at the minimum of the smoothed loss, divided by 10
(fastai's `minimum` suggestion; Smith's advice to stay an order of magnitude below where the loss
stops falling; the first 10% of the steps are left out, as fastai's plot leaves them out: the
average of a few batches is one batch's noise) - never above the point of steepest descent within the two decades below that
minimum (fastai's `steep`; further down the slope is batch noise on the initial plateau), which
lies inside the stable, falling region by construction. A curve that never falls (the minimum at the first step) gives no choice: the run
keeps the family default and says so.

The model's trainable weights, the optimizer's state and hyperparameters, and the RNG states are
snapshotted before and restored after (bit-identical), so a run with `lr: auto` trains exactly
as one given the chosen number. The steps reuse the loop's own primitives (`backward_window`,
the replicas' clip-and-step); there is no second training loop here.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tunelab.errors import InputError
from tunelab.train.checkpoint import rng_state, set_rng_state, trainable_state
from tunelab.train.loop import backward_window, epoch_windows
from tunelab.train.protocols import OneProcess

LR_FIND_FILE = "lr_find.json"
log = logging.getLogger("tunelab")


@dataclass(frozen=True)
class RangeTest:
    start_lr: float = 1e-7
    end_lr: float = 1.0
    steps: int = 60
    smooth: float = 0.98
    diverge: float = 4.0


def lr_sweep(t: RangeTest) -> list[float]:
    """The exponential sweep: start_lr * (end_lr / start_lr) ** (i / (steps - 1))."""
    n = max(2, t.steps)
    return [t.start_lr * (t.end_lr / t.start_lr) ** (i / (n - 1)) for i in range(n)]


def smooth_losses(losses: list[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average (fastai's Recorder smoothing)."""
    out, avg = [], 0.0
    for i, loss in enumerate(losses, start=1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** i))
    return out


def pick_lr(lrs: list[float], smoothed: list[float]) -> dict:
    """The documented rule (module docstring): min(lr at the smoothed minimum / 10, lr of steepest
    descent before the minimum). Returns the suggestions; `lr` is None when the loss never fell."""
    if len(lrs) < 3:
        return {"lr": None, "rule": "too few steps", "lr_min": None, "lr_steepest": None}
    skip = max(1, len(smoothed) // 10)  # the average of the first few batches is one batch's noise
    i_min = min(range(skip, len(smoothed)), key=smoothed.__getitem__)
    if smoothed[i_min] >= smoothed[skip]:
        return {"lr": None, "rule": "the loss never fell", "lr_min": None, "lr_steepest": None}
    logs = [math.log(x) for x in lrs]
    # the steepest descent within the two decades below the minimum: earlier slopes are batch noise on a plateau
    near = [i for i in range(1, i_min) if lrs[i] >= lrs[i_min] / 100]
    slopes = {i: (smoothed[i + 1] - smoothed[i - 1]) / (logs[i + 1] - logs[i - 1]) for i in near}
    i_steep = min(slopes, key=slopes.__getitem__) if slopes else i_min
    lr_min, lr_steep = lrs[i_min], lrs[i_steep]
    return {"lr": min(lr_min / 10, lr_steep), "rule": "min(lr at the smoothed minimum / 10, steepest descent below it)",
            "lr_min": lr_min, "lr_steepest": lr_steep}


def _host_copy(value):
    """A copy of an optimizer state dict with every tensor on the host (numbers and structure copied too)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _host_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_host_copy(v) for v in value)
    return copy.deepcopy(value)


def _snapshot(model, optimizer) -> dict:
    """Everything the sweep changes, as host copies (checkpoint's own helpers): on a GPU the sweep
    would otherwise hold a second device copy of the trainable weights and the optimizer state."""
    return {"params": trainable_state(model, optimizer, copy=True), "optimizer": _host_copy(optimizer.state_dict()),
            "rng": rng_state(), "training": model.training}


def _restore(model, optimizer, snap: dict) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in snap["params"]:
                p.copy_(snap["params"][n])
    optimizer.load_state_dict(snap["optimizer"])  # moves the state back onto each parameter's device
    optimizer.zero_grad(set_to_none=True)
    set_rng_state(snap["rng"])
    model.train(snap["training"])


def _windows(task, batch_size: int, grad_accum: int, seed: int, steps: int):
    """Accumulation windows in the loop's own order (epoch 0, then 1, ...), as many as the sweep needs."""
    epoch = 0
    while True:
        yield from epoch_windows(task, batch_size, seed, epoch, grad_accum)
        epoch += 1


def range_test(model, optimizer, task, autocast, *, base_lr: float, batch_size: int, grad_accum: int,
               max_grad_norm: float | None, seed: int, test: RangeTest = RangeTest()) -> dict:
    """Run the sweep on `model` with `optimizer`, restore both, return the curve and the choice."""
    replicas = OneProcess(model, task.loss_fn)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ratios = [g.get("initial_lr", g["lr"]) / base_lr for g in optimizer.param_groups]
    snap = _snapshot(model, optimizer)
    lrs, losses = [], []
    model.train()
    try:
        best = math.inf
        for lr, window in zip(lr_sweep(test), _windows(task, batch_size, grad_accum, seed, test.steps)):
            for g, k in zip(optimizer.param_groups, ratios):
                g["lr"] = lr * k
            units = sum(task.train.count(idx) for idx in window)
            window_loss, _, _ = backward_window(window, units, task, replicas, autocast, lambda x: x)
            loss = window_loss / max(1, units)
            replicas.clip_and_step(optimizer, params, max_grad_norm, math.isfinite(loss))
            optimizer.zero_grad(set_to_none=True)
            if not math.isfinite(loss):
                break
            lrs.append(lr)
            losses.append(loss)
            smoothed = smooth_losses(losses, test.smooth)[-1]
            best = min(best, smoothed)
            if len(losses) > 5 and smoothed > test.diverge * best:
                break
    finally:
        _restore(model, optimizer, snap)
    smoothed = smooth_losses(losses, test.smooth)
    choice = pick_lr(lrs, smoothed)
    return {"settings": asdict(test), "curve": [{"lr": a, "loss": b, "smoothed": c} for a, b, c in zip(lrs, losses, smoothed)],
            **choice}


def _stamp(path: str | None) -> list:
    if not path:
        return [None]
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        st = p.stat()
        return [str(p.resolve()), st.st_size, st.st_mtime_ns]
    except OSError:
        return [path]


def fingerprint(precision: str, test: RangeTest = RangeTest(), *, task: str, method: str, model_cfg, data_cfg,
                optim_cfg, train_cfg, lora_cfg, freeze_cfg, unfreeze_cfg) -> str:
    """What the sweep's result depends on: model, data, method and what shapes a step (the config's
    task and method keys and its model, data, optim, train, lora, freeze and unfreeze sections;
    tunelab.compose.lr_fingerprint hands them over)."""
    d, o, t, m = data_cfg, optim_cfg, train_cfg, model_cfg
    parts = {"task": task, "model": [m.name, _stamp(m.name), m.max_length],
             "data": [_stamp(d.train) if isinstance(d.train, str) else [[_stamp(x.path), x.model_dump()] for x in d.train],
                      d.max_rows, d.eval, d.eval_split, d.text_column, d.label_column,
                      d.text_pair_column, d.header, d.format, d.packing],
             "method": [method, lora_cfg.model_dump(), freeze_cfg.model_dump(), unfreeze_cfg.model_dump()],
             "optim": [o.weight_decay, list(o.betas), o.eps, o.head_lr, o.head_lr_multiplier, o.layer_lr_decay],
             "step": [t.batch_size, t.grad_accum, t.max_grad_norm, t.seed, precision], "test": asdict(test)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cache_dir() -> Path:
    """Where sweeps are kept across run dirs: $TUNELAB_LR_FIND_CACHE, else $TUNELAB_CACHE/lr_find (default
    ~/.cache/tunelab/lr_find)."""
    if os.environ.get("TUNELAB_LR_FIND_CACHE"):
        return Path(os.environ["TUNELAB_LR_FIND_CACHE"]).expanduser()
    return Path(os.environ.get("TUNELAB_CACHE") or "~/.cache/tunelab").expanduser() / "lr_find"


def load_cached(fp: str, run_dir: Path | None) -> dict | None:
    """A stored sweep with this fingerprint: RUN/lr_find.json first, then the user cache."""
    for path in ([run_dir / LR_FIND_FILE] if run_dir is not None else []) + [cache_dir() / f"{fp}.json"]:
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(found, dict) and found.get("fingerprint") == fp and "curve" in found:
            return found
    return None


def store(result: dict, run_dir: Path | None) -> None:
    """RUN/lr_find.json (when there is a run dir) and the user cache; the cache is best effort."""
    text = json.dumps(result, indent=1) + "\n"
    targets = ([run_dir / LR_FIND_FILE] if run_dir is not None else []) + [cache_dir() / f"{result['fingerprint']}.json"]
    for i, path in enumerate(targets):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        except OSError:
            if i == 0 and run_dir is not None:
                raise


def starting_lr(lr, sharded: bool, precision: str, *, strategy: str, default) -> float:
    """optim.lr (`lr`), or under `auto` `default()`: the lr the config would get without it
    (defaults.default_lr, the one definition: the family default, or the field's own for task
    preference); the range test replaces it before training and falls back to it when the loss
    never falls. `strategy`: distributed.strategy, named when a sharded run refuses `auto`."""
    if lr != "auto":
        return lr
    if precision == "fp16":
        raise InputError("optim.lr: auto does not run under fp16 (its sweep would need the loss scaler): use "
                         "train.precision bf16 or fp32, or give a number", field="optim.lr")
    if sharded:
        raise InputError("optim.lr: auto runs its range test on one process's model; under distributed.strategy "
                         f"{strategy} give a number (`tunelab lr-find CONFIG` finds one)", field="optim.lr")
    return default()


def find_lr(r, fp: str, out: Path | None, *, force: bool = False, world_size: int = 1) -> dict:
    """The range test's result for the run's Recipe `r` (its model, optimizer, task, autocast and loop
    settings) and fingerprint `fp`: a stored one (RUN/lr_find.json or the user cache) when `fp`
    matches and not `force`, else a fresh sweep (weights, optimizer and RNG restored); `source` says
    which. Stores nothing: the callers decide where (`store`)."""
    found = None if force else load_cached(fp, out)
    if found is not None:
        return {**found, "source": "cache"}
    if world_size > 1:
        raise InputError("optim.lr: auto: no stored range test for this model, data and method; with several "
                         "processes run `tunelab lr-find CONFIG` first (its result is cached)", field="optim.lr")
    log.info("optim.lr: auto - running the learning-rate range test")
    found = range_test(r.model, r.optimizer, r.task, r.autocast, base_lr=r.settings.base_lr,
                       batch_size=r.settings.batch_size, grad_accum=r.settings.grad_accum,
                       max_grad_norm=r.settings.max_grad_norm, seed=r.settings.seed)
    return {**found, "fingerprint": fp, "placeholder_lr": r.settings.base_lr, "source": "sweep"}


def found_lr(r, fp: str, out: Path | None, group) -> tuple[float, dict]:
    """optim.lr: auto - the lr to train at and the range test behind it (`find_lr`: stored, else a
    fresh sweep; stored in RUN/lr_find.json and the user cache); the placeholder (`r.settings.base_lr`)
    when the loss never fell, said."""
    found = find_lr(r, fp, out, world_size=group.world_size)
    if out is not None and group.is_main:
        store(found, out)
    lr = found["lr"] or r.settings.base_lr
    if found["lr"] is None:
        log.warning("optim.lr: auto - the range test found no falling loss (%s); training at the default %.3g",
                    found["rule"], lr)
    return lr, found


def found_why(found: dict) -> str:
    """The reason config.yaml and the summary's `defaults` give for the lr the range test chose."""
    return (f"optim.lr: auto - learning-rate range test ({found['rule']}; lr at the smoothed minimum "
            f"{found['lr_min']}, steepest {found['lr_steepest']}; {LR_FIND_FILE}, {found['source']})")


def found_summary(found: dict) -> dict:
    """summary.json's `lr_find`: the choice and how many steps the sweep took."""
    return {**{k: found.get(k) for k in ("lr", "rule", "lr_min", "lr_steepest", "source", "fingerprint")},
            "steps": len(found["curve"])}