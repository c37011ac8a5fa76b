"""A measured peak of tensor memory on real tensors (tracemalloc does not see torch's allocations,
and the CPU allocator keeps no statistics): a dispatch mode that counts each storage made under it
while it is alive."""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LivePeak(TorchDispatchMode):
    """The most bytes alive at once in tensors made under this mode (each storage once; `exclude`d
    storages, the parameters and their gradients, never counted): a measured peak on real tensors."""

    def __init__(self, exclude: set):
        super().__init__()
        self.exclude, self.live, self.now, self.peak = exclude, {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.now -= self.live.pop(key)[1]
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage._cdata not in self.live and storage._cdata not in self.exclude:
                    self.live[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
                    self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)
        return out


def storages_of(tensors) -> set:
    """The storage keys of `tensors` (None skipped), for LivePeak's `exclude`."""
    return {t.untyped_storage()._cdata for t in tensors if t is not None}
