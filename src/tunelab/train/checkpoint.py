"""Checkpoints that are complete or absent, never half-written, and that resume exactly.

Layout of `checkpoints/step-000120/`:
    weights.safetensors   trainable parameters only (frozen ones come back from the base model)
    optimizer.pt          optimizer state (tensors and numbers: loads with weights_only=True)
    scheduler.pt          LambdaLR state
    rng.pt                torch (and CUDA) generator states, Python `random` state
    rng_ranks.pt          with several processes (DDP): every rank's rng.pt, in rank order
    state.json            loop position (step, epoch, window in epoch), tracker, counters
    manifest.json         sha256 and size of every file above; written last

A checkpoint is written into `.tmp-step-000120/`, every file fsync'ed, then the folder is renamed:
a kill at any moment leaves either the complete folder or a `.tmp-*` one that resume ignores and
reports. Retention keeps the best and the last `keep_last`, and never deletes the checkpoint a
resume would need.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
SHARDS = "shards"  # a sharded run's weights and optimizer state, written by every process (tunelab.distributed)
PREFIX = "step-"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def trainable_state(model: torch.nn.Module, optimizer=None, *, copy: bool = False) -> dict[str, torch.Tensor]:
    """Trainable parameters by name, on the host; a tensor shared by two names is stored once.

    Trainable means: requires grad now, or belongs to the optimizer. Under gradual unfreezing every
    parameter is in the optimizer while the lower blocks still wait frozen; a checkpoint must hold
    them too, or `final: best` would ship the best step's head on later steps' blocks.
    `copy`: host copies even of parameters that live on the host (a CPU parameter is otherwise
    returned as itself), for a snapshot that must outlast later optimizer steps.
    """
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]} if optimizer is not None else set()
    out, seen = {}, set()
    for name, p in model.named_parameters():
        if (p.requires_grad or id(p) in in_optimizer) and p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            out[name] = p.detach().to("cpu", copy=copy).contiguous()
    return out


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def save_checkpoint(root: Path, *, step: int, model, optimizer, scheduler, state: dict,
                    rank_rng: list[dict] | None = None, shards: Path | None = None) -> Path:
    """Write a complete checkpoint atomically and return its folder.

    `rank_rng`: the RNG state of every process when several train together (rank 0 writes for all).
    `shards`: a folder every process of a sharded run (fsdp, zero*) wrote its part of the weights
    and optimizer state into; it is moved in as `shards/` (instead of weights.safetensors and
    optimizer.pt) and its files join the manifest.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}.pid{os.getpid()}"  # whose it is: retention removes only its own
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        if shards is not None:
            os.replace(shards, tmp / SHARDS)
        else:
            weights = trainable_state(model, optimizer)
            for name, t in weights.items():
                if not torch.isfinite(t).all():
                    raise FloatingPointError(f"refusing to save a checkpoint: parameter {name} holds NaN/Inf")
            save_file(weights, str(tmp / "weights.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        if rank_rng is not None and len(rank_rng) > 1:
            torch.save(rank_rng, tmp / "rng_ranks.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
        files = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            _fsync(f)
            files[f.relative_to(tmp).as_posix()] = {"sha256": _sha256(f), "bytes": f.stat().st_size}
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1), encoding="utf-8")
        _fsync(tmp / MANIFEST)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def verify(path: Path) -> str | None:
    """None when the checkpoint is complete and intact, else why not."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return "no manifest (save was interrupted)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return "unreadable manifest"
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            return f"missing {name}"
        if f.stat().st_size != meta["bytes"] or _sha256(f) != meta["sha256"]:
            return f"{name} does not match its checksum"
    return None


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def find_resumable(root: Path) -> tuple[Path | None, list[str]]:
    """The newest intact checkpoint, and a note for each one skipped (incomplete or corrupt)."""
    skipped = [f"{p.name}: incomplete save" for p in sorted(root.glob(".tmp-*"))] if root.is_dir() else []
    for path in reversed(list_checkpoints(root)):
        problem = verify(path)
        if problem is None:
            return path, skipped
        skipped.append(f"{path.name}: {problem}")
    return None, skipped


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a resume continues from and its state.json, read once: every resume check and
    the restore read this value, not the file again."""

    path: Path
    state: dict

    @classmethod
    def at(cls, path: Path | None) -> "ResumePoint | None":
        return None if path is None else cls(Path(path), load_state(path))

    @property
    def loop(self) -> dict:
        return self.state["loop"]

    @property
    def step(self) -> int:
        return self.state["loop"]["step"]


def load_checkpoint(path: Path, *, model, optimizer, scheduler, rank: int = 0, weights: bool = True,
                    state: dict | None = None) -> dict:
    """Restore weights, optimizer, scheduler and RNG (this rank's); return the loop state (`state`,
    the checkpoint's state.json, when the caller has read it already: ResumePoint).

    `weights=False`: the weights and optimizer state are restored by the caller (tunelab.distributed
    .reshard: a sharded checkpoint's `shards/` read by every process together, or a checkpoint
    written with another number of processes or strategy). A rank the checkpoint's run did not have
    (resumed with more processes) keeps the RNG stream it was seeded with.
    """
    if weights and not (path / SHARDS).is_dir():
        load_weights_and_optimizer(path, model, optimizer)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if rank == 0:
        set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    elif (path / "rng_ranks.pt").is_file():  # another process of a data-parallel run: its own generators
        ranks = torch.load(path / "rng_ranks.pt", weights_only=True)
        if rank < len(ranks):
            set_rng_state(ranks[rank])
    return state if state is not None else load_state(path)


def load_weights_and_optimizer(path: Path, model, optimizer) -> None:
    """A whole (one-process or ddp) checkpoint's trainable weights and optimizer state, into a whole model."""
    weights = load_file(str(path / "weights.safetensors"))
    missing = [k for k in weights if k not in dict(model.named_parameters())]
    if missing:
        raise ValueError(f"checkpoint {path} holds parameters the model lacks: {missing[:3]}")
    model.load_state_dict(weights, strict=False)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))


def load_state(path: Path) -> dict:
    """The loop state stored in a checkpoint (position, tracker), without touching any model."""
    return json.loads((path / "state.json").read_text())


def load_weights(path: Path, model) -> None:
    model.load_state_dict(load_file(str(path / "weights.safetensors")), strict=False)


def apply_retention(root: Path, *, keep_last: int, keep: set[str]) -> list[str]:
    """Delete checkpoints other than the last `keep_last` intact ones and those named in `keep`."""
    intact = [p for p in list_checkpoints(root) if (p / MANIFEST).is_file()]
    protected = {p.name for p in intact[-keep_last:]} | keep
    removed = []
    for p in intact:
        if p.name not in protected:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    for tmp in root.glob(".tmp-*"):
        if _tmp_owner_gone(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return removed


def _tmp_owner_gone(tmp: Path) -> bool:
    """Whether a `.tmp-step-N.pidP` folder is ours or its writer is dead: only those may be removed
    (another live process's half-written checkpoint is not ours to delete)."""
    _, _, pid = tmp.name.rpartition(".pid")
    if not pid.isdigit():
        return True  # an older layout's leftover
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False
