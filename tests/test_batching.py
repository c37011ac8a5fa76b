"""Epoch order: deterministic in (seed, epoch), a permutation, grouped by length; padding."""

from tunelab.data.batching import epoch_batches, pad_batch
import pytest

pytestmark = pytest.mark.unit


def test_epoch_order_is_a_deterministic_permutation():
    lengths = [(i * 7) % 23 + 1 for i in range(200)]
    a = epoch_batches(lengths, 8, seed=1, epoch=0)
    assert a == epoch_batches(lengths, 8, seed=1, epoch=0)
    assert a != epoch_batches(lengths, 8, seed=1, epoch=1)
    assert a != epoch_batches(lengths, 8, seed=2, epoch=0)
    flat = [i for b in a for i in b]
    assert sorted(flat) == list(range(200))
    assert all(len(b) == 8 for b in a)


def test_length_grouping_reduces_padding():
    lengths = [(i * 37) % 64 + 1 for i in range(1000)]

    def padded(batches):
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    grouped = epoch_batches(lengths, 16, seed=0, epoch=0, group_by_length=True)
    plain = epoch_batches(lengths, 16, seed=0, epoch=0, group_by_length=False)
    assert padded(grouped) < 0.8 * padded(plain)


def test_pad_batch():
    b = pad_batch([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}], pad_id=0, labels=[1, 0])
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [1, 0]


def test_replay_schedule_mixes_the_ratio_and_cycles_through_replay():
    from tunelab.data.batching import replay_schedule

    subset, size = replay_schedule(n_train=60, n_replay=50, ratio=0.25, seed=0)
    assert size == 80  # 20 replay = 25% of the epoch
    seen = set()
    for epoch in range(5):
        s = subset(epoch)
        assert len(s) == 80 and s[:60] == list(range(60))
        replay = s[60:]
        assert all(60 <= i < 110 for i in replay) and len(set(replay)) == 20
        seen |= set(replay)
    assert seen == set(range(60, 110))  # 100 draws over 5 epochs visit all 50
    assert subset(3) == replay_schedule(60, 50, 0.25, seed=0)[0](3)
    batches = epoch_batches([5] * 110, 8, seed=0, epoch=0, subset=subset(0))
    assert sorted(i for b in batches for i in b) == sorted(subset(0))
