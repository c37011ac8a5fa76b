"""Live diagnosis of training health from the metrics rows, as they are logged.

`HealthMonitor` is pure and stateful: feed it every metrics.jsonl row (train rows, eval rows; event
rows are ignored) and it returns the diagnoses that row raises, each with a one-line message that
says what to change. It reads nothing but the rows, so a resume rebuilds it exactly by replaying
metrics.jsonl up to the checkpoint's step (`HealthMonitor.replay`), and a test can hand it any
curve whose answer is known.

The kinds, and the reasoning behind each threshold (all in `Thresholds`; "rows" are logged train
rows, `train.log_every` optimizer steps apart):

- ``loss_spike``: train loss > median + max(k * 1.4826 * MAD, 25% of the median) over the last
  N = 50 rows, k = 6, once 10 rows exist. 1.4826 * MAD estimates the noise's standard deviation
  and, unlike a mean and std, is not dragged up by the spike itself (or by earlier spikes in the
  window), so one bad row cannot hide the next. k = 6 because a MAD from tens of rows can come out
  half the true noise (seen on simulated curves: a 25-row MAD gave 0.0084 where the noise was
  0.0175), and real row losses are heavier-tailed than normal. The 25% floor: a row less than a
  quarter above the typical loss is not worth a warning, however smooth the curve (MAD near 0).
- ``grad_explosion``: pre-clip gradient norm (`grad_norm_max`, the largest since the last row) >
  10 x the running median of the same over the last 50 rows. The highest ratio in the healthy toy
  runs of the tests was 5.6 (the tiny BERT leaving its initial plateau: gradients grow as it starts
  to learn), so 10 leaves room for that; more means one update was far outside the rest, which
  clipping hides from the loss but not from the weights' trajectory.
- ``divergence_risk``: the warning before the loop's own NaN stop (5 non-finite steps in a row):
  a row whose loss is NaN/Inf or whose `skipped_steps` grew (under fp16 a grown count with a
  finite loss is the GradScaler's normal overflow handling and is not flagged); or a climb: 3 rows
  in a row rising, each above the spike bar, the last above 2 x the running median (a one-row
  spike is ``loss_spike``; three rising outliers in a row are not noise).
- ``lr_too_high``: in the first 10 rows, two consecutive rows > 1.3 x the mean of the first two.
  Fine-tuning starts from a model that already fits its pre-training; a loss that climbs 30% above
  where it started, right away and twice in a row, is the lr, not noise.
- ``lr_too_low``: one test, at the first row >= 40 outside warmup: the median of the first 20 rows
  and of the last 20 differ by less than 4% of the loss at 95% confidence (difference + 2 standard
  errors, the noise from the MAD). With Adam the per-parameter step is about the lr itself, so a
  loss that does not move at full lr means the steps are too small to matter (or nothing trains).
  Asking for confidence means a noisy curve is never called flat for lack of evidence: giving the
  advice "raise the lr" to a run that is in fact learning is the worse mistake.
- ``plateau``: rows are cut into blocks of 50, each summarised by its median; a block is a new low
  when it beats the best block so far by more than half the standard error of its median
  (1.2533 * sigma / sqrt(50)); a plateau is 3 blocks in a row (150 rows) without a new low, after
  the loss has once fallen 2% below its start (else it is ``lr_too_low``), while the lr is still
  >= 10% of its peak (an annealed schedule is supposed to flatten). Chosen on simulated curves
  (power laws over 300 and 1000 rows, 3-10% normal and t(5) noise, cosine / linear / constant lr;
  and curves flat from row 150): 25-row blocks, or a row-by-row test, called curves that still fall
  a few percent per 100 rows plateaus in most 1000-row runs; 50 x 3 does so only where the fall per
  block is below the noise (1000 rows at 10% noise: 8 of 20 constant-lr runs), and reports a real
  stall a median of 200 rows after it begins (90% within 350). Fires once, again after a new low.
- ``overfitting``: at an evaluation, either (rising) the eval loss rose at each of the last 2
  evaluations, missing the best before them, the last by 2% or more, or (gap growing) the last 3 missed it and the train/eval gap
  grew by 10% of the eval loss; in both, the train loss (median of the rows since the previous
  evaluation) fell below its level at the best evaluation, and the gap widened at each evaluation
  to an eval loss above the train loss (a run whose train loss is worse than its eval loss is not
  overfitting, whatever else is wrong with it). The margins keep the jitter of a stalled eval loss
  (1-2% between evaluations in the toy runs of the tests) from reading as a trend. Fires once,
  again after the eval loss reaches a new best.

Each train-row kind is then quiet for 25 rows (one warning per kind per window); lr_too_high and
lr_too_low fire at most once per run, plateau and overfitting once until re-armed.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

KINDS = ("loss_spike", "grad_explosion", "divergence_risk", "lr_too_high", "lr_too_low", "plateau", "overfitting",
         "never_stops", "mode_collapse", "repetition", "template_leakage", "answers_worse",
         "likelihood_displacement", "margin_explosion", "reference_free_drift")  # the last 3: health_preference.py


@dataclass(frozen=True)
class Thresholds:
    """The detectors' knobs; the module docstring says why each default is what it is."""

    window: int = 25  # each kind's quiet period (rows) after it fires
    history: int = 50  # rows in the running median / MAD of loss and gradient norm
    min_history: int = 10  # rows before spike, explosion and climb checks speak
    spike_k: float = 6.0
    spike_min_rel: float = 0.25
    grad_factor: float = 10.0
    climb_rows: int = 3
    climb_factor: float = 2.0
    early_rows: int = 10  # lr_too_high looks at the first rows only
    lr_high_rise: float = 0.30
    lr_low_rows: int = 40  # lr_too_low: the first half of these rows vs the last half, once
    flat_rel: float = 0.04  # lr_too_low: moved less than this share, at 95% confidence
    improved_rel: float = 0.02  # plateau only after the loss once fell this share below its start
    plateau_block: int = 50  # rows per plateau block
    plateau_blocks: int = 3  # blocks in a row without a new low
    plateau_margin_se: float = 0.5  # a new low beats the best block by this many standard errors
    plateau_min_lr_share: float = 0.10
    overfit_min_rise: float = 0.02  # eval rising: the last eval >= best x 1.02, after 2 evals without a new best
    overfit_min_gap_growth: float = 0.10  # gap growing: +10% of the eval loss over 3 evals without a new best
    # generation rows (eval_gen_*, greedy replies; monitor/health_generation.py says why each bar is where it is)
    gen_min_stop_rate: float = 0.5
    gen_max_similarity: float = 0.5
    gen_max_repeated_4grams: float = 0.3
    gen_max_loop_rate: float = 0.25
    gen_max_leakage: float = 0.1
    gen_reference_drop_se: float = 2.0  # answers_worse: ROUGE-L fell by more than this many standard errors
    gen_min_chrf_drop: float = 0.1  # ... and chrF by at least this share


@dataclass(frozen=True)
class HealthEvent:
    step: int
    kind: str
    message: str

    def row(self) -> dict:
        """The metrics.jsonl row: an `event` row like the loop's own `diverged` row."""
        return {"step": self.step, "event": "health", "kind": self.kind, "message": self.message}


def _num(v) -> float | None:
    """A row value as a float; metrics.jsonl spells NaN and Inf as strings."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _g(v: float) -> str:
    return f"{v:.4g}"


class HealthMonitor:
    """Feed it each metrics row with `observe(row)`; it returns the `HealthEvent`s that row raises."""

    def __init__(self, thresholds: Thresholds = Thresholds(), *, fp16: bool = False):
        self.t = thresholds
        self.fp16 = fp16  # GradScaler skips are routine under fp16, not a divergence sign
        self.rows = 0  # train rows seen
        self.losses: deque[float] = deque(maxlen=thresholds.history)  # finite train losses
        self.norms: deque[float] = deque(maxlen=thresholds.history)
        self.first: list[float] = []  # the first finite losses (lr_low_rows // 2 of them)
        self.lr_low_checked = False
        self.max_lr = 0.0
        self.prev_lr: float | None = None
        self.skipped = 0
        self.quiet_until: dict[str, int] = {}  # kind -> row count before which it stays silent
        self.done: set[str] = set()  # once-per-run kinds that fired, and disarmed plateau/overfitting
        self.block: list[float] = []  # finite losses of the plateau block being filled
        self.best_block: float | None = None  # the lowest block median so far
        self.blocks_since_low = 0  # complete blocks since the last new low
        self.since_eval: list[float] = []  # train losses since the last evaluation
        self.evals: list[tuple[int, float, float | None]] = []  # (step, eval loss, train loss before it)
        self.gen_before: dict = {}  # the untouched model's eval_gen_* measures, for the messages

    @classmethod
    def replay(cls, rows, thresholds: Thresholds = Thresholds(), *, fp16: bool = False) -> "HealthMonitor":
        """The monitor as it was after `rows` (a resumed run's metrics.jsonl): exact, since it is
        rebuilt from the same rows it saw the first time (their health rows are skipped)."""
        monitor = cls(thresholds, fp16=fp16)
        for row in rows:
            monitor.observe(row)
        return monitor

    def observe(self, row: dict) -> list[HealthEvent]:
        if "event" in row:
            return []
        if "loss" in row:
            out = self._train(row)
        else:
            out = self._eval(row) if _num(row.get("eval_loss")) is not None else []
        if "eval_gen_stop_rate" in row:
            from tunelab.monitor.health_generation import generation_events

            out += generation_events(self, row)
        if "reward_margin" in row or "eval_reward_margin" in row:  # task: preference
            from tunelab.monitor.health_preference import preference_events

            out += preference_events(self, row)
        return out

    # ------------------------------------------------------------------ train rows

    def _fire(self, out: list, kind: str, step: int, message: str) -> bool:
        """Emit unless this kind is in its quiet window or disarmed; True when emitted."""
        if self.rows < self.quiet_until.get(kind, 0) or kind in self.done:
            return False
        self.quiet_until[kind] = self.rows + self.t.window
        out.append(HealthEvent(step, kind, message))
        return True

    def _train(self, row: dict) -> list[HealthEvent]:
        t, out = self.t, []
        step, loss = int(row["step"]), _num(row.get("loss"))
        norm = _num(row.get("grad_norm_max", row.get("grad_norm")))
        lr = _num(row.get("lr"))
        skipped = int(_num(row.get("skipped_steps")) or 0)
        new_skips, self.skipped = skipped - self.skipped, skipped
        self.rows += 1
        warming_up = lr is not None and self.prev_lr is not None and lr > self.prev_lr
        if lr is not None:
            self.max_lr, self.prev_lr = max(self.max_lr, lr), lr
        finite = loss is not None and math.isfinite(loss)
        lr_note = f" (lr {_g(lr)})" if lr is not None else ""

        if (loss is not None and not finite) or (new_skips > 0 and not self.fp16):
            self._fire(out, "divergence_risk", step,
                       f"non-finite loss or gradients at step {step} ({new_skips} step(s) skipped since the last log){lr_note}; "
                       "the run stops after 5 in a row: lower optim.lr, keep train.max_grad_norm set, or use fp32/bf16 instead of fp16")
        if norm is not None and math.isfinite(norm):
            if len(self.norms) >= t.min_history:
                med = statistics.median(self.norms)
                if med > 0 and norm > t.grad_factor * med:
                    self._fire(out, "grad_explosion", step,
                               f"gradient norm {_g(norm)} at step {step} is {norm / med:.0f}x its running median {_g(med)}"
                               f"{lr_note}: clipping (train.max_grad_norm) caps the step, but if it repeats lower optim.lr")
            self.norms.append(norm)
        if not finite:
            return out

        recent = list(self.losses)
        if len(recent) >= t.min_history:
            med = statistics.median(recent)
            mad = statistics.median(abs(x - med) for x in recent)
            bar = med + max(t.spike_k * 1.4826 * mad, t.spike_min_rel * abs(med))
            if loss > bar:
                self._fire(out, "loss_spike", step,
                           f"loss spike at step {step}: {_g(loss)} vs a running median of {_g(med)} (threshold {_g(bar)}): "
                           f"a bad batch or too high an lr{lr_note}; if it repeats, lower optim.lr or train.max_grad_norm")
            climb = recent[-(t.climb_rows - 1):] + [loss]
            rising = all(a < b for a, b in zip(climb, climb[1:])) and min(climb) > bar
            if rising and loss > t.climb_factor * med:
                self._fire(out, "divergence_risk", step,
                           f"loss rose {t.climb_rows} logs in a row to {_g(loss)} at step {step}, {loss / med:.1f}x its running "
                           f"median{lr_note}: the run is heading for divergence; lower optim.lr and resume from the last checkpoint")
        self.losses.append(loss)
        self.since_eval.append(loss)
        if len(self.first) < t.lr_low_rows // 2:
            self.first.append(loss)
        self._early(out, step, loss, lr_note, warming_up)
        self._plateau(out, step, loss, lr, lr_note)
        return out

    def _early(self, out: list, step: int, loss: float, lr_note: str, warming_up: bool) -> None:
        """lr_too_high from the first rows; lr_too_low once, at the first row >= lr_low_rows after warmup."""
        t = self.t
        n = len(self.losses)
        if 3 <= self.rows <= t.early_rows and n >= 3 and len(self.first) >= 3:
            start = (self.first[0] + self.first[1]) / 2
            if min(self.losses[-1], self.losses[-2]) > (1 + t.lr_high_rise) * start > 0 and self._fire(
                    out, "lr_too_high", step, f"loss rose from {_g(start)} to {_g(loss)} by step {step}, right from the "
                    f"start{lr_note}: optim.lr is too high for this model; try 3-10x lower (or a longer warmup)"):
                self.done.add("lr_too_high")
        if not self.lr_low_checked and self.rows >= t.lr_low_rows and not warming_up and "lr_too_high" not in self.done:
            self.lr_low_checked = True  # one test per run: testing every row would find "flat" by chance
            half = t.lr_low_rows // 2
            head, tail = self.first[:half], list(self.losses)[-half:]
            m0, m1 = statistics.median(head), statistics.median(tail)
            noise = 1.4826 * statistics.median([abs(x - m0) for x in head] + [abs(x - m1) for x in tail])
            se = 1.2533 * noise * math.sqrt(2 / half)  # standard error of the difference of two medians
            if m0 > 0 and abs(m1 - m0) + 2 * se < t.flat_rel * m0 and self._fire(
                    out, "lr_too_low", step, f"loss has not moved in {self.rows} logs ({_g(m0)} -> {_g(m1)}){lr_note}: "
                    "nothing is being learned yet; if it stays flat, try a 3-10x higher optim.lr and check what trains "
                    "(method, freeze) and that the labels match the texts"):
                self.done.add("lr_too_low")

    def _plateau(self, out: list, step: int, loss: float, lr: float | None, lr_note: str) -> None:
        """Blocks of `plateau_block` rows, each summarised by its median; a plateau is `plateau_blocks`
        blocks in a row none of which is a new low."""
        t = self.t
        self.block.append(loss)
        if len(self.block) < t.plateau_block:
            return
        b = statistics.median(self.block)
        # a new low must beat the best block by more than the standard error of its median
        # (1.2533 sigma / sqrt(n), sigma from the MAD): on a flat curve, noise alone then rarely
        # makes one, so a stall is reported soon after it begins rather than whenever records run out
        margin = t.plateau_margin_se * 1.2533 * 1.4826 * statistics.median(abs(x - b) for x in self.block) \
            / math.sqrt(len(self.block))
        self.block = []
        new_low = self.best_block is None or b < self.best_block - margin
        self.best_block = b if self.best_block is None else min(self.best_block, b)
        self.blocks_since_low = 0 if new_low else self.blocks_since_low + 1
        if new_low:
            self.done.discard("plateau")  # a new low re-arms it
        improved_once = self.best_block < (1 - t.improved_rel) * statistics.median(self.first)
        annealed = lr is not None and lr < t.plateau_min_lr_share * self.max_lr
        span = t.plateau_block * t.plateau_blocks
        if self.blocks_since_low >= t.plateau_blocks and improved_once and not annealed and self._fire(
                out, "plateau", step, f"loss plateaued: no new low in the last {span} logs (median {_g(b)} at step {step}, "
                f"best {_g(self.best_block)}){lr_note}; stop earlier (fewer epochs, early stopping) or lower optim.lr / "
                "use a decaying schedule to settle lower"):
            self.done.add("plateau")

    # ------------------------------------------------------------------ eval rows

    def _eval(self, row: dict) -> list[HealthEvent]:
        t, out = self.t, []
        step, loss = int(row["step"]), _num(row["eval_loss"])
        train = statistics.median(self.since_eval) if self.since_eval else None
        self.since_eval = []
        if not math.isfinite(loss):
            return out
        if self.evals and loss < min(e[1] for e in self.evals):
            self.done.discard("overfitting")  # a new best re-arms it
        self.evals.append((step, loss, train))
        if len(self.evals) < 3 or "overfitting" in self.done:
            return out
        rising = self._overfit_test(2, t.overfit_min_rise, 0.0, rising=True)  # eval rose twice, clearly
        widening = self._overfit_test(3, 0.0, t.overfit_min_gap_growth, rising=False)  # eval stalled, gap grows
        reason = rising or widening
        if reason:
            out.append(HealthEvent(step, "overfitting", f"{reason} at step {step}: overfitting; keep checkpoint.final: best, "
                                   "enable early_stopping, train fewer epochs, or regularize (optim.weight_decay, more data)"))
            self.done.add("overfitting")
        return out

    def _overfit_test(self, n: int, min_rise: float, min_gap_growth: float, rising: bool) -> str | None:
        """The last `n` evaluations all missed the best before them (the last by `min_rise` of it;
        with `rising`, each higher than the one before), the train loss fell below where it was at the best, and the train/eval gap widened at each
        of them (by `min_gap_growth` of the eval loss in total) to an eval loss above the train loss.
        Returns the reason, or None."""
        if len(self.evals) < n + 1:
            return None
        span = self.evals[-(n + 1):]
        best_step, best, best_train = min(self.evals[:-n], key=lambda e: e[1])
        losses = [v for _, v, _ in span]
        if min(losses[1:]) < best or losses[-1] < best * (1 + min_rise):
            return None
        if rising and not all(a < b for a, b in zip(losses, losses[1:])):
            return None
        trains = [tr for _, _, tr in span]
        ref = best_train if best_train is not None else next((tr for tr in trains[:-1] if tr is not None), None)
        if None in trains[1:] or ref is None or not trains[-1] < ref:
            return None
        gaps = [v - tr for _, v, tr in span if tr is not None]
        if not all(a < b for a, b in zip(gaps, gaps[1:])) or gaps[-1] <= 0 \
                or gaps[-1] - gaps[0] < min_gap_growth * abs(span[-1][1]):
            return None
        return (f"eval loss {_g(span[-1][1])} has not beaten its best {_g(best)} (step {best_step}) for {n} evaluations "
                f"while train loss fell to {_g(trains[-1])} (train/eval gap {_g(gaps[0])} -> {_g(gaps[-1])})")


def summarize(rows) -> dict:
    """summary.json's `health`: how many events of each kind, the first step of each, the messages."""
    events = [r for r in rows if r.get("event") == "health"]
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for e in events:
        counts[e["kind"]] = counts.get(e["kind"], 0) + 1
        first.setdefault(e["kind"], e["step"])
    return {"events": len(events), "counts": counts, "first_step": first,
            "messages": [{k: e[k] for k in ("step", "kind", "message")} for e in events[:50]],
            "messages_left_out": max(0, len(events) - 50)}
