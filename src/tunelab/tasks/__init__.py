"""Tasks plug into the one loop what differs between them: data, loss, metrics, what is saved.

Each task's setup (classification.setup_classification, causal_lm.setup_causal_lm,
preference.setup_preference) takes the config sections it reads; tunelab.compose.setup_task picks
the task and hands it those sections (no function here takes the whole Config).
"""

from tunelab.train.protocols import TaskRun, TrainSet

__all__ = ["TaskRun", "TrainSet"]
