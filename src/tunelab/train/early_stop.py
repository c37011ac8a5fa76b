"""Best-metric tracking and early stopping, with state that goes into every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class BestTracker:
    """Counts evaluations without an improvement of at least `min_delta` over the best so far."""

    metric: str
    mode: str = "max"
    min_delta: float = 0.001
    patience: int = 3
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0

    def update(self, value: float, step: int) -> bool:
        """Record an evaluation; True when it is a new best."""
        if self.best is None:
            improved = True
        elif self.mode == "max":
            improved = value > self.best + self.min_delta
        else:
            improved = value < self.best - self.min_delta
        if improved:
            self.best, self.best_step, self.bad_evals = value, step, 0
        else:
            self.bad_evals += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.bad_evals >= self.patience

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
