"""train/chunked_loss.linear_token_logps: per-position log-probs in vocabulary chunks equal the plain
log-softmax, their gradients under a nonlinear upstream (DPO's) too, with the head trained (full
fine-tuning, recomputed in backward) or frozen (LoRA, taken in the forward); the preference task's
loss through it equals the plain path's on a tiny tied-embedding Llama; and its peak memory stays
far under the plain path's 12 bytes per logit."""

from __future__ import annotations

import pytest
import torch

from tunelab.train.chunked_loss import linear_token_logps

pytestmark = [pytest.mark.parity, pytest.mark.usefixtures("one_torch_thread")]


def _plain(hidden, head, targets):
    logits = torch.nn.functional.linear(hidden, head.weight, head.bias).float()
    return torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)


def _upstream(logps: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A DPO-like loss: a sigmoid of per-row sums, so each position's incoming gradient differs."""
    sums = torch.zeros(int(rows.max()) + 1, dtype=logps.dtype).index_add(0, rows, logps)
    half = sums.shape[0] // 2
    return -torch.nn.functional.logsigmoid(0.3 * (sums[:half] - sums[half:])).sum()


def _case(seed: int, n=50, h=16, v=300, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    head = torch.nn.Linear(h, v, bias=bias)
    targets = torch.randint(0, v, (n,), generator=g)
    rows = torch.sort(torch.randint(0, 4, (n,), generator=g)).values
    return hidden, head, targets, rows


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("head_trains", [True, False])
def test_logps_and_grads_equal_plain_fp32(chunk, bias, head_trains):
    hidden, head, targets, rows = _case(0, bias=bias)
    head.requires_grad_(head_trains)
    wrt = [hidden] + ([head.weight] + ([head.bias] if bias else []) if head_trains else [])
    ref = _plain(hidden, head, targets)
    ref_grads = torch.autograd.grad(_upstream(ref, rows), wrt)
    out = linear_token_logps(hidden, head, targets, chunk)
    grads = torch.autograd.grad(_upstream(out, rows), wrt)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head_trains", [True, False])
def test_bf16_autocast_close_to_plain_autocast(head_trains):
    hidden, head, targets, rows = _case(1, n=80, h=32, v=500)
    head.requires_grad_(head_trains)
    wrt = [hidden, head.weight] if head_trains else [hidden]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _plain(hidden, head, targets)
        out = linear_token_logps(hidden, head, targets, 16)
    ref_grads = torch.autograd.grad(_upstream(ref, rows), wrt)
    grads = torch.autograd.grad(_upstream(out, rows), wrt)
    assert out.dtype == torch.float32 and (out - ref).abs().max() < 2e-2
    for a, b in zip(grads, ref_grads):
        assert a.dtype == b.dtype and (a - b).norm() < 2e-2 * b.norm()


def test_no_grad_gives_the_same_logps_and_no_graph():
    hidden, head, targets, _ = _case(2)
    want = linear_token_logps(hidden, head, targets, 9)
    with torch.no_grad():
        got = linear_token_logps(hidden, head, targets, 9)
    assert got.grad_fn is None and want.grad_fn is not None
    torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)


def _tiny_tied_llama(vocab: int):
    from conftest import tiny_llama_build

    torch.manual_seed(0)
    model = tiny_llama_build(vocab)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _pair_batch(vocab: int):
    from tunelab.data.chat_template import IGNORE_INDEX, EncodedExample
    from tunelab.data.preference import EncodedPair
    from tunelab.tasks.preference import pair_batch

    g = torch.Generator().manual_seed(4)
    pairs = []
    for n_prompt, n_c, n_r in ((5, 4, 7), (3, 9, 2), (8, 3, 3)):
        prompt = torch.randint(3, vocab, (n_prompt,), generator=g).tolist()
        sides = []
        for n in (n_c, n_r):
            answer = torch.randint(3, vocab, (n,), generator=g).tolist()
            sides.append(EncodedExample(prompt + answer, [IGNORE_INDEX] * n_prompt + answer))
        pairs.append(EncodedPair(*sides, source="x.jsonl:1"))
    return pair_batch(pairs, [0, 1, 2], pad_id=0)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_preference_loss_and_every_gradient_equal_the_plain_path(method):
    """The task's DPO loss_fn with loss_chunk_tokens 5 and 0: the same loss and the same gradient on every
    trainable parameter, the tied embedding/head included (full) or the adapters (lora: the reference is
    the adapter-off forward, chunked too)."""
    from tunelab.tasks.preference import make_loss_fn
    from tunelab.train.preference_losses import PreferenceLoss

    vocab = 400
    batch = _pair_batch(vocab)
    results = []
    for chunk in (0, 5):
        model = _tiny_tied_llama(vocab)
        b = dict(batch)
        if method == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
            torch.manual_seed(1)
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.data.normal_(0, 0.3)  # a moved adapter: policy != reference
        else:
            b["ref_logps"] = torch.tensor([-20.0, -31.0, -18.5, -25.0, -9.0, -14.0])
        loss, n = make_loss_fn(PreferenceLoss("dpo", 0.5), None, chunk)(model, b)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        results.append((loss.item(), n, grads))
    (ref, n_ref, g_ref), (out, n_out, g_out) = results
    assert n_ref == n_out == 3 and out == pytest.approx(ref, rel=1e-5)
    assert g_ref and set(g_ref) == set(g_out)
    for k in g_ref:
        assert (g_out[k] - g_ref[k]).norm() <= 1e-5 * g_ref[k].norm() + 1e-9, k


@pytest.mark.parametrize("head_trains", [True, False])
def test_peak_memory_far_under_the_plain_paths(head_trains):
    """Many positions over a large vocabulary: every tensor made in forward and backward (the inputs, the
    weight and its existing .grad excluded) peaks at what plan.memory.logp_bytes plans, within 5%,
    and under a fifth of the plain path's 12 bytes per logit."""
    from live_peak import LivePeak, storages_of

    from tunelab.plan.memory import logp_bytes

    n, hidden_size, vocab, chunk = 256, 64, 8_000, 32
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(n, hidden_size, generator=g, requires_grad=True)
    head = torch.nn.Linear(hidden_size, vocab, bias=False).requires_grad_(head_trains)
    if head_trains:
        head.weight.grad = torch.zeros_like(head.weight)  # as after the first step: model states, not the loss's
    targets = torch.randint(0, vocab, (n,), generator=g)
    rows = torch.sort(torch.randint(0, 8, (n,), generator=g)).values
    kept = [hidden, head.weight, targets, rows] + ([head.weight.grad] if head_trains else [])
    tracker = LivePeak(storages_of(kept))
    with tracker:
        _upstream(linear_token_logps(hidden, head, targets, chunk), rows).backward()
    planned = logp_bytes(n, vocab, hidden_size, act_bytes=4, hidden_bytes=4, chunk=chunk, head_trains=head_trains)
    assert tracker.peak == pytest.approx(planned["peak"], rel=0.05)
    assert tracker.peak < 12 * n * vocab / 5
