"""The training recipe: setup, train, save, in that order (torchtune-style, no trainer class).

`setup` does everything that can fail on bad input (config, data, model) before the run dir is
created, so a bad input never leaves a folder that looks like a run.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import pickle
import random
import signal
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from tunelab.compose import check_distributed, lr_fingerprint, prepare_data, setup_task, starting_lr
from tunelab.device import run_device, to_device
from tunelab.host_allocator import in_use as allocator_in_use, note as note_allocator, release_free_memory
from tunelab.host_malloc import set_mmap_threshold
from tunelab.config import Config, dump_config
from tunelab.data.sources import with_seen
from tunelab.defaults import apply_defaults, eval_trust, resolved_defaults
from tunelab.distributed import ALONE, Group, SharedRunIO, init_from_env, replicas_for
from tunelab.distributed.group import prepare_data_before_joining
from tunelab.distributed.reshard import check_resume_layout, load_model_states, weights_format
from tunelab.distributed.sharded import ShardedRunIO, shard_before_optimizer
from tunelab.durable import is_disk_full, reason
from tunelab.errors import DiskFull, InputError, OutOfMemory
from tunelab.evaluate import generation_run
from tunelab.evaluate.probe import compare, probe_generation_for, probe_measures, read_probe_texts
from tunelab.final_weights import BASE, check_best_or_base, choose_final, save_base, versus_base, worse_message
from tunelab.models.adapt import apply_method
from tunelab.models.checks import check_tokenizer_fits
from tunelab.models.load import count_params
from tunelab.models.owned_memory import own_tensors
from tunelab.monitor.health import HealthMonitor, summarize
from tunelab.monitor.loggers import check_loggers, open_loggers
from tunelab.monitor.metrics_log import read_metrics
from tunelab.monitor.progress import Progress, header_info, header_lines
from tunelab.run_dir import (RunDir, RunLock, check_checkpoint_fits, check_same_run, default_output_dir, files_as_found,
                             leave_as_found, peak_memory_mb, prepare_run_dir, refuse_existing_run, start_over,
                             trim_metrics, write_failure, write_final, write_summary)
from tunelab.tasks import TaskRun
from tunelab.train import checkpoint as ckpt
from tunelab.train import sizes
from tunelab.train.early_stop import BestTracker
from tunelab.train.loop import LoopSettings, LoopState, eval_row, train_loop, windows_per_epoch
from tunelab.train import lr_find
from tunelab.train.optim import build_optimizer, describe_groups, param_groups
from tunelab.train.precision import autocast_factory, grad_scaler, resolve_precision, store_weights_bf16
from tunelab.train.regularizers import apply_mixout, make_penalty, remove_mixout
from tunelab.train.schedules import build_scheduler
from tunelab.train.unfreeze import GradualUnfreezer

log = logging.getLogger("tunelab")

OOM_FIXES = ("out of memory at micro-batch size {bs}: lower train.batch_size and raise train.grad_accum "
             "(same effective batch), or set train.gradient_checkpointing: true, train.precision: bf16, "
             "or method: lora / qlora")


@dataclass
class Recipe:
    """Everything `setup` builds; the loop and `save` read it."""

    cfg: Config
    task: TaskRun
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    tracker: BestTracker
    settings: LoopSettings
    autocast: object
    precision: str
    device: torch.device
    trainable: int
    total: int
    per_epoch: int
    mixout_layers: int = 0
    probe_texts: list[str] | None = None
    probe_before: dict | None = None
    probe_generation: object = None  # evaluate.generation.GenerationEval on the probe's prompts (chat, causal_lm)
    world_size: int = 1  # processes training together (DDP); train.batch_size is per process
    sharding: object = None  # distributed.sharded.ShardedRun under distributed.strategy fsdp / zero1-3
    lr_find: dict | None = None  # optim.lr: auto - the range test's choice (summary.json lr_find)


def enable_gradient_checkpointing(model) -> None:
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise InputError(f"{type(model).__name__} does not support gradient checkpointing",
                         field="train.gradient_checkpointing")
    if hasattr(model, "activation_checkpointing_enable"):  # the 5.x name; gradient_* is deprecated
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False


def fisher_batches(task, cfg) -> list | None:
    """Reference batches for EWC's Fisher: the file the user named, else the training data."""
    if not cfg.regularization.ewc:
        return None
    if cfg.regularization.ewc_data:
        if task.reference_batches is None:
            raise InputError(f"regularization.ewc_data is not supported for task {cfg.task} yet; "
                             "leave it unset to estimate the Fisher on the training data", field="regularization.ewc_data")
        return task.reference_batches(cfg.regularization.ewc_data, cfg.train.batch_size)[: cfg.regularization.ewc_batches]
    from tunelab.data.batching import epoch_batches

    order = epoch_batches(task.train.lengths, cfg.train.batch_size, seed=cfg.train.seed + 1, epoch=0)
    return [task.train.collate(idx) for idx in order[: cfg.regularization.ewc_batches]]


def _adapt(cfg: Config, task: TaskRun, device: torch.device) -> tuple[TaskRun, torch.nn.Module, int]:
    """Apply the method and the model-side options; returns the task, the model, mixout layer count."""
    model = apply_method(task.model, cfg.method, task=cfg.task, freeze_cfg=cfg.freeze, lora=cfg.lora).to(device)
    task = replace(task, model=model)
    if device.type != "cpu":  # batches are built on the CPU; the loop gets them where the model is
        collate = task.train.collate
        task = replace(task, train=replace(task.train, collate=lambda idx: to_device(collate(idx), device)))
    if cfg.method == "feature_extraction" and cfg.feature_extraction.cache_features and cfg.task == "classification":
        from tunelab.tasks.feature_cache import cache_features

        eval_batches = task.eval_batches() if task.eval_batches is not None else None
        task = cache_features(task, model, eval_batches, sizes.eval_batch_size(cfg.train))
    if cfg.method in ("lora", "qlora"):  # final/ = PEFT adapter + how to rebuild the base (+ merged/ on request)
        from tunelab.models.adapters import adapter_saver

        task = replace(task, save_final=adapter_saver(task.save_final, cfg.model, cfg.lora, method=cfg.method,
                                                      task=cfg.task, labels=task.info.get("labels")))
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    mixout_layers = apply_mixout(model, cfg.regularization.mixout) if cfg.regularization.mixout else 0
    if cfg.unfreeze.every:
        for p in model.parameters():  # every parameter joins the optimizer; the unfreezer sets requires_grad
            p.requires_grad = True
    return task, model, mixout_layers


def store_frozen_base(cfg: Config, model: torch.nn.Module, precision: str, quiet: bool = False) -> None:
    """lora.base_dtype: the frozen base's Linear weights in bf16 when the run computes in bf16 autocast
    (models/frozen_weights.py: the same numbers, no per-step weight copies), and under QLoRA its 4-bit
    layers' outputs kept in bf16 as autocast's Linear keeps them (models/autocast_4bit.py). The planner's
    meta model too."""
    from tunelab.models.frozen_weights import store_frozen_linears_bf16, stores

    if stores(cfg.method, cfg.lora, precision=precision, weights_dtype=cfg.train.weights_dtype,
              strategy=cfg.distributed.strategy, unfreezes=bool(cfg.unfreeze.every)):
        layers, values = store_frozen_linears_bf16(model)
        if not quiet:
            log.info("frozen base: %d Linear weights (%.1fM values) stored in bf16 (lora.base_dtype %s)",
                     layers, values / 1e6, cfg.lora.base_dtype)
        if cfg.method == "qlora" and any(hasattr(p, "quant_state") for p in model.parameters()):  # not the planner's meta model
            from tunelab.models.autocast_4bit import keep_autocast_dtype

            n = keep_autocast_dtype(model)
            if not quiet:
                log.info("frozen base: %d 4-bit layers keep bf16 autocast's output dtype (lora.base_dtype %s)",
                         n, cfg.lora.base_dtype)


def _under(autocast, evaluate):
    def evaluate_at_precision(model):
        with autocast():
            return evaluate(model)

    return evaluate_at_precision


def setup(cfg: Config, world_size: int = 1, group: Group | None = None) -> Recipe:
    """Data, model, method, optimizer, schedule, loop settings. Writes nothing.

    With `world_size` processes an optimizer step takes world_size x grad_accum micro-batches, so an
    epoch has that many times fewer steps.
    """
    apply_defaults(cfg)  # once: load_config and config_from_dict have applied them already
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    check_loggers(cfg.monitor.loggers)
    device = run_device()
    task = setup_task(cfg)
    check_tokenizer_fits(task.tokenizer, task.model, cfg.model.name)
    load_note = getattr(task.model, "tunelab_load_note", None)
    task, model, mixout_layers = _adapt(cfg, task, device)
    if task.evaluate is not None and task.metric not in task.info.get("metric_names", (task.metric,)):
        raise InputError(f"'{task.metric}' is not an eval metric of this task", field="checkpoint.metric")
    check_best_or_base(cfg.checkpoint.final, cfg.train.eval_before, task.evaluate is not None)
    trainable, total = count_params(model)
    precision = resolve_precision(cfg.train.precision, device, total, cfg.train.weights_dtype)
    store_frozen_base(cfg, model, precision)  # before any measurement: before and after see the same weights
    probe_texts = probe_before = probe_generation = None
    if cfg.probe.data:
        probe_texts = read_probe_texts(cfg.probe.data, cfg.data.text_column, cfg.probe.max_rows)
        probe_generation = probe_generation_for(cfg.probe, cfg.eval.generate, cfg.task, task.tokenizer)
        probe_before = probe_measures(model, task.tokenizer, probe_texts, cfg.model.max_length, generation=probe_generation)
    if cfg.train.weights_dtype == "bf16":
        store_weights_bf16(model)
    own_tensors(model)  # the loaded file's mapping closes: its pages leave the resident set
    autocast = autocast_factory(precision, device)
    if task.evaluate is not None:  # evaluation runs at the training precision too
        task = replace(task, evaluate=_under(autocast, task.evaluate))
    per_epoch = windows_per_epoch(task.train.examples_per_epoch(), cfg.train.batch_size,
                                  cfg.train.grad_accum * world_size)
    total_steps = sizes.total_steps(per_epoch, cfg.train.epochs, cfg.train.max_steps)

    # fsdp shards the model here (its optimizer takes the sharded parameters); zero* after the optimizer
    sharding = shard_before_optimizer(cfg.distributed, cfg.train, model, task.loss_fn, group or ALONE, precision, device)
    if sharding is not None and task.generation is not None:
        log.warning("generation measures (eval.generate) are not taken under distributed.strategy %s yet",
                    sharding.strategy)
        task = replace(task, generation=None)
    base_lr = starting_lr(cfg, sharding is not None, precision)
    optimizer, scheduler = build_optimization(cfg, model, total_steps, base_lr)
    unfreezer = None
    if cfg.unfreeze.every:
        unfreezer = GradualUnfreezer(model, cfg.unfreeze.every, cfg.unfreeze.unit)
        unfreezer(0, 0)
        trainable, _ = count_params(model)
    if sharding is not None:
        sharding.start(model, task.loss_fn, optimizer, precision)
    penalty = make_penalty(model, l2sp=cfg.regularization.l2sp, ewc=cfg.regularization.ewc,
                           fisher_batches=fisher_batches(task, cfg), loss_fn=task.loss_fn)
    t = cfg.train
    settings = LoopSettings(
        batch_size=t.batch_size, grad_accum=t.grad_accum, total_steps=total_steps, max_grad_norm=t.max_grad_norm,
        seed=t.seed, log_every=t.log_every, eval_every=t.eval_every, save_every=cfg.checkpoint.save_every,
        early_stopping=cfg.early_stopping.enabled and task.evaluate is not None, base_lr=base_lr,
        penalty=penalty, unfreeze=unfreezer, scaler=grad_scaler(precision, device),
    )
    if load_note:  # said once the whole setup succeeded: a bad input stays one line
        log.info("%s", load_note)
    return Recipe(cfg=cfg, task=task, model=model, optimizer=optimizer, scheduler=scheduler,
                  tracker=BestTracker(task.metric, task.mode, cfg.checkpoint.min_delta, cfg.early_stopping.patience),
                  settings=settings, autocast=autocast, precision=precision, device=device,
                  trainable=trainable, total=total, per_epoch=per_epoch, mixout_layers=mixout_layers,
                  probe_texts=probe_texts, probe_before=probe_before, world_size=world_size,
                  probe_generation=probe_generation, sharding=sharding)


def build_optimization(cfg: Config, model, total_steps: int, lr: float):
    """AdamW (optim.name: fp32 or 8-bit moments) over the parameter groups at base lr `lr`, and its schedule."""
    o, sch = cfg.optim, cfg.schedule
    groups = param_groups(model, lr=lr, weight_decay=o.weight_decay, head_lr=o.head_lr or lr * o.head_lr_multiplier,
                          layer_lr_decay=o.layer_lr_decay)
    optimizer = build_optimizer(groups, betas=o.betas, eps=o.eps, name=o.name,
                                bf16_weights=cfg.train.weights_dtype == "bf16", seed=cfg.train.seed)
    scheduler = build_scheduler(optimizer, total_steps=total_steps, name=sch.name, warmup_ratio=sch.warmup_ratio,
                                warmup_steps=sch.warmup_steps, min_lr_ratio=sch.min_lr_ratio, decay_ratio=sch.decay_ratio)
    return optimizer, scheduler


def with_found_lr(r: Recipe, out: Path, group: Group) -> Recipe:
    """optim.lr: auto - the recipe at the range test's lr (train.lr_find.found_lr): a fresh optimizer
    and schedule, and a config that says the number (config.yaml, the summary's defaults)."""
    lr, found = lr_find.found_lr(r, lr_fingerprint(r.cfg, r.precision), out, group)
    cfg = r.cfg.model_copy(deep=True)
    cfg.optim.lr = lr
    cfg._defaults = {**(cfg._defaults or {}), "optim.lr": {"value": lr, "why": lr_find.found_why(found)}}
    optimizer, scheduler = build_optimization(cfg, r.model, r.settings.total_steps, lr)
    return replace(r, cfg=cfg, optimizer=optimizer, scheduler=scheduler, settings=replace(r.settings, base_lr=lr),
                   lr_find=lr_find.found_summary(found))


def prepare_task(r: Recipe, out: Path, group: Group = ALONE) -> None:
    """The task's once-per-run work kept in the run dir (preference, full fine-tuning: the reference
    log-probs), every process taking part; under a sharded strategy through its replicas, where the
    weights are gathered."""
    if r.task.prepare is not None:
        on_main = r.sharding.replicas.on_main if r.sharding is not None else None
        r.task.prepare(r.model, out, group, r.autocast, on_main)


def open_run(r: Recipe, out: Path, resume_at: ckpt.ResumePoint | None, show_progress: bool, should_stop,
             group: Group = ALONE, callbacks=None) -> tuple[RunDir | None, LoopState, dict | None]:
    """Create or reopen the run dir; restore a checkpoint, or evaluate the untouched model.

    With several processes only rank 0 touches the run dir (the RunDir is None on the others);
    every process restores the checkpoint into its own replica, with its own RNG state. What can
    refuse the start (the checkpoint's tensors and objects, a required logger) is judged before
    anything already in the run dir changes: a refused resume leaves it byte for byte as it was,
    a refused fresh start leaves no run dir.
    """
    if r.sharding is not None:
        r.sharding.ckpt_root = out / "checkpoints"  # every process writes its checkpoint shards there
    if resume_at is not None and r.sharding is None and weights_format(resume_at.path) == "plain":
        check_checkpoint_fits(resume_at.path, r.model)
    resumed = resume_at.step if resume_at is not None else 0
    found = progress = loggers = None
    try:
        if group.is_main:
            found = files_as_found(out)
            out.mkdir(parents=True, exist_ok=True)
            progress = Progress(r.settings.total_steps, start_step=resumed, enabled=show_progress,
                                log_file=out / "warnings.log")  # library warnings go there, not through the display
            progress.header(header_lines(header_info(r, out, resumed, model_name=r.cfg.model.name, task=r.cfg.task,
                                                     method=r.cfg.method)))
            # monitor.loggers_required and one could not start: an input error
            loggers = open_loggers(r.cfg.monitor, out, json.loads(r.cfg.model_dump_json()),
                                   resumed if resume_at is not None else None)
        prepare_task(r, out, group)  # before a resume's weights: the untouched model's
        if resume_at is not None:
            restore_checkpoint(r, resume_at, group)
    except InputError:
        for opened in (progress, loggers):
            if opened is not None:
                opened.close()
        if found is not None:
            leave_as_found(out, found)
        raise
    io = None
    if group.is_main:
        if resume_at is not None:  # the rows a killed run logged after its checkpoint
            trim_metrics(out / "metrics.jsonl", resumed)
        io = RunDir(out, r.model, r.optimizer, r.scheduler, r.cfg.checkpoint.keep_last, progress, should_stop)
        io.loggers, io.health = loggers, health_monitor(r, out, resume_at is not None)
        io.eval_key = eval_key(r)
        if callbacks is not None:  # the Python API's functions on log / eval / save rows (tunelab.api)
            io.loggers.add("callbacks", callbacks)
    layout = {"world_size": r.world_size, "grad_accum": r.cfg.train.grad_accum, "batch_size": r.cfg.train.batch_size}
    state, before = LoopState(**layout), None
    if resume_at is not None:
        state = LoopState(**{**resume_at.loop, "status": "running", **layout})  # maybe resharded
        r.tracker.load_state_dict(resume_at.state["tracker"])
        if io is not None:
            io.best_checkpoint = resume_at.state.get("best_checkpoint")
            before = next((row for row in read_metrics(out / "metrics.jsonl") if row.get("before_training")), None)
        log.info("resumed from %s at step %d/%d", resume_at.path, state.step, r.settings.total_steps)
    elif r.sharding is not None and r.cfg.train.eval_before and r.task.evaluate is not None:
        # the weights are in pieces: every process joins the evaluation, rank 0 writes as below
        before = {**eval_row(r.sharding.replicas.on_main(r.task.evaluate, r.model), state, 0.0), "before_training": True}
    if resume_at is None and io is not None:
        dump_config(r.cfg, out / "config.yaml")
        (out / "param_groups.json").write_text(json.dumps(describe_groups(r.optimizer), indent=1))
        if r.cfg.checkpoint.final == "best_or_base":  # the untouched weights, should no evaluation beat them
            save_base(io.ckpt_root, r.model, r.optimizer)
        if r.cfg.train.eval_before and r.task.evaluate is not None:
            before = before or {**eval_row(r.task.evaluate(r.model), state, 0.0), "before_training": True}
            generation_run.add_before(r.task.generation, r.model, before)
            io.log(before)
    return io, state, before


def restore_checkpoint(r: Recipe, resume_at: ckpt.ResumePoint, group: Group) -> None:
    """The checkpoint's weights, optimizer state, schedule and RNG (this rank's) into the recipe's
    objects, whatever wrote them: this strategy and world size or another. Reads nothing of the run dir
    but the checkpoint, so a refusal here comes before any change there."""
    try:
        ckpt.load_checkpoint(resume_at.path, model=r.model, optimizer=r.optimizer, scheduler=r.scheduler,
                             rank=group.rank, weights=False, state=resume_at.state)
        load_model_states(resume_at, r.model, r.optimizer, r.sharding)
    except pickle.UnpicklingError:  # weights_only refused an object: never run a checkpoint's code
        raise InputError("a checkpoint file holds objects other than tensors and numbers (refused by "
                         "weights_only): it was not written by tunelab; resume from another checkpoint",
                         file=resume_at.path) from None


def _stored_eval(io: RunDir, checkpoint: Path) -> dict | None:
    """The evaluation a checkpoint stored, when it measured what this run's evaluation measures."""
    state = ckpt.load_state(checkpoint)
    return state.get("eval") if state.get("eval_key") == io.eval_key else None


def eval_key(r: Recipe) -> str:
    """A fingerprint of what an evaluation measures: the eval data (file, size, mtime, or the split of
    the training file), how it is encoded, and the precision. A stored evaluation is reused for the
    final summary only under the same key (a resume may point at another eval file)."""
    import hashlib

    d = r.cfg.data
    named = d.eval or d.train  # a file, or a list of sources (data mixing)
    files = [f for f in ([s.path for s in named] if isinstance(named, list) else [named]) if f and Path(f).is_file()]
    stamp = [(str(Path(f).resolve()), Path(f).stat().st_size, Path(f).stat().st_mtime_ns) for f in files]
    parts = [r.cfg.task, d.eval, d.eval_split, d.max_rows, r.cfg.train.seed, r.cfg.model.max_length,
             d.text_column, d.label_column, r.precision, stamp]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def health_monitor(r: Recipe, out: Path, resumed: bool) -> HealthMonitor | None:
    """The health monitor; a resumed run's continues where its checkpoint left off (by replaying
    the metrics rows up to it, which is exact)."""
    if not r.cfg.monitor.health:
        return None
    rows = read_metrics(out / "metrics.jsonl") if resumed else []
    return HealthMonitor.replay(rows, fp16=r.precision == "fp16")


def train(r: Recipe, io: RunDir | None, state: LoopState, group: Group = ALONE) -> LoopState:
    """The loop, with Ctrl-C / SIGTERM turned into "finish the step, save, stop".

    With several processes the model trains wrapped in DDP and the loop writes through
    SharedRunIO (rank 0 writes; `io` is None on the other ranks).
    """
    loop_io = io if group.world_size == 1 else SharedRunIO(io, group)
    if r.sharding is None:
        replicas = replicas_for(r.model, r.task.loss_fn, group)
    else:  # fsdp / zero*: the engine's replicas; every process writes its checkpoint shard
        replicas = r.sharding.replicas
        loop_io = ShardedRunIO(loop_io, r.sharding, r.optimizer, r.sharding.ckpt_root)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, loop_io.request_stop)
    try:
        state = train_loop(r.model, r.optimizer, r.scheduler, r.task, r.settings, state, r.tracker, loop_io,
                           r.autocast, replicas)
        if r.sharding is not None:
            r.sharding.gather_held(r.device)
        return state
    except torch.OutOfMemoryError:
        raise OutOfMemory(OOM_FIXES.format(bs=r.settings.batch_size)) from None
    except RuntimeError as e:
        if "can't allocate memory" in str(e) or "out of memory" in str(e):  # the CPU allocator's words
            raise OutOfMemory(OOM_FIXES.format(bs=r.settings.batch_size)) from None
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if io is not None:
            io.progress.close()
            io.metrics.close()
            io.close_loggers()


def save(r: Recipe, io: RunDir, state: LoopState, before: dict | None, wall_start: float) -> dict:
    """final/ (best or last weights), the final evaluation and probe, summary.json, report.html."""
    out, task, model = io.root, r.task, r.model
    train_peak = round(peak_memory_mb(r.device), 1)  # before the final evaluation, final/ and the report
    if r.sharding is None:  # training is over (the last checkpoint holds it): the report must not stack on it
        r.optimizer.state.clear()
        r.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    release_free_memory()  # the freed state and activations back to the OS before the report allocates
    secs = state.train_seconds - state.eval_seconds  # rates count training time only
    summary = {
        "status": state.status, "task": r.cfg.task, "method": r.cfg.method, "steps": state.step,
        "total_steps": r.settings.total_steps,
        "epochs_done": round(state.epoch + (state.window / r.per_epoch if r.per_epoch else 0), 4),
        "precision": r.precision, "device": r.device.type, "world_size": r.world_size,
        "global_batch_size": r.world_size * r.cfg.train.batch_size * r.cfg.train.grad_accum,
        "trainable_params": r.trainable, "total_params": r.total,
        "trainable_percent": round(100 * r.trainable / r.total, 4) if r.total else 0.0,
        "tokens": state.tokens, "samples": state.samples, "train_seconds": round(secs, 3),
        "eval_seconds": round(state.eval_seconds, 3),
        "tokens_per_second": state.tokens / secs if secs else 0.0,
        "samples_per_second": state.samples / secs if secs else 0.0,
        "skipped_steps": state.skipped_steps,
        "best": {"metric": r.tracker.metric, "value": r.tracker.best, "step": r.tracker.best_step,
                 "checkpoint": io.best_checkpoint},
        "before": before, "data": with_seen(task.info, state.source_units, state.source_rows),
        "defaults": resolved_defaults(r.cfg),
    }
    if r.lr_find is not None:
        summary["lr_find"] = r.lr_find
    vs = summary["versus_base"] = versus_base(r.tracker, before)
    summary["worse_than_base"] = vs["worse_than_base"] if vs is not None else None
    if r.sharding is not None:  # the bytes of parameters, gradients and optimizer state each process held
        summary["sharding"] = r.sharding.summary()
    if state.status in ("completed", "early_stopped"):
        # the evaluation stored with the shipped weights, when their checkpoint holds one
        final_eval = None
        summary["final_weights"], shipped = choose_final(r.cfg.checkpoint.final, io.ckpt_root, io.best_checkpoint,
                                                         state.step, vs)
        if summary["final_weights"] != "last" and r.sharding is None:
            ckpt.load_weights(shipped, model)
        if summary["final_weights"] != BASE and shipped.is_dir():  # the base's evaluation is run below
            final_eval = _stored_eval(io, shipped)
        if r.sharding is not None:  # the sharded model cannot leave its process group: final/ from the files
            model = r.sharding.plain_model(shipped)
        if summary["worse_than_base"]:
            vs["message"] = worse_message(vs, summary["final_weights"])
            log.warning("%s", vs["message"])
        if r.mixout_layers:
            remove_mixout(model)
        write_final(out, lambda tmp: task.save_final(model.cpu() if r.device.type != "cpu" else model, tmp))
        model.to(r.device)
        if task.evaluate is not None:
            summary["final"] = final_eval if final_eval is not None else task.evaluate(model)
        if r.probe_texts is not None:
            after = probe_measures(model, task.tokenizer, r.probe_texts, r.cfg.model.max_length,
                                   generation=r.probe_generation)
            summary["probe"] = compare(r.probe_before, after, r.cfg.probe.warn_loss_increase, r.cfg.probe.min_cosine)
            if summary["probe"]["forgetting_flag"]:
                log.warning("forgetting probe: %s", summary["probe"]["message"])
        generation_run.finish(task.generation, r.probe_generation, model, io, state.step, summary)
        summary["eval_trust"] = eval_trust(r.cfg.data, task.info, summary.get("final"))
    summary["best"]["metrics"] = next(
        (row for row in read_metrics(out / "metrics.jsonl")
         if row.get("step") == r.tracker.best_step and r.tracker.metric in row and not row.get("before_training")), None)
    rows = read_metrics(out / "metrics.jsonl")
    summary["health"] = summarize(rows)
    if state.skipped_steps or state.status == "diverged":  # which rows gave the NaN/Inf losses, and what is safe
        bad = [e for row in rows if row.get("event") == "nonfinite_step" for e in row.get("examples", [])]
        summary["nonfinite_examples"] = list(dict.fromkeys(bad))[:20]
        intact, _ = ckpt.find_resumable(io.ckpt_root)
        summary["last_good_checkpoint"] = str(intact) if intact is not None else None
    summary["peak_memory_mb"] = round(peak_memory_mb(r.device), 1)  # so far; the whole process's after the report
    summary["train_peak_memory_mb"] = train_peak
    summary["host_allocator"] = allocator_in_use()
    summary["wall_seconds"] = round(time.monotonic() - wall_start, 3)
    summary["run_dir"] = str(out)
    summary["loggers"] = dict(io.loggers.status)  # {name: "ok" | "failed: reason"}
    if (out / "final").is_dir():
        try:  # the model card must never cost the run
            from tunelab.model_card import write_model_card

            write_model_card(out / "final", summary, r.cfg)
        except Exception as e:
            log.warning("final/README.md (the model card) not written: %s", e)
    write_summary(out, summary)
    try:
        from tunelab.analysis.report import write_report

        write_report(out)
    except Exception as e:  # a report must never cost the run; a full disk is said, as for any write
        if is_disk_full(e):
            raise DiskFull(f"disk full while writing report.html in {out} ({reason(e)}); the run finished: final/ and "
                           f"summary.json are intact; free space, then `tunelab report {out}` writes it") from None
        log.warning("report.html not written: %s", e)
    peak = round(peak_memory_mb(r.device), 1)  # the whole process's peak: the report loads weights and plots
    if peak != summary["peak_memory_mb"]:
        summary["peak_memory_mb"] = peak
        write_summary(out, summary)
    io.progress.finish()  # library warnings back to the terminal (they went to RUN/warnings.log)
    return summary


def finish_missing_report(out: Path) -> dict | None:
    """Write report.html for a finished run that lacks it (stopped after summary.json); its summary, else None."""
    try:
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("status") not in ("completed", "early_stopped") or (
            out / "report.html").exists():
        return None  # a damaged summary.json: prepare_run_dir says so
    from tunelab.analysis.report import write_report

    write_report(out)
    log.info("%s had finished without its report (stopped after summary.json); report.html written", out)
    return summary


def run_training(cfg: Config, output_dir: str | Path | None = None, *, config_path=None, resume: str | None = None,
                 show_progress: bool = True, should_stop=None, callbacks=None) -> dict:
    """Fine-tune per `cfg`; returns the summary (also written to summary.json).

    Under torchrun (WORLD_SIZE > 1) every process runs this with the same arguments: each trains a
    DDP replica and rank 0 alone writes the run dir; the other ranks return a short summary.
    """
    wall_start = time.monotonic()
    note_allocator(cfg.train.host_allocator)
    set_mmap_threshold(cfg.train.malloc_mmap_threshold)  # before the model and the data are allocated
    prepare_data_before_joining(lambda: prepare_data(cfg))  # tokenized once, before any rank waits in a collective
    group = init_from_env()
    check_distributed(cfg, group.world_size)
    out = group.broadcast(Path(output_dir) if output_dir else default_output_dir(config_path))
    if resume == "auto":  # a run killed between summary.json and report.html: finish the report
        done = group.broadcast(finish_missing_report(out) if group.is_main else None)
        if done is not None:
            group.close()
            return done
    resume_at = ckpt.ResumePoint.at(prepare_run_dir(out, resume))  # its state.json, read once for the resume
    if resume_at is not None:
        reshard_note = check_resume_layout(resume_at, group.world_size, strategy=cfg.distributed.strategy,
                                           train=cfg.train)
        if reshard_note and group.is_main:
            log.info("%s", reshard_note)
        check_same_run(out, cfg, resume_at.path)
    group.barrier()  # every process has judged the run dir before rank 0 writes into it
    lock = RunLock(out) if group.is_main else None
    try:
        return _run_locked(cfg, out, resume, resume_at, lock, group, show_progress, should_stop, wall_start,
                           callbacks)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(cfg, out, resume, resume_at, lock, group, show_progress, should_stop, wall_start,
                callbacks=None) -> dict:
    """run_training once the run dir is judged: setup, then (holding the run dir's lock) train and save."""
    retries = []
    while True:
        recipe = setup(cfg, group.world_size, group)
        if lock is not None:
            lock.acquire()  # after the setup (a bad input leaves nothing), before anything is written
            if resume is None and not retries:
                refuse_existing_run(out)  # another run started and ended here since prepare_run_dir
        if resume == "auto" and resume_at is None and not group.rank and (out / "metrics.jsonl").exists():
            # only now that config, data and model have loaded: a bad input must leave the dir as it was
            log.warning("resume: no intact checkpoint in %s; the run starts over", out)
            start_over(out)
        if cfg.optim.lr == "auto":  # after start_over: a stored range test survives in the user cache
            recipe = with_found_lr(recipe, out, group)
        if group.rank:  # the same initial weights everywhere, but each process its own dropout stream
            random.seed(cfg.train.seed + 7919 * group.rank)
            torch.manual_seed(cfg.train.seed + 7919 * group.rank)
        try:
            io, state, before = open_run(recipe, out, resume_at, show_progress, should_stop, group, callbacks)
        except OSError as e:  # config.yaml, param_groups.json, metrics.jsonl on a full disk
            raise write_failure(out, "the run dir's files", e) from None
        try:
            state = train(recipe, io, state, group)
            break
        except OutOfMemory:
            if not cfg.train.auto_batch or cfg.train.batch_size == 1:
                raise
            cfg, resume_at = _halve_batch(cfg, out)
            retries.append({"batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
                            "from_checkpoint": resume_at.path.name if resume_at else None})
    if not group.is_main:
        group.close()
        return {"status": state.status, "steps": state.step, "rank": group.rank, "world_size": group.world_size}
    summary = save(recipe, io, state, before, wall_start)
    group.close()
    if retries:
        summary["auto_batch"] = retries
        write_summary(out, summary)
    return summary


def _halve_batch(cfg: Config, out: Path) -> tuple[Config, ckpt.ResumePoint | None]:
    """After an OOM: the same effective batch in micro-batches half the size, and where to go on.

    With a checkpoint the run continues from it (the batches of the rest of the epoch are cut
    differently, so this resume is not bit-exact); without one the run dir starts over.
    """
    cfg = cfg.model_copy(deep=True)
    cfg.train.batch_size //= 2
    cfg.train.grad_accum *= 2
    log.warning("out of memory: retrying with train.batch_size=%d, train.grad_accum=%d (same effective batch)",
                cfg.train.batch_size, cfg.train.grad_accum)
    resume_from, _ = ckpt.find_resumable(out / "checkpoints")
    if resume_from is None:
        start_over(out)
    else:
        dump_config(cfg, out / "config.yaml")
    return cfg, ckpt.ResumePoint.at(resume_from)
