"""Cross-entropy over the vocabulary projection in chunks of tokens, gradients taken in the forward.

The plain loss (evaluate.lm.supervised_loss) projects every supervised position onto the whole
vocabulary at once: for SmolLM2 (49,152 tokens) and ~1,500 supervised positions per step that is a
(1500, 49152) bf16 logits tensor, its fp32 copy, the fp32 log-softmax autograd keeps for backward,
and in backward the fp32 and bf16 gradients of the logits: ~1.2 GB at the loss's peak for a
135M-parameter model.

Here the positions go through the head `chunk` at a time. The loss is the last thing of the step
and is only ever scaled (divided by the window's token count, the fp16 loss scale), so the
gradient of each chunk's summed cross-entropy with respect to the hidden states and the head's
weight can be taken right away (softmax - one-hot, times the chunk) and only those are kept:
d_hidden is (n, hidden), d_weight one fp32 copy of the head's weight, the chunks' products added
into it in place (under autocast a bf16 product of `PRODUCT_ROWS` vocabulary rows at a time, so no
full-size product nor its fp32 copy is ever made: 4 bytes per head weight in all, where a whole
bf16 product plus its fp32 copy beside the accumulator cost 10). Backward scales d_weight by the
incoming scalar in place and hands it on as the weight's gradient (cast only where the weight is
not fp32), so the loss ends up holding what the head's fp32 gradient costs anyway; it is handed
over once (a second backward through the same graph is refused). The same FLOPs as the plain
path, never recomputed (the idea of Liger Kernel's fused linear cross-entropy, here in plain
PyTorch). Matmuls run in the autocast dtype, the softmax in fp32, as the plain path under autocast
does; the weight gradient is summed over the chunks in fp32 (the plain path rounds it to bf16 once).

tests/test_chunked_loss.py checks the loss and the gradients of the hidden states and of the
(tied) head weight against the plain loss, in fp32 and under bf16 autocast.

`linear_token_logps` gives each position's log pi(target) instead of their summed cross-entropy,
for preference tuning (tasks/preference_logps.py), whose loss is a nonlinear function of per-row
sums of them (DPO's sigmoid of the margin): the gradient reaching each token is only known in
backward, so the trick above (take it in the forward) works only where it does not depend on it.
- Head frozen (LoRA/QLoRA, whose adapters sit in the body): d logp_i / d hidden_i =
  (onehot_i - softmax_i) @ W is taken in the forward, chunk by chunk, and kept (n x hidden);
  backward scales row i by its incoming gradient. The plain path's FLOPs.
- Head trained (full fine-tuning, a tied embedding): forward keeps the inputs and each position's
  log-sum-exp (n floats); backward projects the chunks again and forms g_i (onehot_i - softmax_i)
  chunk by chunk for the hidden states' and the weight's gradients: one more head projection of the
  supervised positions than the plain path (about +4% of a SmolLM2-135M step), for never holding
  the (n, vocab) fp32 logits, their log-softmax and their gradients (12 bytes per logit).
Under no_grad (the reference, evaluation) only the chunks' log-probs are made.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK = 256
PRODUCT_ROWS = 4096  # vocabulary rows per bf16 product added into the fp32 weight gradient


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    device = t.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return t.dtype


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T + bias, target_i), with the gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, dtype: torch.dtype):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        w, b = _head_in(weight, bias, dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        d_hidden = torch.empty_like(hidden) if want_h else None
        d_weight, d_bias = _head_grads(weight, bias, want_w, want_b)
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk].to(dtype)
            t = targets[s : s + chunk]
            logits = torch.nn.functional.linear(h, w, b).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if not (want_h or want_w or want_b):
                del logits  # before the next chunk's are made
                continue
            # d CE / d logits = softmax - one_hot, in place over the fp32 logits
            grad = logits.sub_(lse[:, None]).exp_()
            grad[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            _pass_back(grad.to(dtype), h, w, d_hidden[s : s + chunk] if want_h else None, d_weight, d_bias)
            del logits, grad  # before the next chunk's are made: one chunk's at a time
        ctx.save_for_backward(d_hidden, d_bias)
        ctx.d_weight = d_weight  # not saved: backward scales it in place and hands it on (once)
        ctx.weight_dtype, ctx.bias_dtype = weight.dtype, (bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        d_hidden, d_bias = ctx.saved_tensors
        d_weight = ctx.d_weight
        if d_weight is _HANDED_OVER:
            raise RuntimeError("the chunked loss (train/chunked_loss.py) gives its weight gradient once: "
                               "backward through it twice (retain_graph) is not supported")
        if d_weight is not None:
            ctx.d_weight = _HANDED_OVER
        g_h = d_hidden * grad_out.to(d_hidden.dtype) if d_hidden is not None else None
        g_w = d_weight.mul_(grad_out).to(ctx.weight_dtype) if d_weight is not None else None
        g_b = (d_bias * grad_out).to(ctx.bias_dtype) if d_bias is not None else None
        return g_h, g_w, g_b, None, None, None


_HANDED_OVER = object()


def _head_in(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
    """The head's weight and bias in the compute dtype (the chunks' projections read them)."""
    return weight.to(dtype), (bias.to(dtype) if bias is not None else None)


def _head_grads(weight: torch.Tensor, bias: torch.Tensor | None, want_w: bool, want_b: bool):
    """The fp32 accumulators the chunks' weight and bias gradients are added into (None where not wanted)."""
    d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
    d_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
    return d_weight, d_bias


def _pass_back(grad: torch.Tensor, h: torch.Tensor, w: torch.Tensor, d_hidden: torch.Tensor | None,
               d_weight: torch.Tensor | None, d_bias: torch.Tensor | None) -> None:
    """One chunk's logits gradient `grad` (compute dtype) into the hidden states' gradient (the
    chunk's slice `d_hidden`, written), the head weight's fp32 accumulator and the bias's (added)."""
    if d_hidden is not None:
        d_hidden.copy_(grad @ w)
    if d_weight is not None:
        _add_weight_grad(d_weight, grad, h)
    if d_bias is not None:
        d_bias.add_(grad.sum(0, dtype=torch.float32))


def _add_weight_grad(d_weight: torch.Tensor, grad: torch.Tensor, h: torch.Tensor) -> None:
    """d_weight (fp32) += grad.T @ h in place: one addmm in fp32; in a 16-bit dtype the product of
    `PRODUCT_ROWS` vocabulary rows at a time (torch has no CPU matmul into an fp32 output from 16-bit inputs)."""
    if grad.dtype == d_weight.dtype:
        d_weight.addmm_(grad.t(), h)
        return
    for r in range(0, d_weight.shape[0], PRODUCT_ROWS):
        d_weight[r : r + PRODUCT_ROWS].add_(grad[:, r : r + PRODUCT_ROWS].t() @ h)


class LinearTokenLogProbs(torch.autograd.Function):
    """log_softmax(hidden @ weight.T + bias)[i, target_i] per position, fp32, chunked (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, dtype: torch.dtype):
        want_h = ctx.needs_input_grad[0]
        head_trains = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
        w, b = _head_in(weight, bias, dtype)
        n = hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse_all = torch.empty(n, dtype=torch.float32, device=hidden.device) if head_trains else None
        d_hidden = torch.empty_like(hidden) if want_h and not head_trains else None
        for s in range(0, n, chunk):
            t = targets[s : s + chunk]
            logits = torch.nn.functional.linear(hidden[s : s + chunk].to(dtype), w, b).float()
            lse = torch.logsumexp(logits, dim=-1)
            out[s : s + chunk] = logits.gather(1, t[:, None]).squeeze(1) - lse
            if lse_all is not None:
                lse_all[s : s + chunk] = lse
            elif d_hidden is not None:  # d logp / d logits = onehot - softmax, in place over the fp32 logits
                grad = logits.sub_(lse[:, None]).exp_().neg_()
                grad[torch.arange(t.shape[0], device=t.device), t] += 1.0
                d_hidden[s : s + chunk] = (grad.to(dtype) @ w).to(hidden.dtype)
                del grad
            del logits  # before the next chunk's are made: one chunk's at a time
        ctx.chunk, ctx.dtype, ctx.head_trains = chunk, dtype, head_trains
        if head_trains:
            ctx.save_for_backward(hidden, weight, bias, targets, lse_all)
        else:
            ctx.save_for_backward(d_hidden)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.head_trains:
            (d_hidden,) = ctx.saved_tensors
            g_h = d_hidden * grad_out[:, None].to(d_hidden.dtype) if d_hidden is not None else None
            return g_h, None, None, None, None, None
        hidden, weight, bias, targets, lse_all = ctx.saved_tensors
        chunk, dtype = ctx.chunk, ctx.dtype
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        w, b = _head_in(weight, bias, dtype)
        g_h = torch.empty_like(hidden) if want_h else None
        d_weight, d_bias = _head_grads(weight, bias, want_w, want_b)
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk].to(dtype)
            t = targets[s : s + chunk]
            g = grad_out[s : s + chunk].float()
            logits = torch.nn.functional.linear(h, w, b).float()
            grad = logits.sub_(lse_all[s : s + chunk, None]).exp_().mul_(-g[:, None])  # g_i (onehot_i - softmax_i)
            grad[torch.arange(t.shape[0], device=t.device), t] += g
            _pass_back(grad.to(dtype), h, w, g_h[s : s + chunk] if want_h else None, d_weight, d_bias)
            del logits, grad
        g_w = d_weight.to(weight.dtype) if d_weight is not None else None
        g_b = d_bias.to(bias.dtype) if d_bias is not None else None
        return g_h, g_w, g_b, None, None, None


@torch.no_grad()
def _token_logps_no_grad(hidden, weight, bias, targets, chunk: int, dtype: torch.dtype) -> torch.Tensor:
    w, b = _head_in(weight, bias, dtype)
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for s in range(0, hidden.shape[0], chunk):
        logits = torch.nn.functional.linear(hidden[s : s + chunk].to(dtype), w, b).float()
        out[s : s + chunk] = logits.gather(1, targets[s : s + chunk, None]).squeeze(1) - torch.logsumexp(logits, -1)
        del logits
    return out


def takes_head(head) -> bool:
    """Whether the chunked loss can project with `head`: a plain Linear whose weight is an ordinary local
    tensor. Not an adapter on the head, and not a weight sharded by FSDP2 (a DTensor) or DeepSpeed ZeRO-3
    (`ds_id`), whose hooks gather it only when the head module itself is called."""
    return type(head) is torch.nn.Linear and type(head.weight.data) is torch.Tensor and not hasattr(head.weight, "ds_id")


def linear_cross_entropy(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor,
                         chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Summed cross-entropy of `head(hidden)` against `targets` (no IGNORE_INDEX inside), chunked."""
    return LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk, _compute_dtype(hidden))


def linear_token_logps(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor,
                       chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """log_softmax(head(hidden))[i, targets[i]] for every position i, fp32, `chunk` positions at a time."""
    dtype = _compute_dtype(hidden)
    if not torch.is_grad_enabled():
        return _token_logps_no_grad(hidden, head.weight, head.bias, targets, chunk, dtype)
    return LinearTokenLogProbs.apply(hidden, head.weight, head.bias, targets, chunk, dtype)


__all__ = ["DEFAULT_CHUNK", "PRODUCT_ROWS", "LinearCrossEntropy", "LinearTokenLogProbs", "linear_cross_entropy",
           "linear_token_logps", "takes_head"]
