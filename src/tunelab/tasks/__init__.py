"""Tasks plug into the one loop what differs between them: data, loss, metrics, what is saved."""

from tunelab.train.protocols import TaskRun, TrainSet


def setup_task(cfg) -> TaskRun:
    if cfg.task == "classification":
        from tunelab.tasks.classification import setup_classification

        return setup_classification(cfg)
    if cfg.task in ("causal_lm", "chat"):
        from tunelab.tasks.causal_lm import setup_causal_lm

        return setup_causal_lm(cfg)
    if cfg.task == "preference":
        from tunelab.tasks.preference import setup_preference

        return setup_preference(cfg)
    raise ValueError(f"unknown task {cfg.task!r}")


__all__ = ["TaskRun", "TrainSet", "setup_task"]
