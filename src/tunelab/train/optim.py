"""Parameter groups (head lr, layer-wise lr decay, no decay on biases and norms) and AdamW.

Layer-wise decay (ULMFiT / "How to Fine-Tune BERT", Sun et al. 2019): the head and whatever sits
above the transformer blocks get the base lr, block i of n gets lr * decay**(n - i), the
embeddings (everything below the blocks) get lr * decay**(n + 1). The block list is discovered
from the model, so BERT-like (`encoder.layer`), Llama-like (`model.layers`) and GPT-2-like (`h`)
layouts all work (tunelab.models.anatomy); an unknown layout is a clear error, never a silent flat lr.

`optim.name: adamw_8bit` keeps AdamW's two moments in 8 bits (Dettmers et al. 2022, "8-bit Optimizers
via Block-wise Quantization"): bitsandbytes' AdamW8bit, whose CPU kernel (bitsandbytes >= 0.48,
backends/cpu) dequantises a parameter's moments to fp32, takes the AdamW step there and quantises them
back per block of 256 values (absmax scale per block; the first moment on the signed dynamic map, the
second on the unsigned one, 256 codes each). torchao's AdamW8bit was the other candidate: it is not a
dependency and compiles its step with torch.compile, minutes of inductor C++ builds on this 2-core
CPU before the first step. Tensors under `MIN_8BIT_SIZE` values (biases, norms, a tiny model's
matrices) keep fp32 moments, as in bitsandbytes.
"""

from __future__ import annotations

import functools
import math
import re

import torch
from torch import nn

from tunelab.models.anatomy import find_blocks, head_prefixes  # noqa: F401 (find_blocks: the planner's import path)


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    head_lr: float | None = None,
    layer_lr_decay: float = 1.0,
) -> list[dict]:
    """AdamW groups with a readable `name`; only parameters that require grad are included."""
    heads = head_prefixes(model)
    depth_of: dict[str, int] = {}
    n_blocks = 0
    if layer_lr_decay != 1.0:
        block_name, blocks = find_blocks(model, field="optim.layer_lr_decay", fix="set optim.layer_lr_decay: 1.0")
        n_blocks = len(blocks)
        pattern = re.compile(re.escape(block_name) + r"\.(\d+)\.")
        seen_block = False
        for name, _ in model.named_parameters():
            m = pattern.match(name)
            if m:
                seen_block = True
                depth_of[name] = int(m.group(1)) + 1  # block i -> depth i+1
            elif any(name.startswith(h) for h in heads) or seen_block:
                depth_of[name] = n_blocks + 1  # head, and what comes after the blocks
            else:
                depth_of[name] = 0  # embeddings
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = any(name.startswith(h) for h in heads)
        decay = weight_decay if p.ndim >= 2 else 0.0
        if is_head:
            group_lr, label = (head_lr or lr), "head"
        elif layer_lr_decay != 1.0:
            depth = depth_of[name]
            group_lr = lr * layer_lr_decay ** (n_blocks + 1 - depth)
            label = "embeddings" if depth == 0 else ("top" if depth == n_blocks + 1 else f"block_{depth - 1}")
        else:
            group_lr, label = lr, "body"
        key = (label, decay)
        g = groups.setdefault(key, {"params": [], "lr": group_lr, "weight_decay": decay,
                                     "name": f"{label}{'' if decay else '.no_decay'}", "n_params": 0})
        g["params"].append(p)
        g["n_params"] += p.numel()
    return list(groups.values())


MIN_8BIT_SIZE = 4096  # bitsandbytes' default: smaller tensors keep fp32 moments (tests lower it)
CHUNK_8BIT = 1 << 20  # values per call of the 8-bit kernel: a multiple of its CPU block of 256


def build_optimizer(groups: list[dict], *, betas=(0.9, 0.999), eps: float = 1e-8, name: str = "adamw",
                    bf16_weights: bool = False, seed: int = 0) -> torch.optim.Optimizer:
    """AdamW (`name` adamw), fused where torch has a fused kernel for the device (CPU and CUDA in
    torch 2.13); or AdamW with 8-bit moments (`name` adamw_8bit, `AdamW8bit`). With `bf16_weights`
    (train.weights_dtype bf16) either one rounds each update stochastically into the bf16 weight, its
    noise seeded from `seed`: AdamWBf16 (fp32 moments, train/bf16_adamw.py) or AdamW8bit's bf16 step.

    At small batches the optimizer step dominates a step: for MiniLM (22.7M parameters) the fused
    step took a third of the foreach one on this CPU (measured in the same process).
    """
    clean = [{k: v for k, v in g.items() if k != "n_params"} for g in groups]
    if name == "adamw_8bit":
        return AdamW8bit(clean, betas=tuple(betas), eps=eps, bf16_seed=seed if bf16_weights else None)
    if bf16_weights:
        from tunelab.train.bf16_adamw import AdamWBf16

        return AdamWBf16(clean, betas=tuple(betas), eps=eps, seed=seed)
    try:
        return torch.optim.AdamW(clean, betas=tuple(betas), eps=eps, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(clean, betas=tuple(betas), eps=eps, foreach=True)


def _bnb_adamw8bit():
    import bitsandbytes  # imported only when asked for: it loads its native library

    return bitsandbytes.optim.AdamW8bit


def AdamW8bit(params, *, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
              min_8bit_size: int | None = None, chunk: int | None = None, bf16_seed: int | None = None):
    """bitsandbytes' AdamW8bit whose CPU step goes `chunk` values at a time (`chunked_8bit_class`);
    with `bf16_seed`, bf16 parameters get stochastically rounded updates seeded from it."""
    cls = chunked_8bit_class()
    opt = cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
              min_8bit_size=MIN_8BIT_SIZE if min_8bit_size is None else min_8bit_size)
    opt.chunk = CHUNK_8BIT if chunk is None else chunk
    opt.bf16_seed = bf16_seed
    return opt


@functools.cache
def chunked_8bit_class():
    """A subclass of bitsandbytes' AdamW8bit whose step on a host tensor runs the 8-bit kernel on
    `chunk`-value slices of it (and of its gradient, moments and block scales).

    The CPU kernel makes fp32 copies of the moments, the gradient and the denominator of the tensor it
    is given: for SmolLM2's 28.3M-value embedding about 450 MB at once, more than half of what the
    8-bit moments save. Blocks are 256 values and independent, so slices that start on a block
    boundary give the same result bit for bit (tested) with a few MB of scratch.
    """
    import bitsandbytes.functional as F

    base = _bnb_adamw8bit()

    class ChunkedAdamW8bit(base):
        chunk = CHUNK_8BIT
        bf16_seed: int | None = None  # set: bf16 weights, each chunk's new weight stochastically rounded

        @torch.no_grad()
        def update_step(self, group, p, gindex, pindex):
            state = self.state[p]
            if p.dtype == torch.bfloat16 and self.bf16_seed is not None:
                return self._update_bf16(group, p, gindex, pindex)
            if state["state1"].dtype != torch.uint8 or p.device.type != "cpu":
                return super().update_step(group, p, gindex, pindex)
            p.data = p.data.contiguous()
            p.grad = p.grad.contiguous()
            config = self.get_config(gindex, pindex, group)
            state["step"] += 1
            flat = [t.view(-1) for t in (p.grad, p.data, state["state1"], state["state2"])]
            for a in range(0, p.numel(), self.chunk):
                b = min(a + self.chunk, p.numel())
                self._step_8bit(config, state, *(t[a:b] for t in flat), a, b)

        def _step_8bit(self, config, state, g, w, s1, s2, a: int, b: int):
            """The 8-bit kernel on values a..b of a tensor (its gradient, weight and moments sliced so), with
            the absmax of the blocks they span; a must start a block."""
            if a % 256 or self.chunk % 256:
                raise ValueError(f"chunk {self.chunk} is not a multiple of the 8-bit kernel's block (256)")
            blocks = slice(a // 256, -(-b // 256))
            if w.device.type == "cpu" and self.optimizer_name == "adam" and native_cpu_kernels():
                return adam_8bit_cpu_step(
                    g, w, s1, s2, state["absmax1"][blocks], state["absmax2"][blocks], state["qmap1"], state["qmap2"],
                    betas=config["betas"], eps=config["eps"], step=state["step"], lr=config["lr"],
                    weight_decay=config["weight_decay"])
            F.optimizer_update_8bit_blockwise(
                self.optimizer_name, g, w, s1, s2, config["betas"][0], config["betas"][1], 0.0, 0.0, config["eps"],
                state["step"], config["lr"], state["qmap1"], state["qmap2"], state["absmax1"][blocks],
                state["absmax2"][blocks], config["weight_decay"], gnorm_scale=1.0, skip_zeros=config["skip_zeros"])

        @torch.no_grad()
        def _update_bf16(self, group, p, gindex, pindex):
            """The same kernels on fp32 copies of a chunk's bf16 weight and gradient, the new weight rounded
            stochastically back into bf16 (train/bf16_adamw.py: rounding to nearest would drop the small
            updates); 8-bit moments for tensors of min_8bit_size values and more, fp32 ones below."""
            from tunelab.train.bf16_adamw import stochastic_round_bf16, stochastic_round_generator

            p.data = p.data.contiguous()
            state = self.state[p]
            config = self.get_config(gindex, pindex, group)
            state["step"] += 1
            eight = state["state1"].dtype == torch.uint8
            # the noise stream of the parameter's position over all groups, as AdamWBf16 numbers them
            index = sum(len(g["params"]) for g in self.param_groups[:gindex]) + pindex
            gen = stochastic_round_generator(self.bf16_seed, int(state["step"]), index, p.device)
            chunk = self.chunk if eight else max(self.chunk, p.numel())
            flat = [t.view(-1) for t in (p.grad.contiguous(), p.data, state["state1"], state["state2"])]
            for a in range(0, p.numel(), chunk):
                b = min(a + chunk, p.numel())
                g16, w16, s1, s2 = (t[a:b] for t in flat)
                g, w = g16.float(), w16.float()
                if eight:
                    self._step_8bit(config, state, g, w, s1, s2, a, b)
                else:
                    F.optimizer_update_32bit(
                        self.optimizer_name, g, w, s1, config["betas"][0], config["eps"], state["step"], config["lr"],
                        s2, config["betas"][1], 0.0, 0.0, config["weight_decay"], 1.0, None, max_unorm=0.0,
                        skip_zeros=config["skip_zeros"])
                w16.copy_(stochastic_round_bf16(w, gen))

    return ChunkedAdamW8bit


@functools.cache
def native_cpu_kernels():
    """bitsandbytes' native CPU library, when it loaded (None otherwise: its Python fallbacks are used)."""
    from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib

    return None if isinstance(lib, ErrorHandlerMockBNBNativeLibrary) else lib


@torch.no_grad()
def adam_8bit_cpu_step(g, w, s1, s2, absmax1, absmax2, qmap1, qmap2, *, betas, eps: float, step: int, lr: float,
                       weight_decay: float) -> None:
    """One AdamW step on a CPU slice with 8-bit moments, bit for bit bitsandbytes' own CPU op
    (backends/cpu `_optimizer_update_8bit_blockwise_cpu`, tested) with fewer passes over memory.

    Why our own: that op is Python over torch calls, and on each slice it copies the fp32 gradient
    (`g.float() * gnorm_scale`), allocates the dequantised moments, the square root and the denominator,
    writes the weight back onto itself, and quantises into fresh tensors it then copies into the state.
    Here the same native kernels (`cdequantize_blockwise_cpu_fp32`, `cquantize_blockwise_cpu_fp32`) read
    and write the state slices in place, the arithmetic is the op's own sequence of torch calls (so the
    rounding is the same), and the only scratch is the fp32 moments and denominator of one slice.
    `g` and `w` are fp32 and contiguous; `w` is updated in place; the moments' codes and block scales
    (`s1`, `s2`, `absmax1`, `absmax2`, slices starting on a 256-value block) are rewritten in place.
    """
    import ctypes

    from bitsandbytes.functional import get_ptr

    lib = native_cpu_kernels()
    b1, b2 = betas
    n, block = ctypes.c_longlong(g.numel()), ctypes.c_longlong(256)
    m, v = torch.empty_like(g), torch.empty_like(g)
    lib.cdequantize_blockwise_cpu_fp32(get_ptr(qmap1), get_ptr(s1), get_ptr(absmax1), get_ptr(m), block, n)
    lib.cdequantize_blockwise_cpu_fp32(get_ptr(qmap2), get_ptr(s2), get_ptr(absmax2), get_ptr(v), block, n)
    m.mul_(b1).add_(g, alpha=1.0 - b1)
    v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
    correction1 = 1.0 - b1**step
    correction2 = math.sqrt(1.0 - b2**step)
    denom = torch.sqrt(v).div_(correction2).add_(eps)
    if weight_decay > 0.0:
        w.mul_(1.0 - lr * weight_decay)
    w.addcdiv_(m, denom, value=-lr / correction1)
    del denom
    # the kernel sets the map's first code to -1.0 (its bisection needs the range closed), as the op's does
    lib.cquantize_blockwise_cpu_fp32(get_ptr(qmap1), get_ptr(m), get_ptr(absmax1), get_ptr(s1), block, n)
    lib.cquantize_blockwise_cpu_fp32(get_ptr(qmap2), get_ptr(v), get_ptr(absmax2), get_ptr(s2), block, n)


def describe_groups(optimizer: torch.optim.Optimizer) -> list[dict]:
    """What the run dir records: each group's name, base lr, weight decay and size."""
    return [
        {"name": g.get("name", str(i)), "lr": g.get("initial_lr", g["lr"]), "weight_decay": g["weight_decay"],
         "n_params": sum(p.numel() for p in g["params"])}
        for i, g in enumerate(optimizer.param_groups)
    ]
