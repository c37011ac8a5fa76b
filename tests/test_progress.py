"""The training display: header, live lines at 80 and 120 columns (rich's own rendering captured),
one plain line per logged step when piped, library warnings routed to the run dir's log file."""

from __future__ import annotations

import io
import logging
import re
import warnings

import pytest

from tunelab.monitor.progress import Progress, clock, header_lines, status_text

pytestmark = pytest.mark.unit

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Terminal(io.StringIO):
    def isatty(self):
        return True


TRAIN = {"step": 3, "epoch": 0.1, "loss": 2.345678, "lr": 2e-5, "grad_norm": 0.87, "elapsed": 180.0}
EVAL = {"step": 3, "epoch": 0.1, "eval_loss": 1.23456, "eval_accuracy": 0.91, "eval_macro_f1": 0.9012,
        "eval_perplexity": 3.4, "eval_token_accuracy": 0.55, "eval_supervised_tokens": 123456}


@pytest.mark.parametrize("columns", [80, 120])
def test_live_display_keeps_step_elapsed_and_eta_on_one_line_and_eval_on_its_own(monkeypatch, columns):
    monkeypatch.setenv("COLUMNS", str(columns))
    monkeypatch.setenv("LINES", "40")
    term = Terminal()
    p = Progress(500, stream=term)
    assert p.tty
    p.step_done(1, 60.0)  # the first step: the ETA exists already (499 steps x 60 s)
    assert p.eta_seconds() == pytest.approx(499 * 60.0, abs=2)
    p.update(3, TRAIN)
    p.update(3, EVAL)
    p.message("WARNING: health at step 3: loss spike")
    p.close()
    screen = [ANSI.sub("", line).rstrip() for line in term.getvalue().replace("\r", "\n").splitlines()]
    screen = [line for line in screen if line]
    assert all(len(line) <= columns for line in screen), [ln for ln in screen if len(ln) > columns]
    status = [ln for ln in screen if ln.startswith("step 3/500")]
    assert status and "0:03:00 elapsed" in status[-1] and "eta 8:17:00" in status[-1] and "─" in status[-1]  # 497 x 60 s
    assert any(ln.startswith("loss 2.3457  lr 2.00e-05  grad_norm 0.8700") for ln in screen)
    evals = [ln for ln in screen if ln.startswith("eval @ step 3")]
    assert evals and "loss 1.2346" in evals[-1] and "accuracy 0.9100" in evals[-1]
    assert any("health at step 3" in ln for ln in screen)  # printed above the display, not through it


@pytest.mark.parametrize("width", [40, 60, 80, 120, 200])
def test_the_status_line_drops_speed_then_bar_but_never_step_elapsed_or_eta(width):
    text, bar = status_text(12345, 50000, 3723.0, 99999.0, 1.5, width)
    line = text.replace("{bar}", "━" * bar)
    assert len(line) <= width
    assert line.startswith("step 12345/50000") and "1:02:03" in line and "eta 1d 3:46:39" in line
    assert ("s/step" in line) == (width >= 80) and (bar > 0) == (width >= 70)


def test_piped_output_is_one_line_per_logged_step_with_eta():
    out = io.StringIO()
    p = Progress(100, stream=out)
    assert not p.tty
    for s in (10, 20):
        p.step_done(s, 2.0 * s)
        p.update(s, {"step": s, "loss": 1.0 / s, "lr": 1e-4, "grad_norm": 0.5, "elapsed": 2.0 * s})
    p.update(20, {"step": 20, "eval_loss": 0.7, "eval_accuracy": 0.8})
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert lines[0].startswith("step 10/100") and "eta 0:03:00" in lines[0] and "loss 0.1000" in lines[0]
    assert lines[1].startswith("step 20/100") and "eta 0:02:40" in lines[1]
    assert lines[2] == "eval @ step 20  loss 0.7000  accuracy 0.8000"


def test_library_warnings_go_to_the_run_dirs_log_file_announced_once(tmp_path, monkeypatch):
    # routing is what is tested, not verbosity: a model load earlier in this worker sets transformers'
    # logger to ERROR (models.load.quiet_transformers), which would drop the warning before any handler
    monkeypatch.setattr(logging.getLogger("transformers"), "level", logging.WARNING)
    out = io.StringIO()
    p = Progress(10, stream=out, log_file=tmp_path / "warnings.log")
    warnings.warn("`foo` is deprecated", FutureWarning)
    logging.getLogger("transformers").warning("some transformers chatter")
    logging.getLogger("bitsandbytes").warning("bnb chatter")
    p.close()  # the display ends; the noise stays routed until finish (the save phase still warns)
    logging.getLogger("transformers.modeling_utils").warning("after the display")
    p.finish()
    log = (tmp_path / "warnings.log").read_text()
    assert "foo` is deprecated" in log and "transformers chatter" in log and "bnb chatter" in log
    assert "after the display" in log
    assert out.getvalue().count("library warnings go to") == 1 and "chatter" not in out.getvalue()
    assert logging.getLogger("transformers").propagate is not False or logging.getLogger("transformers").handlers
    with warnings.catch_warnings(record=True) as caught:  # restored: warnings are warnings again
        warnings.simplefilter("always")
        warnings.warn("back", UserWarning)
    assert caught and not logging.getLogger("py.warnings").handlers[:1] == [p]


def test_header_says_what_is_trained():
    lines = header_lines({"run_dir": "runs/x", "model": "minilm (BertForSequenceClassification)",
                          "task": "classification · method lora", "params": "1.2k trainable of 22.7M (0.0053%)"})
    assert lines[0] == "tunelab train · runs/x" and lines[1].split() == ["model", "minilm", "(BertForSequenceClassification)"]
    assert clock(59.6) == "0:01:00" and clock(None) == "--:--" and clock(90061) == "1d 1:01:01"


DRIVER = r'''
import logging, sys, time, warnings
sys.path.insert(0, {src!r})
from tunelab.monitor.progress import Progress
logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
p = Progress(40, log_file={log!r})
for s in range(1, 41):
    p.step_done(s, 0.5 * s)
    if s % 5 == 0:
        p.update(s, {{"step": s, "loss": 1.0 / s, "lr": 1e-4, "grad_norm": 0.5, "elapsed": 0.5 * s}})
    if s % 10 == 0:
        p.update(s, {{"step": s, "eval_loss": 0.9, "eval_accuracy": 0.5 + s / 100}})
    if s == 20:
        logging.getLogger("tunelab").warning("health at step 20: a warning of ours, above the display")
        warnings.warn("a FutureWarning from some library", FutureWarning)
        logging.getLogger("transformers").warning("transformers chatter")
    time.sleep(0.03)
p.close(); p.finish()
print("DONE", file=sys.stderr)
time.sleep(30)
'''


@pytest.mark.skipif(__import__("shutil").which("tmux") is None, reason="tmux is not installed")
@pytest.mark.parametrize("columns", [80, 120])
def test_in_a_real_terminal_warnings_never_tear_the_display(tmp_path, columns):
    """tmux is a real terminal: what capture-pane shows is what a person sees."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "src")
    script = tmp_path / "drive.py"
    script.write_text(DRIVER.format(src=src, log=str(tmp_path / "warnings.log")))
    name = f"tunelab-test-{columns}-{tmp_path.name}"
    subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", str(columns), "-y", "30",
                    f"{sys.executable} {script}"], check=True)
    try:
        deadline, screen = time.monotonic() + 60, ""
        while "DONE" not in screen and time.monotonic() < deadline:
            time.sleep(0.3)
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", name], capture_output=True, text=True).stdout
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)
    lines = [ln.rstrip() for ln in screen.splitlines() if ln.strip()]
    assert "DONE" in screen, screen
    assert all(len(ln) <= columns for ln in lines)
    status = [ln for ln in lines if ln.startswith("step ")]
    assert len(status) == 1 and status[0].startswith("step 40/40") and "eta 0:00:00" in status[0], screen
    assert sum(ln.startswith("eval @ step") for ln in lines) == 1  # one eval line, updated in place
    ours = [i for i, ln in enumerate(lines) if "health at step 20" in ln]
    assert len(ours) == 1 and ours[0] < lines.index(status[0]), screen  # printed above the display, whole
    assert "FutureWarning" not in screen and "chatter" not in screen
    assert screen.count("library warnings go to") == 1
    assert "transformers chatter" in (tmp_path / "warnings.log").read_text()
