"""Verbs about runs and configs, registered on the `tunelab` app by cli.py: compare, config, init.

Each is a thin call into the library (analysis/compare.py, suggest.py, starter.py), with the same
conventions as every verb: `--json` prints one JSON object, `-o/--output` names what is written,
bad input is one line and exit 2 (through cli._guard).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from tunelab.errors import InputError


def register(app: typer.Typer, guard) -> None:
    @app.command()
    def compare(
        runs: list[Path] = typer.Argument(..., help="Run dirs, or folders of run dirs (a sweep)."),
        output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the comparison page here "
                                              "(self-contained HTML, e.g. compare.html)."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ):
        """Runs side by side: final and best metrics, speed and memory, the config keys that differ, and
        (with -o) a page with every run's curves overlaid."""

        def go():
            from tunelab.analysis.compare import compare_lines, write_compare

            out = write_compare(runs, output)
            if as_json:
                typer.echo(json.dumps(out))
                return
            typer.echo("\n".join(compare_lines(out)))
            if "page" in out:
                typer.echo(f"page: {out['page']}")

        guard(go)

    @app.command("config")
    def config_(
        list_: bool = typer.Option(False, "--list", help="List every config key with its default and meaning."),
        key: Optional[str] = typer.Option(None, "--key", help="Only keys starting with this (e.g. optim, lora.r)."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ):
        """Every config key: section.key, default and what it does (the schema in config.py)."""

        def go():
            from tunelab.config import Config
            from tunelab.suggest import format_keys, schema_keys, suggest_key

            keys = schema_keys(Config)
            if key:
                keys = [k for k in keys if k["key"] == key or k["key"].startswith(key.rstrip(".") + ".")]
                if not keys:
                    guess = suggest_key(tuple(key.split(".")), Config)
                    raise InputError(f"no such key or section{f'; did you mean {guess}?' if guess else ''}", field=key)
            if not list_ and not key and not as_json:
                typer.echo("tunelab config --list shows every key; --key SECTION shows one section", err=True)
            typer.echo(json.dumps({"keys": keys}) if as_json else format_keys(keys))

        guard(go)

    @app.command()
    def init(
        task: str = typer.Argument(..., help="classification, chat or causal_lm."),
        output: Path = typer.Option(Path("config.yaml"), "--output", "-o", help="Where to write the config."),
        force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ):
        """Write a commented starter config for TASK (embedded model, the usual recipe, every choice explained)."""

        def go():
            from tunelab.starter import write_starter

            out = write_starter(task, output, force=force)
            typer.echo(json.dumps(out) if as_json else f"wrote {out['config']} ({out['task']}); edit the data "
                       f"paths, then: {out['next']}")

        guard(go)
