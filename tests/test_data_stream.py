"""The first pass in chunks (data.stream, lm_data.encode_stream): the same records, errors, examples
and statistics as reading and encoding the whole file at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tiny_models import conversations, tiny_llama_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _lines(rows: list[dict]) -> str:
    out = []
    for i, r in enumerate(rows):
        out.append(json.dumps(r))
        if i % 4 == 2:
            out.append("")  # blank lines are skipped but counted
    return "\n".join(out) + "\n"


@pytest.mark.unit
def test_chunks_give_the_whole_files_records_and_errors(tmp_path):
    from tunelab.data.readers import read_records
    from tunelab.data.stream import iter_jsonl_chunks
    from tunelab.errors import InputError

    path = tmp_path / "c.jsonl"
    path.write_text("\ufeff" + _lines(conversations(40)), encoding="utf-8")
    chunks = list(iter_jsonl_chunks(path, rows=7))
    assert len(chunks) > 3
    assert [(r.fields, r.index, r.line) for c in chunks for r in c] == [(r.fields, r.index, r.line)
                                                                        for r in read_records(path)]
    good = _lines(conversations(40)).encode()
    broken = good.split(b"\n")
    broken[30] = b"{broken"
    for name, data in (("bad_json", b"\n".join(broken)),
                       ("nul", good[:900] + b"\x00" + good[900:]),
                       ("utf8", good[:1500] + b"\xff" + good[1500:]),
                       ("empty", b"\n\n  \n")):
        path.write_bytes(data)
        with pytest.raises(InputError) as whole:
            read_records(path)
        with pytest.raises(InputError) as streamed:
            [r for c in iter_jsonl_chunks(path, rows=5) for r in c]
        assert (streamed.value.message, streamed.value.line) == (whole.value.message, whole.value.line), name


@pytest.mark.e2e
def test_encoding_in_chunks_equals_encoding_the_whole_file(tmp_path, monkeypatch):
    import yaml
    from transformers import AutoTokenizer

    from tunelab.config import load_config
    from tunelab.data.cache import open_or_build
    from tunelab.data.encoded import LM_LAYOUT, StoreTable
    from tunelab.tasks import lm_data

    tok = AutoTokenizer.from_pretrained(tiny_llama_folder(tmp_path / "llama"))
    (tmp_path / "train.jsonl").write_text(_lines(conversations(33)), encoding="utf-8")
    for max_rows in (None, 17):
        (tmp_path / "c.yaml").write_text(yaml.safe_dump({"task": "chat", "model": {"name": "x", "max_length": 40},
                                                         "data": {"train": "train.jsonl", "max_rows": max_rows,
                                                                  "overflow": "drop"}}))
        cfg = load_config(tmp_path / "c.yaml")
        _, whole, stats, warnings = lm_data.encode_file(cfg.data.train, cfg.data, tok, 40, "chat")
        monkeypatch.setattr("tunelab.data.stream.STREAM_ROWS", 5)
        store = open_or_build({"test": max_rows}, LM_LAYOUT,
                              lambda w: lm_data.encode_stream(cfg.data.train, cfg.data, tok, 40, "chat", None, w))
        got = StoreTable(store)
        assert [(got[i].input_ids, got[i].labels, got.source(i)) for i in range(len(got))] == [
            (e.input_ids, e.labels, e.source) for e in whole]
        assert store.meta["stats"] == stats and store.meta["warnings"] == warnings
        assert stats["dropped_overflow"] > 0 and len(whole) < (max_rows or 33)
