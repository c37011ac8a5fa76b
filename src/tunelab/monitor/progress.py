"""Progress: a rich bar with ETA on a terminal, plain log lines otherwise (CI, files, pipes)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total_steps: int, start_step: int = 0, enabled: bool = True, stream=None):
        self.total = total_steps
        self.stream = stream or sys.stderr
        self.tty = enabled and self.stream.isatty()
        self.enabled = enabled
        self._bar = None
        self._start = time.monotonic()
        self._start_step = start_step
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn
            from rich.progress import TimeElapsedColumn, TimeRemainingColumn

            self._bar = RichProgress(
                TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("train", total=total_steps, completed=start_step, info="")

    def eta_seconds(self, step: int) -> float | None:
        done = step - self._start_step
        if done <= 0:
            return None
        return (time.monotonic() - self._start) / done * (self.total - step)

    def update(self, step: int, row: dict | None = None) -> None:
        if not self.enabled:
            return
        info = ""
        if row:
            info = " ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k in ("loss", "lr", "grad_norm") or k.startswith("eval_"))
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        elif row is not None:
            eta = self.eta_seconds(step)
            eta_s = f" eta {eta:.0f}s" if eta is not None else ""
            print(f"step {step}/{self.total}{eta_s} {info}", file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(text)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
