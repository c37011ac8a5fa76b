"""Where a chat-SFT run's time and memory go: torch.profiler over a few steps, RSS per phase.

    flock /work/bench.lock .venv/bin/python benchmarks/perf_profile.py --steps 3
    flock /work/bench.lock .venv/bin/python benchmarks/perf_profile.py --steps 3 --set train.packed_attention=mask

The configuration is the chat SFT benchmark's (benchmarks/perf_sft.py): SmolLM2-135M-Instruct,
instruction/answer pairs from ../shared/datasets/alpaca_eval_davinci003, packing to 512, 4 rows a
step, bf16 autocast, loss on the assistant tokens. Two parts, each in its own spawned process:

- phases: the whole recipe (setup, train, save: final/, summary, report with drift), with a
  thread sampling the resident set every 20 ms; writes each phase's peak RSS and seconds, plus the
  tracemalloc peak of Python objects during setup (tokenised data, encoded examples).
- ops: the same setup, then `--steps` optimizer steps under torch.profiler (CPU, memory); writes
  the operators with the most self time, the time per labelled part (collate, forward+loss,
  backward, optimizer) and the largest allocations the profiler saw.

Writes benchmarks/results/perf_profile.json. No timing here is compared with anything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import in_child, in_child_on, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class PhaseSampler:
    """Peak VmRSS per named phase, sampled by a daemon thread (ru_maxrss only knows the whole process)."""

    def __init__(self, every: float = 0.02):
        from tunelab.process_memory import runtime_bytes

        self._rss, self.every, self.phase = runtime_bytes, every, "start"
        self.peaks: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self._t = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            mb = self._rss() / 2**20
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), mb)
            self._stop.wait(self.every)

    def enter(self, phase: str) -> None:
        now = time.monotonic()
        self.seconds[self.phase] = self.seconds.get(self.phase, 0.0) + now - self._t
        self._t = now
        mb = self._rss() / 2**20
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), mb)
        self.phase = phase

    def close(self) -> dict:
        self.enter("end")
        self._stop.set()
        self._thread.join()
        return {k: {"peak_rss_mb": round(v, 1), "seconds": round(self.seconds.get(k, 0.0), 2)}
                for k, v in self.peaks.items() if k != "end"}


def phases(raw: dict, out: str) -> dict:
    """The recipe's phases, as run.run_training runs them for one process."""
    import tracemalloc

    from tunelab import run
    from tunelab.config import Config
    from tunelab.process_memory import peak_memory_mb

    import torch

    sampler = PhaseSampler()
    sampler.enter("setup")
    tracemalloc.start()
    cfg = Config.model_validate(raw)
    recipe = run.setup(cfg)
    py_peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    sampler.enter("open_run")
    out = Path(out)
    io, state, before = run.open_run(recipe, out, None, False, None)
    sampler.enter("train")
    state = run.train(recipe, io, state)
    sampler.enter("save_and_report")
    summary = run.save(recipe, io, state, before, time.monotonic())
    result = sampler.close()
    return {"phases": result, "setup_python_objects_peak_mb": round(py_peak, 1),
            "summary_peak_memory_mb": summary["peak_memory_mb"],
            "summary_train_peak_memory_mb": summary["train_peak_memory_mb"],
            "process_peak_mb": round(peak_memory_mb(torch.device("cpu")), 1),
            "tokens_per_second": summary["tokens_per_second"], "steps": summary["steps"]}


def ops(raw: dict, steps: int, top: int = 25, memory: bool = False) -> dict:
    """torch.profiler over `steps` optimizer steps of the recipe's own loop primitives."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from tunelab import run
    from tunelab.config import Config
    from tunelab.data.batching import epoch_batches

    r = run.setup(Config.model_validate(raw))
    model, task = r.model, r.task
    model.train()
    order = epoch_batches(task.train.lengths, r.settings.batch_size, seed=0, epoch=0)
    params = [p for g in r.optimizer.param_groups for p in g["params"]]
    # one warm-up step outside the profile: the optimizer state is allocated on the first step
    warm = True
    labels: dict[str, float] = {}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=memory, record_shapes=False) as prof:
        for idx in order[: steps + 1]:
            t0 = time.monotonic()
            with record_function("collate"):
                batch = task.train.collate(idx)
            t1 = time.monotonic()
            with record_function("forward_loss"):
                with r.autocast():
                    loss, n = task.loss_fn(model, batch)
            t2 = time.monotonic()
            with record_function("backward"):
                (loss / max(1, n)).backward()
            t3 = time.monotonic()
            with record_function("optimizer"):
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                r.optimizer.step()
                r.optimizer.zero_grad(set_to_none=True)
            t4 = time.monotonic()
            if not warm:
                for k, v in (("collate", t1 - t0), ("forward_loss", t2 - t1), ("backward", t3 - t2),
                             ("optimizer", t4 - t3)):
                    labels[k] = labels.get(k, 0.0) + v
            warm = False
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1
    by_self = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    by_mem = sorted(events, key=lambda e: -e.self_cpu_memory_usage)[:12]
    return {
        "seconds_per_step": {k: round(v / steps, 3) for k, v in labels.items()},
        "top_self_cpu": [{"op": e.key, "self_ms_per_step": round(e.self_cpu_time_total / 1e3 / (steps + 1), 1),
                          "share": round(e.self_cpu_time_total / total, 4), "calls": e.count} for e in by_self],
        "top_self_alloc": [{"op": e.key, "self_alloc_mb_per_step": round(e.self_cpu_memory_usage / 2**20 / (steps + 1), 1),
                            "calls": e.count} for e in by_mem],
        "threads": torch.get_num_threads(),
    }


def saved_for_backward(raw: dict) -> dict:
    """Bytes autograd keeps for backward over one step's forward + loss, by the kind of module that
    saved them (unique storages, so views are counted once): the activation memory of a step."""
    import torch

    from tunelab import run
    from tunelab.config import Config
    from tunelab.data.batching import epoch_batches

    r = run.setup(Config.model_validate(raw))
    model, task = r.model, r.task
    model.train()
    where = ["outside"]
    seen: dict[int, tuple[str, int]] = {}

    def pre(mod, args):
        where.append(type(mod).__name__)

    def post(mod, args, out):
        where.pop()

    hooks = []
    for m in model.modules():
        if not list(m.children()) or type(m).__name__.endswith(("Attention", "MLP")):
            hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):  # a saved view of a parameter (linear keeps weight.t()) is no activation
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in params:
            key = t.untyped_storage().data_ptr()
            seen.setdefault(key, (where[-1], t.untyped_storage().nbytes()))
        return t

    idx = epoch_batches(task.train.lengths, r.settings.batch_size, seed=0, epoch=0)[0]
    batch = task.train.collate(idx)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with r.autocast():
            loss, n = task.loss_fn(model, batch)
    for h in hooks:
        h.remove()
    by_kind: dict[str, float] = {}
    for kind, nbytes in seen.values():
        by_kind[kind] = by_kind.get(kind, 0.0) + nbytes / 2**20
    return {"tokens": int(batch["input_ids"].numel()), "supervised": n,
            "saved_mb_total": round(sum(by_kind.values()), 1),
            "saved_mb_by_module": {k: round(v, 1) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=160)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--method", choices=["full", "lora", "qlora"], default="full", help="perf_sft's recipe for it")
    ap.add_argument("--part", choices=["both", "phases", "ops", "saved"], default="both")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "perf_profile.json")
    a = ap.parse_args()
    from perf_sft import bf16_native, missing_inputs, tunelab_config, write_pairs

    why = missing_inputs(a.method)
    if why:
        print(f"skipped: {why}")
        return 0
    from tunelab.config import library_versions

    result = {"benchmark": "perf_profile", "method": a.method, "steps": a.steps, "pairs": a.pairs, "overrides": a.overrides,
              "versions": library_versions(), "load_average_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="tunelab-profile-") as tmp:
        chat, _ = write_pairs(Path(tmp), a.pairs)
        raw = tunelab_config(str(chat), a.steps, a.method, overrides=a.overrides, precision="bf16" if bf16_native() else "fp32")
        if a.part in ("both", "phases"):
            result["phases"] = in_child_on(raw["train"].get("host_allocator", "auto"), phases, raw, str(Path(tmp) / "run"))
            print(json.dumps(result["phases"], indent=1), flush=True)
        if a.part in ("both", "saved"):
            result["saved"] = in_child(saved_for_backward, raw)
            print(json.dumps(result["saved"], indent=1), flush=True)
        if a.part in ("both", "ops"):
            result["ops"] = in_child(ops, raw, a.steps)
            print(json.dumps(result["ops"], indent=1), flush=True)
    result["load_average_end"] = os.getloadavg()
    write_result(a.out, result)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
