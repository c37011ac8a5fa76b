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
    first = sorted((p for p in data_cache_root().iterdir() if (p / "input_ids.i4").is_file()),  # not the labels
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


# ------------------------------------------------------------------ the task setups read through these tables


def _stop_resume_identical(cfg, tmp_path: Path, whole: dict, stop: int, weights) -> dict:
    """Run `cfg` stopped after `stop` steps, resumed to the end: its weights and per-source counts equal `whole`'s."""
    import torch

    from conftest import stop_after
    from tunelab.run import run_training

    stopped = run_training(cfg, tmp_path / "resumed", show_progress=False, should_stop=stop_after(stop))
    assert stopped["status"] != "completed" and stopped["steps"] == stop
    resumed = run_training(cfg, tmp_path / "resumed", show_progress=False, resume="auto")
    assert resumed["status"] == "completed"
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [(s["units_seen"], s["rows_seen"]) for s in resumed["data"]["sources"]] == [
        (s["units_seen"], s["rows_seen"]) for s in whole["data"]["sources"]]  # the counts travel in the checkpoints
    return resumed


@pytest.mark.e2e
def test_classification_cached_and_uncached_runs_are_bit_identical_and_mixed_sources_report_each(
        toy_classification, tmp_path, encodings):
    import copy

    import torch

    from tunelab.compose import setup_task
    from tunelab.config import Config
    from tunelab.data.classification import encode, load_examples, make_batches
    from tunelab.evaluate.classification import predict
    from tunelab.run import run_training

    from test_data_cache import _rows, _weights  # the run-dir readers the chat cache test compares with

    raw = copy.deepcopy(toy_classification["config"])
    raw["train"] = {**raw["train"], "max_steps": 4, "eval_every": 2}
    runs = {}
    for name, cache in (("uncached", False), ("miss", True), ("hit", True)):
        n = len(encodings)
        runs[name] = run_training(Config.model_validate({**raw, "data": {**raw["data"], "cache": cache}}),
                                  tmp_path / name, show_progress=False)
        assert runs[name]["status"] == "completed"
        assert (len(encodings) > n) == (name != "hit"), name  # the hit encodes nothing
    reference = _weights(tmp_path / "uncached")
    for name in ("miss", "hit"):
        got = _weights(tmp_path / name)
        assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in reference), name
        assert _rows(tmp_path / name) == _rows(tmp_path / "uncached"), name
        assert runs[name]["data"] == runs["uncached"]["data"], name

    d = toy_classification["dir"]
    write_jsonl(d / "general.jsonl", sentiment_rows(40, seed=11))
    write_jsonl(d / "eval_b.jsonl", sentiment_rows(10, seed=12))
    raw["data"] = {"train": [{"path": str(d / "train.jsonl"), "weight": 3}, {"path": str(d / "general.jsonl")}],
                   "eval": [{"path": str(d / "eval.jsonl"), "name": "a"}, {"path": str(d / "eval_b.jsonl"), "name": "b"}]}
    raw["train"] = {**raw["train"], "max_steps": 6, "eval_every": 3}
    cfg = Config.model_validate(raw)
    summary = run_training(cfg, tmp_path / "whole", show_progress=False)
    train, general = summary["data"]["sources"]
    assert (train["planned_units_per_epoch"], general["planned_units_per_epoch"]) == (64, 21)
    assert train["units_seen"] + general["units_seen"] == summary["samples"] == 48  # 6 steps of 8 rows
    assert train["rows_seen"] == train["units_seen"] and general["units_seen"] > 0  # a unit is one row
    rows = [r for r in _rows(tmp_path / "whole") if "eval_a_loss" in r]
    assert rows and all({"eval_b_loss", "eval_a_accuracy", "eval_b_macro_f1"} <= set(r) for r in rows)
    task = setup_task(cfg)
    got = task.evaluate(task.model)
    total = 0.0
    for name, path in (("a", d / "eval.jsonl"), ("b", d / "eval_b.jsonl")):  # each eval file alone, plainly
        ex, _ = load_examples(path, label_names=task.info["labels"])
        loss, preds, ys = predict(task.model, make_batches(encode(ex, task.tokenizer, 32)[0], ex.labels, 0, 8))
        assert abs(got[f"{name}_loss"] - loss / len(ys)) < 1e-6
        assert got[f"{name}_accuracy"] == sum(p == y for p, y in zip(preds, ys)) / len(ys)
        total += loss
    assert abs(got["loss"] - total / 26) < 1e-6  # over every eval row
    _stop_resume_identical(cfg, tmp_path, summary, 2, _weights)  # an epoch is 11 steps: stopped inside it


PREF_RAW = {"method": "full", "optim": {"lr": 1e-2, "weight_decay": 0.0},
            "schedule": {"name": "constant", "warmup_ratio": 0.0},
            "train": {"max_steps": 4, "batch_size": 2, "log_every": 1, "eval_every": 2, "eval_before": False},
            "early_stopping": {"enabled": False}}


def _pref_model(tmp_path: Path) -> Path:
    from tiny_models import tiny_llama_build

    tok = tiny_chat_tokenizer_build()
    tiny_llama_build(len(tok)).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.mark.e2e
def test_mixed_preference_run_reports_each_source_and_each_eval_source_equals_it_alone(tmp_path):
    from tunelab.compose import setup_task
    from tunelab.config import Config
    from tunelab.data.preference import encode_pairs, read_preference_data
    from tunelab.run import run_training
    from tunelab.tasks.preference import pair_batch, preference_metrics
    from tunelab.train.preference_losses import loss_from_config

    from test_data_cache import _weights

    model = _pref_model(tmp_path)
    write_jsonl(tmp_path / "a.jsonl", PAIRS * 2)
    write_jsonl(tmp_path / "b.jsonl", PAIRS[1:3])
    write_jsonl(tmp_path / "ea.jsonl", PAIRS[:2])
    write_jsonl(tmp_path / "eb.jsonl", PAIRS[2:])
    raw = {"task": "preference", "model": {"name": str(model), "max_length": 96}, **PREF_RAW,
           "data": {"train": [{"path": str(tmp_path / "a.jsonl"), "weight": 2}, {"path": str(tmp_path / "b.jsonl")}],
                    "eval": [{"path": str(tmp_path / "ea.jsonl"), "name": "ea"},
                             {"path": str(tmp_path / "eb.jsonl"), "name": "eb"}]}}
    cfg = Config.model_validate(raw)
    summary = run_training(cfg, tmp_path / "whole", show_progress=False)  # dpo, full: a cached reference
    assert summary["status"] == "completed"
    a, b = summary["data"]["sources"]
    assert (a["planned_units_per_epoch"], b["planned_units_per_epoch"]) == (10, 5)
    assert a["rows_seen"] + b["rows_seen"] == summary["samples"] >= 7 and b["rows_seen"] > 0  # 4 steps of 2 pairs
    # (an epoch of 15 pairs has one short batch)
    assert {"ea_loss", "eb_loss", "ea_pref_accuracy", "eb_reward_margin"} <= set(summary["final"])
    _stop_resume_identical(cfg, tmp_path, summary, 3, _weights)  # an epoch is 8 steps: stopped inside it

    raw["preference"] = {"loss": "simpo"}  # reference-free: each eval file alone is the plain reference
    task = setup_task(Config.model_validate(raw))
    got = task.evaluate(task.model)
    loss_fn = loss_from_config(Config.model_validate(raw).preference)
    total = 0.0
    for name in ("ea", "eb"):
        pairs = encode_pairs(read_preference_data(tmp_path / f"{name}.jsonl"), task.tokenizer, 96)[0]
        alone = preference_metrics(task.model, [pair_batch(pairs, list(range(len(pairs))), 0)], loss_fn)
        assert abs(got[f"{name}_loss"] - alone["loss"]) < 1e-5 and got[f"{name}_pref_accuracy"] == alone["pref_accuracy"]
        total += alone["loss"] * alone["pairs"]
    assert abs(got["loss"] - total / got["pairs"]) < 1e-5 and got["pairs"] == len(PAIRS)


@pytest.mark.e2e
def test_preference_cached_and_uncached_runs_are_bit_identical(tmp_path, encodings):
    import torch

    from tunelab.config import Config
    from tunelab.run import run_training

    from test_data_cache import _rows, _weights

    model = _pref_model(tmp_path)
    write_jsonl(tmp_path / "p.jsonl", PAIRS * 2)
    raw = {"task": "preference", "model": {"name": str(model), "max_length": 96}, **PREF_RAW,
           "data": {"train": str(tmp_path / "p.jsonl"), "eval_split": 0.2}}
    for name, cache in (("uncached", False), ("miss", True), ("hit", True)):
        n = len(encodings)
        got = run_training(Config.model_validate({**raw, "data": {**raw["data"], "cache": cache}}), tmp_path / name,
                           show_progress=False)
        assert got["status"] == "completed" and (len(encodings) > n) == (name != "hit"), name
    reference = _weights(tmp_path / "uncached")
    for name in ("miss", "hit"):
        got = _weights(tmp_path / name)
        assert all(torch.equal(got[k], reference[k]) for k in reference), name
        assert _rows(tmp_path / name) == _rows(tmp_path / "uncached"), name


@pytest.mark.unit
def test_prepare_fills_the_classification_and_preference_caches_and_training_only_reads_them(
        toy_classification, tmp_path, encodings):
    from tunelab.compose import prepare_data, setup_task
    from tunelab.config import Config

    cfg = Config.model_validate(toy_classification["config"])
    folders = prepare_data(cfg)  # the training file and the eval file
    assert len(folders) == 2 and all((f / "manifest.json").is_file() for f in folders)
    n = len(encodings)
    task = setup_task(cfg)
    assert len(encodings) == n and task.info["train_rows"] == 64 and task.info["eval_rows"] == 16

    model = _pref_model(tmp_path)
    write_jsonl(tmp_path / "p.jsonl", PAIRS * 2)
    write_jsonl(tmp_path / "e.jsonl", PAIRS[:2])
    cfg = Config.model_validate({"task": "preference", "model": {"name": str(model), "max_length": 96}, **PREF_RAW,
                                 "preference": {"max_prompt_length": 24},
                                 "data": {"train": str(tmp_path / "p.jsonl"), "eval": str(tmp_path / "e.jsonl")}})
    folders = prepare_data(cfg)
    assert len(folders) == 2 and all((f / "manifest.json").is_file() for f in folders)
    n = len(encodings)
    task = setup_task(cfg)  # the same key: preference.max_prompt_length travels to prepare
    assert len(encodings) == n and task.info["train_rows"] == 10 and task.info["eval_rows"] == 2


@pytest.mark.unit
def test_bad_pairs_are_reported_before_the_model_and_bad_rows_of_any_source_name_their_file(tmp_path):
    from tunelab.compose import setup_task
    from tunelab.config import Config
    from tunelab.errors import InputError

    write_jsonl(tmp_path / "p.jsonl", PAIRS)
    write_jsonl(tmp_path / "bad.jsonl", PAIRS[:2] + [{"prompt": "Hi.", "chosen": "Same.", "rejected": "Same."}])
    pref = {"task": "preference", "model": {"name": str(tmp_path / "no-such-model")}, **PREF_RAW,
            "data": {"train": [{"path": str(tmp_path / "p.jsonl")}, {"path": str(tmp_path / "bad.jsonl")}]}}
    with pytest.raises(InputError) as err:
        setup_task(Config.model_validate(pref))
    assert "bad.jsonl:3" in str(err.value) and "identical" in str(err.value)
    with pytest.raises(InputError) as err:  # good data: now the model is what is wrong
        setup_task(Config.model_validate({**pref, "data": {"train": str(tmp_path / "p.jsonl")}}))
    assert "no-such-model" in str(err.value)

    write_jsonl(tmp_path / "t.jsonl", sentiment_rows(20, seed=1))
    write_jsonl(tmp_path / "u.jsonl", sentiment_rows(4, seed=2) + [{"text": "x", "label": ""}])
    cls = {"task": "classification", "model": {"name": str(tmp_path / "no-such-model")},
           "data": {"train": [{"path": str(tmp_path / "t.jsonl")}, {"path": str(tmp_path / "u.jsonl")}]}}
    with pytest.raises(InputError) as err:
        setup_task(Config.model_validate(cls))
    assert "u.jsonl:5" in str(err.value) and "'label'" in str(err.value)
    cls["data"] = {"train": str(tmp_path / "t.jsonl"), "eval": [{"path": str(tmp_path / "t.jsonl"), "name": "a"},
                                                               {"path": str(tmp_path / "u.jsonl"), "name": "b"}]}
    with pytest.raises(InputError) as err:
        setup_task(Config.model_validate(cls))
    assert "u.jsonl:5" in str(err.value)


@pytest.mark.unit
def test_feature_extraction_reports_each_eval_source_as_the_plain_evaluator(toy_classification):
    import copy

    from tunelab.compose import setup_task
    from tunelab.config import Config
    from tunelab.models.adapt import apply_method
    from tunelab.tasks.feature_cache import cache_features

    d = toy_classification["dir"]
    write_jsonl(d / "eval_b.jsonl", sentiment_rows(10, seed=12))
    raw = copy.deepcopy(toy_classification["config"])
    raw["method"] = "feature_extraction"
    raw["data"]["eval"] = [{"path": str(d / "eval.jsonl"), "name": "a"}, {"path": str(d / "eval_b.jsonl"), "name": "b"}]
    cfg = Config.model_validate(raw)
    task = setup_task(cfg)
    model = apply_method(task.model, cfg.method, task=cfg.task, freeze_cfg=cfg.freeze, lora=cfg.lora)
    plain = task.evaluate(model)  # the token batches through the whole model
    cached = cache_features(task, model, task.eval_batches(), 16)
    got = cached.evaluate(model)
    assert cached.evaluate is not task.evaluate and cached.info["feature_cache"]["eval"][0] == 26
    assert set(got) == set(plain) >= {"a_loss", "b_loss", "a_accuracy", "b_macro_f1", "loss", "accuracy"}
    for k in plain:  # losses to float precision; predictions, so accuracy and F1, the same
        assert (abs(got[k] - plain[k]) < 1e-5) if isinstance(plain[k], float) else got[k] == plain[k], k
