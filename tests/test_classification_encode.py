"""Classification encoding: truncation at max_length and the count of cut examples."""

from __future__ import annotations

from transformers import AutoTokenizer

from tunelab.data.classification import Examples
from tunelab.tasks.classification import encode
import pytest

pytestmark = pytest.mark.unit


def test_truncation_count_matches_a_whole_tokenization(tiny_bert):
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    texts = ["good", "the movie was good", "the movie was really very good fun", "bad",
             "the plot and the acting and the music and the story"]
    whole = [len(tok(t)["input_ids"]) for t in texts]
    max_length = sorted(whole)[2]  # one example exactly at the limit (kept whole), two above it (cut)
    features, truncated = encode(Examples(texts=texts, labels=[0] * len(texts)), tok, max_length)
    assert truncated == sum(n > max_length for n in whole) == 2
    assert [len(f["input_ids"]) for f in features] == [min(n, max_length) for n in whole]
    assert all(f["input_ids"][-1] == tok.sep_token_id for f in features)  # truncation keeps [SEP]


def test_truncation_count_for_text_pairs(tiny_bert):
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    texts, pairs = ["good fun", "the movie", "bad"], ["the acting was really very good", "bad", "awful"]
    whole = [len(tok(t, p)["input_ids"]) for t, p in zip(texts, pairs)]
    max_length = 6
    _, truncated = encode(Examples(texts=texts, labels=[0, 0, 0], pairs=pairs), tok, max_length)
    assert truncated == sum(n > max_length for n in whole) >= 1


def test_to_device_moves_tensors_and_keeps_the_rest():
    import torch

    from tunelab.device import to_device

    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "num_tokens": 6}
    assert to_device(batch, torch.device("cpu")) is batch  # the CPU path allocates nothing
    moved = to_device(batch, torch.device("meta"))
    assert moved["input_ids"].device.type == "meta" and moved["input_ids"].shape == (2, 3)
    assert moved["num_tokens"] == 6 and batch["input_ids"].device.type == "cpu"
