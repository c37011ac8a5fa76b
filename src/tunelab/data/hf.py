"""Hugging Face datasets as data inputs: a folder written by `save_to_disk`, or
`hf:ORG/NAME[:CONFIG][@SPLIT]` resolved through `datasets.load_dataset` (from its own cache when
offline: HF_DATASETS_OFFLINE / HF_HUB_OFFLINE).

The rows become the same `Record`s the file readers make (located as `record N`, a dataset has no
lines), so column and format detection, validation and encoding are those of files. A dataset
with several splits needs one chosen (`@split`, or a `train` split is taken); the key of the
encoded-data cache is the dataset's own fingerprint (datasets hashes its content) plus, for a
folder, every file's size and mtime.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import InputError

PREFIX = "hf:"


def is_hf_source(path) -> bool:
    """`hf:...`, or a folder that `save_to_disk` wrote (a Dataset or a DatasetDict)."""
    text = str(path)
    if text.startswith(PREFIX):
        return True
    p = Path(text)
    return p.is_dir() and any((p / name).is_file() for name in ("state.json", "dataset_dict.json"))


def parse_spec(spec: str) -> tuple[str, str | None, str | None]:
    """'hf:ORG/NAME:CONFIG@SPLIT' -> (ORG/NAME, CONFIG, SPLIT); the config and split are optional."""
    rest = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    split = None
    if "@" in rest:
        rest, split = rest.rsplit("@", 1)
    name, _, config = rest.partition(":")
    if not name or split == "" or (":" in rest and not config):
        raise InputError("expected hf:ORG/NAME[:CONFIG][@SPLIT]", file=spec, field="data.train")
    return name, config or None, split


def _one_split(ds, spec: str, split: str | None):
    """The Dataset of a DatasetDict: the named split, else 'train', else the only one."""
    if not hasattr(ds, "keys"):
        return ds
    names = list(ds.keys())
    pick = split or ("train" if "train" in names else (names[0] if len(names) == 1 else None))
    if pick not in names:
        raise InputError(f"the dataset has the splits {names}; choose one with @SPLIT", file=spec)
    return ds[pick]


def load(path):
    """The `datasets.Dataset` behind a save_to_disk folder or an hf: spec; InputError when it cannot be had."""
    import datasets

    text = str(path)
    try:
        if text.startswith(PREFIX):
            name, config, split = parse_spec(text)
            return _one_split(datasets.load_dataset(name, config, split=split), text, split)
        return _one_split(datasets.load_from_disk(text), text, None)
    except InputError:
        raise
    except Exception as e:  # offline without a cached copy, a missing config, a damaged folder
        first = " ".join(str(e).split())[:300]
        raise InputError(f"cannot load the dataset ({type(e).__name__}: {first})", file=text) from None


def read_hf_records(path) -> list:
    """Every row as a Record (index only, no line), in the dataset's order."""
    from tunelab.data.readers import Record

    ds = load(path)
    records = []
    for batch in ds.iter(batch_size=1000):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            records.append(Record(dict(zip(keys, values)), len(records), None))
    if not records:
        raise InputError("the dataset has no rows", file=str(path))
    return records


def hf_stamp(path) -> dict:
    """The cache-key part of a dataset input: its spec or folder, datasets' content fingerprint, rows
    and (folders) every file's size and mtime."""
    ds = load(path)
    stamp = {"hf": str(path), "fingerprint": getattr(ds, "_fingerprint", None), "rows": ds.num_rows}
    p = Path(str(path))
    if p.is_dir():
        stamp["files"] = sorted((str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns)
                                for f in p.rglob("*") if f.is_file())
    return stamp


__all__ = ["is_hf_source", "parse_spec", "load", "read_hf_records", "hf_stamp"]
