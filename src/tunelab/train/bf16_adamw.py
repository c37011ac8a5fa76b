"""AdamW for weights stored in bf16, with fp32 moments and stochastically rounded updates
(`train.weights_dtype: bf16`).

Why: with bf16 autocast the exact path keeps fp32 weights and fp32 gradients (8 bytes a parameter)
and makes bf16 copies of the weights for every forward. Keeping the weights themselves in bf16
halves those 8 bytes and removes the copies. The catch is well known: rounding to nearest drops
every update smaller than half a bf16 ulp (2**-9 relative), so at fine-tuning learning rates most
updates vanish and the model stops learning ("Revisiting BFloat16 Training", Zamirai et al. 2020;
Gupta et al. 2015 for stochastic rounding). Stochastic rounding rounds up with probability equal
to the distance to the lower neighbour, so each rounding is unbiased in expectation and small
updates accumulate over steps. Zamirai et al. report bf16 weights + stochastic rounding matching
fp32 training; torchao's `_AdamW(bf16_stochastic_round=True)` does the same. We write it here
instead of taking torchao: it is not a dependency, and its step is compiled with torch.compile,
minutes of inductor C++ builds on a small CPU before the first step.

The step is torch's AdamW's (decoupled weight decay, bias-corrected moments) computed in fp32
from the bf16 weight and gradient, `CHUNK` values at a time (SmolLM2's 28M-value embedding would
otherwise need ~450 MB of fp32 scratch), and the new fp32 weight rounded stochastically back to
bf16. Exact resume: the rounding noise comes from a generator seeded from (seed, step, tensor
index), nothing random lives outside the checkpoint. A parameter that is not bf16 (a tensor kept
in fp32) gets the same fp32 step without rounding, which equals torch.optim.AdamW (tested).
"""

from __future__ import annotations

import math

import torch

CHUNK = 1 << 20  # values per slice of a tensor's step
_LOW16 = -65536  # int32 0xFFFF0000: keeps sign, exponent and the 7 mantissa bits bf16 holds


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 -> bf16, rounding up in magnitude with probability (x - lower) / ulp.

    Adding 16 uniform random bits to the fp32 bit pattern and truncating them carries into the kept
    bits exactly with that probability (sign-magnitude: for negative numbers the carry grows the
    magnitude, so the rule is symmetric). inf stays inf; NaN stays NaN.

    The noise is drawn 64 bits at a time over the whole int64 range (`random_(-2**63, None)`: every bit
    uniform, where a plain `random_()` leaves bit 63 at zero), and each draw gives four 16-bit lanes;
    a signed lane plus 32768 is a uniform value in [0, 65535]. Against one draw per two values (low 16
    bits of each int32 lane kept) it halves the generator's work, which was a third of the rounding's
    time on every weight at every step; the sum is taken in int32 and the same three passes follow. A
    NaN is looked for through the sum (NaN whenever x holds one) instead of a full isnan().any() pass."""
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round_bf16 takes fp32, not {x.dtype}")
    bits = x.contiguous().view(torch.int32)
    n = bits.numel()
    noise = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None, generator=generator)
    lanes = noise.view(torch.int16)[:n].view(x.shape)  # signed 16-bit uniforms in [-32768, 32767]
    rounded = torch.add(bits, lanes).add_(32768).bitwise_and_(_LOW16)  # int32 + int16 -> int32
    out = rounded.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero
    if not torch.isfinite(x.sum()):  # a NaN (or an inf, or an overflowing sum): the slow check
        nan = torch.isnan(x)
        if nan.any():  # a NaN's payload can carry into the sign bit's neighbour; keep it a NaN
            out[nan] = float("nan")
    return out


def stochastic_round_generator(seed: int, step: int, index: int, device: torch.device) -> torch.Generator:
    """The rounding noise of tensor `index` at optimizer step `step`: (seed, step, tensor) mixed into one
    63-bit seed, so a resumed run draws the same noise with nothing saved."""
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + int(step) * 7_919 + int(index) * 104_729) % (2**63 - 1))
    return g


class AdamWBf16(torch.optim.Optimizer):
    """AdamW with fp32 moments for bf16 (or fp32) parameters; bf16 weights get stochastic rounding."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, seed: int = 0, chunk: int = CHUNK):
        if not 0.0 <= lr:
            raise ValueError(f"invalid lr {lr}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.seed = int(seed)
        self.chunk = int(chunk)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's Optimizer casts floating-point state to its parameter's dtype on load: the moments
        would come back in bf16, and a resumed run would not be the run. They are put back in fp32
        from the state dict itself (the same values, bit for bit)."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            for key in ("exp_avg", "exp_avg_sq"):
                value = state_dict["state"].get(pid, {}).get(key)
                if value is not None:
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32, copy=True)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = -1
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamWBf16 does not take sparse gradients")
                if not p.data.is_contiguous():
                    p.data = p.data.contiguous()
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                    state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                state["step"] += 1
                t = int(state["step"].item())
                bc1 = 1 - beta1 ** t
                bc2_sqrt = math.sqrt(1 - beta2 ** t)
                rounding = p.dtype == torch.bfloat16
                gen = stochastic_round_generator(self.seed, t, index, p.device) if rounding else None
                w_flat, g_flat = p.data.view(-1), p.grad.reshape(-1)
                m_flat, v_flat = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
                for a in range(0, p.numel(), self.chunk):
                    b = min(a + self.chunk, p.numel())
                    g = g_flat[a:b].float()
                    m, v = m_flat[a:b], v_flat[a:b]
                    m.lerp_(g, 1 - beta1)
                    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    del g
                    w = w_flat[a:b].float()  # a copy for bf16 weights; the weight itself for fp32 ones
                    w.mul_(1 - lr * wd)
                    w.addcdiv_(m, v.sqrt().div_(bc2_sqrt).add_(eps), value=-lr / bc1)
                    if rounding:
                        w_flat[a:b] = stochastic_round_bf16(w, gen)
                    elif w.data_ptr() != w_flat[a:b].data_ptr():
                        w_flat[a:b] = w
        return loss
