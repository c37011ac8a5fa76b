"""Answer log-probabilities for preference tuning, for the policy and for its reference.

`answer_logps` runs chosen and rejected rows of a batch through the model once (they are stacked:
rows 0..B-1 chosen, B..2B-1 rejected, right-padded), applies the vocabulary projection only at the
supervised positions (evaluate.lm.supervised_logits, the chat SFT path) and sums log pi(token) per
row: exactly the answer's tokens, never the prompt. With `chunk` > 0 (train.loss_chunk_tokens, as
chat SFT) the projection and log-softmax go `chunk` positions at a time
(train/chunked_loss.linear_token_logps): the same log-probs and gradients without the (positions,
vocabulary) fp32 logits, their log-softmax and their gradients; a head it cannot take (an adapter
on it, a sharded weight) keeps the plain path.

The reference never costs a second copy of the model:
- LoRA / QLoRA: the base itself with the adapter switched off (peft's `disable_adapter`), under
  no_grad, in eval mode;
- full fine-tuning: `ReferenceCache` computes every pair's reference log-probs once, before
  training, from the untouched weights, and keeps them in RUN/reference_logps.safetensors with a
  fingerprint of the encoded pairs and the precision, so a resume reads them instead of
  recomputing (the model has moved by then; recomputing would be wrong, not just slow).
"""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import nullcontext
from pathlib import Path

import torch

from tunelab.data.chat_template import IGNORE_INDEX
from tunelab.device import model_device, to_device
from tunelab.evaluate.lm import supervised_hidden, supervised_logits
from tunelab.train.chunked_loss import linear_token_logps, takes_head

log = logging.getLogger("tunelab")

CACHE_FILE = "reference_logps.safetensors"


def answer_logps(model, batch: dict, chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob, supervised token count) per row of `batch`, fp32; the vocabulary projection
    `chunk` positions at a time when `chunk` > 0 and the head allows it."""
    keep = batch["labels"][:, 1:] != IGNORE_INDEX
    rows = torch.arange(keep.shape[0], device=keep.device).unsqueeze(1).expand_as(keep)[keep]
    head = model.get_output_embeddings() if chunk else None
    if head is not None and takes_head(head):
        hidden, targets = supervised_hidden(model, batch)
        token_logps = linear_token_logps(hidden, head, targets, chunk)
    else:
        logits, targets = supervised_logits(model, batch)
        token_logps = torch.log_softmax(logits, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
    sums = torch.zeros(keep.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    sums = sums.index_add(0, rows, token_logps)
    return sums, keep.sum(1).to(token_logps.dtype)


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


@torch.no_grad()
def adapter_off_logps(model, batch: dict, chunk: int = 0) -> torch.Tensor:
    """The reference of a LoRA/QLoRA policy: the same weights with the adapter switched off, eval mode."""
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            return answer_logps(model, batch, chunk)[0]
    finally:
        model.train(was_training)


def fingerprint(pairs, context: str) -> str:
    """What the cached log-probs depend on: every encoded pair's tokens and labels, and `context`
    (the model and the precision)."""
    h = hashlib.sha256(context.encode())
    for p in pairs:
        for ex in (p.chosen, p.rejected):
            h.update(json.dumps([ex.input_ids, ex.labels]).encode())
    return h.hexdigest()[:32]


class ReferenceCache:
    """Reference log-probs of every training and eval pair, computed once per run (full fine-tuning).

    `values[split]` is a (pairs, 2) tensor: chosen, rejected. Filled by `prepare` (the TaskRun hook
    run.py calls before training and before a resume loads its checkpoint)."""

    def __init__(self, splits: dict, collate, batch_size: int, context: str = "", chunk: int = 0,
                 batches: dict | None = None):
        """`batches`: name -> the index lists a split is evaluated in (the eval splits: evaluation's own
        batches, so the untouched model's eval margin is exactly 0 under bf16 too, where another padding
        width rounds the log-probs differently); other splits go in index order, `batch_size` at a time."""
        self.splits = splits  # name -> encoded pairs
        self.batches = batches or {}
        self.chunk = chunk  # answer_logps' vocabulary chunk
        self.collate = collate  # (pairs, indices) -> batch without reference values
        self.batch_size = batch_size
        self.context = context
        self.values: dict[str, torch.Tensor] = {}
        self.computed = False  # True when this process computed them (not read from the run dir)

    def key(self) -> str:
        return fingerprint([p for name in sorted(self.splits) for p in self.splits[name]], self.context)

    @torch.no_grad()
    def compute(self, model, autocast=nullcontext) -> dict[str, torch.Tensor]:
        was_training = model.training
        model.eval()
        device = model_device(model)
        out = {}
        try:
            for name, pairs in self.splits.items():
                values = torch.zeros(len(pairs), 2)
                order = self.batches.get(name) or [list(range(s, min(s + self.batch_size, len(pairs))))
                                                   for s in range(0, len(pairs), self.batch_size)]
                for idx in order:
                    batch = to_device(self.collate(pairs, idx), device)
                    with autocast():
                        logps, _ = answer_logps(model, batch, self.chunk)
                    n = len(idx)
                    values[idx] = torch.stack([logps[:n], logps[n:]], 1).float().cpu()
                out[name] = values
        finally:
            model.train(was_training)
        return out

    def prepare(self, model, run_dir: Path, group, autocast=nullcontext, on_main=None) -> None:
        """Read the run dir's cache when it holds these pairs' values, else compute and write it; every
        process then holds rank 0's values (broadcast: no process but rank 0 reads the run dir, which
        need not be on a filesystem the other nodes share).

        `on_main(fn)`: how the weights are reached under a sharded strategy (the replicas' on_main:
        under fsdp and zero3 every process runs the forwards, each gathering the blocks it lacks, and
        rank 0's result is kept); None: rank 0 computes alone with the whole model it holds."""
        from safetensors.torch import load_file, save_file

        path = Path(run_dir) / CACHE_FILE
        key = self.key()
        fresh = group.broadcast(not self._matches(path, key) if group.is_main else None)
        values = None
        if fresh:
            if group.is_main:
                log.info("computing the reference log-probs of %d pairs once (kept in %s)",
                         sum(len(v) for v in self.splits.values()), path)
            compute = lambda: self.compute(model, autocast)  # noqa: E731
            values = on_main(compute) if on_main is not None else (compute() if group.is_main else None)
            if group.is_main:
                tmp = path.with_name(f".{path.name}.tmp")
                save_file({k: v.contiguous() for k, v in values.items()}, str(tmp), metadata={"fingerprint": key})
                tmp.replace(path)
                self.computed = True
        elif group.is_main:
            values = load_file(str(path))
        self.values = group.broadcast({k: values[k] for k in self.splits} if group.is_main else None)

    @staticmethod
    def _matches(path: Path, key: str) -> bool:
        if not path.is_file():
            return False
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return (f.metadata() or {}).get("fingerprint") == key
        except Exception:  # a torn or foreign file: compute again
            return False

    def lookup(self, split: str, idx: list[int]) -> torch.Tensor:
        """The reference log-probs of pairs `idx` as one column, chosen rows then rejected rows."""
        if split not in self.values:
            raise RuntimeError("the reference log-probs were not prepared: TaskRun.prepare must run before training "
                               "(tunelab.run.open_run does)")
        v = self.values[split][idx]
        return torch.cat([v[:, 0], v[:, 1]])
