"""`tunelab plan`: will this config fit, how long will it take, and what would make it fit.

Before a run starts, a user wants three answers: peak memory (against what the machine has),
the time to the end (and its cost), and the cheapest change that fixes an out-of-memory. We get
them from the run's real inputs rather than from rules of thumb:

- the data: the training file read, tokenized and batched exactly as `tunelab train` will (the
  same readers, encoders, packing and length-grouped batch order), so padding, packing and the
  longest micro-batch are the real ones;
- the model: per-shape activation bytes and FLOPs measured on a weightless copy
  (`tunelab.plan.probe`), fitted as rows * (a + b*width + c*width^2) + d*supervised (exact for
  transformers: linear layers give the width term, attention the square, the vocabulary
  projection the supervised term), evaluated on every micro-batch of an epoch;
- the speed: `measure_steps` real optimizer steps of the real model on the first batches
  (the loop itself runs them), turned into FLOP/s and applied to the whole run's FLOPs. Without
  measurement the plan still gives FLOPs, memory and steps, and says the time is unknown.

Memory = runtime (this process after imports: Python, torch, transformers) + weights (fp32
master weights; a QLoRA base at NF4's 4.127 bits per weight with double quantisation) +
gradients and AdamW moments (fp32, trainable parameters only; optim.name adamw_8bit: 8-bit
moments, plan.memory.adam_state_bytes) + regularizer copies (L2-SP/EWC
anchor, EWC Fisher, Mixout targets) + the activations of the largest micro-batch + backward's
transient (twice the largest saved tensor, or the chunked loss's own peak when that is larger).
The probes run chat / causal-LM models with the run's switches (train.loss_chunk_tokens,
train.recompute_norms: `probe.Speed`). benchmarks/plan_accuracy.py compares it with measured peaks.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch

from pydantic import ValidationError

from tunelab.config import Config, given_keys
from tunelab.errors import InputError
from tunelab.plan.memory import adam_state_bytes, logp_bytes, loss_bytes, nf4_bits
from tunelab.plan.probe import Speed, meta_model, probe
from tunelab.device import run_device
from tunelab.process_memory import available_bytes, runtime_bytes  # one /proc reader, shared with the run
from tunelab.train import sizes
from tunelab.train.loop import evaluation_due
from tunelab.train.sizes import usable_max_length

MB = 2**20
NF4_BITS = nf4_bits()  # 4.127: 4-bit codes + 8-bit absmax per 64 weights + fp32 per 256 absmax (double quant)


# ---------------------------------------------------------------- data as the loop will batch it


def data_profile(cfg: Config) -> dict:
    """Training units (lengths, supervised tokens) and one epoch's micro-batch shapes."""
    from tunelab.models.load import load_tokenizer
    from tunelab.models.registry import resolve_model

    source = resolve_model(cfg.model.name)
    tok = load_tokenizer(source, trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision)
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file,
                                              trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision)
    max_len = usable_max_length(cfg.model.max_length, model_config)  # the length training will use
    packed = False
    if cfg.task == "classification":
        from tunelab.tasks.classification_data import load_classification_data

        r = cfg.regularization  # the run's own data path (and cache)
        data = load_classification_data(cfg.data, tok, max_len, seed=cfg.train.seed, replay_data=r.replay_data,
                                        replay_ratio=r.replay_ratio)
        lengths = data.train.lengths.tolist()
        supervised = [0] * len(lengths)
        eval_tokens = sum(int(t.lengths.sum()) for t in data.evals.values())
        num_labels = len(data.names)
    elif cfg.task == "preference":
        return rebatch(preference_profile(cfg, tok, max_len), cfg.train.batch_size, cfg.train.seed)
    else:
        from tunelab.data.encoded import lengths_of, supervised_of
        from tunelab.tasks.causal_lm import batcher
        from tunelab.tasks.lm_data import load_lm_data

        r = cfg.regularization  # the run's own data path (and cache)
        lm = load_lm_data(cfg.data, tok, max_len, task=cfg.task, seed=cfg.train.seed, generating=False,
                          replay_data=r.replay_data, replay_ratio=r.replay_ratio)
        packed = bool(cfg.data.packing)
        units, _ = batcher(lm.train, 0, packed, max_len, units=lm.units)
        tokens, sup = lengths_of(lm.train), supervised_of(lm.train)
        lengths = [sum(tokens[j] for j in u) for u in units]
        supervised = [sum(sup[j] for j in u) for u in units]
        eval_tokens = sum(sum(lengths_of(t)) for t in lm.evals.values())
        num_labels = None
    return rebatch({"units": len(lengths), "tokens": sum(lengths), "supervised_tokens": sum(supervised),
                    "lengths": lengths, "supervised": supervised, "eval_tokens": eval_tokens,
                    "num_labels": num_labels, "packed": packed, "max_length": max_len}, cfg.train.batch_size, cfg.train.seed)


def preference_profile(cfg: Config, tok, max_len: int) -> dict:
    """task preference: one unit per pair, batched by its two answers' tokens together (as the task's
    TrainSet), collated as 2 rows (chosen, rejected) right-padded to the longest side in the batch."""
    from tunelab.tasks.preference_data import load_preference_data

    data = load_preference_data(cfg.data, tok, max_len, cfg.preference.max_prompt_length, seed=cfg.train.seed)
    pairs = data.train  # the run's own data path (and cache)
    lengths, supervised = pairs.lengths.tolist(), pairs.supervised.tolist()
    return {"units": len(pairs), "tokens": sum(lengths), "supervised_tokens": sum(supervised), "lengths": lengths,
            "supervised": supervised, "widths": pairs.widths.tolist(), "rows_per_unit": 2,
            "eval_tokens": sum(int(t.lengths.sum()) for t in data.evals.values()), "num_labels": None,
            "packed": False, "max_length": max_len}


def rebatch(profile: dict, batch_size: int, seed: int) -> dict:
    """The profile with one epoch's micro-batch shapes (rows, width, supervised) at this batch size,
    in the loop's order: what-ifs on the batch size re-batch the same units without re-reading data.
    A unit is one row of its length, or (`rows_per_unit`, `widths`: preference pairs) several rows."""
    from tunelab.data.batching import epoch_batches

    lengths, supervised = profile["lengths"], profile["supervised"]
    widths, per_unit = profile.get("widths", lengths), profile.get("rows_per_unit", 1)
    batches = epoch_batches(lengths, batch_size, seed=seed, epoch=0)
    shapes = [(per_unit * len(b), max(widths[i] for i in b), sum(supervised[i] for i in b)) for b in batches]
    return {**profile, "shapes": shapes, "padded_tokens": sum(r * w for r, w, _ in shapes)}


# ---------------------------------------------------------------- cost per micro-batch shape


def fit_costs(model, task: str, max_width: int, packed: bool, autocast_dtype, speed: Speed = Speed()) -> dict:
    """Coefficients of bytes/FLOPs = rows*(a + b*w + c*w^2) + d*supervised, from four probes."""
    widths = sorted({max(8, max_width), max(4, max_width // 2), max(2, max_width // 4)})
    while len(widths) < 3:
        widths.append(widths[-1] + 8)
    results = [probe(model, task, rows=1, width=w, packed=packed, autocast_dtype=autocast_dtype, speed=speed)
               for w in widths]
    out = {}
    for key in ("saved_bytes", "flops"):
        ys = [getattr(r, key) for r in results]
        a, b, c = _quadratic_through(widths, ys)
        out[key] = [a, b, c, 0.0]
    if task != "classification":
        w = widths[0]
        s = max(1, w - 1)
        with_head = probe(model, task, rows=1, width=w, supervised=s, packed=packed, autocast_dtype=autocast_dtype,
                          speed=speed)
        out["saved_bytes"][3] = (with_head.saved_bytes - results[0].saved_bytes) / s
        out["flops"][3] = (with_head.flops - results[0].flops) / s
    return out


def _quadratic_through(xs: list[int], ys: list[int]) -> tuple[float, float, float]:
    (x0, x1, x2), (y0, y1, y2) = xs[:3], ys[:3]
    d01, d12 = (y1 - y0) / (x1 - x0), (y2 - y1) / (x2 - x1)
    c = (d12 - d01) / (x2 - x0)
    b = d01 - c * (x0 + x1)
    return y0 - b * x0 - c * x0 * x0, b, c


def shape_cost(coef: list[float], rows: int, width: int, supervised: int) -> float:
    a, b, c, d = coef
    return rows * (a + b * width + c * width * width) + d * supervised


# ---------------------------------------------------------------- memory


def param_bytes(model, cfg: Config) -> dict:
    """Weights, gradients, optimizer moments and regularizer copies, in bytes."""
    from tunelab.models.quantization import QLORA_SKIP_MODULES

    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    four_bit = {}  # what bitsandbytes would store in 4 bits: frozen Linear weights outside the heads
    if cfg.method == "qlora":
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad \
                    and not any(part in QLORA_SKIP_MODULES for part in name.split(".")):
                four_bit[id(m.weight)] = m.weight.numel()
    quantizable = sum(four_bit.values())
    wbytes = 2 if cfg.train.weights_dtype == "bf16" else 4  # gradients take the weights' dtype
    half = sum(p.numel() for p in model.parameters()  # frozen bf16 weights (lora.base_dtype), not the 4-bit ones
               if p.dtype == torch.bfloat16 and not p.requires_grad and id(p) not in four_bit)
    weights = (total - quantizable - half) * wbytes + 2 * half + quantizable * NF4_BITS / 8
    reg = cfg.regularization
    copies = (1 if (reg.l2sp or reg.ewc) else 0) + (1 if reg.ewc else 0) + (1 if reg.mixout else 0)
    return {"total_params": total, "trainable_params": trainable, "quantized_params": quantizable,
            "weights": weights, "gradients": trainable * wbytes,
            "optimizer": adam_state_bytes([p.numel() for p in model.parameters() if p.requires_grad], cfg.optim.name),
            "regularizers": trainable * 4 * copies}


# ---------------------------------------------------------------- the plan


def autocast_dtype_for(cfg: Config, device: torch.device, total_params: int):
    from tunelab.train.precision import resolve_precision

    precision = resolve_precision(cfg.train.precision, device, total_params, cfg.train.weights_dtype)
    return precision, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def estimate(cfg: Config, profile: dict, runtime: int) -> dict:
    """Memory and FLOPs of a config on a data profile (no real computation); `runtime`: the process baseline."""
    device = run_device()
    model = meta_model(cfg, profile["num_labels"])
    precision, amp = autocast_dtype_for(cfg, device, sum(p.numel() for p in model.parameters()))
    from tunelab.run import store_frozen_base

    store_frozen_base(cfg, model, precision, quiet=True)  # as the run stores them (lora.base_dtype)
    pb = param_bytes(model, cfg)
    shapes = profile["shapes"]
    speed = Speed.of(cfg)  # the causal-LM switches, as the run applies them
    coef = fit_costs(model, cfg.task, max(w for _, w, _ in shapes), profile["packed"], amp, speed)
    per_batch = [shape_cost(coef["saved_bytes"], *s) for s in shapes]
    peak_i = max(range(len(shapes)), key=per_batch.__getitem__)
    rows, width, sup = shapes[peak_i]
    direct = probe(model, cfg.task, rows=rows, width=width, supervised=sup, packed=profile["packed"],
                   autocast_dtype=amp, speed=speed)
    ref = reference_forward_flops(cfg, pb["total_params"])
    policy_flops = [shape_cost(coef["flops"], *s) for s in shapes]
    flops_per_batch = [f + ref * r * w for f, (r, w, _) in zip(policy_flops, shapes)]
    flops_epoch = sum(flops_per_batch)
    # evaluation runs forward only: about a third of forward + backward per token (plus the reference's)
    eval_flops = (sum(policy_flops) / max(1, profile["padded_tokens"]) / 3 + ref) * profile["eval_tokens"]
    transient = max(2 * direct.largest_saved_bytes, chunked_loss_transient(model, speed, sup, amp, cfg.task))
    if cfg.train.gradient_checkpointing:  # backward recomputes one block at a time: its activations come back
        transient += recompute_bytes(cfg, profile, direct, rows, width, sup, amp)
    memory = {"runtime": runtime, "weights": pb["weights"], "gradients": pb["gradients"],
              "optimizer": pb["optimizer"], "regularizers": pb["regularizers"],
              "activations": direct.saved_bytes, "transient": transient}
    memory["peak"] = sum(memory.values())
    return {"saved_per_batch": per_batch, "precision": precision, "device": device.type, "params": pb, "memory": memory,
            "model": model,
            "largest_micro_batch": {"rows": rows, "width": width, "supervised_tokens": sup},
            "flops_per_epoch": flops_epoch, "flops_per_batch": flops_per_batch, "eval_flops_per_pass": eval_flops}


def chunked_loss_transient(model, speed: Speed, supervised: int, amp, task: str = "chat") -> float:
    """What the chunked loss holds at its peak beyond what autograd saves for backward (plan.memory.loss_bytes:
    the head's fp32 weight gradient, taken in the forward and kept on the autograd context, one bf16
    product slice, one chunk's logits; task preference: plan.memory.logp_bytes, its chunked per-token
    log-probs), which the probe's saved bytes do not see; 0 where the loss is not chunked."""
    from tunelab.train.chunked_loss import takes_head

    head = model.get_output_embeddings() if speed.loss_chunk else None
    if head is None or not takes_head(head):
        return 0.0
    of = logp_bytes if task == "preference" else loss_bytes
    loss = of(supervised, head.out_features, head.in_features, act_bytes=2 if amp is not None else 4,
              hidden_bytes=4, chunk=speed.loss_chunk, head_trains=head.weight.requires_grad)
    return loss["peak"] - loss["saved"]


def shard_states(est: dict, cfg: Config, strategy: str, nproc: int) -> None:
    """Per-process model states under a sharded strategy (plan.memory.device_states, the ZeRO paper's
    cuts, as the hardware plan takes them), in place of the one-process weights, gradients and optimizer state; `sharding_change`
    (negative) is what that frees, `sharding_buffers` the strategy's communication buffers.

    The layouts are the ones each implementation keeps (measured per rank in tests/test_sharding.py):
    FSDP2 shards the fp32 parameters, their gradients and AdamW's two moments (no master copy);
    DeepSpeed keeps its optimizer partition as an fp32 master plus the moments (K = 12 bytes), and
    16-bit weights and gradients under bf16/fp16."""
    from tunelab.plan.arch import gathered_unit_params, root_unit_params
    from tunelab.plan.memory import device_states

    mem, pb = est["memory"], est["params"]
    root, root_trainable = root_unit_params(est["model"])
    ms = device_states(pb["total_params"], pb["trainable_params"], quantized=pb["quantized_params"],
                       precision=est["precision"], strategy=strategy, n=nproc, offload=cfg.distributed.cpu_offload,
                       unit_params=gathered_unit_params(est["model"]), root_params=root,
                       root_trainable=root_trainable, whole_bucket=est.get("device") != "cpu",
                       gloo=est.get("device") == "cpu", optim=cfg.optim.name, weights_dtype=cfg.train.weights_dtype)
    new = {"weights": ms["weights"], "gradients": ms["gradients"], "optimizer": ms["master_weights"] + ms["optimizer"],
           "sharding_buffers": ms["buffers"]}
    before = mem["weights"] + mem["gradients"] + mem["optimizer"]
    mem["sharding_change"] = sum(new.values()) - before
    mem.update(new)
    mem["peak"] += mem["sharding_change"]
    if ms["cpu"]:
        mem["offloaded_to_host"] = ms["cpu"]


def reference_forward_flops(cfg: Config, total_params: int) -> float:
    """FLOPs per padded token that task preference adds each step for its reference: under lora/qlora
    the adapter-off forward (no_grad, so no activations kept), 2 per parameter per token (Kaplan et
    al. 2020's forward count; attention's own term left out); 0 for full fine-tuning (the reference
    log-probs are computed once before training and cached) and for the reference-free losses."""
    if cfg.task != "preference" or cfg.method not in ("lora", "qlora"):
        return 0.0
    from tunelab.train.preference_losses import loss_from_config

    return 2.0 * total_params if loss_from_config(cfg.preference).needs_reference else 0.0


def calibrated_peak(est: dict, measured: dict, grad_accum: int) -> dict:
    """The peak from the measured steps' real peak memory plus what the largest micro-batch adds.

    The component sum misses what only a real process shows (the allocator's slack, the weights'
    file mapping, autograd's workspace): about 100-200 MB on CPU for MiniLM. The measured steps
    ran the first micro-batches of the epoch; the largest one may come later, so its extra
    activations (fitted bytes, scaled by the transient share) are added on top.
    """
    mem = est["memory"]
    per_batch = est["saved_per_batch"]
    seen = max(per_batch[: grad_accum * (1 + measured["steps"])], default=0.0)
    scale = (mem["activations"] + mem["transient"]) / mem["activations"] if mem["activations"] else 1.0
    extra = max(0.0, max(per_batch) - seen) * scale
    # the measured steps ran one process holding every state: add DDP's buckets, or take off what sharding frees
    peak = measured["peak_memory_mb"] + (extra + mem.get("ddp_buckets", 0) + mem.get("sharding_change", 0)) / MB
    out = {"peak_analytic": round(mem["peak"] / MB, 1), "peak_measured_steps": measured["peak_memory_mb"],
           "peak": round(peak, 1), "peak_basis": "measured steps + largest micro-batch"}
    if est.get("device") == "cpu":  # a host peak: `tunelab plan` measured it on the malloc `train` runs on (cli)
        from tunelab.host_allocator import in_use

        out["host_allocator"] = in_use()
        out["peak_basis"] += f", on {out['host_allocator']}"
    return out


def recompute_bytes(cfg: Config, profile: dict, ckpt, rows: int, width: int, sup: int, amp) -> float:
    """One block's activations, recreated during backward under gradient checkpointing: the saved
    bytes without checkpointing minus those with it, over the number of blocks."""
    from tunelab.train.optim import find_blocks

    plain_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"gradient_checkpointing": False})})
    plain = meta_model(plain_cfg, profile["num_labels"])
    full = probe(plain, cfg.task, rows=rows, width=width, supervised=sup, packed=profile["packed"], autocast_dtype=amp,
                 speed=Speed.of(cfg))  # the checkpointed run's switches (no norm recomputation of its own)
    try:
        n_blocks = len(find_blocks(plain.get_base_model() if hasattr(plain, "get_base_model") else plain)[1])
    except InputError:  # an unknown layout: assume the whole difference can come back at once
        n_blocks = 1
    return max(0.0, (full.saved_bytes - ckpt.saved_bytes) / n_blocks)


def measure(cfg: Config, steps: int) -> dict:
    """Time `steps` real optimizer steps after one warm-up step, through the real setup and loop."""
    from tunelab.run import prepare_task, setup
    from tunelab.train.early_stop import BestTracker
    from tunelab.train.loop import LoopState, train_loop

    r = setup(cfg)
    prepare_seconds = None
    if r.task.prepare is not None:  # once-per-run work (preference, full: the reference log-probs), as open_run
        import tempfile

        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="tunelab-plan-") as tmp:
            prepare_task(r, Path(tmp))
        prepare_seconds = time.monotonic() - t0
    r.task = dataclasses.replace(r.task, evaluate=None)  # task values are frozen
    r.settings.total_steps, r.settings.log_every = steps + 1, 1
    r.settings.eval_every = r.settings.save_every = None
    r.settings.early_stopping = False
    stamps: list[float] = []

    class Clock:
        def log(self, row):
            if "loss" in row:
                stamps.append(time.monotonic())

        def save(self, *a, **k):
            pass

        def stop_requested(self):
            return False

    train_loop(r.model, r.optimizer, r.scheduler, r.task, r.settings, LoopState(), BestTracker("loss", "min"),
               Clock(), r.autocast)
    from tunelab.run_dir import peak_memory_mb

    secs = stamps[-1] - stamps[0] if len(stamps) > 1 else float("nan")
    return {"steps": len(stamps) - 1, "seconds": secs, "peak_memory_mb": round(peak_memory_mb(r.device), 1),
            "prepare_seconds": prepare_seconds}


def make_plan(cfg: Config, *, measure_steps: int = 0, price_per_hour: float | None = None,
              suggestions: bool = True, nproc: int = 1, interconnect: str | None = None,
              link_gb_per_s: float | None = None, overlap: float | None = None) -> dict:
    """The whole plan as one JSON-ready dict (the `tunelab plan --json` object).

    `nproc`: data-parallel processes (`tunelab train --nproc`). A step then takes nproc x grad_accum
    micro-batches (fewer steps), each process holds the memory planned here plus DDP's gradient
    buckets (one more copy of the trainable gradients), and on the CPU the processes share the
    machine's memory and cores (no speedup: benchmarks measured 71-74 vs 90-98 samples/s for 2 vs 1
    on 2 cores), while on GPUs (one each) the time is divided by nproc. Each step adds the strategy's
    collectives (`communication`: plan.comm, over gloo's measured loopback figure on the CPU, PCIe 4
    between GPUs here unless `interconnect` / `link_gb_per_s` say; `overlap` of it hidden, default
    none: on the CPU gloo computes on the cores the steps use).
    """
    profile = data_profile(cfg)
    # the process with transformers, the tokenizer and the data loaded, as a run has them; taken once,
    # before the probes and the measured steps grow this process
    runtime = runtime_bytes()
    est = estimate(cfg, profile, runtime)
    strategy = cfg.distributed.strategy if nproc > 1 else "ddp"
    if nproc > 1 and strategy == "ddp":
        est["memory"]["ddp_buckets"] = est["params"]["gradients"]
        est["memory"]["peak"] += est["memory"]["ddp_buckets"]
    elif nproc > 1:
        shard_states(est, cfg, strategy, nproc)
    shapes = profile["shapes"]
    windows = math.ceil(len(shapes) / (cfg.train.grad_accum * nproc))
    total_steps = sizes.total_steps(windows, cfg.train.epochs, cfg.train.max_steps)
    epochs = total_steps / windows
    n_evals = 0
    if profile["eval_tokens"]:  # the loop's own rule
        n_evals = (1 if cfg.train.eval_before else 0) + sum(
            evaluation_due(step, cfg.train.eval_every, step % windows == 0, total_steps)
            for step in range(1, total_steps + 1))
    plan = {
        "model": cfg.model.name, "task": cfg.task, "method": cfg.method, "precision": est["precision"],
        "weights_dtype": cfg.train.weights_dtype,
        "device": est["device"], "processes": nproc, "strategy": strategy,
        "per_process_states": {k: est["memory"][k] for k in ("weights", "gradients", "optimizer")},
        "params": {k: est["params"][k] for k in ("total_params", "trainable_params")},
        "data": {k: profile[k] for k in ("units", "tokens", "padded_tokens", "supervised_tokens", "eval_tokens",
                                          "packed", "max_length")} | {"micro_batches_per_epoch": len(shapes)},
        "largest_micro_batch": est["largest_micro_batch"],
        "steps": {"per_epoch": windows, "total": total_steps, "epochs": round(epochs, 4), "evaluations": n_evals},
        "memory_mb": {k: round(v / MB, 1) for k, v in est["memory"].items()},
        "flops": {"train_per_epoch": est["flops_per_epoch"], "train_total": est["flops_per_epoch"] * epochs,
                  "eval_per_pass": est["eval_flops_per_pass"]},
    }
    plan["memory_mb"]["peak_basis"] = "component sum (allocator slack not included; --measure-steps adds it)"
    plan["packed_attention"] = packed_attention_note(cfg, est, profile)
    avail = available_bytes(torch.device(est["device"]))
    plan["available_mb"] = round(avail / MB, 1) if avail is not None else None
    share = nproc if est["device"] == "cpu" else 1  # CPU processes share one machine's memory
    plan["fits"] = None if avail is None else est["memory"]["peak"] * share <= avail
    plan["communication"] = communication(cfg, est, strategy, nproc, interconnect=interconnect,
                                          link_gb_per_s=link_gb_per_s, overlap=overlap)
    plan["time"] = None
    if measure_steps:
        m = measure(cfg, measure_steps)
        # the clock ran from the end of step 1 to the end of the last: micro-batches of windows 2..
        a = cfg.train.grad_accum
        measured_flops = sum(est["flops_per_batch"][a: a * (1 + m["steps"])])
        rate = measured_flops / m["seconds"] if m["seconds"] > 0 else float("nan")
        rate *= nproc if est["device"] == "cuda" else 1  # one GPU each; CPU processes share the cores
        compute_s = plan["flops"]["train_total"] / rate
        comm_s = total_steps * plan["communication"]["exposed_seconds_per_step"]
        train_s = compute_s + comm_s
        eval_s = n_evals * plan["flops"]["eval_per_pass"] / rate + (m["prepare_seconds"] or 0.0)
        plan["memory_mb"].update(calibrated_peak(est, m, cfg.train.grad_accum))
        plan["fits"] = None if avail is None else plan["memory_mb"]["peak"] * MB * share <= avail
        plan["time"] = {"measured_steps": m["steps"], "measured_seconds": round(m["seconds"], 3),
                        "achieved_flops_per_second": round(rate, 1), "compute_seconds": round(compute_s, 3),
                        "communication_seconds": round(comm_s, 3), "train_seconds": round(train_s, 3),
                        "eval_seconds": round(eval_s, 3), "total_seconds": round(train_s + eval_s, 3),
                        "measured_peak_memory_mb": m["peak_memory_mb"]}
        if m["prepare_seconds"] is not None:  # counted in eval_seconds: forward passes outside the steps
            plan["time"]["reference_seconds"] = round(m["prepare_seconds"], 3)
        if price_per_hour is not None:
            plan["cost"] = {"price_per_hour": price_per_hour,
                            "total": round(price_per_hour * (train_s + eval_s) / 3600, 4)}
    if suggestions:
        plan["suggestions"] = suggest(cfg, profile, est["memory"], est["precision"])
    return plan


def packed_attention_note(cfg: Config, est: dict, profile: dict) -> dict | None:
    """How the plan took train.packed_attention where rows are packed: the fake-tensor probe runs the
    `mask` path only (`split` reads each row's positions, which a fake tensor does not have), so a
    `split` run is planned as `mask`. Said, with the formula's difference at the largest micro-batch
    (plan.memory.packed_terms: mask's L x L terms against split's one more attention output per layer),
    which the planned peak still includes. None where rows are not packed or the task is not chat /
    causal_lm."""
    if not profile.get("packed") or cfg.task not in ("chat", "causal_lm"):
        return None
    configured = cfg.train.packed_attention
    out = {"configured": configured, "planned_as": "mask"}
    if configured != "split":
        return out
    from tunelab.models.packed_attention import supports
    from tunelab.plan.arch import shape_of
    from tunelab.plan.memory import packed_terms

    model = est["model"]
    if not supports(model.get_base_model() if hasattr(model, "get_base_model") else model):
        out["note"] = "split needs sdpa attention: this model keeps the mask in training too"
        return out
    shape = shape_of(model.config, cfg.task)
    big = est["largest_micro_batch"]
    act = 2 if est["precision"] in ("bf16", "fp16") else 4
    terms = {k: packed_terms(shape, big["width"], big["rows"], packed=k, attention="sdpa", act_bytes=act)
             for k in ("mask", "split")}
    over = sum(shape.layers * t[0] * (1 if k == "mask" else -1) + t[1] * (1 if k == "mask" else -1)
               for k, t in terms.items())
    out["mask_minus_split_bytes"] = int(over)
    out["note"] = ("the probe cannot run split: planned as mask, whose peak is about "
                   f"{abs(over) / MB:,.1f} MB {'above' if over >= 0 else 'below'} split's at the largest "
                   "micro-batch (formula; the planned peak is mask's)")
    return out


def communication(cfg: Config, est: dict, strategy: str, nproc: int, *, interconnect: str | None = None,
                  link_gb_per_s: float | None = None, overlap: float | None = None) -> dict:
    """The collectives of one optimizer step (plan.comm) for `nproc` processes of this config."""
    from tunelab.plan import comm
    from tunelab.plan.arch import root_unit_params

    pb = est["params"]
    per_step = comm.strategy_step_bytes(strategy, total=pb["total_params"], trainable=pb["trainable_params"],
                                        quantized=pb["quantized_params"], precision=est["precision"], n=nproc,
                                        accum=cfg.train.grad_accum, root_params=root_unit_params(est["model"])[0],
                                        reshard_after_forward=cfg.distributed.reshard_after_forward,
                                        weights_dtype=cfg.train.weights_dtype)
    gpu = None if est["device"] == "cpu" else "here"  # GPUs of this machine: PCIe 4 unless told
    link = comm.link_for(gpu, interconnect=interconnect, gb_per_s=link_gb_per_s)
    return comm.step_seconds(per_step, link, comm.DEFAULT_OVERLAP if overlap is None else overlap)


LEVERS = [
    ("train.gradient_checkpointing=true", {"train": {"gradient_checkpointing": True}}),
    ("halve train.batch_size, double train.grad_accum", None),
    ("train.precision=bf16", {"train": {"precision": "bf16"}}),
    ("method=lora", {"method": "lora"}),
    ("method=qlora", {"method": "qlora"}),
]


def suggest(cfg: Config, profile: dict, memory: dict, precision: str) -> list[dict]:
    """Each memory lever not already in use, with the peak it would give (same data, same probes)."""
    out = []
    for label, change in LEVERS:
        # what the user set, not every default: validators judge a section "set" by its presence
        raw = given_keys(cfg)
        if label.startswith("train.precision") and precision != "fp32":
            continue
        if change is None:
            if cfg.train.batch_size < 2:
                continue
            raw.setdefault("train", {}).update(batch_size=cfg.train.batch_size // 2, grad_accum=cfg.train.grad_accum * 2)
        else:
            section, value = next(iter(change.items()))
            current = getattr(cfg, section)
            if isinstance(value, dict):
                if all(getattr(current, k) == v for k, v in value.items()):
                    continue
                raw.setdefault(section, {}).update(value)
            elif current == value or (value == "lora" and current == "qlora"):
                continue
            else:
                raw[section] = value
            if value == "qlora" and cfg.train.weights_dtype == "bf16":  # a 4-bit base keeps its own dtype
                raw.setdefault("train", {})["weights_dtype"] = "fp32"
                label += ", train.weights_dtype=fp32"
        try:
            variant = Config.model_validate(raw)
        except ValidationError:  # a lever this config cannot take is not a suggestion
            continue
        vprofile = rebatch(profile, variant.train.batch_size, variant.train.seed) if change is None else profile
        est = estimate(variant, vprofile, memory["runtime"])
        out.append({"change": label, "peak_mb": round(est["memory"]["peak"] / MB, 1),
                    "saves_mb": round((memory["peak"] - est["memory"]["peak"]) / MB, 1)})
    return sorted(out, key=lambda s: s["peak_mb"])
