"""Fill the encoded-data cache (tunelab.data.cache) for a config before training starts.

Here, in tasks/, and not in data/cache.py: which encoder a config's data goes through is the task's
knowledge (tasks.lm_data for chat / causal_lm, tasks.classification_data, tasks.preference_data),
and data/ must not import tasks/ (no package circle, tests/test_architecture.py).
"""

from __future__ import annotations

from pathlib import Path


def prepare(*, task: str, model_cfg, data_cfg, replay_data: str | None = None, replay_ratio: float = 0.0,
            max_prompt_length: int | None = None) -> list[Path]:
    """Encode a config's training and eval data into the cache now, so that training (every rank)
    only reads it: for a launcher or rank 0 to call before the process group starts, so no rank
    waits out a collective timeout while another tokenizes. Loads the tokenizer and the model's
    config, not its weights (a preference run starting from a tunelab LoRA run loads that run: its
    tokenizer is the run's). Returns the encoded entries' folders; [] when there is nothing to cache
    (data.cache false). Raises InputError for bad data, as training would.

    The config's parts it reads (tunelab.compose.prepare_data hands them over): the task, the model
    and data sections, regularization's replay_data / replay_ratio, preference.max_prompt_length."""
    if not data_cfg.cache:
        return []
    if task in ("chat", "causal_lm"):
        from tunelab.tasks.lm_data import prepare_lm_data

        return prepare_lm_data(task=task, model_cfg=model_cfg, data_cfg=data_cfg, replay_data=replay_data,
                               replay_ratio=replay_ratio)
    from tunelab.train.sizes import usable_max_length

    if task == "classification":
        from transformers import AutoConfig

        from tunelab.models.load import load_tokenizer
        from tunelab.models.registry import resolve_model
        from tunelab.tasks.classification_data import check_classification_data, prepare_classification_data

        m = model_cfg
        check_classification_data(data_cfg, replay_data=replay_data, replay_ratio=replay_ratio)  # before the model
        source = resolve_model(m.name)
        tokenizer = load_tokenizer(source, trust_remote_code=m.trust_remote_code, revision=m.revision)
        config = AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file,
                                            trust_remote_code=m.trust_remote_code, revision=m.revision)
        return prepare_classification_data(data_cfg, tokenizer, usable_max_length(m.max_length, config),
                                           replay_data=replay_data, replay_ratio=replay_ratio)
    if task == "preference":
        from tunelab.tasks.preference import policy_tokenizer
        from tunelab.tasks.preference_data import check_preference_data, prepare_preference_data

        check_preference_data(data_cfg)  # before the model
        tokenizer, config = policy_tokenizer(model_cfg)
        return prepare_preference_data(data_cfg, tokenizer, usable_max_length(model_cfg.max_length, config),
                                       max_prompt_length)
    return []
