"""Model anatomy: where a transformer's blocks are and which children are the new task head.

Layer-wise lr (train.optim), freezing (models.adapt), gradual unfreezing (train.unfreeze), the
regularizers that anchor the backbone (train.regularizers), LoRA's head exclusion (models.adapters),
feature caching and the planner all ask the same two questions; they are answered here once.
The block list is discovered from the model, so BERT-like (`encoder.layer`), Llama-like
(`model.layers`) and GPT-2-like (`h`) layouts all work; an unknown layout is a clear error naming
the option that needed it.
"""

from __future__ import annotations

from torch import nn

from tunelab.errors import InputError


def find_blocks(model: nn.Module, *, field: str | None = None, fix: str = "") -> tuple[str, nn.ModuleList]:
    """The transformer's list of blocks: the longest ModuleList of identical module types.

    `field` and `fix` name the option that needs the blocks and how to do without it, for the
    error an unknown layout raises.
    """
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) != 1:
                continue
            if n_layers is not None and len(module) != n_layers:
                continue
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        needed = f" for {field}" if field else ""
        raise InputError(f"cannot find the transformer blocks of {type(model).__name__}{needed}"
                         + (f"; {fix}" if fix else ""), field=field)
    return best


def head_prefixes(model: nn.Module) -> list[str]:
    """Top-level children that are not the pre-trained base model: the new task head."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):  # a peft model: look inside
        return ["base_model.model." + h for h in head_prefixes(model.get_base_model())]
    base = getattr(model, "base_model_prefix", "")
    return [n + "." for n, _ in model.named_children() if n != base]


def head_modules_with_params(model: nn.Module) -> list[str]:
    """Names of the top-level head children that hold parameters (a classifier, a score layer)."""
    names = [p.rstrip(".") for p in head_prefixes(model)]
    return [n for n in names if any(True for _ in model.get_submodule(n).parameters())]
