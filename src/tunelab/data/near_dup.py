"""Near-duplicate texts: MinHash signatures over word shingles, banded into buckets (LSH), and
the exact Jaccard similarity of the shingle sets checked for every candidate pair.

Deterministic by construction: shingles are hashed with blake2b (Python's `hash` is salted per
process) and the hash family comes from `random.Random(seed)`. MinHash only proposes candidates;
the decision is the exact Jaccard, so the result does not depend on the seed except in the
vanishing chance that a qualifying pair shares no band. The band width is chosen per threshold so
that a pair exactly at the threshold is missed with probability below 1e-6 for any threshold
above 0.11 (`rows_per_band`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from hashlib import blake2b

import numpy as np

from tunelab.data.curate import normalize_text

PRIME = (1 << 61) - 1
NUM_PERM = 128
MAX_MISS = 1e-6


def shingles(text: str, n: int = 3) -> set[int]:
    """32-bit hashes of the word n-grams of the normalised text (a shorter text is one shingle)."""
    words = normalize_text(text).split()
    if not words:
        return set()
    grams = [words[i : i + n] for i in range(max(1, len(words) - n + 1))]
    return {int.from_bytes(blake2b(" ".join(g).encode(), digest_size=4).digest(), "little") for g in grams}


def jaccard(a: set[int], b: set[int]) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


def rows_per_band(threshold: float) -> int:
    """The widest band (fewest candidate pairs) whose chance of missing a pair at Jaccard
    `threshold`, (1 - t**r) ** (NUM_PERM / r), stays below MAX_MISS."""
    for r in (8, 4, 2):
        if (1 - threshold**r) ** (NUM_PERM // r) < MAX_MISS:
            return r
    return 1


def signature(shingle_set: set[int], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """MinHash signature: for each (a, b), the minimum of (a*x + b) mod p over the shingles x.
    x, a and b are below 2**32, so a*x + b stays below 2**64 and uint64 arithmetic is exact."""
    x = np.fromiter(shingle_set, dtype=np.uint64, count=len(shingle_set))
    return ((np.outer(x, a) + b) % np.uint64(PRIME)).min(axis=0)


def near_duplicates(texts: Sequence[str], threshold: float, *, seed: int = 0, n: int = 3) -> dict[int, int]:
    """Texts whose word-shingle Jaccard with an earlier kept text is >= threshold:
    {index: index of the earlier text}. Earlier texts win; a dropped text is never matched again,
    so a chain a~b~c with a and c far apart keeps a and c."""
    if not 0 < threshold <= 1:
        raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
    rng = random.Random(seed)
    a = np.array([rng.randrange(1, 1 << 32) for _ in range(NUM_PERM)], dtype=np.uint64)
    b = np.array([rng.randrange(0, 1 << 32) for _ in range(NUM_PERM)], dtype=np.uint64)
    width = rows_per_band(threshold)
    buckets: dict[tuple[int, bytes], list[int]] = {}
    sets: list[set[int]] = []
    found: dict[int, int] = {}
    for i, text in enumerate(texts):
        s = shingles(text, n)
        sets.append(s)
        if not s:
            continue
        sig = signature(s, a, b)
        bands = [(k, sig[k * width : (k + 1) * width].tobytes()) for k in range(NUM_PERM // width)]
        candidates = sorted({j for band in bands for j in buckets.get(band, ())})
        match = next((j for j in candidates if jaccard(s, sets[j]) >= threshold), None)
        if match is not None:
            found[i] = match
            continue
        for band in bands:
            buckets.setdefault(band, []).append(i)
    return found
