"""Health events of preference tuning (task: preference), from its train and eval rows.

Rows carry the measures of tasks/preference.py: reward_margin, logp_chosen / logp_rejected (mean
per-token log-prob of the answers), kl_ref (absent for the reference-free losses ORPO and
SimPO); eval rows the same with `eval_`. The untouched model's eval row (`before_training`) is the
baseline; without one, the first train rows (median of 3) are. Each kind fires once per run. The
bars (in `PreferenceThresholds`) and why:

- ``likelihood_displacement``: the chosen answers' log-likelihood fell by at least 0.1 nats per
  token (their probability x 0.9 per token: on a 100-token answer, a factor of 2e-5) below the
  baseline while the reward margin grew above it. DPO can only widen the margin; pushing the
  rejected answers down faster than the chosen ones satisfies it too, and the probability mass
  then goes to answers in neither set (Razin et al. 2024, "Unintentional Unalignment"; Pal et al.
  2024, "Smaug"). Judged on eval rows (the same pairs each time), else on the median of the last 3
  train rows (other pairs each row, hence the median).
- ``margin_explosion``: a reward margin above 20 (nats x beta), or not finite. At a margin of 20
  sigmoid leaves the pair a loss of 2e-9: nothing left to learn from it, and the only way on is
  moving further from the reference (over-optimisation); healthy DPO runs end with margins of a
  few units.
- ``reference_free_drift``: ORPO/SimPO rows (no kl_ref): the mean per-token log-prob of the chosen
  or of the rejected answers moved more than 1.0 nat from its baseline (a factor e per token). With
  no reference model nothing anchors the policy to where it started; a move that large on the
  training distribution's own answers means the model is being rewritten, not nudged.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from tunelab.monitor.health import HealthEvent, _num

KINDS = ("likelihood_displacement", "margin_explosion", "reference_free_drift")


@dataclass(frozen=True)
class PreferenceThresholds:
    displacement_drop: float = 0.1  # nats per token below the baseline, chosen answers
    max_margin: float = 20.0
    drift: float = 1.0  # nats per token from the baseline (reference-free losses)
    train_rows: int = 3  # train rows in a median (baseline: the first ones; now: the last ones)


ADVICE = {
    "likelihood_displacement": "lower optim.lr or train fewer steps (keep checkpoint.final: best), raise "
                               "preference.beta (stay nearer the reference), or use loss: orpo, whose SFT term "
                               "keeps the chosen answers likely",
    "margin_explosion": "the pairs are already separated: lower optim.lr, raise preference.beta, train fewer "
                        "epochs, or use loss: ipo (its squared loss stops at a finite margin)",
    "reference_free_drift": "nothing anchors a reference-free loss: lower optim.lr, train fewer steps, or use "
                            "loss: dpo (its reference keeps the policy near where it started)",
}


class PreferenceWatch:
    """State of the three detectors; lives on the HealthMonitor (rebuilt exactly by replaying rows)."""

    def __init__(self, t: PreferenceThresholds = PreferenceThresholds()):
        self.t = t
        self.done: set[str] = set()
        self.eval_base: dict | None = None
        self.train_rows: list[dict] = []

    def observe(self, row: dict) -> list[HealthEvent]:
        step, out = int(row.get("step", 0)), []
        if "eval_reward_margin" in row:
            m = {k[len("eval_"):]: _num(v) for k, v in row.items() if k.startswith("eval_")}
            if row.get("before_training"):
                self.eval_base = m
                return []
            self._judge(out, step, m, self.eval_base, "held-out pairs")
            return out
        m = {k: _num(row.get(k)) for k in ("reward_margin", "logp_chosen", "logp_rejected", "kl_ref")}
        margin = m["reward_margin"]
        if margin is not None and (not math.isfinite(margin) or margin > self.t.max_margin):
            self._fire(out, step, "margin_explosion",
                       f"the train reward margin reached {margin:.4g} at step {step} (bar {self.t.max_margin:g})")
        self.train_rows.append(m)
        n = self.t.train_rows
        if self.eval_base is None and len(self.train_rows) >= 2 * n:
            self._judge(out, step, _median(self.train_rows[-n:]), _median(self.train_rows[:n]), "training pairs")
        return out

    def _judge(self, out: list, step: int, now: dict, base: dict | None, where: str) -> None:
        if not base:
            return
        d_chosen = _diff(now, base, "logp_chosen")
        d_margin = _diff(now, base, "reward_margin")
        if d_chosen is not None and d_margin is not None and d_chosen <= -self.t.displacement_drop and d_margin > 0:
            self._fire(out, step, "likelihood_displacement",
                       f"on the {where}, the chosen answers' log-likelihood fell {-d_chosen:.3g} nats/token "
                       f"(to {now['logp_chosen']:.4g}) while the reward margin grew by {d_margin:.3g}: the rejected "
                       "answers are pushed down faster, and both are losing probability")
        if now.get("kl_ref") is None and base.get("kl_ref") is None:  # reference-free loss
            for key in ("logp_chosen", "logp_rejected"):
                d = _diff(now, base, key)
                if d is not None and abs(d) > self.t.drift:
                    self._fire(out, step, "reference_free_drift",
                               f"on the {where}, the {key.removeprefix('logp_')} answers' mean log-prob moved {d:+.3g} "
                               f"nats/token from the start (bar {self.t.drift:g}), with no reference model to hold it")
                    break

    def _fire(self, out: list, step: int, kind: str, message: str) -> None:
        if kind in self.done:
            return
        self.done.add(kind)
        out.append(HealthEvent(step, kind, f"{message}: {ADVICE[kind]}"))


def _diff(now: dict, base: dict, key: str) -> float | None:
    a, b = now.get(key), base.get(key)
    return a - b if a is not None and b is not None and math.isfinite(a) and math.isfinite(b) else None


def _median(rows: list[dict]) -> dict:
    out = {}
    for key in rows[0]:
        vals = [r[key] for r in rows if r.get(key) is not None]
        out[key] = statistics.median(vals) if vals else None
    return out


def preference_events(monitor, row: dict) -> list[HealthEvent]:
    """The preference kinds this row raises; the watch is created on the monitor at its first row."""
    watch = getattr(monitor, "preference", None)
    if watch is None:
        watch = monitor.preference = PreferenceWatch()
    return watch.observe(row)
