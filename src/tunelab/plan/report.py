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
        f"{p['model']} · {p['task']} · {p['method']} · {p['precision']}"
        f"{' (bf16 weights)' if p.get('weights_dtype') == 'bf16' else ''} on {p['device']}",
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
    pa = p.get("packed_attention")
    if pa and pa.get("note"):
        lines.append(f"packed_attention {pa['configured']}: {pa['note']}")
    c = p.get("communication")
    if c and c["bytes_per_step"]:
        lines.append(_comm_line(c))
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


def _comm_line(c: dict) -> str:
    return (f"communication: {c['bytes_per_step'] / 2**20:,.1f} MB per device per step over {c['link']} "
            f"({c['link_gb_per_s']:g} GB/s): {c['seconds_per_step']:.3g} s per step, "
            f"{c['overlap']:.0%} assumed hidden behind computation")


def _gb(n: float) -> str:
    return f"{n / 2**30:,.1f}"


def _config_line(p: dict) -> str:
    ckpt = ", checkpointing" if p["gradient_checkpointing"] else ""
    off = " + offload" if p["offload"] else ""
    t = p.get("time")
    when = f"; {_duration(t['seconds'])}" + (f", {t['cost']:,.2f}" if t.get("cost") is not None else "") if t else ""
    return (f"{p['method']} · {p['strategy']}{off}{ckpt} · micro-batch {p['micro_batch']} x accum {p['grad_accum']}: "
            f"{_gb(p['per_device']['total_bytes'])} GiB per device, {p['step']['tokens_per_second']:,.0f} tokens/s{when}")


def hardware_lines(p: dict) -> list[str]:
    """The hardware plan (`tunelab plan --model/--gpu`) as lines a person reads."""
    d, gpu = p["per_device"], p["gpu"]
    lines = [f"{p['model']} ({p['model_type']}, {p['task']}): {p['base_params']:,} parameters; "
             f"{p['trainable_params']:,} trainable under {p['method']}",
             f"on {p['devices']} x {gpu['name']} ({gpu['memory_gb']:g} GB, {gpu['bf16_tflops']:g} bf16 TFLOPS) "
             f"· {p['strategy']}{' + offload' if p['offload'] else ''} · {p['precision']}"
             f"{' (bf16 weights)' if p.get('weights_dtype') == 'bf16' else ''} · seq {p['seq_len']} · "
             f"micro-batch {p['micro_batch']} x accum {p['grad_accum']} (effective {p['effective_batch']})",
             "per device (GiB): " + ", ".join(f"{k.removesuffix('_bytes').replace('_', ' ')} {_gb(d[k])}"
                                               for k in d if k != "total_bytes"),
             f"total {_gb(d['total_bytes'])} of {_gb(p['device_memory_bytes'])} GiB: "
             f"{'fits' if p['fits'] else 'DOES NOT FIT'}" + (f"; {_gb(p['cpu_bytes'])} GiB in host memory"
                                                             if p["cpu_bytes"] else "")]
    t = p.get("time")
    if t:
        lines.append(f"time: {_duration(t['seconds'])} ({t['gpu_hours']:,.1f} GPU-hours at MFU {t['mfu']}; "
                     f"{p['flops']['total']:.3g} FLOPs)" + (f", cost {t['cost']:,.2f}" if t["cost"] is not None else ""))
    else:
        lines.append("time: give --tokens (training tokens) for time and cost")
    if p.get("communication") and p["communication"]["bytes_per_step"]:
        lines.append(_comm_line(p["communication"]))
    o = p.get("offload_traffic")
    if o and o["bytes_per_step"]:
        lines.append(f"offload: {o['bytes_per_step'] / 2**20:,.1f} MB per device per step over {o['link']} "
                     f"({o['link_gb_per_s']:g} GB/s): {o['seconds_per_step']:.3g} s per step (the host's optimizer "
                     "step not counted)")
    if p["recommendations"]:
        lines.append("fits (fastest first):")
        lines += [f"  {r['rank']}. {_config_line(r)}\n     {r['command']}" for r in p["recommendations"]]
    if p["missing"]:
        lines.append(p["missing"])
    be = p.get("break_even")
    if be:
        n = be["break_even_requests"]
        lines.append(f"fine-tune vs prompting: {'break-even after ' + format(n, ',') + ' requests' if n else 'no break-even (nothing saved per request)'}"
                     + (f"; at {be['requests']:,} requests {be['cheaper']} is cheaper "
                        f"({be['finetune_total']:,.2f} vs {be['prompting_total']:,.2f})" if "requests" in be else ""))
    if p.get("command"):
        lines.append(f"run: {p['command']}")
    return lines
