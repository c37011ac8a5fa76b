"""The plan as lines a person reads (the `--json` object is the machine's form)."""

from __future__ import annotations


COMPONENTS = ("runtime", "weights", "gradients", "optimizer", "regularizers", "activations", "transient")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def plan_lines(p: dict) -> list[str]:
    mem, steps, data, big = p["memory_mb"], p["steps"], p["data"], p["largest_micro_batch"]
    lines = [
        f"{p['model']} · {p['task']} · {p['method']} · {p['precision']} on {p['device']}",
        f"parameters: {p['params']['trainable_params']:,} trainable of {p['params']['total_params']:,}",
        f"data: {data['units']:,} training units, {data['tokens']:,} tokens per epoch "
        f"({data['padded_tokens']:,} with padding); {data['micro_batches_per_epoch']} micro-batches",
        f"steps: {steps['total']} ({steps['per_epoch']} per epoch x {steps['epochs']}), {steps['evaluations']} evaluations",
        f"largest micro-batch: {big['rows']} x {big['width']} tokens",
        "memory (MB): " + ", ".join(f"{k} {mem[k]:,.0f}" for k in (*COMPONENTS, "ddp_buckets") if k in mem)
        + (f" (per process; {p['processes']} processes)" if p.get("processes", 1) > 1 else ""),
        f"peak memory: {mem['peak']:,.0f} MB ({mem['peak_basis']})" + (
            f" of {p['available_mb']:,.0f} MB available: {'fits' if p['fits'] else 'DOES NOT FIT'}"
            if p.get("available_mb") is not None else ""),
        f"compute: {p['flops']['train_total'] / 1e12:,.2f} TFLOP training, "
        f"{p['flops']['eval_per_pass'] / 1e12:,.3f} TFLOP per evaluation",
    ]
    t = p.get("time")
    if t:
        lines.append(f"time: {_duration(t['total_seconds'])} (train {_duration(t['train_seconds'])}, eval "
                     f"{_duration(t['eval_seconds'])}; {t['achieved_flops_per_second'] / 1e9:.1f} GFLOP/s measured over "
                     f"{t['measured_steps']} steps)")
    else:
        lines.append("time: not measured (--measure-steps N times N real steps)")
    if p.get("cost"):
        lines.append(f"cost: {p['cost']['total']:.2f} at {p['cost']['price_per_hour']}/hour")
    for s in p.get("suggestions", []):
        effect = f"saves {s['saves_mb']:,.0f} MB" if s["saves_mb"] >= 0 else f"costs {-s['saves_mb']:,.0f} MB more"
        lines.append(f"  what if {s['change']}: peak {s['peak_mb']:,.0f} MB ({effect})")
    return lines
