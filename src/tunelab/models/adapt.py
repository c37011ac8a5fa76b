"""Adapt a loaded model to the fine-tuning method: full, freeze, feature extraction, LoRA/QLoRA.

One entry point, `apply_method`, so the recipe reads the same for every method. Frozen parameters
get `requires_grad = False`; the optimizer is built afterwards from trainable parameters only, so
they get no gradient and no optimizer state (the memory really drops).
"""

from __future__ import annotations

from torch import nn

from tunelab.errors import InputError
from tunelab.models.anatomy import find_blocks, head_prefixes


def embedding_params(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that sit before the first transformer block (token/position embeddings, their norm)."""
    block_name, _ = find_blocks(model, field="freeze.embeddings", fix="freeze with freeze.all_but_head instead")
    out = []
    for name, p in model.named_parameters():
        if name.startswith(block_name + "."):
            break
        if not any(name.startswith(h) for h in head_prefixes(model)):
            out.append(p)
    return out


def freeze(model: nn.Module, *, embeddings: bool = False, blocks: int = 0, all_but_head: bool = False) -> None:
    """Freeze embeddings, the first `blocks` blocks, or everything but the task head."""
    heads = head_prefixes(model)
    if all_but_head:
        if not heads:
            raise InputError(f"{type(model).__name__} has no separate head to keep trainable", field="freeze.all_but_head")
        for name, p in model.named_parameters():
            p.requires_grad = any(name.startswith(h) for h in heads)
        return
    if blocks:
        _, block_list = find_blocks(model, field="freeze.blocks", fix="freeze with freeze.all_but_head instead")
        if blocks > len(block_list):
            raise InputError(f"the model has {len(block_list)} blocks; cannot freeze {blocks}", field="freeze.blocks")
        for block in list(block_list)[:blocks]:
            for p in block.parameters():
                p.requires_grad = False
    if embeddings:
        for p in embedding_params(model):
            p.requires_grad = False


def inference_mode_backbone(model: nn.Module) -> None:
    """A frozen backbone behaves as at inference even while the loop runs model.train(): no dropout
    anywhere, so training on cached features and on live features is the same computation."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0  # attention modules read their dropout's p at call time too


def apply_method(model: nn.Module, method: str, *, task: str, freeze_cfg=None, lora=None) -> nn.Module:
    """Return the model ready for `method` (may wrap it, e.g. in a peft model).

    `freeze_cfg` is the config's freeze section (config.FreezeConfig), read by method freeze; `lora`
    its lora section (config.LoraConfig), read by lora/qlora; `task` tells LoRA which modules form
    the head. (models/ sits below config.py, so the sections are taken as they come, not imported.)"""
    if method == "full":
        return model
    if method == "freeze":
        f = freeze_cfg
        if f is None or not (f.embeddings or f.blocks or f.all_but_head):
            raise InputError("method 'freeze' needs freeze.embeddings, freeze.blocks or freeze.all_but_head", field="freeze")
        freeze(model, embeddings=f.embeddings, blocks=f.blocks, all_but_head=f.all_but_head)
        return model
    if method == "feature_extraction":
        freeze(model, all_but_head=True)
        inference_mode_backbone(model)
        return model
    if method in ("lora", "qlora"):
        from tunelab.models.adapters import apply_lora

        if lora is None:
            raise ValueError(f"method {method} needs the config's lora section")
        return apply_lora(model, lora, method=method, task=task)
    raise InputError(f"unknown method {method!r}", field="method")
