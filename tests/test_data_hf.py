"""Hugging Face datasets as inputs (data.hf): a save_to_disk folder and an hf: spec read offline,
with the same format detection and the same encoded examples as the JSONL file they came from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import sentiment_rows, write_jsonl
from tiny_models import conversations, tiny_llama_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return tiny_llama_folder(tmp_path_factory.mktemp("tiny_llama"))


@pytest.mark.unit
def test_hf_spec_is_parsed_and_bad_specs_refused():
    from tunelab.data.hf import parse_spec
    from tunelab.errors import InputError

    assert parse_spec("hf:org/name") == ("org/name", None, None)
    assert parse_spec("hf:org/name:cfg@validation") == ("org/name", "cfg", "validation")
    assert parse_spec("hf:org/name@train") == ("org/name", None, "train")
    for bad in ("hf:", "hf:org/name@", "hf:org/name:@train"):
        with pytest.raises(InputError):
            parse_spec(bad)


@pytest.mark.e2e
def test_saved_dataset_and_hf_spec_read_like_the_file(tmp_path, tiny_llama, monkeypatch):
    import datasets
    from transformers import AutoTokenizer

    from tunelab.data.cache import file_stamp
    from tunelab.data.classification import load_examples
    from tunelab.tasks.lm_data import read_and_encode
    from tunelab.config import load_config

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    rows = conversations(10)
    jsonl = write_jsonl(tmp_path / "chat.jsonl", rows)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:6]),
                          "test": datasets.Dataset.from_list(rows[6:])}).save_to_disk(str(tmp_path / "dd"))
    (tmp_path / "repo").mkdir()  # a dataset folder load_dataset reads offline (its json builder)
    write_jsonl(tmp_path / "repo" / "train.jsonl", rows)

    (tmp_path / "c.yaml").write_text(json.dumps({"task": "chat", "model": {"name": str(tiny_llama), "max_length": 64},
                                                 "data": {"train": "saved", "eval": "hf:" + str(tmp_path / "repo")}}))
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.data.train == str(tmp_path / "saved") and cfg.data.eval == "hf:" + str(tmp_path / "repo")
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    _, want, _, _ = read_and_encode(str(jsonl), cfg.data, tok, 64, "chat")
    for source in (cfg.data.train, cfg.data.eval + "@train"):
        _, got, _, _ = read_and_encode(source, cfg.data, tok, 64, "chat")
        assert [got[i].input_ids for i in range(len(got))] == [want[i].input_ids for i in range(len(want))]
        assert [got[i].labels for i in range(len(got))] == [want[i].labels for i in range(len(want))]
    assert got.source(3).endswith("#3")  # located by record index

    _, test_split, _, _ = read_and_encode(str(tmp_path / "dd") + "", cfg.data, tok, 64, "chat")
    assert len(test_split) == 6  # a DatasetDict without @split: its train split

    before = file_stamp(tmp_path / "saved")
    datasets.Dataset.from_list(rows[:5]).save_to_disk(str(tmp_path / "saved2"))
    assert file_stamp(tmp_path / "saved2")["fingerprint"] != before["fingerprint"]  # other rows: another key

    labelled = sentiment_rows(12)
    datasets.Dataset.from_list(labelled).save_to_disk(str(tmp_path / "cls"))
    ex, names = load_examples(tmp_path / "cls")  # classification reads it too, same columns
    assert ex.texts == [r["text"] for r in labelled] and names == ["neg", "pos"]


@pytest.mark.unit
def test_a_missing_dataset_is_one_input_error(tmp_path, monkeypatch):
    from tunelab.data.readers import read_records
    from tunelab.errors import InputError

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    with pytest.raises(InputError) as err:
        read_records("hf:no-such-org/no-such-dataset")
    assert err.value.file == "hf:no-such-org/no-such-dataset" and "cannot load the dataset" in err.value.message
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text("{broken")
    with pytest.raises(InputError):
        read_records(tmp_path / "dd")
