"""`tunelab lr-find CONFIG`: the learning-rate range test (train/lr_find.py) alone, registered by cli.py.

Builds the run's recipe (data, model, method, optimizer) exactly as `tunelab train` would, sweeps
the lr, prints the choice and where the curve went, and stores the result where `optim.lr: auto`
looks for it: the user cache (always) and `--output-dir RUN/lr_find.json` (when given), so a
following `tunelab train` with `optim.lr: auto` does not sweep again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def _lines(found: dict) -> list[str]:
    curve = found["curve"]
    head = (f"lr: {found['lr']:.3g} ({found['rule']})" if found["lr"] is not None
            else f"lr: none found ({found['rule']}); keep the default")
    lines = [head, f"smoothed-loss minimum at lr {found['lr_min']}, steepest descent at lr {found['lr_steepest']}"
             if found["lr"] is not None else "", f"sweep: {len(curve)} steps, lr {curve[0]['lr']:.2g} .. "
             f"{curve[-1]['lr']:.2g}, loss {curve[0]['loss']:.4g} .. {curve[-1]['loss']:.4g}" if curve else "sweep: no step",
             f"source: {found['source']} (fingerprint {found['fingerprint']})"]
    if found.get("stored"):
        lines.append(f"stored: {', '.join(found['stored'])}")
    return [x for x in lines if x]


def register(app: typer.Typer, guard) -> None:
    @app.command("lr-find")
    def lr_find_(
        config: Path = typer.Argument(..., help="YAML config file (the one you would train with)."),
        set_: list[str] = typer.Option([], "--set", help="Override a key: --set train.batch_size=16 (repeatable)."),
        output_dir: Optional[Path] = typer.Option(None, "--output", "-o", "--output-dir",
                                                  help="Also write RUN/lr_find.json here (the run dir `tunelab "
                                                  "train -o` will use)."),
        force: bool = typer.Option(False, "--force", help="Sweep again even when a stored result matches."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ):
        """Learning-rate range test (Smith 2017): an exponential lr sweep on the real model and data,
        the lr picked from the smoothed loss curve; weights and optimizer are restored afterwards."""

        def go():
            from tunelab.compose import lr_fingerprint
            from tunelab.config import load_config
            from tunelab.run import setup
            from tunelab.train import lr_find

            cfg = load_config(config, list(set_))
            r = setup(cfg)
            found = lr_find.find_lr(r, lr_fingerprint(cfg, r.precision), output_dir, force=force)
            if output_dir is not None:
                output_dir.mkdir(parents=True, exist_ok=True)
            lr_find.store(found, output_dir)
            stored = [str(lr_find.cache_dir() / f"{found['fingerprint']}.json")]
            if output_dir is not None:
                stored.insert(0, str(output_dir / lr_find.LR_FIND_FILE))
            found["stored"] = stored
            typer.echo(json.dumps(found) if as_json else "\n".join(_lines(found)))

        guard(go)
