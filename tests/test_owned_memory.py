"""models/owned_memory.py: after setup no model tensor views the loaded weights file, so its mapping closes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from tiny_models import conversations, tiny_llama_folder

from tunelab.models.owned_memory import foreign, own_tensors


def _mapped(path: Path) -> bool:
    return any(line.rstrip().endswith(str(path)) for line in open("/proc/self/maps"))


def test_own_tensors_copies_foreign_memory_in_place_and_keeps_ties():
    lin = torch.nn.Linear(4, 4, bias=False)
    buf = bytearray(torch.arange(16, dtype=torch.float32).numpy().tobytes())
    with torch.no_grad():
        lin.weight.data = torch.frombuffer(buf, dtype=torch.float32).view(4, 4)
    model = torch.nn.Sequential(lin, torch.nn.Linear(4, 4))
    model[1].weight = lin.weight  # a tie: one Parameter
    param = lin.weight
    assert foreign(lin.weight) and not foreign(model[1].bias)
    assert own_tensors(model) == 16 * 4  # once, though two modules hold it
    assert not foreign(lin.weight) and lin.weight is param and model[1].weight is param
    buf[:4] = bytes(4)  # the buffer no longer backs the weight
    assert torch.equal(lin.weight.detach().flatten(), torch.arange(16, dtype=torch.float32))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_setup_leaves_the_weights_file_unmapped(tmp_path):
    """A LoRA run stores the frozen Linears in bf16 and keeps the embedding and norms as loaded: those
    were views of the memory-mapped model.safetensors, keeping all of its read pages resident."""
    from conftest import write_jsonl

    from tunelab import run
    from tunelab.config import Config

    folder = tiny_llama_folder(tmp_path / "m")
    weights = folder / "model.safetensors"
    train = write_jsonl(tmp_path / "train.jsonl", conversations(12))
    cfg = Config.model_validate({"task": "chat", "method": "lora", "model": {"name": str(folder), "max_length": 64},
                                 "data": {"train": str(train), "eval_split": 0},
                                 "train": {"max_steps": 1, "batch_size": 2, "precision": "bf16"},
                                 "early_stopping": {"enabled": False}})
    r = run.setup(cfg)
    tensors = list(r.model.parameters()) + list(r.model.buffers())
    assert not any(foreign(t) for t in tensors)
    assert not _mapped(weights)
