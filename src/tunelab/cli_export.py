"""The verbs that take a trained model out: `merge`, `export`, `push` (registered onto cli.app).

Apart from cli.py so these verbs and the training verbs can change independently; each is a thin
call into tunelab.export, and each ends with the check of what it wrote (export.check).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer, guard) -> None:
    """Add merge / export / push to `app`; `guard` is cli._guard (exit codes 0/2/1)."""

    @app.command()
    def merge(
        run_or_adapter: Path = typer.Argument(..., help="A run dir (its final/ holds a LoRA adapter) or an adapter folder."),
        output: Path = typer.Option(..., "--output", "-o", help="Folder for the merged model (new or empty)."),
        dtype: str = typer.Option("fp32", "--dtype", help="fp32 | bf16 | fp16: the dtype the merged weights are written in."),
        no_check: bool = typer.Option(False, "--no-check", help="Skip the comparison with the unmerged model."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ):
        """Fold a LoRA/QLoRA adapter into its fp32 base and write a plain Hugging Face folder (no peft
        needed); then read it back and compare it with the unmerged model (export_check.json)."""

        def go():
            from tunelab.export.check import summary_line
            from tunelab.export.merge import merge_checked

            out = merge_checked(run_or_adapter, output, dtype, check=not no_check)
            if as_json:
                typer.echo(json.dumps(out))
                return
            typer.echo(f"merged {out['adapter']} into {out['base_model']} ({out['dtype']}): {out['merged']}")
            if out["check"]:
                typer.echo(summary_line(out["check"]))

        guard(go)

    @app.command()
    def export(
        run: Path = typer.Argument(..., help="A run dir, a model folder or a LoRA adapter folder (merged first)."),
        fmt: str = typer.Option("gguf", "--format", help="gguf | ollama (GGUF + Modelfile)."),
        quant: list[str] = typer.Option(["f16"], "--quant", help="f32 | f16 | bf16 | q8_0 | q4_0 | q4_k_m (repeatable for gguf)."),
        llama_cpp: str = typer.Option("auto", "--llama-cpp", help="auto | on | off: also run each file in real llama.cpp (make llamacpp installs it)."),
        output: Optional[Path] = typer.Option(None, "--output", "-o", help="Folder (new or empty); default RUN/export-FORMAT."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ):
        """Write a Llama-family causal LM as GGUF (chat template and end-of-turn token in its metadata), or
        for Ollama; read every file back and compare it with the source model (*.check.json)."""

        def go():
            from tunelab.export.check import summary_line
            from tunelab.export.run_export import export_run

            out = export_run(run, output or Path(run) / f"export-{fmt}", fmt, quant, llama_cpp=llama_cpp)
            if as_json:
                typer.echo(json.dumps(out))
                return
            for f in out["files"]:
                typer.echo(f"wrote {f['file']} ({f['bytes'] / 2**20:.1f} MiB)")
                typer.echo("  " + summary_line(f["check"]))
                if f.get("modelfile"):
                    mc = f["modelfile_check"]
                    typer.echo(f"wrote {f['modelfile']}: renders {mc['renders_equal']}/{mc['conversations']} "
                               "conversations as training did (`ollama create NAME -f Modelfile`)")

        guard(go)

    @app.command()
    def push(
        run: Path = typer.Argument(..., help="A run dir, a model folder or an adapter folder."),
        repo_id: str = typer.Argument(..., help="owner/name on the Hugging Face Hub."),
        gguf: list[Path] = typer.Option([], "--gguf", help="Export folders whose *.gguf / Modelfile go under gguf/ "
                                        "(default: RUN/export*/)."),
        private: bool = typer.Option(False, "--private", help="Create the repo private."),
        dry_run: bool = typer.Option(False, "--dry-run", help="List what would be sent; send nothing."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ):
        """Upload the model (adapter or weights), its card and any GGUF to the Hub in one commit
        (huggingface_hub; the token comes from `hf auth login` or HF_TOKEN, never from tunelab)."""

        def go():
            from tunelab.export.push import push as push_run

            out = push_run(run, repo_id, gguf_dirs=gguf or None, private=private, dry_run=dry_run)
            if as_json:
                typer.echo(json.dumps(out))
                return
            verb = "would send" if dry_run else "sent"
            typer.echo(f"{verb} {len(out['files'])} files to {repo_id}:")
            for f in out["files"]:
                typer.echo(f"  {f['path']}  {f['bytes']} bytes")
            if out.get("commit_url"):
                typer.echo(out["commit_url"])

        guard(go)
