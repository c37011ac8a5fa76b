"""The run dir: where it goes, whether it may be (re)used, and the loop's view of it.

Layout (the contract in DESIGN.md): config.yaml, metrics.jsonl, param_groups.json, checkpoints/,
final/, summary.json, report.html.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import threading
from datetime import datetime
from pathlib import Path

import torch

from tunelab.errors import DiskFull, InputError, RunFailure
from tunelab.monitor.loggers import LoggerSet
from tunelab.durable import is_disk_full, is_write_error, looks_full, reason, write_atomic
from tunelab.monitor.metrics_log import MetricsLog, read_metrics, repair_metrics
from tunelab.monitor.progress import Progress
from tunelab.process_memory import memory_now_mb, peak_memory_mb  # noqa: F401 (run.py's import path)
from tunelab.train import checkpoint as ckpt
from tunelab.train.early_stop import BestTracker
from tunelab.train.loop import LoopState

log = logging.getLogger("tunelab")


LOCK_NAME = ".lock"


class RunLock:
    """An exclusive OS lock on a run dir for the life of a run: `fcntl.flock` on RUN/.lock.

    The kernel drops a flock when its holder dies (a SIGKILL too), so a lock is never stale; the
    file keeps the holder's pid, host and start time so that a second process can name it. A
    second `train` or a resume on a locked dir is an input error (exit 2). Within one process the
    same RunLock may be acquired again (the OOM retry); `release` ends it.
    """

    def __init__(self, root: Path):
        self.root = root
        self.path = root / LOCK_NAME
        self._fd: int | None = None

    def holder(self) -> str | None:
        """Who holds the lock ("pid 123 on host, since ..."), or None when nobody does. Creates nothing."""
        if self._fd is not None:
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None  # no lock file: no run has started here
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return self._describe(fd)
        finally:
            os.close(fd)  # closing our own descriptor releases only our probe
        return None

    @staticmethod
    def _describe(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except (OSError, ValueError):
            info = {}
        return (f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}"
                if info else "another process")

    def acquire(self) -> None:
        """Take the lock (creating the run dir if needed) or raise InputError naming the holder."""
        if self._fd is not None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = self._describe(fd)
            os.close(fd)
            raise InputError(f"another tunelab run is using this run dir ({who}); wait for it to end, "
                             "or choose another --output-dir", file=self.root) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def check_unlocked(out: Path) -> None:
    """Refuse a run dir that another live process holds (pid, host, start time named)."""
    who = RunLock(out).holder() if out.is_dir() else None
    if who:
        raise InputError(f"another tunelab run is using this run dir ({who}); wait for it to end, "
                         "or choose another --output-dir", file=out)


def default_output_dir(config_path: str | Path | None) -> Path:
    stem = Path(config_path).stem if config_path else "run"
    return Path("runs") / f"{stem}-{datetime.now():%Y%m%d-%H%M%S}"


def prepare_run_dir(out: Path, resume: str | None) -> Path | None:
    """Check the output dir against the resume request; return the checkpoint to resume from."""
    try:
        out.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputError("the output dir is a symbolic link loop; choose another --output-dir", file=out) from None
    if out.exists() and not out.is_dir():
        raise InputError("the output dir is a file; choose another --output-dir", file=out)
    check_writable(out)
    check_unlocked(out)
    if resume is None:
        refuse_existing_run(out)
        return None
    if resume != "auto":
        path = Path(resume)
        problem = ckpt.verify(path) if path.is_dir() else "not a folder"
        if problem:
            raise InputError(f"cannot resume from this checkpoint: {problem}", file=path)
        return path
    if (out / "summary.json").exists():
        try:
            status = json.loads((out / "summary.json").read_text(encoding="utf-8")).get("status")
        except (ValueError, AttributeError):
            raise InputError("summary.json is damaged (not a JSON object); delete it to resume the run",
                             file=out / "summary.json") from None
        if status in ("completed", "early_stopped"):
            raise InputError(f"this run already finished ({status}); nothing to resume", file=out)
    path, skipped = ckpt.find_resumable(out / "checkpoints")
    for note in skipped:
        log.warning("resume: skipping %s", note)
    return path


def refuse_existing_run(out: Path) -> None:
    if (out / "metrics.jsonl").exists() or (out / "checkpoints").exists():
        raise InputError("output dir already holds a run; pass --resume auto to continue it, or choose another "
                         "--output-dir", file=out)


def files_as_found(out: Path) -> dict[Path, int | None]:
    """Every file (its size) and folder (None) of the run dir but the lock, for `leave_as_found`."""
    if not out.is_dir():
        return {}
    return {p: (p.stat().st_size if p.is_file() else None) for p in out.rglob("*") if p.name != LOCK_NAME}


def leave_as_found(out: Path, found: dict[Path, int | None]) -> None:
    """Undo what opening a run wrote before the start was refused (run.open_run): what it added is
    removed and an append (warnings.log) cut back; a run dir that held only the lock goes whole.
    Nothing already there is rewritten before a start can no longer be refused, so a refused resume
    leaves the run dir byte for byte as it was."""
    if not out.is_dir():
        return
    for p in sorted(out.rglob("*"), key=lambda p: len(p.parts), reverse=True):  # a folder's files first
        if p.name == LOCK_NAME:
            continue
        if p not in found:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        elif found[p] is not None and p.is_file() and p.stat().st_size > found[p]:
            os.truncate(p, found[p])
    if not found and all(p.name == LOCK_NAME for p in out.iterdir()):
        shutil.rmtree(out, ignore_errors=True)


# What fixes the parameters a checkpoint holds: a resume under other values would load weights into
# another model (or silently mean another run).
IDENTITY_KEYS = ("task", "model.name", "method", "lora.r", "lora.alpha", "lora.target_modules", "lora.dora",
                 "lora.rslora", "freeze.embeddings", "freeze.blocks", "freeze.all_but_head", "data.labels",
                 "data.text_column", "data.text_pair_column", "data.label_column", "train.seed",
                 "optim.name", "train.weights_dtype")  # the optimizer state the checkpoint holds, its weights' dtype
# what a config.yaml written before a key existed meant by its absence
IDENTITY_DEFAULTS = {"optim.name": "adamw", "train.weights_dtype": "fp32"}


def check_same_run(out: Path, cfg, resume_from: Path) -> None:
    """A resume continues the run it finds: refuse one whose config.yaml differs in what fixes the
    model and its parameters (naming the key and both values)."""
    import yaml

    saved_path = out / "config.yaml" if (out / "config.yaml").is_file() else resume_from.parent.parent / "config.yaml"
    if not saved_path.is_file():
        return
    try:
        saved = yaml.safe_load(saved_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        raise InputError("the run dir's config.yaml is damaged; cannot tell which run this is", file=saved_path) from None
    if not isinstance(saved, dict):
        raise InputError("the run dir's config.yaml is not a mapping; cannot tell which run this is", file=saved_path)
    now = json.loads(cfg.model_dump_json())
    for key in IDENTITY_KEYS:
        a, b = _dig(saved, key), _dig(now, key)
        a = IDENTITY_DEFAULTS.get(key) if a is None else a
        if key == "model.name" and isinstance(a, str) and isinstance(b, str) and Path(a).name == Path(b).name:
            continue  # the same folder reached by another path
        if a != b:
            raise InputError(f"cannot resume: this run was trained with {key} = {a!r}, the config now says {b!r}; "
                             "resume with the run's own config, or choose another --output-dir", file=resume_from,
                             field=key)


def _dig(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def check_checkpoint_fits(path: Path, model) -> None:
    """Every tensor of a checkpoint must be a parameter of this model with the same shape (another
    model's checkpoint would fail deep in load_state_dict, or load half)."""
    from safetensors import SafetensorError, safe_open

    params = dict(model.named_parameters())
    try:
        with safe_open(str(path / "weights.safetensors"), framework="pt") as f:
            for name in f.keys():
                shape = list(f.get_slice(name).get_shape())
                if name not in params:
                    raise InputError(f"checkpoint holds tensor {name}, which this model lacks (a checkpoint of "
                                     "another model or method?)", file=path)
                if shape != list(params[name].shape):
                    raise InputError(f"checkpoint tensor {name} has shape {shape}, the model's is "
                                     f"{list(params[name].shape)} (a checkpoint of another model or label set?)", file=path)
    except (SafetensorError, OSError) as e:
        raise InputError(f"checkpoint weights are unreadable ({e})", file=path) from None


def write_summary(out: Path, summary: dict) -> None:
    """summary.json, atomically (a reader never sees half of it); a full disk is a DiskFull line."""
    try:
        write_atomic(out / "summary.json", json.dumps(summary, indent=1))
    except OSError as e:
        raise write_failure(out, "summary.json", e) from None


def write_final(out: Path, save) -> None:
    """final/: `save(folder)` writes into RUN/.tmp-final, which then replaces final/ whole."""
    from tunelab.durable import replace_dir

    tmp = out / ".tmp-final"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                ckpt._fsync(f)
        replace_dir(tmp, out / "final")
    except Exception as e:
        if not is_write_error(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failure(out, "final/", e) from None


def write_failure(root: Path, what: str, e: BaseException) -> RunFailure:
    """The one line for a write that failed mid-run (disk full, quota, I/O error): what failed and
    why, what is intact, how to go on. Exit code 1: not the input's fault."""
    full = looks_full(root, e)
    why = "disk full" if full else "write failed"
    intact, _ = ckpt.find_resumable(root / "checkpoints")
    if intact is not None:
        kept = f"intact: checkpoint {intact.name} and metrics.jsonl up to it"
        go_on = f"free space, then rerun the same command with --output-dir {root} --resume auto"
    else:
        kept = "no checkpoint was written yet"
        go_on = f"free space, then rerun with --output-dir {root} --resume auto (it starts over)"
    cause = "No space left on device" if full and not is_disk_full(e) else reason(e)
    return DiskFull(f"{why} while writing {what} in {root} ({cause}); {kept}; {go_on}")


def check_writable(out: Path) -> None:
    """The output dir can be created and written, judged before the setup (which takes a while):
    the nearest existing folder above it must be a writable folder."""
    probe = out
    while not probe.exists():
        if probe.is_symlink():
            raise InputError("the output dir is a dangling symbolic link; choose another --output-dir", file=out)
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"cannot create the output dir: {probe} is a file", file=out)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"cannot create or write the output dir: {probe} is not writable (permission denied)", file=out)


def start_over(out: Path) -> None:
    """Remove what a run wrote before its first intact checkpoint, so a fresh start does not append to it
    (the TensorBoard events go too: their steps would repeat). Unusable checkpoints are set aside in
    checkpoints.unusable/, not deleted: retention must not weigh a stale high step against the new ones."""
    for name in ("metrics.jsonl", "config.yaml", "param_groups.json", "summary.json", "loggers.json"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "tensorboard", ignore_errors=True)
    if (out / "checkpoints").is_dir():
        shutil.rmtree(out / "checkpoints.unusable", ignore_errors=True)
        os.replace(out / "checkpoints", out / "checkpoints.unusable")


def trim_metrics(path: Path, step: int) -> None:
    """Drop rows that a killed run logged after the checkpoint we resume from (a torn last line,
    from a write cut by a full disk or a crash, is cut and said first)."""
    note = repair_metrics(path)
    if note:
        log.warning("resume: %s", note)
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


class RunDir:
    """The loop's view of the run dir: where rows are logged and checkpoints saved."""

    def __init__(self, root: Path, model, optimizer, scheduler, keep_last: int, progress: Progress,
                 should_stop=None):
        self.root = root
        self.ckpt_root = root / "checkpoints"
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.device = next(model.parameters()).device
        self.keep_last = keep_last
        self.progress = progress
        self.metrics = MetricsLog(root / "metrics.jsonl")
        self.best_checkpoint: str | None = None
        self.loggers = LoggerSet()  # monitor.loggers (TensorBoard, W&B, MLflow): each gets every row written here
        self.health = None  # a monitor.health.HealthMonitor: its diagnoses become rows too
        self.eval_key: str | None = None  # what the evaluations measure (run.eval_key); stored beside them
        self._stop = threading.Event()
        self._should_stop = should_stop

    def request_stop(self, *_):
        self._stop.set()

    def stop_requested(self) -> bool:
        return self._stop.is_set() or bool(self._should_stop and self._should_stop())

    def log(self, row: dict) -> None:
        """Write the row, and the health events it raises (each warned once), to metrics.jsonl and the loggers."""
        try:
            events = self.health.observe(row) if self.health is not None else []
        except Exception as e:  # a diagnosis must never cost the run
            log.warning("health checks stopped: %s", e)
            self.health, events = None, []
        if "loss" in row and "memory_mb" not in row:
            row = {**row, "memory_mb": round(memory_now_mb(self.device), 1)}
        for r in (row, *(e.row() for e in events)):
            try:
                self.metrics.write(r)
            except OSError as e:  # the write cut the file back to its whole rows
                raise write_failure(self.root, "metrics.jsonl", e) from None
            self.loggers.log(r)  # a failing logger is dropped there, with one warning and its status kept
        self.progress.update(row.get("step", 0), row)
        for e in events:
            log.warning("health at step %d: %s", e.step, e.message)

    def close_loggers(self) -> None:
        self.loggers.close()

    def step_done(self, step: int, loop_seconds: float) -> None:
        """Every optimizer step (logged or not): the live display's step-time estimate."""
        self.progress.step_done(step, loop_seconds)

    def save(self, state: LoopState, tracker: BestTracker, is_best: bool, metrics: dict | None = None,
             rank_rng: list[dict] | None = None, shards: Path | None = None) -> None:
        """Checkpoint the run; `metrics` is the full evaluation of these weights when one just ran.

        The evaluation travels inside the checkpoint so the final summary can report it for the
        weights it ships without evaluating them a second time. `rank_rng`: every process's RNG
        state when several train together (tunelab.distributed.SharedRunIO gathers them). `shards`: the
        folder a sharded run's processes wrote their parts into (distributed.sharded.ShardedRunIO).
        """
        best = ckpt.checkpoint_name(state.step) if is_best else self.best_checkpoint
        payload = {"loop": state.to_dict(), "tracker": tracker.state_dict(), "best_checkpoint": best,
                   "eval": metrics, "eval_key": self.eval_key}
        try:
            ckpt.save_checkpoint(self.ckpt_root, step=state.step, model=self.model, optimizer=self.optimizer,
                                 scheduler=self.scheduler, state=payload, rank_rng=rank_rng, shards=shards)
        except Exception as e:  # torch and safetensors report a full disk as RuntimeError / SafetensorError
            if not is_write_error(e):
                raise
            raise write_failure(self.root, f"checkpoint {ckpt.checkpoint_name(state.step)}", e) from None
        try:
            self.metrics.sync()  # the rows up to this checkpoint survive a power cut with it
        except OSError as e:
            raise write_failure(self.root, "metrics.jsonl", e) from None
        self.best_checkpoint = best
        keep = {self.best_checkpoint} if self.best_checkpoint else set()
        ckpt.apply_retention(self.ckpt_root, keep_last=self.keep_last, keep=keep)
        # an event row for the loggers only (they send no scalars for it): the Python API's save callbacks
        self.loggers.log({"event": "save", "step": state.step, "checkpoint": ckpt.checkpoint_name(state.step), "is_best": is_best})
