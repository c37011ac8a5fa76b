"""Fill the encoded-data cache (tunelab.data.cache) for a config before training starts.

Here, in tasks/, and not in data/cache.py: which encoder a config's data goes through is the task's
knowledge (tasks.lm_data for chat / causal_lm), and data/ must not import tasks/ (no package circle,
tests/test_architecture.py).
"""

from __future__ import annotations

from pathlib import Path


def prepare(*, task: str, model_cfg, data_cfg, replay_data: str | None = None, replay_ratio: float = 0.0) -> list[Path]:
    """Encode a config's training and eval data into the cache now, so that training (every rank)
    only reads it: for a launcher or rank 0 to call before the process group starts, so no rank
    waits out a collective timeout while another tokenizes. Loads the tokenizer and the model's
    config, not its weights. Returns the entries' folders; [] when there is nothing to cache (data.cache
    false, or a task whose data is not cached). Raises InputError for bad data, as training would.

    The config's parts it reads (tunelab.compose.prepare_data hands them over): the task, the model
    and data sections, regularization's replay_data / replay_ratio."""
    if not data_cfg.cache:
        return []
    if task in ("chat", "causal_lm"):
        from tunelab.tasks.lm_data import prepare_lm_data

        return prepare_lm_data(task=task, model_cfg=model_cfg, data_cfg=data_cfg, replay_data=replay_data,
                               replay_ratio=replay_ratio)
    return []
