"""Preference tuning under DDP (2 CPU processes, torchrun, gloo): one optimizer step over the same
pairs equals one process's step over one large batch — full fine-tuning (cached reference read
from the run dir by both processes) and LoRA (the reference is the adapter switched off inside
DDP's forward) — and the logged rewards, margin and accuracy are summed over both processes."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import tiny_chat_tokenizer_build, tiny_llama_build, write_jsonl

pytestmark = [pytest.mark.multiprocess, pytest.mark.parity]
torch.set_num_threads(1)  # hidden-32 models: a second thread only waits on a shared 2-core box

STEP_SCRIPT = textwrap.dedent('''
    import json, sys
    from contextlib import nullcontext
    from pathlib import Path
    import torch
    from tunelab.config import Config
    from tunelab.distributed import ALONE
    from tunelab.models.adapt import apply_method
    from tunelab.compose import setup_task
    from tunelab.train.early_stop import BestTracker
    from tunelab.train.loop import LoopSettings, LoopState, train_loop

    class RowsIO:
        def __init__(self): self.rows = []
        def log(self, row): self.rows.append(row)
        def save(self, *a): pass
        def stop_requested(self): return False

    def train_step(raw, batch_size, grad_accum, run_dir, group=ALONE, make_replicas=None):
        cfg = Config.model_validate(raw)
        torch.manual_seed(0)
        task = setup_task(cfg)
        model = apply_method(task.model, cfg.method, task=cfg.task, freeze_cfg=cfg.freeze, lora=cfg.lora)
        if task.prepare is not None:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            task.prepare(model, Path(run_dir), group, nullcontext)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        s = LoopSettings(batch_size=batch_size, grad_accum=grad_accum, total_steps=2, max_grad_norm=None, seed=0,
                         log_every=1, eval_every=None, save_every=None, early_stopping=False)
        io = RowsIO()
        replicas = make_replicas(model, task.loss_fn) if make_replicas else None
        train_loop(model, opt, sched, task, s, LoopState(), BestTracker("eval_loss", "min"), io, nullcontext, replicas)
        return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}, io.rows

    if __name__ == "__main__":
        from tunelab.distributed import DataParallel, init_from_env

        group = init_from_env()
        assert group.world_size == 2 and group.backend == "gloo"
        for i, case in enumerate(json.loads(open(sys.argv[1]).read())):
            weights, rows = train_step(case["raw"], case["batch_size"], case["grad_accum"], case["run_dir"], group,
                                       lambda model, loss_fn: DataParallel(model, loss_fn, group))
            torch.save({"weights": weights, "rows": rows}, f"{sys.argv[2]}/case{i}-rank{group.rank}.pt")
        group.close()
''')

PAIRS = [
    {"prompt": "What is two plus two?", "chosen": "Four.", "rejected": "Six, I think."},
    {"prompt": "Name a color.", "chosen": "Red.", "rejected": "Apple."},
    {"prompt": "Translate hello to French.", "chosen": "Bonjour.", "rejected": "Thank you!"},
    {"prompt": "Name a fruit.", "chosen": "Apple.", "rejected": "The sea is blue."},
    {"prompt": "Tell me a story about a cat.", "chosen": "A cat and a dog sing at every tide.", "rejected": "No."},
]


def test_two_processes_step_like_one_process_over_the_same_pairs(tmp_path):
    folder = tmp_path / "model"
    tok = tiny_chat_tokenizer_build()
    tiny_llama_build(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    train = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    cases = []
    # (method, per-process batch, accum) vs one process (batch 5, accum 1): 5 pairs a step, 2 steps; the full case
    # leaves rank 1 with 1 of 3 micro-batches (a zero-weight copy joins the all-reduce)
    for method, bs, accum in (("full", 1, 3), ("lora", 2, 2)):
        raw = {"task": "preference", "model": {"name": str(folder), "max_length": 64},
               "data": {"train": str(train), "eval_split": 0.0}, "method": method,
               "train": {"batch_size": bs, "grad_accum": accum, "eval_before": False},
               "early_stopping": {"enabled": False}}
        if method == "lora":
            raw["lora"] = {"r": 4, "dropout": 0.0}
        cases.append({"raw": raw, "batch_size": bs, "grad_accum": accum, "run_dir": str(tmp_path / f"run-{method}")})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    script = tmp_path / "step.py"
    script.write_text(STEP_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tmp_path / "cases.json"), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # hidden-32 models: one thread per process is faster
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "run-full" / "reference_logps.safetensors").is_file()

    train_step = runpy.run_path(str(script))["train_step"]
    for i, case in enumerate(cases):
        ref, ref_rows = train_step(case["raw"], 5, 1, str(tmp_path / f"alone-{i}"))
        ranks = [torch.load(tmp_path / f"case{i}-rank{r}.pt") for r in (0, 1)]
        for k in ref:
            assert torch.equal(ranks[0]["weights"][k], ranks[1]["weights"][k]), (i, k)
            torch.testing.assert_close(ranks[0]["weights"][k], ref[k], rtol=1e-5, atol=1e-6)
        for row, want in zip(ranks[0]["rows"], ref_rows, strict=True):  # step 2: the rewards have moved off 0
            for key in ("loss", "reward_chosen", "reward_rejected", "reward_margin", "pref_accuracy", "logp_chosen",
                        "kl_ref", "samples"):
                assert row[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (i, key)
        assert abs(ref_rows[1]["reward_margin"]) > 1e-4 and ranks[0]["rows"][1]["samples"] == 10
