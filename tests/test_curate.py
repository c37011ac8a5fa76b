"""Curation: the rules of tunelab.data.curate against hand-made data with known answers, and the
`data clean` / `data check` verbs that use them (exact counts, exact kept rows, round trips,
refusals with exit 2)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import write_jsonl
from tunelab.cli import app
from tunelab.data.classification import Examples, load_examples
from tunelab.data.clean import clean_files
from tunelab.data.curate import (Filters, Row, conversation_key, curate, describe, exact_duplicates, label_conflicts,
                                 leaked, normalize_text, percentiles)
from tunelab.data.near_dup import jaccard, near_duplicates, shingles
from tunelab.data.readers import read_records

runner = CliRunner()

# Ten training rows, the answer known: lines 2 and 4 repeat lines 1 and 3 (case, spacing, full-width
# letters); 5 and 6 are one text under two labels; 7 is blank; 9 leaks into the eval file.
TRAIN = [
    {"text": "The movie was great", "label": "pos"},
    {"text": "the  movie was GREAT", "label": "pos"},
    {"text": "Boring plot", "label": "neg"},
    {"text": "\uff42\uff4f\uff52\uff49\uff4e\uff47 plot ", "label": "neg"},  # full-width "boring"
    {"text": "Lovely music", "label": "pos"},
    {"text": "lovely music", "label": "neg"},
    {"text": "   ", "label": "pos"},
    {"text": "Terrible ending", "label": "neg"},
    {"text": "I loved the acting", "label": "pos"},
    {"text": "Awful film", "label": "neg"},
]
TRAIN_KEPT_LINES = [1, 3, 8, 9, 10]
EVAL = [
    {"text": "i loved the\tacting", "label": "pos"},
    {"text": "Dull story", "label": "neg"},
    {"text": "dull story", "label": "neg"},
    {"text": "A fine film", "label": "pos"},
]
EVAL_KEPT_LINES = [2, 4]


def rows_of(texts_labels, file="f.jsonl") -> list[Row]:
    return [Row(normalize_text(t), t, y, f"{file}:{i}") for i, (t, y) in enumerate(texts_labels, start=1)]


# ------------------------------------------------------------------ pure rules


@pytest.mark.unit
def test_normalize_text_folds_unicode_space_and_case():
    assert normalize_text("  The\u00a0 MOVIE\n\twas ﬁne ") == "the movie was fine"  # nbsp, ligature
    assert normalize_text("Ｇｒｅａｔ") == "great"  # full-width
    assert normalize_text("Straße") == normalize_text("STRASSE")  # case folding, not lower()
    assert normalize_text("good film") != normalize_text("good films")


@pytest.mark.unit
def test_single_rules_give_known_answers():
    keys = ["a", "b", "a", "c", "a", "b"]
    assert exact_duplicates(keys) == {2: 0, 4: 0, 5: 1}
    assert label_conflicts(keys, ["x", "y", "x", "x", "z", "y"]) == [0, 2, 4]  # 'a' has x and z; 'b' only y
    assert leaked({"c", "q"}, keys) == [3]
    assert percentiles(list(range(1, 101))) == {"min": 1, "p50": 50, "p90": 90, "p99": 99, "max": 100}
    assert percentiles([7]) == {"min": 7, "p50": 7, "p90": 7, "p99": 7, "max": 7}


@pytest.mark.unit
def test_curate_counts_each_row_under_the_first_rule_that_drops_it():
    rows = rows_of([("tiny", "a"), ("a long enough text", "a"), ("A long  enough text", "a"),
                    ("x" * 50, "a"), ("same words here", "a"), ("Same words here", "b"), ("fine row", "b")])
    out = curate(rows, Filters(min_chars=5, max_chars=30), train_keys={normalize_text("fine row")})
    assert out.dropped == {"too_short": [0], "too_long": [3], "leakage": [6], "label_conflict": [4, 5], "duplicate": [2]}
    assert out.kept == [1]
    assert out.copy_of == {2: 1}
    report = describe(out, rows, {"empty": ["f.jsonl:9"]})
    assert report["dropped"] == {"empty": 1, "too_short": 1, "too_long": 1, "leakage": 1, "label_conflict": 2, "duplicate": 1}
    assert report["examples"]["duplicate"] == ["f.jsonl:3 (copy of f.jsonl:2)"]


@pytest.mark.unit
def test_token_bounds_use_the_given_counts():
    rows = rows_of([("one", None), ("one two", None), ("one two three", None), ("one two three four", None)])
    out = curate(rows, Filters(min_tokens=2, max_tokens=3), token_counts=[1, 2, 3, 4])
    assert out.dropped == {"too_few_tokens": [0], "too_many_tokens": [3]} and out.kept == [1, 2]


@pytest.mark.unit
def test_conversation_key_compares_roles_and_normalised_content():
    a = conversation_key([("user", "Hi  there"), ("assistant", "Hello!")])
    assert a == conversation_key([("user", "hi there"), ("assistant", "HELLO!")])
    assert a != conversation_key([("user", "Hi there"), ("assistant", "Hello")])
    assert a != conversation_key([("system", "Hi there"), ("assistant", "Hello!")])
    # a message boundary cannot be imitated by content
    assert conversation_key([("user", "a"), ("user", "b")]) != conversation_key([("user", 'a"], ["user", "b')])


# ------------------------------------------------------------------ near duplicates

BASE = "the old lighthouse keeper walked along the rocky shore every single morning".split()


@pytest.mark.unit
def test_near_duplicates_exact_jaccard_and_determinism():
    a = " ".join(BASE)                       # 12 words, 10 shingles
    b = " ".join(BASE[:-1] + ["evening"])    # last shingle differs: Jaccard 9/11
    c = "a completely different sentence about cooking rice in a small pot"
    assert jaccard(shingles(a), shingles(b)) == pytest.approx(9 / 11)
    assert near_duplicates([a, b, c], 0.8) == {1: 0}
    assert near_duplicates([a, b, c], 0.85) == {}  # 0.818 is below
    assert all(near_duplicates([a, b, c], 0.8, seed=s) == {1: 0} for s in range(5))


@pytest.mark.unit
def test_near_duplicate_chain_keeps_both_ends():
    """Windows of 40 distinct words, each 5 words on: a~b and b~c (33/43 shared shingles), a and c
    less alike (28/48). b goes as a copy of a; c is compared with kept rows only, so it stays."""
    words = [f"w{i}" for i in range(50)]
    a, b, c = (" ".join(words[k : k + 40]) for k in (0, 5, 10))
    assert jaccard(shingles(a), shingles(b)) == pytest.approx(33 / 43) == jaccard(shingles(b), shingles(c))
    assert jaccard(shingles(a), shingles(c)) == pytest.approx(28 / 48)
    assert near_duplicates([a, b, c], 0.7) == {1: 0}
    assert near_duplicates([a, b, c], 0.5) == {1: 0, 2: 0}


@pytest.mark.unit
def test_rows_per_band_keeps_misses_rare_and_bands_wide_when_it_can():
    from tunelab.data.near_dup import NUM_PERM, rows_per_band

    for t in (0.3, 0.5, 0.7, 0.8, 0.9):
        r = rows_per_band(t)
        assert (1 - t**r) ** (NUM_PERM // r) < 1e-6
    assert rows_per_band(0.9) == 4 and rows_per_band(0.5) == 2 and rows_per_band(0.3) == 1


@pytest.mark.e2e
def test_check_near_dup_option_through_the_cli(tmp_path):
    rows = [{"text": " ".join(BASE)}, {"text": " ".join(BASE[:-1] + ["evening"])}, {"text": "short note"}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    result, report = _invoke(["data", "check", str(path), "--near-dup", "0.8", "--json"])
    assert result.exit_code == 0, result.output
    assert report["task"] == "text" and report["duplicate_texts"] == 0
    assert report["clean"]["would_drop"] == {"near_duplicate": 1}
    assert report["clean"]["examples"]["near_duplicate"] == [f"{path}:2 (copy of {path}:1)"]


@pytest.mark.unit
def test_curate_near_duplicates_reason():
    texts = [" ".join(BASE), " ".join(BASE[:-1] + ["evening"]), "something else entirely here"]
    rows = rows_of([(t, None) for t in texts])
    out = curate(rows, Filters(near_duplicate=0.8))
    assert out.dropped == {"near_duplicate": [1]} and out.kept == [0, 2] and out.copy_of == {1: 0}


# ------------------------------------------------------------------ data clean, classification


def _invoke(args: list[str]):
    result = runner.invoke(app, args)
    return result, (json.loads(result.stdout) if result.exit_code == 0 and "--json" in args else None)


@pytest.mark.e2e
def test_clean_cli_classification_exact_counts_and_rows(tmp_path):
    train, ev = write_jsonl(tmp_path / "train.jsonl", TRAIN), write_jsonl(tmp_path / "eval.jsonl", EVAL)
    out, eval_out = tmp_path / "clean" / "train.jsonl", tmp_path / "clean" / "eval.jsonl"
    before = train.read_bytes(), ev.read_bytes()
    result, report = _invoke(["data", "clean", str(train), "--eval", str(ev), "--out", str(out),
                              "--eval-out", str(eval_out), "--json"])
    assert result.exit_code == 0, result.output
    assert (report["task"], report["rows"], report["kept"]) == ("classification", 10, 5)
    assert report["dropped"] == {"empty": 1, "label_conflict": 2, "duplicate": 2}
    assert report["examples"]["duplicate"] == [f"{train}:2 (copy of {train}:1)", f"{train}:4 (copy of {train}:3)"]
    assert report["examples"]["label_conflict"] == [f"{train}:5", f"{train}:6"]
    assert report["examples"]["empty"] == [f"{train}:7"]
    assert (report["out"], report["out_format"]) == (str(out), "jsonl")
    e = report["eval"]
    assert (e["rows"], e["kept"], e["dropped"]) == (4, 2, {"leakage": 1, "duplicate": 1})
    assert e["examples"]["leakage"] == [f"{ev}:1"]
    # the outputs hold exactly the kept rows, as written, and read back through the readers
    assert [r.fields for r in read_records(out)] == [TRAIN[i - 1] for i in TRAIN_KEPT_LINES]
    assert [r.fields for r in read_records(eval_out)] == [EVAL[i - 1] for i in EVAL_KEPT_LINES]
    ex, names = load_examples(out)
    assert len(ex) == 5 and names == ["neg", "pos"]
    assert (train.read_bytes(), ev.read_bytes()) == before  # inputs untouched
    assert not list(out.parent.glob(".*tmp*"))  # no temporary file left behind


@pytest.mark.e2e
def test_clean_text_output_names_counts_and_examples(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", TRAIN)
    result = runner.invoke(app, ["data", "clean", str(train), "--out", str(tmp_path / "o.jsonl")])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == f"kept 5 of 10 rows of {train} -> {tmp_path / 'o.jsonl'} (jsonl)"
    assert re.search(r"duplicate\s+2\s+e\.g\. .*train\.jsonl:2 \(copy of .*train\.jsonl:1\)", result.stdout)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".parquet"])
@pytest.mark.unit
def test_clean_keeps_the_input_format_and_round_trips(tmp_path, suffix):
    """A file cleaned into its own format reads back with the same fields, minus the dropped rows."""
    from tunelab.data.writers import write_records

    rows = [{"text": r["text"], "label": r["label"], "id": str(i)} for i, r in enumerate(TRAIN) if r["text"].strip()]
    rows[-1]["text"] = 'Awful "film", really'  # a quote and a comma: CSV must quote them, TSV keep them bare
    src = tmp_path / f"train{suffix}"
    write_records(src, rows, columns=["text", "label", "id"])
    assert [r.fields for r in read_records(src)] == rows  # the writer itself round-trips
    out = tmp_path / f"out{suffix}"
    report = clean_files(src, out)
    assert report["dropped"] == {"label_conflict": 2, "duplicate": 2} and report["out_format"] == suffix[1:]
    kept = [r.fields for r in read_records(out)]
    assert [r["id"] for r in kept] == ["0", "2", "7", "8", "9"]
    assert kept == [r for r in rows if r["id"] in {"0", "2", "7", "8", "9"}]


@pytest.mark.unit
def test_clean_length_bounds_exact(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", TRAIN)
    report = clean_files(train, tmp_path / "o.jsonl", filters=Filters(min_chars=11, max_chars=15))
    # lengths: 19 20 11 12 12 12 (blank) 15 18 10 -> lines 1, 2, 9 long, 10 short; of the rest, 4 copies 3
    # and 5/6 conflict, leaving "Boring plot" and "Terrible ending"
    assert report["dropped"] == {"empty": 1, "too_short": 1, "too_long": 3, "label_conflict": 2, "duplicate": 1}
    assert [r.fields["text"] for r in read_records(tmp_path / "o.jsonl")] == ["Boring plot", "Terrible ending"]


@pytest.mark.e2e
def test_clean_min_tokens_with_a_tokenizer(tmp_path, tiny_bert):
    train = write_jsonl(tmp_path / "train.jsonl", [r for r in TRAIN if r["text"].strip()])
    out = tmp_path / "o.jsonl"
    result, report = _invoke(["data", "clean", str(train), "--out", str(out), "--tokenizer", str(tiny_bert),
                              "--min-tokens", "4", "--json"])
    assert result.exit_code == 0, result.output
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    counts = [len(tok(rec.fields["text"], add_special_tokens=False)["input_ids"]) for rec in read_records(train)]
    assert 0 < sum(n < 4 for n in counts) < len(counts)  # the bound splits the file
    assert report["dropped"]["too_few_tokens"] == sum(n < 4 for n in counts)
    kept_texts = {r.fields["text"] for r in read_records(out)}
    assert all(n >= 4 for rec, n in zip(read_records(train), counts) if rec.fields["text"] in kept_texts)


# ------------------------------------------------------------------ data clean, chat and text

CHAT = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    {"messages": [{"role": "user", "content": "hi "}, {"role": "assistant", "content": "hello!"}]},  # copy of 1
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]},  # other answer
    {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "  "}]},  # empty answer
    {"messages": [{"role": "user", "content": "Only a question"}]},  # no assistant turn
    {"messages": [{"role": "system", "content": "Be brief."}]},  # only a system prompt
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}]},  # a system prompt makes it another conversation
]
CHAT_EVAL = [
    {"messages": [{"role": "user", "content": "HI"}, {"role": "assistant", "content": "Hello!"}]},  # leaked
    {"messages": [{"role": "user", "content": "New"}, {"role": "assistant", "content": "Thing"}]},
]


@pytest.mark.e2e
def test_clean_chat_dedupe_empty_and_missing_assistant(tmp_path):
    train, ev = write_jsonl(tmp_path / "chat.jsonl", CHAT), write_jsonl(tmp_path / "chat_eval.jsonl", CHAT_EVAL)
    out, eval_out = tmp_path / "o.jsonl", tmp_path / "oe.jsonl"
    result, report = _invoke(["data", "clean", str(train), "--eval", str(ev), "-o", str(out), "--eval-out",
                              str(eval_out), "--json"])
    assert result.exit_code == 0, result.output
    assert report["task"] == "chat" and (report["rows"], report["kept"]) == (7, 3)
    assert report["dropped"] == {"empty_assistant": 1, "no_assistant_turn": 2, "duplicate": 1}
    assert report["examples"]["no_assistant_turn"] == [f"{train}:5", f"{train}:6"]
    assert report["eval"]["dropped"] == {"leakage": 1}
    assert [r.fields for r in read_records(out)] == [CHAT[0], CHAT[2], CHAT[6]]
    assert [r.fields for r in read_records(eval_out)] == [CHAT_EVAL[1]]
    from tunelab.data.chat import read_chat_data

    assert len(read_chat_data(out).conversations) == 3  # training accepts the cleaned file


@pytest.mark.unit
def test_clean_alpaca_compares_instruction_input_and_output(tmp_path):
    rows = [{"instruction": "Add", "input": "2+2", "output": "4"},
            {"instruction": "add", "input": "2 + 2", "output": "4"},  # not a copy: '2 + 2' != '2+2'
            {"instruction": "ADD", "input": "2+2", "output": "4"},    # a copy of the first
            {"instruction": "Add", "output": "4"}]                    # no input: another prompt
    src = write_jsonl(tmp_path / "a.jsonl", rows)
    report = clean_files(src, tmp_path / "o.jsonl")
    assert report["dropped"] == {"duplicate": 1} and report["examples"]["duplicate"] == [f"{src}:3 (copy of {src}:1)"]


@pytest.mark.unit
def test_clean_plain_text_jsonl_and_txt(tmp_path):
    rows = [{"text": "First doc."}, {"text": "first   DOC."}, {"text": ""}, {"text": "Second doc,\nline two."}]
    report = clean_files(write_jsonl(tmp_path / "t.jsonl", rows), tmp_path / "o.txt")
    assert report["task"] == "text" and report["dropped"] == {"empty": 1, "duplicate": 1}
    assert (tmp_path / "o.txt").read_text() == "First doc.\n\nSecond doc,\nline two.\n"
    again = clean_files(tmp_path / "o.txt", tmp_path / "o2.txt", task="text")
    assert again["rows"] == again["kept"] == 2 and (tmp_path / "o2.txt").read_text() == (tmp_path / "o.txt").read_text()


# ------------------------------------------------------------------ data check


@pytest.mark.e2e
def test_check_classification_json_keeps_old_keys_and_counts(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [r for r in TRAIN if r["text"].strip()])
    ev = write_jsonl(tmp_path / "eval.jsonl", EVAL)
    result, report = _invoke(["data", "check", str(train), "--eval", str(ev), "--json"])
    assert result.exit_code == 0, result.output
    assert report["file"] == str(train) and report["rows"] == 9 and report["labels"] == {"neg": 5, "pos": 4}
    assert report["duplicate_texts"] == 3  # lines 2, 4 and 6 repeat an earlier text
    assert report["label_conflicts"] == 2
    assert (report["chars_median"], report["chars_max"]) == (12, 20)
    assert report["clean"]["would_keep"] == 5 and report["clean"]["would_drop"] == {"label_conflict": 2, "duplicate": 2}
    assert report["eval"]["leakage"] == 1 and report["eval"]["leakage_examples"] == [f"{ev}:1"]
    assert report["eval"]["clean"]["would_drop"] == {"leakage": 1, "duplicate": 1}
    assert any("eval rows also appear" in h for h in report["eval"]["hints"])


@pytest.mark.e2e
def test_check_chat_reports_roles_turns_and_assistant_share(tmp_path):
    rows = [CHAT[0], CHAT[2], CHAT[6], CHAT[1]]
    result, report = _invoke(["data", "check", str(write_jsonl(tmp_path / "c.jsonl", rows)), "--json"])
    assert result.exit_code == 0, result.output
    chat = report["chat"]
    assert chat["conversations"] == 4 and chat["roles"] == {"system": 1, "user": 4, "assistant": 4}
    assert chat["with_system_prompt"] == 1 and chat["multi_turn"] == 0
    assert chat["messages_per_conversation"]["max"] == 3
    total = sum(len(m["content"]) for r in rows for m in r["messages"])
    answers = sum(len(m["content"]) for r in rows for m in r["messages"] if m["role"] == "assistant")
    assert chat["assistant_char_share"] == round(answers / total, 4)
    assert report["duplicate_texts"] == 1 and report["clean"]["would_drop"] == {"duplicate": 1}


@pytest.mark.e2e
def test_check_stops_at_the_first_refused_row_and_counts_them(tmp_path):
    train = write_jsonl(tmp_path / "chat.jsonl", CHAT)
    result = runner.invoke(app, ["data", "check", str(train)])
    assert result.exit_code == 2 and result.stdout == ""
    line = result.stderr.strip()
    assert re.fullmatch(rf"error: {re.escape(str(train))}:4: field 'messages\[1\]\.content': empty assistant turn "
                        r"\(1 of 3 rows that training refuses; `tunelab data clean` drops them\)", line), line


# ------------------------------------------------------------------ bad input: exit 2, one located line


def _bad(ws: Path, name: str):
    """(arguments, location, words) of one bad `data` call, its files written into ws."""
    train = write_jsonl(ws / "train.jsonl", TRAIN[:4])
    ev = write_jsonl(ws / "eval.jsonl", EVAL)
    out = str(ws / "out.jsonl")
    cases = {
        "out_is_input": (["clean", str(train), "--out", str(train)], "train.jsonl field '--out'", "input file"),
        "out_is_input_respelled": (["clean", str(train), "--out", str(ws / "sub" / ".." / "train.jsonl")],
                                   "train.jsonl field '--out'", "input file"),
        "out_is_eval_input": (["clean", str(train), "--eval", str(ev), "--out", str(ev), "--eval-out", out],
                              "eval.jsonl field '--out'", "input file"),
        "eval_out_is_eval_input": (["clean", str(train), "--eval", str(ev), "--out", out, "--eval-out", str(ev)],
                                   "eval.jsonl field '--eval-out'", "input file"),
        "eval_out_is_out": (["clean", str(train), "--eval", str(ev), "--out", out, "--eval-out", out],
                            "out.jsonl field '--eval-out'", "--out"),
        "eval_without_eval_out": (["clean", str(train), "--eval", str(ev), "--out", out], "field '--eval-out'", "--eval"),
        "unknown_out_suffix": (["clean", str(train), "--out", str(ws / "out.xlsx")], "out.xlsx field '--out'", "suffix"),
        "txt_out_for_labels": (["clean", str(train), "--out", str(ws / "out.txt")], "out.txt field '--out'", "plain text"),
        "min_above_max": (["clean", str(train), "--out", out, "--min-chars", "9", "--max-chars", "3"],
                          "field '--min-chars'", "above"),
        "tokens_without_tokenizer": (["clean", str(train), "--out", out, "--max-tokens", "9"], "field '--tokenizer'",
                                     "tokenizer"),
        "near_dup_above_1": (["clean", str(train), "--out", out, "--near-dup", "1.5"], "field '--near-dup'", "1.5"),
        "unknown_task": (["clean", str(train), "--out", out, "--task", "ner"], "field '--task'", "'ner'"),
        "broken_line": (["clean", str(ws.joinpath("b.jsonl")), "--out", out], "b.jsonl:2", "invalid JSON"),
        "eval_label_unknown": (["clean", str(train), "--eval", str(ws / "e2.jsonl"), "--out", out, "--eval-out",
                                str(ws / "oe.jsonl")], "e2.jsonl:2 field 'label'", "training data"),
        "text_without_label": (["clean", str(ws / "t.jsonl"), "--out", out], "t.jsonl:1 field 'label'", "--task text"),
        "txt_without_task": (["clean", str(ws / "doc.txt"), "--out", out], "doc.txt", "suffix"),
        "nested_to_csv": (["clean", str(ws / "chat.jsonl"), "--out", str(ws / "out.csv")], "out.csv field '--out'",
                          "CSV"),
        "check_empty_text": (["check", str(ws / "e.jsonl")], "e.jsonl:2 field 'text'", "training refuses such rows"),
        "check_txt_without_task": (["check", str(ws / "doc.txt")], "doc.txt", "suffix"),
    }
    (ws / "b.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": \n')
    write_jsonl(ws / "e2.jsonl", [EVAL[0], {"text": "meh", "label": "meh"}])
    write_jsonl(ws / "t.jsonl", [{"text": "a", "score": 1}])
    (ws / "doc.txt").write_text("one\n\ntwo\n")
    write_jsonl(ws / "chat.jsonl", CHAT[:1])
    write_jsonl(ws / "e.jsonl", [TRAIN[0], {"text": "", "label": "pos"}])
    args, loc, word = cases[name]
    return ["data", *args], loc, word


BAD = ["out_is_input", "out_is_input_respelled", "out_is_eval_input", "eval_out_is_eval_input", "eval_out_is_out",
       "eval_without_eval_out", "unknown_out_suffix", "txt_out_for_labels", "min_above_max", "tokens_without_tokenizer",
       "near_dup_above_1", "unknown_task", "broken_line", "eval_label_unknown", "text_without_label",
       "txt_without_task", "nested_to_csv", "check_empty_text", "check_txt_without_task"]


@pytest.mark.parametrize("name", BAD)
@pytest.mark.e2e
def test_data_bad_input_exits_2_with_one_located_line(tmp_path, name):
    args, loc, word = _bad(tmp_path, name)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    result = runner.invoke(app, args)
    shown = f"exit {result.exit_code}\nstderr:\n{result.stderr}\nstdout:\n{result.stdout}"
    assert result.exit_code == 2 and result.stdout == "" and "Traceback" not in result.output, shown
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, shown
    rx = re.escape(loc).replace(r"\ field", ":? field")
    assert re.match(rf"error: (\S*/)?{rx}: \S", lines[0]), f"expected {loc!r} in {lines[0]!r}"
    assert word in lines[0], lines[0]
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before, "a refused call wrote or changed a file"


# ------------------------------------------------------------------ training: warn, never change the data


@pytest.mark.unit
def test_train_warns_and_records_quality_without_changing_data(toy_classification, caplog):
    from tunelab.config import Config
    from tunelab.compose import setup_task
    from tunelab.tasks.classification import data_quality

    train = Examples(["Good film", "good  film", "Bad film", "bad film", "Fine"], [1, 1, 0, 1, 1],
                     source=[f"t.jsonl:{i}" for i in range(1, 6)])
    evaluation = Examples(["FINE", "new one"], [1, 0], source=["e.jsonl:1", "e.jsonl:2"])
    with caplog.at_level(logging.WARNING, logger="tunelab"):
        q = data_quality(train, evaluation)
    assert (q["duplicate_rows"], q["label_conflict_rows"], q["eval_rows_in_train"]) == (2, 2, 1)
    assert q["examples"]["duplicate"] == ["t.jsonl:2 (copy of t.jsonl:1)", "t.jsonl:4 (copy of t.jsonl:3)"]
    assert q["examples"]["leakage"] == ["e.jsonl:1"]
    assert "2 rows repeat an earlier text" in caplog.text and "1 eval rows also appear" in caplog.text

    d = toy_classification["dir"]
    rows = [{"text": "great fun film", "label": "pos"}, {"text": "Great fun  film", "label": "pos"},
            {"text": "awful boring film", "label": "neg"}, {"text": "the plot was bad", "label": "neg"}]
    write_jsonl(d / "train.jsonl", rows)
    write_jsonl(d / "eval.jsonl", [{"text": "the PLOT was bad", "label": "neg"}, {"text": "lovely music", "label": "pos"}])
    task = setup_task(Config.model_validate(toy_classification["config"]))
    info = task.info
    assert info["train_rows"] == 4 and info["eval_rows"] == 2  # nothing dropped by default
    assert (info["data_quality"]["duplicate_rows"], info["data_quality"]["eval_rows_in_train"]) == (1, 1)
