"""The Python API: train from a dict / list of dicts / datasets.Dataset, callbacks, errors, load, generate."""

from __future__ import annotations

import json

import pytest

import tunelab
from conftest import sentiment_rows, tiny_chat_tokenizer_build, tiny_llama_build

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.e2e]


@pytest.fixture
def api_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _in_memory(cfg: dict) -> dict:
    cfg = json.loads(json.dumps(cfg))
    del cfg["data"]["train"], cfg["data"]["eval"]
    return cfg


@pytest.fixture
def toy(toy_classification):
    """The toy classification config, one epoch (these tests compare runs, they need no learning)."""
    toy_classification["config"]["train"]["epochs"] = 1
    return toy_classification


def test_train_from_dict_and_records_equals_the_file_run(toy, api_cache):
    """A dict config with a list of dicts trains exactly as the same config with the same rows in files
    (the file run is the reference: same final metrics, same loss curve); callbacks see every row."""
    d, cfg = toy["dir"], toy["config"]
    ref = tunelab.train(cfg, output_dir=d / "ref")
    seen = {"log": [], "eval": [], "save": []}
    rows = [json.loads(line) for line in (d / "train.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (d / "eval.jsonl").read_text().splitlines()]
    got = tunelab.train(_in_memory(cfg), train_data=rows, eval_data=evals, output_dir=d / "api",
                        callbacks={k: seen[k].append for k in seen})
    assert got.status == ref.status == "completed"
    assert got.metrics["accuracy"] == ref.metrics["accuracy"] and got.metrics["loss"] == pytest.approx(ref.metrics["loss"], abs=1e-6)
    assert [r["loss"] for r in got.rows() if "loss" in r] == pytest.approx([r["loss"] for r in ref.rows() if "loss" in r], abs=1e-6)
    assert seen["log"] == [r for r in got.rows() if "loss" in r and "event" not in r]
    assert seen["eval"] == [r for r in got.rows() if any(k.startswith("eval_") for k in r)]
    saved = sorted(p.name for p in got.paths["checkpoints"].iterdir())
    assert seen["save"] and set(saved) <= {r["checkpoint"] for r in seen["save"]}  # every kept checkpoint was announced
    assert got.final.is_dir() and got.paths["summary"].is_file()
    assert got.summary["loggers"]["callbacks"] == "ok"


def test_train_from_a_datasets_dataset(toy, api_cache):
    from datasets import Dataset

    d, cfg = toy["dir"], toy["config"]
    ds = Dataset.from_list(sentiment_rows(64, seed=1))
    result = tunelab.train(_in_memory(cfg), train_data=ds, eval_data=Dataset.from_list(sentiment_rows(16, seed=2)),
                           output_dir=d / "ds")
    assert result.status == "completed"
    import yaml

    read = yaml.safe_load(result.paths["config"].read_text())["data"]["train"]  # the rows as the readers saw them
    assert [json.loads(line) for line in open(read)] == sentiment_rows(64, seed=1)
    metrics = tunelab.evaluate(result.run_dir, sentiment_rows(16, seed=2))
    assert metrics["accuracy"] == pytest.approx(result.metrics["accuracy"])
    model, tok = tunelab.load(result.run_dir)
    assert model.config.num_labels == 2 and not model.training


def test_errors_name_the_record_and_the_field(toy, api_cache, tmp_path):
    cfg = _in_memory(toy["config"])
    rows = sentiment_rows(8)
    rows[3] = {"text": "no label here"}
    with pytest.raises(tunelab.InputError) as e:
        tunelab.train(cfg, train_data=rows, eval_data=sentiment_rows(4), output_dir=tmp_path / "bad")
    assert "train_data record 3" in e.value.one_line() and e.value.file is None
    assert not (tmp_path / "bad").exists()
    with pytest.raises(tunelab.InputError, match="optim.lrr"):
        tunelab.train({**cfg, "optim": {"lrr": 1.0}}, train_data=sentiment_rows(8))
    with pytest.raises(tunelab.InputError, match="list of dicts"):
        tunelab.train(cfg, train_data=42)
    with pytest.raises(tunelab.InputError, match="callback kind"):
        tunelab.train(cfg, train_data=sentiment_rows(8), callbacks={"step": print})


def test_load_and_generate_a_causal_lm(tmp_path):
    tok = tiny_chat_tokenizer_build()
    folder = tmp_path / "lm"
    tiny_llama_build(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    model, loaded_tok = tunelab.load(folder)
    assert type(model).__name__ == "LlamaForCausalLM"
    out = tunelab.generate(folder, "Name a color.", max_new_tokens=5)
    again = tunelab.generate(model, [{"role": "user", "content": "Name a color."}], tokenizer=loaded_tok,
                             max_new_tokens=5)
    assert out["reply"] == again["reply"] and out["new_tokens"] <= 5
    assert out["prompt_text"].endswith("<|im_start|>assistant\n")


def test_evaluate_a_causal_lm_on_chat_records(tmp_path):
    import math

    tok = tiny_chat_tokenizer_build()
    folder = tmp_path / "lm"
    tiny_llama_build(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    convs = [{"messages": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple."}]},
             {"messages": [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}]}]
    m = tunelab.evaluate(folder, convs)
    assert m["rows"] == 2 and m["supervised_tokens"] > 0
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
    assert m["loss"] == pytest.approx(math.log(len(tok)), rel=0.05)  # an untrained model: about uniform
