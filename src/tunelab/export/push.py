"""`tunelab push RUN REPO_ID`: the run's model (adapter or full weights), its card, and any GGUF
exports, to the Hugging Face Hub through `huggingface_hub`.

`plan_push` builds exactly what would be sent, offline: `huggingface_hub`'s own
`CommitOperationAdd` objects (which check each file and hash it as an upload would) and the model
card, parsed and validated by `huggingface_hub.ModelCard`. `push` hands those same operations to
`HfApi.create_commit` after `HfApi.create_repo(exist_ok=True)`. Only the offline half has been run
here (no network): the README says so.

What goes: RUN/final/* at the repo root (README.md = the card; training-only files such as
checkpoints, metrics and run logs never go), and every `*.gguf` + `Modelfile` of RUN/export*/
folders (or of `--gguf DIR`) under `gguf/`.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import InputError
from tunelab.export.source import locate

SKIP = {"export_check.json"}


def _card(src, folder: Path) -> str:
    """final/README.md (tunelab's card, or peft's), else a short one; its `base_model` made portable
    (peft writes this machine's path there) and tagged `tunelab`."""
    from huggingface_hub import ModelCard, ModelCardData

    base = None
    if src.is_adapter:
        from tunelab.models.adapters import read_adapter_info
        from tunelab.models.base_ref import peft_base_name, portable_reference

        info = read_adapter_info(folder)
        base = peft_base_name(info.get("base") or portable_reference(str(info.get("base_model"))))
    if (folder / "README.md").is_file():
        card = ModelCard((folder / "README.md").read_text(encoding="utf-8"))
    else:
        data = ModelCardData(library_name="peft" if src.is_adapter else "transformers")
        card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n# {(src.run_dir or folder).resolve().name}\n\n"
                         "Fine-tuned with tunelab.\n")
    if base is not None:
        card.data.base_model = base
    card.data.tags = sorted(set(card.data.tags or []) - {t for t in card.data.tags or [] if "/" in t and
                                                          t.startswith("base_model:")} | {"tunelab"})
    return str(card)


def plan_push(path: str | Path, repo_id: str, gguf_dirs: list[str | Path] | None = None) -> dict:
    """What `push` would send: {"repo_id", "operations" (CommitOperationAdd), "files", "card"}."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise InputError(f"not a valid Hub repo id: {str(e).splitlines()[0]}", field="REPO_ID") from None
    if "/" not in repo_id:
        raise InputError("give the repo as owner/name", field="REPO_ID")
    src = locate(path)
    card = _card(src, src.folder)
    ops = [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8"))]
    for f in sorted(src.folder.rglob("*")):
        rel = f.relative_to(src.folder).as_posix()
        if f.is_file() and rel != "README.md" and f.name not in SKIP and not rel.startswith("merged/"):
            ops.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(f)))
    dirs = [Path(d) for d in gguf_dirs] if gguf_dirs else sorted((src.run_dir or src.folder).glob("export*"))
    for d in dirs:
        if not d.is_dir():
            raise InputError("not a folder", file=d, field="--gguf")
        for f in sorted(list(d.glob("*.gguf")) + list(d.glob("Modelfile"))):
            ops.append(CommitOperationAdd(path_in_repo=f"gguf/{f.name}", path_or_fileobj=str(f)))
    files = [{"path": op.path_in_repo, "bytes": op.upload_info.size, "sha256": op.upload_info.sha256.hex()}
             for op in ops]
    return {"repo_id": repo_id, "operations": ops, "files": files, "card": card}


def push(path: str | Path, repo_id: str, *, gguf_dirs=None, private: bool = False, dry_run: bool = False,
         api=None) -> dict:
    """Create the repo if needed and commit the planned files in one commit; `dry_run` stops before the network."""
    plan = plan_push(path, repo_id, gguf_dirs)
    out = {"repo_id": repo_id, "files": plan["files"], "dry_run": dry_run}
    if dry_run:
        return out
    from huggingface_hub import HfApi

    api = api or HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.create_commit(repo_id, plan["operations"], commit_message="Upload model fine-tuned with tunelab",
                             repo_type="model")
    out["commit_url"] = getattr(info, "commit_url", None)
    return out
