"""HealthMonitor on hand-made metrics rows whose answers are known (no model, milliseconds)."""

import math
import random

import pytest

from tunelab.monitor.health import KINDS, HealthMonitor, summarize

pytestmark = pytest.mark.unit


def curve(seed: int, n: int = 300, noise: float = 0.05, eval_every: int = 25, schedule: str = "cosine") -> list[dict]:
    """A healthy run, one train row per step: a power-law loss curve (the usual shape of fine-tuning
    and LM curves) with relative Gaussian noise, noisy lognormal gradient norms slowly falling, 6%
    warmup then cosine (or constant) lr, and an eval loss that falls too (slower, with 0.4% jitter)."""
    rng = random.Random(seed)
    rows = [{"step": 0, "epoch": 0.0, "eval_loss": 0.95, "eval_accuracy": 0.5, "before_training": True}]
    warm = int(0.06 * n)
    for s in range(1, n + 1):
        frac = 1.0 if s < warm or schedule == "constant" else 0.5 * (1 + math.cos(math.pi * (s - warm) / (n - warm)))
        lr = 2e-5 * (s / warm if s < warm else frac)
        loss = (0.25 + 0.7 * (1 + s / 20) ** -0.8) * (1 + noise * rng.gauss(0, 1))
        norm = 3.0 * (1 + s / 50) ** -0.5 * math.exp(0.3 * rng.gauss(0, 1))
        rows.append({"step": s, "epoch": s / n, "loss": loss, "lr": lr, "grad_norm": norm, "grad_norm_max": norm,
                     "skipped_steps": 0})
        if s % eval_every == 0:
            eval_loss = (0.3 + 0.65 * (1 + s / 20) ** -0.8) * (1 + 0.004 * rng.gauss(0, 1))
            rows.append({"step": s, "epoch": s / n, "eval_loss": eval_loss, "eval_accuracy": 0.9})
    return rows


def events(rows, **kwargs) -> list[tuple[int, str]]:
    monitor = HealthMonitor(**kwargs)
    return [(e.step, e.kind) for row in rows for e in monitor.observe(row)]


def train_row(rows, step):
    return next(r for r in rows if r["step"] == step and "loss" in r)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("noise,schedule", [(0.03, "cosine"), (0.08, "cosine"), (0.05, "constant")])
def test_a_smooth_noisy_decaying_curve_raises_nothing(seed, noise, schedule):
    assert events(curve(seed, noise=noise, schedule=schedule)) == []


@pytest.mark.parametrize("seed", range(5))
def test_a_loss_spike_is_flagged_at_its_step_and_nowhere_else(seed):
    rows = curve(seed)
    train_row(rows, 40)["loss"] *= 3
    assert events(rows) == [(40, "loss_spike")]


def test_spikes_inside_the_quiet_window_are_not_repeated():
    """One warning per kind per 25 rows: spikes at 40 and 50 give one event, a third at 80 another."""
    rows = curve(0)
    for step in (40, 50, 80):
        train_row(rows, step)["loss"] *= 3
    assert events(rows) == [(40, "loss_spike"), (80, "loss_spike")]


def test_a_gradient_norm_explosion_is_flagged_at_its_step():
    rows = curve(1)
    train_row(rows, 120)["grad_norm_max"] *= 30
    assert events(rows) == [(120, "grad_explosion")]


def overfit_rows(eval_losses: list[float], every: int = 10, train_offset: float = 0.0) -> list[dict]:
    """Train loss falling steadily (one row a step), an evaluation every `every` steps with the given losses."""
    rows = [{"step": 0, "eval_loss": eval_losses[0], "before_training": True}]
    for s in range(1, every * (len(eval_losses) - 1) + 1):
        rows.append({"step": s, "loss": 0.9 * math.exp(-s / 30) + 0.02 + train_offset, "lr": 1e-4, "grad_norm": 1.0})
        if s % every == 0:
            rows.append({"step": s, "eval_loss": eval_losses[s // every]})
    return rows


def test_overfitting_is_flagged_at_the_second_eval_that_misses_the_best():
    """Eval loss best at step 30 (0.55), then 0.58 at 40 (one miss: not yet) and 0.62 at 50 (two misses,
    13% above the best, train still falling): flagged at 50, once, though 60 is worse still."""
    rows = overfit_rows([0.9, 0.7, 0.6, 0.55, 0.58, 0.62, 0.66])
    assert events(rows) == [(50, "overfitting")]


def test_overfitting_rearms_after_a_new_best():
    rows = overfit_rows([0.9, 0.7, 0.6, 0.55, 0.58, 0.62, 0.5, 0.53, 0.56])
    assert events(rows) == [(50, "overfitting"), (80, "overfitting")]


def test_a_growing_gap_with_a_stalled_eval_loss_is_overfitting():
    """Eval loss stuck within 0.5% of its best for 3 evaluations while the train loss keeps falling:
    not 'rising', but the train/eval gap grows by far more than 10% of the eval loss."""
    rows = overfit_rows([0.9, 0.6, 0.5, 0.501, 0.502, 0.5025])
    assert events(rows) == [(50, "overfitting")]


@pytest.mark.parametrize("eval_losses", [
    [0.9, 0.7, 0.6, 0.55, 0.58, 0.54, 0.56],  # one miss, then a new best
    [0.9, 0.7, 0.6, 0.55, 0.552, 0.553],      # two misses, but 0.5% above the best: jitter, not a trend
    [0.9, 0.7, 0.6, 0.55, 0.575, 0.565],      # two misses 2.7% above, but down at the second: not rising
])
def test_eval_wobble_is_not_overfitting(eval_losses):
    assert events(overfit_rows(eval_losses)) == []


def test_an_eval_loss_below_the_train_loss_is_not_overfitting():
    """The same rising eval losses as above, but the train loss is higher still (an lr-5 run looks
    like this): the gap is negative, so whatever is wrong, it is not overfitting."""
    assert events(overfit_rows([0.9, 0.7, 0.6, 0.55, 0.58, 0.62, 0.66], train_offset=1.0)) == []


def plateau_rows(n: int, flat_from: int, seed: int = 0, lr_after=None) -> list[dict]:
    """Exponential decay until `flat_from`, then flat at its level; 5% noise; constant lr unless `lr_after`."""
    rng = random.Random(seed)
    rows = []
    for s in range(1, n + 1):
        level = 0.3 + 0.6 * math.exp(-min(s, flat_from) / 25)
        lr = lr_after if lr_after is not None and s > flat_from else 1e-4
        rows.append({"step": s, "loss": level * (1 + 0.05 * rng.gauss(0, 1)), "lr": lr, "grad_norm": 1.0})
    return rows


@pytest.mark.parametrize("seed", range(4))
def test_a_plateau_is_flagged_after_three_blocks_without_a_new_low(seed):
    """Flat from step 150. Blocks are rows 1-50, 51-100, ...; the first flat block ends at 200, so
    the earliest a stall of 3 blocks can be seen is 300; noise can still make a "new low" (by half
    a standard error) for a while, which delays it (on 100 seeds: median 350, 90% by 500). Nothing
    before the curve flattens, nothing but plateau, and no stream of repeats."""
    found = events(plateau_rows(700, flat_from=150, seed=seed))
    assert found and {k for _, k in found} == {"plateau"}
    assert 300 <= found[0][0] <= 600 and len(found) <= 3, found


def test_no_plateau_once_the_schedule_has_annealed_the_lr():
    assert events(plateau_rows(500, flat_from=150, lr_after=5e-6)) == []


def test_loss_rising_from_the_first_logs_means_lr_too_high():
    """Start 0.71 (mean of the first two), bar 1.3 x 0.71 = 0.923: 0.95 at step 3 is the first row
    above it, 1.1 at step 4 the second in a row: flagged at 4, once."""
    losses = [0.70, 0.72, 0.95, 1.1, 1.5, 2.2, 3.0, 2.5, 2.8, 3.3, 3.1, 2.9]
    rows = [{"step": s, "loss": v, "lr": 5.0, "grad_norm": 1.0} for s, v in enumerate(losses, 1)]
    assert events(rows) == [(4, "lr_too_high")]


def test_a_flat_loss_means_lr_too_low_but_only_when_the_noise_allows_saying_so():
    """Flat at 0.69 with 1% noise: flagged once, at row 40 (the one test). With 15% noise the same
    flat curve cannot be told from a slowly falling one, so nothing is said."""
    def flat(noise):
        rng = random.Random(0)
        return [{"step": s, "loss": 0.69 * (1 + noise * rng.gauss(0, 1)), "lr": 1e-9, "grad_norm": 0.5}
                for s in range(1, 101)]
    assert events(flat(0.01)) == [(40, "lr_too_low")]
    assert events(flat(0.15)) == []


def test_non_finite_rows_warn_before_the_loop_stops_a_run():
    rows = curve(2, n=60)
    row = train_row(rows, 30)
    row.update({"loss": float("nan"), "skipped_steps": 1})
    for r in rows:
        if "loss" in r and r["step"] > 30:
            r["skipped_steps"] = 1
    assert events(rows) == [(30, "divergence_risk")]
    row["loss"] = "nan"  # as metrics.jsonl spells it, so a replay sees the same
    assert events(rows) == [(30, "divergence_risk")]


def test_fp16_scaler_skips_with_a_finite_loss_are_not_divergence():
    rows = curve(3, n=60)
    for r in rows:
        if "loss" in r and r["step"] >= 5:
            r["skipped_steps"] = 2  # the GradScaler skipped two overflowing steps at 5
    assert events(rows, fp16=True) == []
    assert events(rows) == [(5, "divergence_risk")]  # without fp16 a skipped step is a non-finite one


def test_a_sustained_climb_is_a_divergence_risk():
    """Three rows in a row rising, each far above the running median: the spike warns at the first,
    the climb at the third."""
    rows = curve(4, n=100)
    for step, factor in ((60, 2.5), (61, 3.5), (62, 4.5)):
        train_row(rows, step)["loss"] *= factor
    assert events(rows) == [(60, "loss_spike"), (62, "divergence_risk")]


def test_replay_rebuilds_the_state_exactly():
    """A monitor rebuilt from the rows up to step k (health rows among them, as in metrics.jsonl)
    says exactly what the uninterrupted one says after k, here a quiet-window suppression (spike at
    45 hidden by the one at 40) and an overfitting alarm that needs evaluations from before k."""
    rows = curve(5, n=200)
    for step in (40, 45, 110):
        train_row(rows, step)["loss"] *= 3
    for r in rows:
        if "eval_loss" in r and r["step"] >= 125:
            r["eval_loss"] = 0.5 + 0.02 * (r["step"] - 100) / 25
    whole, logged = HealthMonitor(), []
    for r in rows:
        logged.append(r)
        logged += [e.row() for e in whole.observe(r)]
    expected = [r for r in logged if r.get("event") == "health"]
    assert [(r["step"], r["kind"]) for r in expected] == [(40, "loss_spike"), (110, "loss_spike"), (150, "overfitting")]
    for k in (42, 100, 125, 140):
        head = [r for r in logged if r["step"] <= k]
        resumed = HealthMonitor.replay(head)
        after = [e.row() for r in rows if r["step"] > k for e in resumed.observe(r)]
        assert after == [r for r in expected if r["step"] > k], k


def test_summary_counts_kinds_first_steps_and_messages():
    rows = [{"step": 1, "loss": 1.0},
            {"step": 5, "event": "health", "kind": "loss_spike", "message": "a"},
            {"step": 9, "event": "diverged", "skipped_steps": 5},
            {"step": 7, "event": "health", "kind": "loss_spike", "message": "b"},
            {"step": 8, "event": "health", "kind": "plateau", "message": "c"}]
    s = summarize(rows)
    assert s["events"] == 3 and s["counts"] == {"loss_spike": 2, "plateau": 1}
    assert s["first_step"] == {"loss_spike": 5, "plateau": 8}
    assert [m["message"] for m in s["messages"]] == ["a", "b", "c"] and s["messages_left_out"] == 0
    assert set(s["counts"]) <= set(KINDS)
