"""`tunelab merge`: fold an adapter into its base, write it in fp32 / bf16 / fp16, and check it.

The reference for the check is the fp32 base with the adapter applied unmerged (what merging
claims to equal); for a QLoRA adapter that is its fp32 base too, not the 4-bit one it trained on,
since folding into 4-bit weights would re-quantise them. The written folder is read back from
disk in its own dtype and compared on a few prompts (tunelab.export.check); the report is saved
as `export_check.json` in the folder. A mismatch beyond the dtype's tolerance is an error and
leaves only the report behind.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

from tunelab.errors import InputError
from tunelab.export.check import REPORT, check_and_save, ExportMismatch
from tunelab.export.source import locate, training_prompts

DTYPES = ("fp32", "bf16", "fp16")


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise InputError(f"unknown dtype '{name}'; choose one of {', '.join(DTYPES)}", field="--dtype")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def empty_output(out: Path) -> None:
    """InputError unless `out` is new or an empty folder (nothing of the user's is overwritten)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError("output folder exists and is not empty; choose another", file=out)


def merge_checked(path: str | Path, out: str | Path, dtype: str = "fp32", *, check: bool = True,
                  corrupt=None) -> dict:
    """Merge the adapter of `path` (a run dir or adapter folder) into `out`; returns what was done.

    `corrupt`: a test hook, a function applied to the merged model before it is written (the
    check must catch what it does).
    """
    from tunelab.models.adapters import find_adapter, load_adapter

    adapter_dir = find_adapter(path)
    out = Path(out)
    target = torch_dtype(dtype)
    empty_output(out)
    peft_model, tokenizer, info = load_adapter(adapter_dir, merge=False, quantized=False)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    if corrupt is not None:
        corrupt(merged)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.to(target).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    report = None
    try:
        if check and info["task"] != "classification":
            written, _ = _reload(tmp, info["task"])
            prompts = training_prompts(locate(path), tokenizer)
            report = check_and_save(peft_model, written, tokenizer, prompts, dtype, tmp / REPORT)
    except ExportMismatch:
        _keep_report_only(tmp, out)
        raise
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return {"adapter": str(adapter_dir), "merged": str(out), "base_model": info["base_model"], "dtype": dtype,
            "task": info["task"], "method": info["method"], "params": sum(p.numel() for p in merged.parameters()),
            "from_quantized_training": bool(info.get("quantization")), "check": report}


def _reload(folder: Path, task: str):
    """The written folder as a user loads it, in its own dtype (compute too)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()
    return model, AutoTokenizer.from_pretrained(folder)


def _keep_report_only(tmp: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if (tmp / REPORT).is_file():
        os.replace(tmp / REPORT, out / REPORT)
    shutil.rmtree(tmp, ignore_errors=True)
