"""Where the whole Config is split into the sections each function below takes (run.py's level).

DESIGN: config keys map one to one onto the arguments of the functions they configure. The
entries (run.py, cli*.py, api.py, the planner, config.py, defaults.py, this module) see the whole
Config; below them (tasks/, train/, data/, models/, evaluate/, distributed/, monitor/,
analysis/, export/) every function takes the sections it reads (cfg.data, cfg.train, ...) or
the keys themselves (tests/test_architecture.py holds that).

A task's setup is its own small composition (model, data, loss, evaluation, saver) and reads
six to eight sections, so the decision which sections each task gets is made here, once, for
run.py, the tests and the launchers: a setup's signature then says what it depends on. The
user's checkpoint.metric / mode are applied here over the task's own default metric.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from tunelab.config import Config
from tunelab.errors import InputError
from tunelab.train.protocols import TaskRun


@contextmanager
def _logs_held_until_done():
    """tunelab's log records held back while a task's data and model are set up, then replayed in order;
    dropped when the setup ends in bad input. A bad row is often found only after good sources were read
    and encoded, each logged ('encoded data cached in ...', truncation warnings); the bad input's one-line
    error must still be the only line on stderr (DESIGN: exit 2, one line naming file, line and field)."""
    logger = logging.getLogger("tunelab")
    held: list[logging.LogRecord] = []

    class Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            held.append(record)

    hold, propagate = Hold(), logger.propagate
    saved, logger.handlers, logger.propagate = logger.handlers, [hold], False
    try:
        yield
    except InputError:
        held.clear()
        raise
    finally:
        logger.handlers, logger.propagate = saved, propagate
        for record in held:
            logger.handle(record)


def _replay(cfg: Config) -> dict:
    """regularization's replay file and its share of each epoch, as the data readers take them."""
    return {"replay_data": cfg.regularization.replay_data, "replay_ratio": cfg.regularization.replay_ratio}


def setup_task(cfg: Config) -> TaskRun:
    """The task's TaskRun (model, data, loss, evaluation, saver), each setup given the sections it reads."""
    with _logs_held_until_done():
        return _setup_task(cfg)


def _setup_task(cfg: Config) -> TaskRun:
    from tunelab.models.quantization import quantization_for

    sections = {"model_cfg": cfg.model, "data_cfg": cfg.data, "train_cfg": cfg.train}
    if cfg.task == "classification":
        from tunelab.tasks.classification import setup_classification

        task = setup_classification(**sections, **_replay(cfg),
                                    quantization=quantization_for(cfg.method, cfg.distributed.strategy))
    elif cfg.task in ("causal_lm", "chat"):
        from tunelab.tasks.causal_lm import setup_causal_lm

        task = setup_causal_lm(task=cfg.task, generate_cfg=cfg.eval.generate, **sections, **_replay(cfg),
                               quantization=quantization_for(cfg.method, cfg.distributed.strategy))
    elif cfg.task == "preference":
        from tunelab.tasks.preference import setup_preference

        task = setup_preference(preference_cfg=cfg.preference, method=cfg.method, **sections)
    else:
        raise ValueError(f"unknown task {cfg.task!r}")
    return replace(task, metric=cfg.checkpoint.metric or task.metric, mode=cfg.checkpoint.mode or task.mode)


def prepare_data(cfg: Config) -> list[Path]:
    """The config's data into the encoded-data cache before training (tunelab.tasks.prepare.prepare)."""
    from tunelab.tasks.prepare import prepare

    with _logs_held_until_done():
        return prepare(task=cfg.task, model_cfg=cfg.model, data_cfg=cfg.data, **_replay(cfg),
                       max_prompt_length=cfg.preference.max_prompt_length)


def check_distributed(cfg: Config, world_size: int) -> None:
    """The options that do not work with `world_size` processes yet, refused at load time
    (tunelab.distributed.check_supported)."""
    from tunelab.distributed import check_supported

    check_supported(world_size, strategy=cfg.distributed.strategy, task=cfg.task, method=cfg.method, train=cfg.train,
                    regularization=cfg.regularization, final=cfg.checkpoint.final, unfreeze_every=cfg.unfreeze.every)


def starting_lr(cfg: Config, sharded: bool, precision: str) -> float:
    """optim.lr, or under `auto` the default the config would get without it (train.lr_find.starting_lr)."""
    from tunelab.defaults import default_lr
    from tunelab.train.lr_find import starting_lr as start

    return start(cfg.optim.lr, sharded, precision, strategy=cfg.distributed.strategy, default=lambda: default_lr(cfg))


def lr_fingerprint(cfg: Config, precision: str) -> str:
    """What a learning-rate range test of this config depends on (train.lr_find.fingerprint)."""
    from tunelab.train.lr_find import fingerprint

    return fingerprint(precision, task=cfg.task, method=cfg.method, model_cfg=cfg.model, data_cfg=cfg.data,
                       optim_cfg=cfg.optim, train_cfg=cfg.train, lora_cfg=cfg.lora, freeze_cfg=cfg.freeze,
                       unfreeze_cfg=cfg.unfreeze)


__all__ = ["setup_task", "prepare_data", "check_distributed", "starting_lr", "lr_fingerprint"]
