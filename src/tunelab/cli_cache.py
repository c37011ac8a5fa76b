"""`tunelab cache ls|clear`: the encoded-data cache (tunelab.data.cache), registered by cli.py.

`ls` lists every entry with its size, rows and the files it encodes (a damaged one with why; --verify
compares every checksum too), plus the size of the other things tunelab keeps in $TUNELAB_CACHE
(GGUF conversions, the Python API's data files); `clear`
deletes the encoded-data entries (with --all everything under $TUNELAB_CACHE). Both take --json.
"""

from __future__ import annotations

import json
import shutil

import typer


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _others() -> list[dict]:
    """The other folders under $TUNELAB_CACHE (gguf conversions, api-data), with their sizes."""
    from tunelab.data.cache import _folder_bytes, data_cache_root
    from tunelab.models.gguf import cache_root

    root, data_root = cache_root(), data_cache_root()
    if not root.is_dir():
        return []
    return [{"name": p.name, "path": str(p), "bytes": _folder_bytes(p)} for p in sorted(root.iterdir())
            if p.is_dir() and p.resolve() != data_root.resolve()]


def cache_listing(verify: bool = False) -> dict:
    from tunelab.data.cache import data_cache_root, list_entries

    entries = list_entries(verify)
    others = _others()
    return {"root": str(data_cache_root()), "entries": entries, "bytes": sum(e["bytes"] for e in entries),
            "other": others}


def listing_lines(out: dict) -> list[str]:
    lines = [f"encoded data: {out['root']} ({len(out['entries'])} entries, {human_bytes(out['bytes'])})"]
    for e in out["entries"]:
        what = ", ".join(f for f in e.get("files") or [] if f) or "?"
        rows = f"{e['rows']:,} rows, " if e.get("rows") is not None else ""
        why = f" ({e['why']})" if e.get("why") else ""
        lines.append(f"  {e['key']}  {e['state']:<8} {human_bytes(e['bytes']):>9}  {rows}{e.get('encoder') or ''} {what}{why}")
    for o in out["other"]:
        lines.append(f"{o['name']}: {o['path']} ({human_bytes(o['bytes'])})")
    return lines


def register(app: typer.Typer, guard) -> None:
    cache_app = typer.Typer(rich_markup_mode=None, no_args_is_help=True,
                            help="The encoded-data cache: list its entries and sizes, or clear it.")
    app.add_typer(cache_app, name="cache")

    @cache_app.command("ls")
    def ls(as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
           verify: bool = typer.Option(False, "--verify", help="Read every entry whole and compare its checksums "
                                       "(a run checks only the manifest, sizes and offsets).")):
        """Every encoded-data entry (key, state, size, rows, the files it encodes) and the other caches' sizes."""

        def go():
            out = cache_listing(verify)
            typer.echo(json.dumps(out) if as_json else "\n".join(listing_lines(out)))

        guard(go)

    @cache_app.command("clear")
    def clear(all_: bool = typer.Option(False, "--all", help="Also delete GGUF conversions and the API's data files."),
              as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")):
        """Delete the encoded-data entries (the next run encodes again); --all: everything tunelab cached."""

        def go():
            from tunelab.data.cache import clear_entries

            out = clear_entries()
            if all_:
                for o in _others():
                    shutil.rmtree(o["path"], ignore_errors=True)
                    out["bytes"] += o["bytes"]
                    out["removed"] += 1
            if as_json:
                typer.echo(json.dumps(out))
            else:
                typer.echo(f"removed {out['removed']} entries ({human_bytes(out['bytes'])}) from {out['root']}")

        guard(go)
