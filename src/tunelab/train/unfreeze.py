"""Gradual unfreezing (ULMFiT, Howard & Ruder 2018): train the head first, then one more block
from the top every `every` epochs (or steps), the embeddings last.

The set of trainable parameters is a pure function of the loop position, so a resumed run
recomputes it and needs no extra state. All parameters are in the optimizer from the start:
AdamW skips a parameter whose grad is None, so a frozen block gets no update, no weight decay and
no optimizer state until it is unfrozen, and then joins with fresh moments.
"""

from __future__ import annotations

from torch import nn

from tunelab.models.anatomy import find_blocks, head_prefixes


def stages_unfrozen(position: int, every: int) -> int:
    """How many unfreezing stages have happened at this epoch/step (0 = head only)."""
    return position // every


def set_trainable_top(model: nn.Module, stages: int) -> int:
    """Head + the top `stages` blocks trainable (+ embeddings once every block is); returns blocks trainable."""
    heads = head_prefixes(model)
    block_name, blocks = find_blocks(model, field="unfreeze.every", fix="remove unfreeze.every")
    n = len(blocks)
    top = min(stages, n)
    first_trainable = n - top
    for name, p in model.named_parameters():
        if any(name.startswith(h) for h in heads):
            p.requires_grad = True
        elif name.startswith(block_name + "."):
            idx = int(name[len(block_name) + 1 :].split(".", 1)[0])
            p.requires_grad = idx >= first_trainable
        else:
            seen_blocks_before = _comes_after_blocks(model, name, block_name)
            # layers above the blocks (pooler, final norm) train with the head; embeddings come last
            p.requires_grad = seen_blocks_before or stages > n
    return top


def _comes_after_blocks(model: nn.Module, name: str, block_name: str) -> bool:
    names = [n for n, _ in model.named_parameters()]
    first_block = next(i for i, n in enumerate(names) if n.startswith(block_name + "."))
    return names.index(name) > first_block


class GradualUnfreezer:
    """Called by the loop before each optimizer step; flips requires_grad when a stage begins."""

    def __init__(self, model: nn.Module, every: int, unit: str):
        self.model, self.every, self.unit = model, every, unit
        self.stages = -1

    def __call__(self, epoch: int, step: int) -> None:
        """Apply the stage for this loop position (a no-op unless a new stage begins)."""
        stages = stages_unfrozen(epoch if self.unit == "epochs" else step, self.every)
        if stages != self.stages:
            self.stages = stages
            set_trainable_top(self.model, stages)
