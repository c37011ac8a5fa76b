"""Classification and preference data through the encoded-data cache, mixed by weight, from files,
JSONL chunks and Hugging Face datasets (tasks.classification_data, tasks.preference_data): every
table against the plain readers and encoders it replaces (data.classification.load_train_eval +
encode, data.preference.read_preference_data + encode_pairs), a damaged entry rebuilt, each
fingerprint part a miss, label sets across sources checked, and the mix's shares exact by seed."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import sentiment_rows, tiny_chat_tokenizer_build, write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAIRS = [
    {"prompt": "What is two plus two?", "chosen": "Four.", "rejected": "Six, I think."},
    {"prompt": "Name a color.", "chosen": "Red.", "rejected": "Apple."},
    {"prompt": [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Name a color."},
                {"role": "assistant", "content": "Red."}, {"role": "user", "content": "And a fruit?"}],
     "chosen": [{"role": "assistant", "content": "Apple."}], "rejected": [{"role": "assistant", "content": "A dog."}]},
    {"prompt": "Tell me a story about a cat and the sea and the wind.",
     "chosen": "A cat and a dog sing at every tide, all night long. " * 3, "rejected": "No."},
    {"prompt": "Write a short poem about the sea.", "chosen": "The sea is blue and wide.", "rejected": "Six."},
]


@pytest.fixture(scope="module")
def bert_tok(tmp_path_factory):
    from transformers import AutoTokenizer

    from tiny_models import tiny_bert_folder

    return AutoTokenizer.from_pretrained(tiny_bert_folder(tmp_path_factory.mktemp("bert")))


def _data(**kw):
    from tunelab.config import DataConfig

    return DataConfig(**kw)


@pytest.fixture
def encodings(monkeypatch):
    """Counts the cache builds of classification and preference entries (a hit makes none)."""
    from tunelab.data import classification, preference

    calls = []
    for module, name in ((classification, "encode_rows"), (preference, "encode_pairs")):
        real = getattr(module, name)

        def counting(*a, _real=real, _name=name, **k):
            calls.append(_name)
            return _real(*a, **k)

        monkeypatch.setattr(module, name, counting)
    return calls


def _features(table) -> list[dict]:
    return [table[i] for i in range(len(table))]


@pytest.mark.unit
def test_classification_tables_equal_the_plain_reader_and_encoder_cached_uncached_and_streamed(
        tmp_path, bert_tok, encodings, monkeypatch):
    from tunelab.data.classification import encode, load_train_eval
    from tunelab.tasks.classification_data import load_classification_data

    rows = sentiment_rows(60, seed=1)
    rows[7]["text"] = " ".join(["very"] * 40) + " good"  # cut at max_length
    write_jsonl(tmp_path / "train.jsonl", rows)
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    write_jsonl(tmp_path / "eval.jsonl", sentiment_rows(12, seed=2))
    monkeypatch.setattr("tunelab.data.stream.STREAM_ROWS", 7)  # the JSONL file in 9 chunks
    for train, extra in (("train.jsonl", {"eval_split": 0.25}), ("train.jsonl", {"eval": str(tmp_path / "eval.jsonl")}),
                         ("train.csv", {"eval_split": 0.2, "max_rows": 50})):
        want_train, want_eval, names = load_train_eval(_data(train=str(tmp_path / train), **extra), seed=3)
        want_feats, want_cut = encode(want_train, bert_tok, 16)
        want_eval_feats = encode(want_eval, bert_tok, 16)[0]
        for cache, encodes in ((True, True), (False, True), (True, False)):  # a miss, the cache off, a hit
            n = len(encodings)
            got = load_classification_data(_data(train=str(tmp_path / train), cache=cache, **extra), bert_tok, 16,
                                           seed=3)
            assert (len(encodings) > n) == encodes, (train, extra, cache, len(encodings) - n)
            assert got.names == names
            assert _features(got.train) == want_feats and got.train.labels.tolist() == want_train.labels
            assert [got.train.source(i) for i in range(len(got.train))] == want_train.source
            assert int(got.train.cut.sum()) == want_cut == 1
            ev = got.evals[""]
            assert _features(ev) == want_eval_feats and ev.labels.tolist() == want_eval.labels
            assert got.mix is None and got.sources is None  # one source: no mixing schedule


@pytest.mark.unit
def test_classification_fingerprint_parts_miss_and_a_damaged_entry_is_rebuilt(tmp_path, bert_tok, encodings):
    from transformers import AutoTokenizer

    from tunelab.data.cache import data_cache_root
    from tunelab.tasks.classification_data import load_classification_data

    rows = sentiment_rows(20, seed=4)
    for r in rows:
        r["review"] = r["text"]
    write_jsonl(tmp_path / "t.jsonl", rows)

    def built(tok=bert_tok, max_len=16, **kw) -> bool:
        n = len(encodings)
        got = load_classification_data(_data(train=str(tmp_path / "t.jsonl"), eval_split=0.0, **kw), tok, max_len,
                                       seed=0)
        assert len(got.train) == kw.get("max_rows", 20)
        return len(encodings) > n

    assert built() and not built()
    other = AutoTokenizer.from_pretrained(bert_tok.name_or_path)
    other.add_tokens(["zebra"])
    for part, again in (("max_length", dict(max_len=12)), ("text_column", dict(text_column="review")),
                        ("max_rows", dict(max_rows=15)), ("labels", dict(labels=["neg", "pos"])),
                        ("tokenizer", dict(tok=other))):
        assert built(**again), part
        assert not built(**again), f"{part}: the second time is a hit"

    # damage the first entry (the default options): a truncated token file is caught by the cheap hit check
    first = sorted((p for p in data_cache_root().iterdir() if (p / "manifest.json").is_file()),
                   key=lambda p: (p / "manifest.json").stat().st_mtime_ns)[0]
    ids = first / "input_ids.i4"
    ids.write_bytes(ids.read_bytes()[:-4])
    assert built()  # rebuilt, not used
    assert not built()


@pytest.mark.unit
def test_mixed_classification_sources_labels_must_agree_and_shares_are_exact_by_seed(tmp_path, bert_tok):
    from collections import Counter

    from tunelab.data.mixing import mix_schedule
    from tunelab.errors import InputError
    from tunelab.tasks.classification_data import load_classification_data

    from tunelab.config import DataSource

    write_jsonl(tmp_path / "domain.jsonl", sentiment_rows(30, seed=5))
    general = sentiment_rows(25, seed=6)
    write_jsonl(tmp_path / "general.jsonl", general)
    sources = [DataSource(path=str(tmp_path / "domain.jsonl"), weight=2),
               DataSource(path=str(tmp_path / "general.jsonl"), weight=1)]
    got = load_classification_data(_data(train=sources, eval_split=0.2), bert_tok, 16, seed=8)
    domain, gen = (s["examples"] for s in got.sources)
    assert (domain, gen) == (24, 20) and set(got.evals) == {"domain", "general"}  # each source's held-out share
    assert [s["planned_units_per_epoch"] for s in got.sources] == [24, 12]
    for epoch in range(4):
        rows = got.mix.epoch_subset(epoch)
        shares = Counter(0 if i < domain else 1 for i in rows)
        assert shares == {0: 24, 1: 12}  # exact shares every epoch, without replacement
        assert rows == mix_schedule([24, 20], [2, 1], 8)[0](epoch)  # a pure function of (seed, epoch)
    assert got.mix.epoch_subset(1) != load_classification_data(_data(train=sources, eval_split=0.2), bert_tok, 16,
                                                               seed=9).mix.epoch_subset(1)
    assert got.mix.unit_source.tolist() == [0] * 24 + [1] * 20
    # the concatenated table: each source's rows, its own labels
    assert got.train.labels.tolist()[:24] == got.train.tables[0].labels.tolist()

    general[11]["label"] = "neutral"  # a label the first source does not have
    write_jsonl(tmp_path / "general.jsonl", general)
    with pytest.raises(InputError) as err:
        load_classification_data(_data(train=sources, eval_split=0.2), bert_tok, 16, seed=8)
    e = err.value
    assert e.file == str(tmp_path / "general.jsonl") and e.line == 12 and e.field == "label"
    assert "'neutral'" in e.message and "first training source (domain" in e.message and "data.labels" in e.message
    declared = load_classification_data(_data(train=sources, eval_split=0.2, labels=["neg", "neutral", "pos"]),
                                        bert_tok, 16, seed=8)
    assert declared.names == ["neg", "neutral", "pos"] and 1 in declared.train.labels.tolist()


@pytest.mark.unit
def test_classification_replay_gives_the_rows_replay_always_gave(tmp_path, bert_tok):
    from tunelab.data.batching import replay_schedule
    from tunelab.data.classification import encode, load_examples, load_train_eval
    from tunelab.tasks.classification_data import load_classification_data

    write_jsonl(tmp_path / "train.jsonl", sentiment_rows(64, seed=1))
    write_jsonl(tmp_path / "eval.jsonl", sentiment_rows(16, seed=2))
    write_jsonl(tmp_path / "replay.jsonl", sentiment_rows(40, seed=11))
    data = _data(train=str(tmp_path / "train.jsonl"), eval=str(tmp_path / "eval.jsonl"))
    got = load_classification_data(data, bert_tok, 32, seed=3, replay_data=str(tmp_path / "replay.jsonl"),
                                   replay_ratio=0.2)
    # the code before: train features + replay features end to end, replay_schedule over them
    train, _, names = load_train_eval(data, 3)
    replay, _ = load_examples(tmp_path / "replay.jsonl", label_names=names)
    want = encode(train, bert_tok, 32)[0] + encode(replay, bert_tok, 32)[0]
    assert _features(got.train) == want and got.train.labels.tolist() == train.labels + replay.labels
    subset, size = replay_schedule(64, 40, 0.2, 3)
    assert got.mix.epoch_size == size == 80 and all(got.mix.epoch_subset(e) == subset(e) for e in range(3))
    assert len(got.train_rows) == 64  # counts and quality: the training file's rows, not the replay file's


@pytest.mark.unit
def test_preference_pairs_from_the_cache_equal_freshly_encoded_ones(tmp_path, encodings, monkeypatch):
    from tunelab.data.preference import encode_pairs, read_preference_data
    from tunelab.tasks.lm_data import split_indices
    from tunelab.tasks.preference_data import load_preference_data

    tok = tiny_chat_tokenizer_build()
    write_jsonl(tmp_path / "p.jsonl", PAIRS * 4)
    monkeypatch.setattr("tunelab.data.stream.STREAM_ROWS", 3)  # 20 pairs in 7 chunks
    fresh, stats = encode_pairs(read_preference_data(tmp_path / "p.jsonl"), tok, 60, 16)
    assert stats["truncated_prompts"] and stats["truncated_answers"]  # the cut counts are carried too
    keep, held = split_indices(len(fresh), 0.25, 7)

    def key(p):
        return p.chosen.input_ids, p.chosen.labels, p.rejected.input_ids, p.rejected.labels, p.source

    for cache in (True, False, True):
        got = load_preference_data(_data(train=str(tmp_path / "p.jsonl"), eval_split=0.25, cache=cache), tok, 60, 16,
                                   seed=7)
        assert [key(got.train[i]) for i in range(len(got.train))] == [key(fresh[i]) for i in keep]
        assert [key(got.evals[""][i]) for i in range(len(got.evals[""]))] == [key(fresh[i]) for i in held]
        assert got.stats == stats and got.train.lengths.tolist() == [fresh[i].tokens() for i in keep]
        assert got.train.widths.tolist() == [max(len(fresh[i].chosen), len(fresh[i].rejected)) for i in keep]
    assert encodings.count("encode_pairs") == 1 + 7 * 2  # the reference, then a miss and the cache off; a hit: none


@pytest.mark.unit
def test_mixed_preference_sources_and_a_saved_dataset(tmp_path, monkeypatch):
    import datasets

    from tunelab.config import DataSource
    from tunelab.data.preference import encode_pairs, read_preference_data
    from tunelab.tasks.preference_data import load_preference_data

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tok = tiny_chat_tokenizer_build()
    write_jsonl(tmp_path / "a.jsonl", PAIRS * 2)
    datasets.Dataset.from_list([{**p, "prompt": p["prompt"] if isinstance(p["prompt"], str) else p["prompt"][-1]["content"],
                                 "chosen": p["chosen"] if isinstance(p["chosen"], str) else p["chosen"][0]["content"],
                                 "rejected": p["rejected"] if isinstance(p["rejected"], str) else p["rejected"][0]["content"]}
                                for p in PAIRS]).save_to_disk(str(tmp_path / "b"))
    data = _data(train=[DataSource(path=str(tmp_path / "a.jsonl"), weight=3),
                        DataSource(path=str(tmp_path / "b"), weight=1, name="b")],
                 eval=[DataSource(path=str(tmp_path / "a.jsonl"), name="ea"), DataSource(path=str(tmp_path / "b"))])
    got = load_preference_data(data, tok, 96, None, seed=1)
    assert [s["examples"] for s in got.sources] == [10, 5] and set(got.evals) == {"ea", "b"}
    assert [s["planned_units_per_epoch"] for s in got.sources] == [10, 3]
    want = encode_pairs(read_preference_data(tmp_path / "b"), tok, 96)[0]
    assert [got.train[10 + i].chosen.input_ids for i in range(5)] == [p.chosen.input_ids for p in want]
    assert got.train[12].source.endswith("#2")  # a dataset row is located by its index
