"""The encoded-data cache (tunelab.data.cache): hit and miss on every fingerprint part, damaged
entries rebuilt and never used, cached and uncached runs bit-identical, resume / plan / prepare
reading the cache, and `tunelab cache ls|clear`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import write_jsonl
from tiny_models import conversations, tiny_llama_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYOUT = {"ragged": {"input_ids": "i4", "labels": "i4"}, "columns": {"supervised": "i8"}, "strings": ("source",)}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return tiny_llama_folder(tmp_path_factory.mktemp("tiny_llama"))


def _rows_builder(calls: list, rows: list[list[int]]):
    def build(writer) -> dict:
        calls.append(1)
        writer.add({"input_ids": rows, "labels": [[-100] + r[1:] for r in rows],
                    "supervised": [len(r) - 1 for r in rows], "source": [f"f.jsonl:{i + 1}" for i in range(len(rows))]})
        return {"kind": "conversations"}

    return build


@pytest.mark.unit
def test_store_round_trip_and_damaged_entries_rebuilt_never_used():
    from tunelab.data.cache import data_cache_root, open_or_build
    from tunelab.data.encoded import StoreTable

    rows = [[5, 6, 7], [1], [9, 8, 7, 6, 5], [2, 3]]
    calls: list = []
    build = _rows_builder(calls, rows)
    parts = {"encoder": "test", "n": 1}
    store = open_or_build(parts, LAYOUT, build)
    table = StoreTable(store)
    assert [table[i].input_ids for i in range(4)] == rows and table.lengths.tolist() == [3, 1, 5, 2]
    assert table[2].labels == [-100, 8, 7, 6, 5] and table.source(3) == "f.jsonl:4"
    assert table.subset([2, 0]).lengths.tolist() == [5, 3] and table.subset([2, 0])[1].input_ids == [5, 6, 7]
    assert open_or_build(parts, LAYOUT, build).key == store.key and len(calls) == 1  # a hit

    ids = store.folder / "input_ids.i4"
    for damage in ("flip", "offsets", "truncate", "no_manifest", "bad_manifest"):
        if damage == "flip":  # same size, one token changed: only the checksums (the full check) see it
            raw = bytearray(ids.read_bytes()); raw[0] ^= 1; ids.write_bytes(bytes(raw))
            before = len(calls)
            assert StoreTable(open_or_build(parts, LAYOUT, build))[0].input_ids == [4, 6, 7]  # a hit reads no checksum
            assert len(calls) == before
        elif damage == "offsets":  # the last offset no longer the manifest's token count: the cheap check sees it
            off = store.folder / "offsets.i8"
            raw = bytearray(off.read_bytes()); raw[-8] ^= 1; off.write_bytes(bytes(raw))
        elif damage == "truncate":
            ids.write_bytes(ids.read_bytes()[:-4])
        elif damage == "no_manifest":  # a build killed before its manifest
            (store.folder / "manifest.json").unlink()
        else:
            (store.folder / "manifest.json").write_text("{not json")
        before = len(calls)
        again = StoreTable(open_or_build(parts, LAYOUT, build, verify=damage == "flip"))
        assert len(calls) == before + 1, damage  # rebuilt, not used
        assert [again[i].input_ids for i in range(4)] == rows
    assert sorted(p.name for p in data_cache_root().iterdir() if p.is_dir()) == [store.key]  # nothing left aside

    def failing(writer):
        writer.add({"input_ids": [[1]], "labels": [[-100]], "supervised": [0], "source": ["x"]})
        raise ValueError("bad row")

    with pytest.raises(ValueError):
        open_or_build({"encoder": "test", "n": 2}, LAYOUT, failing)
    assert sorted(p.name for p in data_cache_root().iterdir() if p.is_dir()) == [store.key]  # no partial entry


@pytest.mark.unit
def test_a_hit_reads_no_checksum_and_verify_reads_them_all(monkeypatch):
    from tunelab.data import cache
    from tunelab.data.cache import list_entries, open_or_build

    calls: list = []
    store = open_or_build({"encoder": "test", "n": 3}, LAYOUT, _rows_builder(calls, [[1, 2, 3], [4, 5]]))
    hashed: list = []
    real = cache._sha256_file
    monkeypatch.setattr(cache, "_sha256_file", lambda path, *a: hashed.append(Path(path).name) or real(path, *a))
    open_or_build({"encoder": "test", "n": 3}, LAYOUT, _rows_builder(calls, []))
    assert hashed == [] and len(calls) == 1  # a hit: manifest, sizes and offsets only
    assert list_entries()[0]["state"] == "ok" and hashed == []
    assert list_entries(verify=True)[0]["state"] == "ok" and sorted(hashed) == sorted(store.manifest["files"])
    monkeypatch.setenv("TUNELAB_DATA_CACHE_VERIFY", "1")
    hashed.clear()
    open_or_build({"encoder": "test", "n": 3}, LAYOUT, _rows_builder(calls, []))
    assert sorted(hashed) == sorted(store.manifest["files"]) and len(calls) == 1
    ids = store.folder / "input_ids.i4"
    raw = bytearray(ids.read_bytes()); raw[0] ^= 1; ids.write_bytes(bytes(raw))
    bad = list_entries(verify=True)[0]
    assert bad["state"] == "damaged" and "checksum" in bad["why"] and list_entries()[0]["state"] == "ok"


def _chat_cfg(tmp_path: Path, model: Path, **data) -> "object":
    from tunelab.config import load_config

    cfg = {"task": "chat", "model": {"name": str(model), "max_length": 64},
           "data": {"train": str(tmp_path / "train.jsonl"), "eval_split": 0.25, **data},
           "optim": {"lr": 3e-3}, "schedule": {"name": "constant", "warmup_steps": 0},
           "train": {"max_steps": 4, "batch_size": 2, "log_every": 1, "seed": 5, "eval_every": 2},
           "eval": {"generate": {"n": 0}}, "early_stopping": {"enabled": False}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return load_config(tmp_path / "c.yaml")


@pytest.fixture
def encode_calls(monkeypatch):
    """Counts the real encodings (lm_data.encode_file / encode_stream calls): a cache hit makes none."""
    import tunelab.tasks.lm_data as lm

    calls = []
    for name in ("encode_file", "encode_stream"):
        real = getattr(lm, name)

        def counting(*a, _real=real, **k):
            calls.append(a[0])
            return _real(*a, **k)

        monkeypatch.setattr(lm, name, counting)
    return calls


@pytest.mark.unit
def test_every_fingerprint_part_misses_and_the_same_inputs_hit(tmp_path, tiny_llama, encode_calls, monkeypatch):
    from transformers import AutoTokenizer

    import tunelab
    from tunelab.tasks.causal_lm import read_and_encode

    train = write_jsonl(tmp_path / "train.jsonl", conversations(12))
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    cfg = _chat_cfg(tmp_path, tiny_llama)

    def encode(cfg=cfg, tok=tok, max_length=64, task="chat"):
        n = len(encode_calls)
        _, table, _, _ = read_and_encode(str(train), cfg.data, tok, max_length, task)
        return len(encode_calls) > n, table

    missed, first = encode()
    assert missed
    missed, hit = encode()
    assert not missed and [hit[i] for i in range(len(hit))] == [first[i] for i in range(len(first))]

    changes = {
        "max_length": lambda: encode(max_length=48),
        "overflow": lambda: encode(cfg=_chat_cfg(tmp_path, tiny_llama, overflow="drop")),
        "format": lambda: encode(cfg=_chat_cfg(tmp_path, tiny_llama, format="openai")),
        "max_rows": lambda: encode(cfg=_chat_cfg(tmp_path, tiny_llama, max_rows=10)),
        "task": lambda: encode(task="causal_lm"),
    }
    for part, run in changes.items():
        assert run()[0], part
        assert not run()[0], f"{part}: the second time is a hit"

    other = AutoTokenizer.from_pretrained(tiny_llama)
    other.chat_template = other.chat_template.replace("<|im_end|>", "<|im_end|> ")
    assert encode(tok=other)[0], "chat template"
    other = AutoTokenizer.from_pretrained(tiny_llama)
    other.add_tokens(["zebra"])
    assert encode(tok=other)[0], "tokenizer vocabulary"

    # the data file: one character changed with size and mtime kept (only the content hash sees it) ...
    stat = train.stat()
    train.write_text(train.read_text().replace("sky", "sea", 1), encoding="utf-8")
    os.utime(train, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert train.stat().st_size == stat.st_size
    missed, changed = encode()
    assert missed and [changed[i].input_ids for i in range(3)] != [first[i].input_ids for i in range(3)]
    # ... the mtime alone ...
    os.utime(train, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert encode()[0], "mtime"
    assert not encode()[0]
    # ... and tunelab's version
    monkeypatch.setattr(tunelab, "__version__", "999.0")
    assert encode()[0], "tunelab version"


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "final" / "model.safetensors")


def _rows(run: Path) -> list[dict]:
    drop = {"elapsed", "tokens_per_second", "samples_per_second", "eval_seconds", "time", "wall_seconds"}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in drop and not k.endswith(("_seconds", "memory_mb"))} for r in rows]


@pytest.mark.e2e
def test_cached_and_uncached_runs_are_bit_identical_and_resume_plan_prepare_read_the_cache(
        tmp_path, tiny_llama, encode_calls):
    from tunelab.compose import prepare_data as prepare
    from tunelab.plan.planner import data_profile
    from tunelab.run import run_training, setup
    from conftest import stop_after

    write_jsonl(tmp_path / "train.jsonl", conversations(24))
    runs = {}
    for name, cache in (("uncached", False), ("miss", True), ("hit", True)):
        cfg = _chat_cfg(tmp_path, tiny_llama, cache=cache)
        n = len(encode_calls)
        summary = run_training(cfg, tmp_path / name, show_progress=False)
        assert summary["status"] == "completed"
        runs[name] = summary
        assert len(encode_calls) - n == {"uncached": 1, "miss": 1, "hit": 0}[name], name
    reference = _weights(tmp_path / "uncached")
    for name in ("miss", "hit"):
        got = _weights(tmp_path / name)
        assert got.keys() == reference.keys()
        assert all(torch.equal(got[k], reference[k]) for k in reference), name
        assert _rows(tmp_path / name) == _rows(tmp_path / "uncached"), name
        assert runs[name]["data"] == runs["uncached"]["data"], name

    cfg = _chat_cfg(tmp_path, tiny_llama)
    n = len(encode_calls)
    stopped = run_training(cfg, tmp_path / "resumed", show_progress=False, should_stop=stop_after(2))
    assert stopped["status"] != "completed"
    resumed = run_training(cfg, tmp_path / "resumed", show_progress=False, resume="auto")
    assert resumed["status"] == "completed"
    assert all(torch.equal(_weights(tmp_path / "resumed")[k], reference[k]) for k in reference)
    assert data_profile(cfg)["units"] > 0
    assert prepare(cfg) and len(encode_calls) == n  # resume, plan and prepare: all hits

    fresh = _chat_cfg(tmp_path, tiny_llama, max_rows=20)  # prepare first, then training reads what it wrote
    folders = prepare(fresh)
    assert len(encode_calls) == n + 1 and len(folders) == 1 and (folders[0] / "manifest.json").is_file()
    setup(fresh)  # everything a run does before its loop: the data comes from prepare's entry
    assert len(encode_calls) == n + 1


@pytest.mark.e2e
def test_cli_cache_ls_and_clear(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tunelab.cli import app
    from tunelab.data.cache import open_or_build

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "tl"))
    (tmp_path / "tl" / "gguf" / "m").mkdir(parents=True)
    (tmp_path / "tl" / "gguf" / "m" / "w.bin").write_bytes(b"x" * 100)
    store = open_or_build({"encoder": "test"}, LAYOUT, _rows_builder([], [[1, 2, 3]] * 10))
    res = CliRunner().invoke(app, ["cache", "ls", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert [e["key"] for e in out["entries"]] == [store.key] and out["entries"][0]["state"] == "ok"
    assert out["entries"][0]["rows"] == 10 and out["bytes"] == out["entries"][0]["bytes"] > 30 * 4
    assert [o["name"] for o in out["other"]] == ["gguf"] and out["other"][0]["bytes"] == 100
    text = CliRunner().invoke(app, ["cache", "ls"]).output
    assert store.key in text and "10 rows" in text and " B" in text

    res = CliRunner().invoke(app, ["cache", "clear", "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["removed"] == 1
    assert json.loads(CliRunner().invoke(app, ["cache", "ls", "--json"]).output)["entries"] == []
    assert (tmp_path / "tl" / "gguf" / "m" / "w.bin").is_file()  # clear keeps the GGUF conversions; --all does not
    assert json.loads(CliRunner().invoke(app, ["cache", "clear", "--all", "--json"]).output)["removed"] == 1
    assert not (tmp_path / "tl" / "gguf").exists()


@pytest.mark.unit
@pytest.mark.parametrize("where", ["under_a_file", "a_file"])
def test_a_cache_folder_that_cannot_be_made_is_bad_input_naming_it(where, tmp_path, monkeypatch):
    """$TUNELAB_DATA_CACHE at (or under) a file: an InputError naming the folder and data.cache (exit 2), not
    NotADirectoryError / FileExistsError out of mkdir (an internal error, exit 1)."""
    from tunelab.data.cache import open_or_build
    from tunelab.errors import InputError

    (tmp_path / "plain").write_text("x")
    root = tmp_path / "plain" / "sub" if where == "under_a_file" else tmp_path / "plain"
    monkeypatch.setenv("TUNELAB_DATA_CACHE", str(root))
    with pytest.raises(InputError) as e:
        open_or_build({"a": 1}, LAYOUT, _rows_builder([], [[1, 2]]))
    assert e.value.file is not None and Path(e.value.file) == root and e.value.field == "data.cache"
    assert "TUNELAB_DATA_CACHE" in e.value.message
