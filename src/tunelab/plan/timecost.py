"""Training FLOPs, time at a device's peak x MFU, cost, and the fine-tune vs prompting break-even.

FLOPs per training token (P = parameters that take part in a matmul: all but the input
embedding tables, the output projection counted even when tied; L layers, s sequence length,
d = heads x head size):

- full fine-tuning: 6P (Kaplan et al. 2020: forward 2P, backward 4P: input and weight gradients);
- LoRA / QLoRA: 4P + 6P_a: the frozen base runs forward (2P) and passes input gradients back
  (2P) down to the lowest adapter, but computes no weight gradients; the adapters' P_a parameters
  cost 6 each like any trained weight. (QLoRA's dequantisation is bandwidth, not FLOPs: it shows up
  as a lower MFU, not here.) Frozen layers in general: 4 per weight above the lowest trained
  layer, 2 below it (forward only);
- attention: 12 L s d per token (QK^T and AV are 2sd each per layer forward, backward twice
  that; Narayanan et al. 2021's s/6h term of 72Bslh^2), unmasked (causal kernels skip about half;
  not assumed);
- gradient checkpointing: one more forward, + 2P + 4Lsd per token.

Time = FLOPs / (devices x peak x MFU) + the collectives' time not hidden behind computation
+ offload's host traffic (plan.comm: bytes per step over the link, times the steps). The default
MFU, 0.4, is what well-tuned dense fine-tuning reaches on A100/H100 (Megatron-style runs report 0.4-0.55; Hugging Face Trainer
setups often 0.3-0.4); pass `--mfu` for yours. Cost = hours x devices x price per device-hour.
"""

from __future__ import annotations

import math

DEFAULT_MFU = 0.4


def flops_per_token(*, matmul_params: float, adapter_params: float, method: str, layers: int, seq_len: int,
                    attn_dim: int, checkpointing: bool) -> dict:
    """FLOPs of one training token, split into the weight and attention terms."""
    if method == "full":
        weights = 6 * matmul_params
    else:
        weights = 4 * matmul_params + 6 * adapter_params
    attention = 12 * layers * seq_len * attn_dim
    if checkpointing:
        weights += 2 * matmul_params
        attention += 4 * layers * seq_len * attn_dim
    return {"weights": weights, "attention": attention, "total": weights + attention}


def time_and_cost(total_flops: float, *, devices: int, peak_flops: float, mfu: float = DEFAULT_MFU,
                  price_per_hour: float | None = None, comm_seconds: float = 0.0,
                  offload_seconds: float = 0.0) -> dict:
    """Seconds at `devices` x `peak_flops` x `mfu`, plus `comm_seconds` of collectives not hidden
    behind the computation and `offload_seconds` of host traffic (plan.comm); the cost at
    `price_per_hour` per device."""
    compute = total_flops / (devices * peak_flops * mfu)
    seconds = compute + comm_seconds + offload_seconds
    out = {"seconds": seconds, "compute_seconds": compute, "communication_seconds": comm_seconds,
           "offload_seconds": offload_seconds,
           "hours": seconds / 3600, "gpu_hours": devices * seconds / 3600, "mfu": mfu}
    out["cost"] = None if price_per_hour is None else out["gpu_hours"] * price_per_hour
    return out


def break_even(finetune_cost: float, *, tokens_saved: int, price_in: float, price_out: float,
               requests: int | None = None, ft_price_in: float | None = None, ft_price_out: float | None = None,
               request_in: int = 0, request_out: int = 0) -> dict:
    """Requests after which fine-tuning (one-off cost + serving) is cheaper than long prompts.

    Prices are per million tokens. A prompted request sends `request_in + tokens_saved` input
    tokens and gets `request_out` back at (price_in, price_out); the fine-tuned model gets
    `request_in` and returns `request_out` at (ft_price_in, ft_price_out), by default the same
    prices (a self-hosted or same-priced endpoint). Break-even: the one-off cost over the saving per
    request, rounded up; none when fine-tuning saves nothing per request.
    """
    ft_in = price_in if ft_price_in is None else ft_price_in
    ft_out = price_out if ft_price_out is None else ft_price_out
    prompted = ((request_in + tokens_saved) * price_in + request_out * price_out) / 1e6
    tuned = (request_in * ft_in + request_out * ft_out) / 1e6
    saving = prompted - tuned
    out = {"finetune_cost": finetune_cost, "prompted_cost_per_request": prompted,
           "finetuned_cost_per_request": tuned, "saving_per_request": saving,
           # (less a hair: 20 / 0.002 is 10000.000000000002 in floating point)
           "break_even_requests": math.ceil(finetune_cost / saving - 1e-9) if saving > 0 else None}
    if requests is not None:
        out["requests"] = requests
        out["prompting_total"] = requests * prompted
        out["finetune_total"] = finetune_cost + requests * tuned
        out["cheaper"] = "fine-tune" if out["finetune_total"] < out["prompting_total"] else "prompting"
    return out
