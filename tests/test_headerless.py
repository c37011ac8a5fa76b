"""Headerless CSV/TSV (issue 20): data.header true/false/unset (detected), AG News' text<TAB>label rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import SHARED_DATASETS
from tunelab.config import config_from_dict
from tunelab.data.classification import load_examples, load_train_eval
from tunelab.errors import InputError

pytestmark = pytest.mark.unit

ROWS = ["stocks fell sharply\tBusiness", "the team won the cup\tSports", "new chip is faster\tSci/Tech",
        "markets rallied today\tBusiness", "striker scores twice\tSports", "phone maker opens lab\tSci/Tech"]


def _tsv(tmp_path: Path, lines: list[str], name: str = "d.tsv") -> Path:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_headerless_file_is_detected_and_its_first_row_kept(tmp_path):
    ex, names = load_examples(_tsv(tmp_path, ROWS))
    assert len(ex) == 6  # the first row is data, not a header
    assert ex.texts[0] == "stocks fell sharply"
    assert names == ["Business", "Sci/Tech", "Sports"]
    assert ex.source[0] == "d.tsv:1"  # file:line still points at the row


def test_header_false_and_true_are_obeyed(tmp_path):
    p = _tsv(tmp_path, ROWS)
    assert len(load_examples(p, header=False)[0]) == 6
    with pytest.raises(InputError, match="missing column"):  # header: true reads row 1 as names
        load_examples(p, header=True)


def test_a_header_with_other_names_stays_a_header(tmp_path):
    # "review<TAB>sentiment" names no expected column, but 'sentiment' recurs nowhere below: a header
    p = _tsv(tmp_path, ["review\tsentiment", "good film\tpos", "bad film\tneg"])
    with pytest.raises(InputError, match="missing column .*review, sentiment"):
        load_examples(p)
    with_header = _tsv(tmp_path, ["text\tlabel"] + ROWS, "h.tsv")
    assert len(load_examples(with_header)[0]) == 6


def test_header_false_with_the_wrong_width_names_line_1(tmp_path):
    p = _tsv(tmp_path, ["a\tb\tc", "d\te\tf"])
    with pytest.raises(InputError) as e:
        load_examples(p, header=False)
    assert e.value.line == 1 and "3 fields" in e.value.one_line()


def test_config_key_reaches_the_loader_and_is_classification_only(tmp_path):
    p = _tsv(tmp_path, ROWS * 4)
    cfg = config_from_dict({"data": {"train": str(p), "header": False, "eval_split": 0.25}})
    train, evaluation, names = load_train_eval(cfg.data, seed=0)
    assert len(train) + len(evaluation) == 24 and len(names) == 3
    with pytest.raises(InputError, match="classification only"):
        config_from_dict({"task": "chat", "data": {"train": str(p), "header": False}})


@pytest.mark.shared
def test_agnews_reads_whole():
    path = SHARED_DATASETS / "agnews" / "train.tsv"
    if not path.is_file():
        pytest.skip("../shared/datasets/agnews is missing")
    ex, names = load_examples(path)
    assert len(ex) == 10_001
    assert names == ["Business", "Sci/Tech", "Sports", "World"]
