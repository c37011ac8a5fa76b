"""Batches: the order of examples in each epoch, and padding a batch into tensors.

We do not use `torch.utils.data.DataLoader` with a shuffling sampler because its position inside
an epoch cannot be saved. Here the order of epoch `e` is a pure function of (seed, e), so a
checkpoint only needs the epoch and the number of batches already consumed, and a resumed run sees
exactly the batches the uninterrupted run would have seen.

Batches are grouped by length (shuffle, cut into pools of `pool_batches` batches, sort each pool
by length, shuffle the batch order): examples of similar length share a batch, so dynamic padding
wastes little compute, while the order stays random from epoch to epoch.
"""

from __future__ import annotations

import torch


def epoch_batches(
    lengths: list[int],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    group_by_length: bool = True,
    pool_batches: int = 50,
    subset: list[int] | None = None,
) -> list[list[int]]:
    """The batches (lists of example indices) of one epoch; deterministic in (seed, epoch).

    `subset`: the example indices that take part in this epoch (default all), e.g. the training
    examples plus this epoch's share of replay examples.
    """
    members = list(range(len(lengths))) if subset is None else list(subset)
    n = len(members)
    if not shuffle:
        return [members[i : i + batch_size] for i in range(0, n, batch_size)]
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = [members[i] for i in torch.randperm(n, generator=g).tolist()]
    if group_by_length:
        pool = batch_size * pool_batches
        grouped = []
        for start in range(0, n, pool):
            chunk = order[start : start + pool]
            chunk.sort(key=lambda i: lengths[i], reverse=True)
            grouped += chunk
        order = grouped
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if group_by_length:
        perm = torch.randperm(len(batches), generator=g).tolist()
        batches = [batches[i] for i in perm]
    return batches


def pad_batch(features: list[dict[str, list[int]]], pad_id: int, labels: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Right-pad token lists to the longest in the batch; attention_mask marks real tokens."""
    width = max(len(f["input_ids"]) for f in features)
    out: dict[str, torch.Tensor] = {}
    for key in features[0]:
        fill = pad_id if key == "input_ids" else 0
        out[key] = torch.tensor([f[key] + [fill] * (width - len(f[key])) for f in features], dtype=torch.long)
    if "attention_mask" not in out:
        out["attention_mask"] = torch.tensor(
            [[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"])) for f in features], dtype=torch.long
        )
    if labels is not None:
        out["labels"] = torch.tensor(labels, dtype=torch.long)
    return out


def replay_schedule(n_train: int, n_replay: int, ratio: float, seed: int):
    """Which examples take part in each epoch when replay data is mixed in at `ratio`.

    Training examples are indices [0, n_train), replay examples [n_train, n_train + n_replay).
    Each epoch uses every training example plus k = round(ratio / (1 - ratio) * n_train) replay
    examples, so replay makes up `ratio` of the epoch; they are drawn without replacement and
    cycle through the whole replay set across epochs. Deterministic in (seed, epoch). This is the
    two-source case of weighted mixing (data.mixing): [train weight 1 - ratio, replay weight ratio].
    """
    from tunelab.data.mixing import mix_schedule

    subset, size, _ = mix_schedule([n_train, n_replay], [1 - ratio, ratio], seed)
    return subset, size
