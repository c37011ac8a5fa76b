"""Batched generation against one-at-a-time generation, and hand-biased tiny models that loop, never
stop or leak template tokens, caught by the measures and the health events."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama_build
from tunelab.config import GenerateEvalConfig
from tunelab.evaluate.generate import generate_reply
from tunelab.evaluate.generation import (GenerationEval, Prompt, generate_replies,
                                         prompts_from_chat_data, template_markers)
from tunelab.monitor.health import HealthMonitor

PROMPTS = [Prompt(messages=[{"role": "user", "content": c}], reference=r) for c, r in [
    ("What is two plus two?", "Four."), ("Name a color.", "Red."),
    ("Write a short poem about the sea.", "The sea is blue and wide."), ("Translate hello to French.", "Bonjour.")]]


@pytest.fixture(scope="module")
def tiny(tiny_chat_tokenizer):
    return tiny_llama_build(len(tiny_chat_tokenizer), seed=3), tiny_chat_tokenizer


def biased(model, token_id: int):
    """The model with a huge logit added to one token: greedy emits it forever."""
    bias = torch.zeros(model.config.vocab_size)
    bias[token_id] = 1e4
    return model.lm_head.register_forward_hook(lambda m, i, out: out + bias)


@pytest.mark.unit
def test_batched_greedy_equals_one_at_a_time(tiny):
    model, tok = tiny
    batched = generate_replies(model, tok, PROMPTS, max_new_tokens=6, batch_size=4)
    for p, b in zip(PROMPTS, batched):
        single = generate_reply(model, tok, p.messages, max_new_tokens=6)
        assert b["reply"] == single["reply"]
        assert b["stopped"] == (single["stopped"] == "end_of_turn")


@pytest.mark.unit
def test_sampling_is_seeded_and_leaves_the_rng_alone(tiny):
    model, tok = tiny
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = generate_replies(model, tok, PROMPTS, max_new_tokens=6, temperature=1.0, seed=5)
    assert torch.equal(torch.rand(3), expected)  # generating consumed nothing of the global stream
    b = generate_replies(model, tok, PROMPTS, max_new_tokens=6, temperature=1.0, seed=5)
    c = generate_replies(model, tok, PROMPTS, max_new_tokens=6, temperature=1.0, seed=6)
    assert [r["reply"] for r in a] == [r["reply"] for r in b]
    assert [r["reply"] for r in a] != [r["reply"] for r in c]


@pytest.mark.unit
def test_template_markers_of_chatml(tiny_chat_tokenizer):
    m = template_markers(tiny_chat_tokenizer)
    assert {"<|im_start|>", "<|im_end|>", "<|im_start|>user", "<|im_start|>assistant"} <= set(m)


def _events(gen: GenerationEval, result: dict) -> set[str]:
    mon = HealthMonitor()
    row = {"step": 5, **{f"eval_{k}": v for k, v in gen.flat(result).items()}}
    return {e.kind for e in mon.observe(row)}


@pytest.mark.unit
def test_a_looping_model_never_stops_collapses_and_repeats(tiny):
    model, tok = tiny
    word = tok(" sea", add_special_tokens=False)["input_ids"]
    assert len(word) == 1
    gen = GenerationEval(tok, PROMPTS, GenerateEvalConfig(n=4, max_new_tokens=12, temperature=0.7, batch_size=2))
    handle = biased(model, word[0])
    try:
        result = gen(model, "after")
    finally:
        handle.remove()
    g = result["greedy"]
    assert g["stop_rate"] == 0.0 and g["length_mean"] == 12
    assert g["loop_rate"] == 1.0 and g["repeated_4gram_share"] == pytest.approx(8 / 9)  # 12 x "sea": 9 4-grams, 1 distinct
    assert g["cross_similarity"] == 1.0 and g["distinct_1"] == pytest.approx(1 / 12)
    assert result["replies"]["greedy"][0] == " ".join(["sea"] * 12)
    assert {"never_stops", "mode_collapse", "repetition"} <= _events(gen, result)


@pytest.mark.unit
def test_a_model_that_emits_role_markers_leaks(tiny):
    model, tok = tiny
    start = tok.convert_tokens_to_ids("<|im_start|>")
    gen = GenerationEval(tok, PROMPTS, GenerateEvalConfig(n=4, max_new_tokens=3, batch_size=4))
    handle = biased(model, start)
    try:
        result = gen(model, "after")
    finally:
        handle.remove()
    assert result["greedy"]["leakage_rate"] == 1.0
    assert result["greedy"]["leaked_markers"]["<|im_start|>"] == 4
    assert "template_leakage" in _events(gen, result)


@pytest.mark.unit
def test_a_model_that_stops_at_once_is_healthy_on_stopping(tiny):
    model, tok = tiny
    gen = GenerationEval(tok, PROMPTS, GenerateEvalConfig(n=4, max_new_tokens=5, batch_size=4))
    handle = biased(model, tok.convert_tokens_to_ids("<|im_end|>"))
    try:
        result = gen(model, "after")
    finally:
        handle.remove()
    assert result["greedy"]["stop_rate"] == 1.0 and result["greedy"]["length_mean"] == 0
    assert result["greedy"]["leakage_rate"] == 0.0  # the stop token itself is cut, not a leak
    assert "never_stops" not in _events(gen, result)


@pytest.mark.unit
def test_prompts_from_conversations_and_texts():
    from tunelab.data.chat import ChatData, Message

    conv = [Message("user", "q1"), Message("assistant", "a1"), Message("user", "q2"), Message("assistant", "a2")]
    p = prompts_from_chat_data(ChatData("conversations", conversations=[conv], sources=["f:1"]), 5)
    assert p[0].messages == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                             {"role": "user", "content": "q2"}]
    assert p[0].reference == "a2" and p[0].shown() == "q2"
    t = prompts_from_chat_data(ChatData("text", texts=["one two three four five"], sources=["f:1"]), 5)
    assert t[0].text == "one two" and t[0].reference == "three four five"
