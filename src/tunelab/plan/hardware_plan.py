"""The `tunelab plan --model/--gpu ...` object: a spec from the flags (over a CONFIG.yaml when given),
its plan, the ranked configurations that fit, what is missing, the command, the break-even.

The `--json` schema (documented in the README): top level `mode` ("hardware"), `model`,
`model_type`, `task`, `shape`, `gpu`, `total_params`, `trainable_params`, the planned
configuration's fields (`method`, `strategy`, `offload`, `precision`, `micro_batch`, `grad_accum`,
`effective_batch`, `devices`, the causal-LM switches as applied (`loss_chunk_tokens`, `recompute_norms`, `recompute_mlp_activation`,
`packed_attention`), `per_device` {weights_bytes, gradients_bytes, optimizer_bytes,
master_weights_bytes, model_states_bytes, activations_bytes, logits_bytes, overhead_bytes,
total_bytes}, `cpu_bytes`, `fits`, `flops`, `communication` (plan.comm: bytes_per_step,
collectives, seconds_per_step, exposed_seconds_per_step, overlap, link, link_gb_per_s,
link_source), `time` (seconds = compute_seconds + communication_seconds)), `recommendations` (the same fields each,
plus `rank` and `command`), `missing` (a sentence, or null when something fits), `command` (the
planned configuration's when it fits, else the first recommendation's), `break_even` (or null).
"""

from __future__ import annotations

from tunelab.errors import InputError
from tunelab.plan import comm, hardware, recommend as rec, timecost
from tunelab.plan.model_plan import METHODS, Model, Spec, check_spec, plan_one

HARDWARE_FLAGS = ("model", "gpu", "gpu_memory", "gpu_tflops", "gpus", "nodes", "strategy", "offload")


def wants_hardware_plan(flags: dict) -> bool:
    """True when a flag asks about a model or hardware rather than this machine."""
    return any(flags.get(k) not in (None, False) for k in HARDWARE_FLAGS)


def shape_overrides(flags: dict) -> list[str]:
    """The shape flags as `--set` overrides of a CONFIG.yaml (they win over its keys)."""
    out = []
    pairs = [("method", "method"), ("lora_r", "lora.r"), ("seq_len", "model.max_length"),
             ("batch_size", "train.batch_size"), ("grad_accum", "train.grad_accum"),
             ("precision", "train.precision"), ("weights_dtype", "train.weights_dtype")]
    for flag, key in pairs:
        if flags.get(flag) is not None:
            out.append(f"{key}={flags[flag]}")
    if flags.get("gradient_checkpointing") is not None:
        out.append(f"train.gradient_checkpointing={str(flags['gradient_checkpointing']).lower()}")
    if flags.get("lora_targets"):
        t = flags["lora_targets"]
        out.append(f"lora.target_modules={t}" if t in ("auto", "all-linear") else f"lora.target_modules=[{t}]")
    return out


def _targets(text: str | None):
    if text is None or text in ("auto", "all-linear"):
        return text or "auto"
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise InputError("--lora-targets is empty; give module names (a,b,c), auto or all-linear", field="--lora-targets")
    return names


def spec_from(flags: dict, cfg=None, config_path: str | None = None) -> Spec:
    """A Spec from the flags; a CONFIG.yaml's values (`cfg`, already overridden by the flags) fill the rest."""
    gpu = hardware.resolve(flags.get("gpu"), flags.get("gpu_memory"), flags.get("gpu_tflops")) \
        if (flags.get("gpu") or flags.get("gpu_memory") or flags.get("gpu_tflops")) else hardware.lookup("A100-80GB")
    common = dict(gpu=gpu, gpus=flags.get("gpus") or 1, nodes=flags.get("nodes") or 1,
                  strategy=flags.get("strategy") or "ddp", offload=bool(flags.get("offload")),
                  attention=flags.get("attention") or "sdpa", mfu=flags.get("mfu") or timecost.DEFAULT_MFU,
                  price_per_hour=flags.get("price_per_hour"), tokens=flags.get("tokens"),
                  interconnect=flags.get("interconnect"), link_gb_per_s=flags.get("link_bandwidth"),
                  comm_overlap=comm.DEFAULT_OVERLAP if flags.get("comm_overlap") is None else flags["comm_overlap"])
    if cfg is not None:
        if cfg.method not in METHODS:
            raise InputError(f"planning for other hardware covers methods {', '.join(METHODS)}, not {cfg.method!r}",
                             field="method", file=config_path)
        targets = cfg.lora.target_modules
        spec = Spec(model=flags.get("model") or cfg.model.name, method=cfg.method, lora_r=cfg.lora.r,
                    lora_dropout=cfg.lora.dropout, lora_lean_dropout=cfg.lora.lean_dropout and not cfg.lora.dora,
                    lora_recompute_inputs=cfg.lora.recompute_inputs,
                    lora_base_dtype="fp32" if cfg.lora.dora else cfg.lora.base_dtype,
                    lora_targets=targets if isinstance(targets, str) else list(targets),
                    seq_len=cfg.model.max_length, batch_size=cfg.train.batch_size, grad_accum=cfg.train.grad_accum,
                    precision="bf16" if cfg.train.precision == "auto" or cfg.train.weights_dtype == "bf16"
                    else cfg.train.precision, optim=cfg.optim.name, weights_dtype=cfg.train.weights_dtype,
                    gradient_checkpointing=cfg.train.gradient_checkpointing,
                    task="classification" if cfg.task == "classification" else "causal_lm",
                    trust_remote_code=cfg.model.trust_remote_code, config_path=config_path,
                    reshard_after_forward=cfg.distributed.reshard_after_forward, **lm_switches(cfg), **common)
        if flags.get("lora_targets"):
            spec.lora_targets = _targets(flags["lora_targets"])
    else:
        spec = Spec(model=flags["model"], method=flags.get("method") or "full", lora_r=flags.get("lora_r") or 8,
                    lora_targets=_targets(flags.get("lora_targets")), seq_len=flags.get("seq_len") or 2048,
                    batch_size=flags.get("batch_size") or 1, grad_accum=flags.get("grad_accum") or 1,
                    precision=flags.get("precision") or "bf16", weights_dtype=flags.get("weights_dtype") or "fp32",
                    gradient_checkpointing=bool(flags.get("gradient_checkpointing")), **common)
    check_spec(spec)
    return spec


def lm_switches(cfg) -> dict:
    """The Spec's causal-LM switches from a CONFIG.yaml: chat and causal_lm run them (tasks/lm_speed.py);
    a preference run only the chunked vocabulary projection (its answer log-probs, planned as the
    chunked loss: the same bytes to within a head's input)."""
    if cfg.task == "preference":
        return {"loss_chunk_tokens": cfg.train.loss_chunk_tokens, "recompute_norms": False,
                "recompute_mlp_activation": False, "packing": False}
    t = cfg.train
    return {"loss_chunk_tokens": t.loss_chunk_tokens, "recompute_norms": t.recompute_norms,
            "recompute_mlp_activation": t.recompute_mlp_activation,
            "packing": bool(cfg.data.packing), "packed_attention": t.packed_attention}


def tokens_from_config(cfg) -> float:
    """Training tokens of a CONFIG.yaml's data: padded tokens per epoch x epochs (the data read as train reads it)."""
    from tunelab.plan.planner import data_profile

    profile = data_profile(cfg)
    if cfg.train.max_steps:
        per_step = profile["padded_tokens"] / max(1, len(profile["shapes"])) * cfg.train.grad_accum
        return per_step * cfg.train.max_steps
    return profile["padded_tokens"] * cfg.train.epochs


def build(spec: Spec, break_even_args: dict | None = None, *, explicit_method: bool = True) -> dict:
    """The whole hardware plan as one JSON-ready dict."""
    model = Model(spec)
    planned = plan_one(model, spec)
    recs = rec.recommend(model, spec, methods=[spec.method] if explicit_method else None)
    out = {"mode": "hardware", "model": spec.model, "model_type": model.shape.model_type, "task": model.task,
           "shape": model.shape.as_dict(), "gpu": spec.gpu.as_dict(),
           "total_params": planned["total_params"], "trainable_params": planned["trainable_params"],
           "base_params": model.counts["total"], **planned,
           "recommendations": recs, "missing": None if recs else rec.missing(model, spec)}
    if planned["fits"]:
        out["command"] = rec.command(model, spec, **rec.config_says(spec))
    else:
        out["command"] = recs[0]["command"] if recs else None
    out["break_even"] = None
    if break_even_args:
        chosen = planned if planned["fits"] else (recs[0] if recs else None)
        cost = chosen["time"]["cost"] if chosen and chosen.get("time") else None
        if cost is None:
            raise InputError("the break-even needs the fine-tune's cost: give --tokens and --price-per-hour "
                             "(and hardware it fits on)", field="--prompting-tokens-saved")
        out["break_even"] = timecost.break_even(cost, **break_even_args)
    return out


def break_even_args(flags: dict) -> dict | None:
    """--prompting-tokens-saved N --price-in P [--price-out Q] [--requests R] as break_even()'s keywords."""
    given = [k for k in ("tokens_saved", "price_in", "price_out", "requests") if flags.get(k) is not None]
    if not given:
        return None
    if flags.get("tokens_saved") is None or flags.get("price_in") is None:
        raise InputError("the break-even needs --prompting-tokens-saved N and --price-in P (per 1M tokens)",
                         field="--prompting-tokens-saved" if flags.get("tokens_saved") is None else "--price-in")
    return {"tokens_saved": flags["tokens_saved"], "price_in": flags["price_in"],
            "price_out": flags.get("price_out") or 0.0, "requests": flags.get("requests")}
