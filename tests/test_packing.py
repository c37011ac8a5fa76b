"""Packing: first-fit-decreasing bins, and packed logits equal each example's logits alone."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama_build

from tunelab.data.chat import Message
from tunelab.data.chat_template import IGNORE_INDEX, EncodedExample, encode_conversation
from tunelab.data.packing import block_causal_mask, collate_packed, collate_padded, pack


@pytest.mark.unit
def test_pack_first_fit_decreasing_known_answer():
    # sorted 5,4,3,3,2,2,1 into bins of 8: [5,3], [4,3,1], [2,2]
    assert pack([5, 4, 3, 3, 2, 2, 1], 8) == [[0, 2], [1, 3, 6], [4, 5]]


@pytest.mark.unit
def test_pack_covers_every_example_once_within_capacity():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(1, 64) for _ in range(200)]
    bins = pack(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(200))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert len(bins) <= 2 * sum(lengths) / 64 + 1  # FFD is never worse than twice the optimum


def _first_fit_decreasing_quadratic(lengths: list[int], max_length: int) -> list[list[int]]:
    """The packer as it was before the segment tree: each example, longest first (ties in order), into
    the lowest-numbered bin with room, else a new bin; the reference the fast one must equal."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins, room = [], []
    for i in order:
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_length - lengths[i])
    return bins


@pytest.mark.unit
def test_pack_equals_the_quadratic_first_fit_on_random_lengths():
    import random

    import numpy as np

    rng = random.Random(7)
    for trial in range(240):
        n, cap = rng.randint(0, 250), rng.choice([1, 3, 16, 64, 100, 512])
        draw = (lambda: rng.randint(0, cap), lambda: rng.choice([1, cap // 3 or 1, cap // 2 or 1, cap]),
                lambda: rng.randint(1, max(1, cap // 4)),
                lambda: min(cap, int(rng.expovariate(5 / cap)) + 1))[trial % 4]  # zeros, runs, small, skewed
        lengths = [draw() for _ in range(n)]
        want = _first_fit_decreasing_quadratic(lengths, cap)
        assert pack(lengths, cap) == want, (trial, cap, lengths)
        assert pack(np.asarray(lengths), cap) == want  # the tables' numpy lengths, as they come


@pytest.mark.unit
def test_pack_rejects_example_longer_than_max_length():
    with pytest.raises(ValueError, match="example 1"):
        pack([3, 9], 8)


@pytest.mark.unit
def test_block_causal_mask_values():
    m = block_causal_mask([2, 3])
    assert m.shape == (1, 1, 5, 5) and m.dtype == torch.float32
    allowed = (m[0, 0] == 0).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ]
    assert torch.isinf(m[0, 0, 2, 0]) and m[0, 0, 2, 0] < 0


def _random_examples(lengths, vocab=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append(EncodedExample(ids, [IGNORE_INDEX] + ids[1:]))
    return out


@pytest.mark.unit
def test_collate_packed_positions_and_labels():
    exs = _random_examples([3, 4])
    row = collate_packed(exs, [1, 0])
    assert row["input_ids"].shape == (1, 7)
    assert row["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert row["input_ids"][0].tolist() == exs[1].input_ids + exs[0].input_ids
    labels = row["labels"][0].tolist()
    assert labels[0] == IGNORE_INDEX and labels[4] == IGNORE_INDEX  # no target across the seam
    assert row["attention_mask"].shape == (1, 1, 7, 7)


def _alone_and_packed(model, exs, row):
    with torch.no_grad():
        packed = model(input_ids=row["input_ids"], position_ids=row["position_ids"],
                       attention_mask=row["attention_mask"]).logits[0]
        diffs, start = [], 0
        for e in exs:
            alone = model(input_ids=torch.tensor([e.input_ids])).logits[0]
            diffs.append((packed[start : start + len(e)] - alone).abs().max().item())
            start += len(e)
    return diffs


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parity
def test_packed_logits_equal_logits_alone(attn):
    model = tiny_llama_build(400, attn_implementation=attn)
    exs = _random_examples([7, 12, 5, 9], seed=1)
    row = collate_packed(exs, [0, 1, 2, 3])
    diffs = _alone_and_packed(model, exs, row)
    assert max(diffs) < 1e-4, diffs


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parity
def test_naive_packing_with_position_ids_only_differs(attn):
    """The regression this guards against: restarting position_ids without the block mask."""
    model = tiny_llama_build(400, attn_implementation=attn)
    exs = _random_examples([7, 12, 5, 9], seed=1)
    row = collate_packed(exs, [0, 1, 2, 3])
    naive = dict(row)
    naive["attention_mask"] = None
    diffs = _alone_and_packed(model, exs, naive)
    assert diffs[0] < 1e-4  # the first example sees nothing before it either way
    assert min(diffs[1:]) > 1e-3, diffs


@pytest.mark.parity
def test_packed_loss_equals_sum_of_losses_alone(tiny_chat_tokenizer):
    tok = tiny_chat_tokenizer
    model = tiny_llama_build(len(tok))
    convs = [
        [Message("user", "What is two plus two?"), Message("assistant", "Four.")],
        [Message("system", "Be brief."), Message("user", "Name a color."), Message("assistant", "Red."),
         Message("user", "Name a fruit."), Message("assistant", "Apple.")],
        [Message("user", "Translate hello to French."), Message("assistant", "Bonjour.")],
    ]
    exs = [encode_conversation(c, tok, 128) for c in convs]
    ce = torch.nn.CrossEntropyLoss(reduction="sum")

    def loss_sum(logits, labels):
        return ce(logits[0, :-1], labels[0, 1:]).item()

    with torch.no_grad():
        alone = sum(loss_sum(model(input_ids=torch.tensor([e.input_ids])).logits, torch.tensor([e.labels])) for e in exs)
        row = collate_packed(exs, pack([len(e) for e in exs], 128)[0])
        packed = loss_sum(model(input_ids=row["input_ids"], position_ids=row["position_ids"],
                                attention_mask=row["attention_mask"]).logits, row["labels"])
    assert packed == pytest.approx(alone, rel=1e-5)


@pytest.mark.parity
def test_collate_padded_shapes_and_logits():
    model = tiny_llama_build(400)
    exs = _random_examples([4, 9, 6], seed=2)
    batch = collate_padded(exs, [0, 1, 2], pad_id=0)
    assert batch["input_ids"].shape == (3, 9)
    assert batch["labels"][0].tolist()[4:] == [IGNORE_INDEX] * 5
    assert batch["input_ids"][0].tolist()[4:] == [0] * 5
    assert batch["attention_mask"].tolist()[0] == [1] * 4 + [0] * 5
    with torch.no_grad():
        padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        alone = model(input_ids=torch.tensor([exs[0].input_ids])).logits[0]
    assert (padded[0, :4] - alone).abs().max().item() < 1e-4
