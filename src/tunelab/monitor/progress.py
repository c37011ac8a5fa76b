"""What a person sees while training: a header, then a live display on a terminal, or one plain line
per logged step when the output is a pipe, a file or CI.

The live display (rich's `Live`, redrawn twice a second) keeps three lines, each cut to the
terminal's width so nothing wraps and tears the display:

    step 12/500 ━━━━━━━╸────────  2%  0:01:23 elapsed  eta 1:02:11  6.9 s/step
    loss 2.3456  lr 2.00e-05  grad_norm 0.871
    eval @ step 10  loss 1.2345  accuracy 0.9100  macro_f1 0.9012

Step/total, elapsed and ETA come first and are the last things dropped on a narrow terminal (then
s/step, then the bar). The ETA is tunelab's own estimate, the loop's mean seconds per optimizer
step (evaluations and checkpoints included, as they recur) times the steps left; it exists from the
first finished step on, because the loop reports every step (`step_done`), not only logged ones.

Warnings never tear the display: tunelab's own log lines are printed above it (the stream handlers
are pointed at rich's proxy while it runs), and library noise (Python warnings, transformers / peft /
bitsandbytes / accelerate loggers) goes to `RUN/warnings.log`, announced once on the display.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from pathlib import Path

LIBRARY_LOGGERS = ("py.warnings", "transformers", "peft", "bitsandbytes", "accelerate", "huggingface_hub", "torch",
                   "DeepSpeed", "datasets", "absl", "rouge_score", "sacrebleu")
TRAIN_KEYS = ("loss", "lr", "grad_norm")


def clock(seconds: float | None) -> str:
    """0:01:23 / 1:02:11 / 2d 3:04:05; '--:--' when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "--:--"
    s = int(round(max(0.0, seconds)))
    days, s = divmod(s, 86400)
    text = f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return f"{days}d {text}" if days else text


def fmt_value(key: str, v) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if key == "lr" or key.endswith("_lr"):
        return f"{v:.2e}"
    if isinstance(v, int):
        return str(v)
    return f"{v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3g}"


def train_text(row: dict) -> str:
    return "  ".join(f"{k} {fmt_value(k, row[k])}" for k in TRAIN_KEYS if k in row)


GEN_SHOWN = ("gen_stop_rate", "gen_chrf", "gen_rouge_l")  # of the generation measures; summary.json has all


def eval_text(row: dict) -> str:
    metrics = sorted(((k.removeprefix("eval_"), v) for k, v in row.items() if k.startswith("eval_")
                      and (not k.startswith("eval_gen_") or k.removeprefix("eval_") in GEN_SHOWN)),
                     key=lambda kv: kv[0] != "loss")  # loss first, then the rest in their order
    return f"eval @ step {row.get('step', 0)}  " + "  ".join(f"{k} {fmt_value(k, v)}" for k, v in metrics)


def status_text(step: int, total: int, elapsed: float | None, eta: float | None, per_step: float | None,
                width: int, bar: bool = True) -> tuple[str, int]:
    """The status line for `width` columns, as text with a `{bar}` slot, and the bar's width (0: none).

    Drop order on a narrow terminal: s/step, then the bar, then the word 'elapsed'; step/total,
    elapsed and ETA stay."""
    pct = f"{100 * step / total:3.0f}%" if total else ""
    head = f"step {step}/{total}"
    eta_s = clock(eta) if eta is not None else ("estimating" if step < total else "0:00:00")
    full = f"  {pct}  {clock(elapsed)} elapsed  eta {eta_s}"
    tails = [full + (f"  {per_step:.3g} s/step" if per_step else ""), full, f"  {clock(elapsed)}  eta {eta_s}",
             f" {clock(elapsed)} eta {eta_s}"]
    for tail in tails[:2]:
        room = width - len(head) - len(tail) - 1
        if bar and room >= 10:
            return head + " {bar}" + tail, min(room, 40)
    for tail in tails if not bar else tails[1:]:
        if len(head) + len(tail) <= width:
            return head + tail, 0
    return (head + tails[-1])[:width], 0


class Progress:
    """The training display. `update(step, row)` for each metrics row, `step_done(step, seconds)` for
    each optimizer step, `message(text)` for lines that must not tear it, `close()` at the end."""

    def __init__(self, total_steps: int, start_step: int = 0, enabled: bool = True, stream=None,
                 log_file: Path | None = None):
        self.total = total_steps
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.step, self._start_step = start_step, start_step
        self._seconds: float | None = None  # the loop's elapsed time at the last finished step
        self._tick_at = time.monotonic()
        self._train_row: dict | None = None
        self._eval_row: dict | None = None
        self._live = None
        self._noise = LibraryNoise(log_file, self.message) if enabled and log_file is not None else None
        if self.tty:
            self._start_live()

    # ------------------------------------------------------------------ estimates

    def seconds_per_step(self) -> float | None:
        """The loop's mean time per optimizer step so far (from the first finished step on)."""
        if self._seconds is None or self.step <= 0:
            return None
        return self._seconds / self.step

    def elapsed(self) -> float | None:
        if self._seconds is None:
            return None
        return self._seconds + (time.monotonic() - self._tick_at if self.tty else 0.0)

    def eta_seconds(self, step: int | None = None) -> float | None:
        per = self.seconds_per_step()
        if per is None:
            return None
        since = time.monotonic() - self._tick_at if self.tty else 0.0
        return max(0.0, per * (self.total - (self.step if step is None else step)) - since)

    # ------------------------------------------------------------------ input

    def step_done(self, step: int, loop_seconds: float) -> None:
        """One optimizer step finished; `loop_seconds` is the loop's elapsed time (resumed time included)."""
        self.step, self._seconds, self._tick_at = step, loop_seconds, time.monotonic()

    def header(self, lines: list[str]) -> None:
        """Lines shown once before training (see `header_lines`)."""
        for line in lines:
            self.message(line)

    def update(self, step: int, row: dict | None = None) -> None:
        if not self.enabled:
            return
        if row is not None and "elapsed" in row and isinstance(row["elapsed"], (int, float)):
            self.step_done(step, float(row["elapsed"]))
        elif step > self.step:
            self.step = step
        if row is None or "event" in row:
            return
        is_eval = any(k.startswith("eval_") for k in row)
        if is_eval:
            self._eval_row = row
        elif any(k in row for k in TRAIN_KEYS):
            self._train_row = row
        else:
            return
        if self._live is not None:
            self._live.refresh()
        elif not row.get("before_training") or is_eval:
            print(self.plain_line(row), file=self.stream, flush=True)

    def plain_line(self, row: dict) -> str:
        """One line for a pipe: the status without a bar, then the row's values."""
        if any(k.startswith("eval_") for k in row):
            return eval_text(row)
        status, _ = status_text(self.step, self.total, self.elapsed(), self.eta_seconds(), None, 10_000, bar=False)
        return f"{status}  {train_text(row)}"

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._live is not None:
            self._live.console.print(text, markup=False, highlight=False, soft_wrap=False, overflow="ellipsis")
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        """End the live display. Library noise stays routed to the log file until `finish` (the final
        evaluation, model card and report still import and warn), unless an exception is on its way out."""
        if self._live is not None:
            self._live.refresh()
            self._live.stop()
            for handler, stream in self._streams:
                handler.setStream(stream)
            self._live = None
        if sys.exc_info()[0] is not None:
            self.finish()

    def finish(self) -> None:
        """The run is over: close the display and give library warnings back to the terminal."""
        self.close() if self._live is not None else None
        if self._noise is not None:
            self._noise.close()
            self._noise = None

    # ------------------------------------------------------------------ the live display

    def _start_live(self) -> None:
        from rich.console import Console
        from rich.live import Live

        console = Console(file=self.stream, highlight=False)
        self._live = Live(console=console, get_renderable=self._renderable, refresh_per_second=2,
                          transient=False, redirect_stdout=True, redirect_stderr=True)
        self._live.start()
        # logging's stream handlers hold the real stderr: point them at rich's proxy (lines go above the display)
        self._streams = []
        for logger in (logging.getLogger(), logging.getLogger("tunelab")):
            for h in logger.handlers:
                if type(h) is logging.StreamHandler and h.stream in (sys.__stderr__, sys.__stdout__, self.stream):
                    self._streams.append((h, h.setStream(sys.stderr)))

    def _renderable(self):
        return _Display(self)

    def lines(self, width: int) -> list[str]:
        """The display's lines at `width` columns (the bar drawn with '━' and '─')."""
        text, bar_width = status_text(self.step, self.total, self.elapsed(), self.eta_seconds(),
                                      self.seconds_per_step(), width)
        if bar_width:
            done = round(bar_width * min(1.0, self.step / self.total)) if self.total else bar_width
            text = text.replace("{bar}", "━" * done + "─" * (bar_width - done))
        out = [text]
        if self._train_row is not None:
            out.append(train_text(self._train_row))
        if self._eval_row is not None:
            out.append(eval_text(self._eval_row))
        return [cut(line, width) for line in out]


def cut(line: str, width: int) -> str:
    return line if len(line) <= width else line[: max(0, width - 1)] + "…"


class _Display:
    """A rich renderable that lays the lines out at the console's current width."""

    def __init__(self, progress: Progress):
        self.progress = progress

    def __rich_console__(self, console, options):
        from rich.text import Text

        lines = self.progress.lines(options.max_width)
        for i, line in enumerate(lines):
            t = Text(line, no_wrap=True, overflow="ellipsis")
            if i == 0:
                t.highlight_regex(r"━+", "green")
                t.highlight_regex(r"─+", "grey50")
            elif line.startswith("eval"):
                t.stylize("cyan", 0, 4)
            yield t


class LibraryNoise:
    """While training: Python warnings and library loggers go to `log_file` (RUN/warnings.log), not to
    the terminal; the first one is announced once with `announce(text)`. `close()` restores everything."""

    def __init__(self, log_file: Path, announce):
        self.path, self.announce, self.announced = Path(log_file), announce, False
        self.handler = logging.FileHandler(self.path, delay=True, encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        self.handler.addFilter(self._first)
        # first: importing transformers (for its bars) configures its logger, whose handler we then replace
        self._bars = _progress_bars(False)  # transformers' "Writing model shards" bars would tear the display too
        self.saved = []
        for name in LIBRARY_LOGGERS:
            lg = logging.getLogger(name)
            self.saved.append((lg, lg.handlers[:], lg.propagate))
            lg.handlers = [self.handler]
            lg.propagate = False
        self._warnings_filters = warnings.filters[:]
        warnings.simplefilter("default")  # each distinct warning once per place, then into the file
        logging.captureWarnings(True)

    def _first(self, record) -> bool:
        if not self.announced:
            self.announced = True
            self.announce(f"library warnings go to {self.path}")
        return True

    def close(self) -> None:
        _progress_bars(self._bars)
        logging.captureWarnings(False)
        warnings.filters[:] = self._warnings_filters
        for lg, handlers, propagate in self.saved:
            lg.handlers, lg.propagate = handlers, propagate
        self.handler.close()


def _progress_bars(enabled: bool | None) -> bool | None:
    """Switch transformers' tqdm bars on or off; returns whether they were on (None: leave as is)."""
    try:
        import transformers.utils.logging as tl
    except ImportError:
        return None
    was = tl.is_progress_bar_enabled()
    if enabled is not None:
        tl.enable_progress_bar() if enabled else tl.disable_progress_bar()
    return was


def header_lines(info: dict) -> list[str]:
    """The header before training, from `header_info`'s dict: label, value pairs, one per line."""
    lines = [f"tunelab train · {info['run_dir']}"]
    lines += [f"  {k:<10} {v}" for k, v in info.items() if k != "run_dir" and v not in (None, "")]
    return lines


def header_info(recipe, out: Path, resumed_step: int | None = None, *, model_name: str, task: str,
                method: str) -> dict:
    """What the header says about a run about to train (a run.Recipe, its run dir, and the config's
    model.name, task and method)."""
    t = recipe.settings  # train.batch_size and train.grad_accum, as the loop runs them
    from tunelab.model_card import base_model_name, data_rows, human_count

    train_rows, eval_rows = data_rows(recipe.task.info or {})
    pct = 100 * recipe.trainable / recipe.total if recipe.total else 0.0
    effective = recipe.world_size * t.batch_size * t.grad_accum
    steps = f"{recipe.settings.total_steps}"
    if recipe.per_epoch:
        epochs = recipe.settings.total_steps / recipe.per_epoch
        steps += f" ({epochs:.3g} epoch{'' if epochs == 1 else 's'} of {recipe.per_epoch})"
    if resumed_step:
        steps += f", resuming at {resumed_step}"
    return {
        "run_dir": str(out),
        "model": f"{base_model_name(model_name)} ({type(recipe.model).__name__})",
        "task": f"{task} · method {method}",
        "params": f"{human_count(recipe.trainable)} trainable of {human_count(recipe.total)} ({pct:.3g}%)",
        "data": f"{train_rows if train_rows is not None else '?'} train rows"
                + (f" · {eval_rows} eval rows" if eval_rows is not None else ""),
        "steps": steps,
        "batch": f"{effective} per step ({t.batch_size} x {t.grad_accum} accum"
                 + (f" x {recipe.world_size} processes)" if recipe.world_size > 1 else ")"),
        "precision": f"{recipe.precision} on {recipe.device}",
    }
