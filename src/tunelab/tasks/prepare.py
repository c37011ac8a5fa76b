"""Fill the encoded-data cache (tunelab.data.cache) for a config before training starts.

Here, in tasks/, and not in data/cache.py: which encoder a config's data goes through is the task's
knowledge (tasks.lm_data for chat / causal_lm), and data/ must not import tasks/ (no package circle,
tests/test_architecture.py).
"""

from __future__ import annotations

from pathlib import Path


def prepare(cfg) -> list[Path]:
    """Encode a config's training and eval data into the cache now, so that training (every rank)
    only reads it: for a launcher or rank 0 to call before the process group starts, so no rank
    waits out a collective timeout while another tokenizes. Loads the tokenizer and the model's
    config, not its weights. Returns the entries' folders; [] when there is nothing to cache (data.cache
    false, or a task whose data is not cached). Raises InputError for bad data, as training would."""
    if not cfg.data.cache:
        return []
    if cfg.task in ("chat", "causal_lm"):
        from tunelab.tasks.lm_data import prepare_lm_data

        return prepare_lm_data(cfg)
    return []
