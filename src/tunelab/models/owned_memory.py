"""The model's tensors in memory the process owns, so the weights file it was loaded from is unmapped.

transformers loads safetensors by memory-mapping the file: every tensor loaded in its stored dtype
is a zero-copy view of the mapping, and the mapping lives while any one of them does. Loading
reads every page of the file (the dtype casts, the finite check, lora.base_dtype's bf16 copies of
the frozen Linear weights), and a mapped page that has been read counts in the process's resident
set until the mapping goes. So when only some tensors are replaced — the frozen base's Linears
stored in bf16, QLoRA's 4-bit codes — the untouched ones (the embedding, the norms) keep the whole
file resident: measured on SmolLM2-135M-Instruct with LoRA (benchmarks/perf_profile.py, the
tcmalloc heap's live bytes read alongside /proc/self/smaps), 513 MB of file pages stayed resident
through training for 108 MB of fp32 tensors still viewing them; the run's peak RSS carried all 513.

`own_tensors` copies every parameter and buffer whose storage torch did not allocate (a view of a
mapping or of a foreign buffer: its storage is not resizable) into ordinary memory, one tensor at a
time, in place (`.data`), so Parameters, ties (a tied head is the same Parameter) and state-dict
keys are unchanged. The values are bit-identical copies. Once none is left, the mapping closes and
its pages leave the resident set. A full fine-tune gains less: the optimizer's first in-place
update copies each trained page out of the mapping anyway (private mappings copy on write).
"""

from __future__ import annotations

import torch


def foreign(t: torch.Tensor) -> bool:
    """Whether `t`'s memory was not allocated by torch (a file mapping, a numpy or Python buffer)."""
    return t.device.type == "cpu" and not t.untyped_storage().resizable()


@torch.no_grad()
def own_tensors(model: torch.nn.Module) -> int:
    """Copy the model's parameters and buffers that live in foreign memory; returns the bytes copied."""
    copied = 0
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for t in tensors.values():
                if t is not None and foreign(t):
                    t.data = t.data.clone()
                    copied += t.numel() * t.element_size()
    return copied


__all__ = ["foreign", "own_tensors"]
