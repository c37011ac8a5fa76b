"""train/chunked_loss.py: the chunked linear cross-entropy equals the plain loss, its gradients too."""

from __future__ import annotations

import pytest
import torch

from tunelab.tasks.lm_speed import chunked_supervised_loss
from tunelab.train.chunked_loss import linear_cross_entropy

pytestmark = [pytest.mark.parity, pytest.mark.usefixtures("one_torch_thread")]


def _plain(hidden, weight, bias, targets):
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_loss_and_grads_equal_plain_fp32(chunk, bias):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 16, generator=g, requires_grad=True)
    head = torch.nn.Linear(16, 300, bias=bias)
    targets = torch.randint(0, 300, (50,), generator=g)
    ref = _plain(hidden, head.weight, head.bias, targets)
    ref_grads = torch.autograd.grad(ref * 0.37, [hidden, head.weight] + ([head.bias] if bias else []))
    out = linear_cross_entropy(hidden, head, targets, chunk)
    grads = torch.autograd.grad(out * 0.37, [hidden, head.weight] + ([head.bias] if bias else []))
    assert torch.allclose(out, ref, rtol=1e-6, atol=1e-4)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_close_to_plain_autocast():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(80, 32, generator=g, requires_grad=True)
    head = torch.nn.Linear(32, 500, bias=False)
    targets = torch.randint(0, 500, (80,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _plain(hidden, head.weight, None, targets)
        out = linear_cross_entropy(hidden, head, targets, 16)
    (gh_ref, gw_ref) = torch.autograd.grad(ref, [hidden, head.weight])
    (gh, gw) = torch.autograd.grad(out, [hidden, head.weight])
    assert out.dtype == torch.float32 and abs(out.item() - ref.item()) < 1e-3 * abs(ref.item())
    for a, b in ((gh, gh_ref), (gw, gw_ref)):
        assert a.dtype == b.dtype and (a - b).norm() < 1e-2 * b.norm()


def test_frozen_head_gets_no_gradient_and_hidden_still_does():
    hidden = torch.randn(10, 8, requires_grad=True)
    head = torch.nn.Linear(8, 20, bias=False).requires_grad_(False)
    targets = torch.randint(0, 20, (10,))
    out = linear_cross_entropy(hidden, head, targets, 3)
    out.backward()
    assert head.weight.grad is None
    (gh,) = torch.autograd.grad(_plain(hidden, head.weight, None, targets), [hidden])
    assert torch.allclose(hidden.grad, gh, rtol=1e-5, atol=1e-6)


def test_task_loss_and_tied_weight_grads_equal_supervised_loss():
    """On a tiny Llama with tied embeddings: the chunked task loss gives supervised_loss's value and
    the same gradient on every parameter (the tied embedding/head included), packed rows as batch."""
    from conftest import tiny_llama_build

    from tunelab.data.chat_template import IGNORE_INDEX, EncodedExample
    from tunelab.data.packing import collate_packed, stack_rows
    from tunelab.evaluate.lm import supervised_loss

    g = torch.Generator().manual_seed(2)
    exs = []
    for n in (9, 14, 6, 11):
        ids = torch.randint(3, 400, (n,), generator=g).tolist()
        exs.append(EncodedExample(ids, [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]))
    batch = stack_rows([collate_packed(exs, [0, 1]), collate_packed(exs, [2, 3])], pad_id=0)
    grads = []
    for fn in (supervised_loss, chunked_supervised_loss(5)):
        model = tiny_llama_build(400)
        model.config.tie_word_embeddings = True
        model.tie_weights()
        assert model.lm_head.weight is model.model.embed_tokens.weight
        loss, n = fn(model, batch)
        (loss / n).backward()
        grads.append((loss.item(), n, {k: p.grad.clone() for k, p in model.named_parameters()}))
    (ref, n_ref, g_ref), (out, n_out, g_out) = grads
    assert n_ref == n_out and out == pytest.approx(ref, rel=1e-6)
    for k in g_ref:
        assert (g_out[k] - g_ref[k]).norm() <= 1e-5 * g_ref[k].norm() + 1e-9, k


@pytest.mark.parametrize("amp", [False, True])
def test_peak_memory_is_the_planned_one_four_bytes_per_head_weight(amp):
    """A large head over few tokens, so the head's weight gradient dominates: the loss's measured peak
    (every tensor made in forward and backward, the weight and its existing .grad excluded) is what
    plan.memory.loss_bytes plans, within 5%, and per head weight under 6 bytes in fp32 (the fp32
    accumulator and one chunk's logits; a whole product beside it made it 8.5 before) and under 8 with
    bf16 autocast (plus the weight's bf16 cast; the whole bf16 product and its fp32 copy made it 12.2);
    the gradients still equal the plain path's."""
    from live_peak import LivePeak, storages_of

    from tunelab.plan.memory import loss_bytes

    n, hidden_size, vocab, chunk = 48, 128, 20_000, 16
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(n, hidden_size, generator=g, requires_grad=True)
    head = torch.nn.Linear(hidden_size, vocab, bias=False)
    head.weight.grad = torch.zeros_like(head.weight)  # as after the first step: model states, not the loss's
    targets = torch.randint(0, vocab, (n,), generator=g)
    tracker = LivePeak(storages_of([hidden, head.weight, head.weight.grad, targets]))
    context = torch.autocast("cpu", dtype=torch.bfloat16) if amp else torch.autocast("cpu", enabled=False)
    with tracker:
        with context:
            out = linear_cross_entropy(hidden, head, targets, chunk)
        out.backward()
    weights = vocab * hidden_size
    planned = loss_bytes(n, vocab, hidden_size, act_bytes=2 if amp else 4, hidden_bytes=4, chunk=chunk)["peak"]
    planned -= n * hidden_size * 4  # the input, made outside the tracker
    assert tracker.peak == pytest.approx(planned, rel=0.05)
    assert tracker.peak < (8 if amp else 6) * weights
    ref = _plain(hidden.detach(), head.weight.detach().requires_grad_(), None, targets)
    with context:
        ref_w = torch.autograd.grad(_plain(hidden, head.weight, None, targets), [head.weight])[0]
    assert (head.weight.grad - ref_w).norm() < (1e-2 if amp else 1e-5) * ref_w.norm()
    assert ref.item() == pytest.approx(out.item(), rel=1e-3)


def test_a_second_backward_is_refused_not_wrong():
    hidden = torch.randn(6, 8, requires_grad=True)
    head = torch.nn.Linear(8, 20, bias=False)
    out = linear_cross_entropy(hidden, head, torch.randint(0, 20, (6,)), 4)
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        out.backward()
