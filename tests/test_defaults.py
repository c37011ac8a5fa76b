"""Defaults per model family, size and method (issue 20): applied only to keys the user left unset,
recorded with their reason, visible in plan and summary; the eval-trust statement."""

from __future__ import annotations

import json

import pytest

from tunelab.config import Config, config_from_dict
from tunelab.defaults import (SMALL_ENCODER_LR, apply_defaults, eval_trust, learning_rate, model_kind_and_size,
                              resolved_defaults)

pytestmark = pytest.mark.unit  # the plan test runs a tiny model's plan (a few seconds)


def _cfg(**raw):
    return config_from_dict({"data": {"train": "t.tsv"}, **raw})


def test_each_family_and_method_gets_its_lr_with_a_reason():
    assert _cfg().optim.lr == SMALL_ENCODER_LR  # minilm: a 22M encoder
    assert _cfg().optim.head_lr_multiplier == 10.0  # the head at 1e-3 (benchmarks/README.md run F)
    assert _cfg(method="lora").optim.head_lr_multiplier == 20.0  # as measured with LoRA at 1e-3
    assert _cfg(method="lora").optim.lr == 1e-3  # MiniLM: benchmarks/results/lora_vs_full_sst2.json
    assert learning_rate("classification", "lora", "encoder", 125_000_000).value == 5e-4  # RoBERTa-base (Hu et al.)
    assert _cfg(method="feature_extraction").optim.lr == 1e-3
    chat = _cfg(task="chat", model={"name": "smollm2-135m-instruct"}, data={"train": "t.jsonl"})
    assert chat.optim.lr == 5e-5 and chat.schedule.warmup_ratio == 0.03
    assert _cfg(task="chat", method="qlora", model={"name": "smollm2-135m-instruct"},
                data={"train": "t.jsonl"}).optim.lr == 2e-4
    assert learning_rate("classification", "full", "encoder", 110_000_000).value == 2e-5  # BERT-base
    assert learning_rate("classification", "full", "encoder", 335_000_000).value == 1e-5  # BERT-large
    assert learning_rate("causal_lm", "full", "causal", 7_000_000_000).value == 2e-5
    # preference: the lr is not measured here (the field's own), only max_length gets the LM default
    assert set(resolved_defaults(_cfg(task="preference", data={"train": "t.jsonl"}))) == {"model.max_length"}
    for key, d in resolved_defaults(_cfg()).items():
        assert d["why"] and d["value"] is not None, key


def test_language_model_tasks_default_to_1024_tokens_and_classification_keeps_128():
    """The field's 128 cuts most chat answers; chat, causal LM and preference get 1024 (TRL's default), which
    training clamps to the model's positions; a max_length the user gave is kept."""
    for task, train in (("chat", "t.jsonl"), ("causal_lm", "t.txt"), ("preference", "t.jsonl")):
        cfg = _cfg(task=task, model={"name": "smollm2-135m-instruct"}, data={"train": train})
        assert cfg.model.max_length == 1024, task
        assert "TRL" in resolved_defaults(cfg)["model.max_length"]["why"]
        given = _cfg(task=task, model={"name": "smollm2-135m-instruct", "max_length": 256}, data={"train": train})
        assert given.model.max_length == 256 and "model.max_length" not in resolved_defaults(given)
    assert _cfg().model.max_length == 128 and "model.max_length" not in resolved_defaults(_cfg())
    from types import SimpleNamespace

    from tunelab.train.sizes import usable_max_length
    assert usable_max_length(1024, SimpleNamespace(max_position_embeddings=256)) == 256  # a small model's positions


def test_keys_the_user_set_are_never_touched():
    cfg = _cfg(optim={"lr": 3e-5}, schedule={"warmup_steps": 5}, checkpoint={"final": "best"})
    assert cfg.optim.lr == 3e-5 and cfg.schedule.warmup_ratio == 0.06 and cfg.checkpoint.final == "best"
    chosen = resolved_defaults(cfg)
    assert "optim.lr" not in chosen and "checkpoint.final" not in chosen and "schedule.warmup_ratio" not in chosen
    assert cfg.optim.head_lr_multiplier == 20.0  # at the user's 3e-5 the multiplier measured at 2e-5 applies
    assert _cfg(optim={"head_lr": 1e-3}).optim.head_lr_multiplier == 20.0  # head_lr given: the multiplier is moot


def test_a_resolved_config_reloads_to_the_same_values_and_resolves_nothing():
    cfg = _cfg(data={"train": "t.tsv"})
    dumped = json.loads(cfg.model_dump_json())
    dumped["versions"] = {"tunelab": "x"}  # a run dir's config.yaml
    again = apply_defaults(Config.model_validate(dumped))
    assert again.optim.lr == cfg.optim.lr and again.checkpoint.final == cfg.checkpoint.final
    assert resolved_defaults(again) == {}
    # filled keys stay unset for the user: a variant that changes the method re-resolves its own lr
    variant = cfg.model_dump(exclude_unset=True)
    assert "lr" not in variant.get("optim", {})
    assert config_from_dict({**variant, "method": "lora"}).optim.lr == 1e-3


def test_selection_follows_where_the_eval_rows_come_from():
    assert _cfg().checkpoint.final == "last"  # a split of the training file
    assert _cfg(data={"train": "t.tsv", "eval": "e.tsv"}).checkpoint.final == "best"


def test_size_from_a_folders_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 768, "num_hidden_layers": 12,
                                                      "intermediate_size": 3072, "vocab_size": 30522}))
    kind, n = model_kind_and_size(str(tmp_path))
    assert kind == "encoder" and 100e6 < n < 120e6  # BERT-base: 110M
    assert config_from_dict({"model": {"name": str(tmp_path)}, "data": {"train": "t.tsv"}}).optim.lr == 2e-5
    assert model_kind_and_size("org/unknown-model") == (None, None)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "mixtral", "granite", "olmo2", "gpt2", "bert",
                                        "electra", "xlm-roberta"])
def test_the_defaults_and_the_planner_read_a_family_alike(model_type, tmp_path):
    """One table (models/families.py): the size estimate counts a gated MLP (3 h x i per layer) exactly
    where the planner's shape has one, and an encoder is an encoder to both (granite, mixtral and
    gemma3_text were gated to the planner only; ELECTRA and XLM-R were causal LMs to it)."""
    from transformers import AutoConfig

    from tunelab.plan import arch

    config = AutoConfig.for_model(model_type)
    config.save_pretrained(tmp_path)
    kind, n = model_kind_and_size(str(tmp_path))
    shape = arch.shape_of(config, arch.default_task(config))
    h, i, layers, vocab = shape.hidden, shape.intermediate, shape.layers, shape.vocab
    assert n == vocab * h + layers * (4 * h * h + (3 if shape.gated_mlp else 2) * h * i), model_type
    assert (kind == "encoder") == (arch.default_task(config) == "classification"), model_type


def test_eval_trust_says_how_far_to_trust_a_split():
    cfg = _cfg()
    t = eval_trust(cfg.data, {"eval_rows": 400}, {"accuracy": 0.86})
    assert t["trust"] == "low" and t["same_distribution_as_training"] is True
    assert t["accuracy_95ci"] == pytest.approx(1.96 * (0.86 * 0.14 / 400) ** 0.5, abs=1e-4)
    assert "split of the training file" in t["message"]
    perfect = eval_trust(cfg.data, {"eval_rows": 120}, {"accuracy": 1.0})  # the demo: 120 rows all right
    assert perfect["accuracy_95_interval"] == [pytest.approx(120 / (120 + 1.96 ** 2), abs=1e-4), 1.0]  # Wilson's n/(n+z^2)
    assert "0.969-1.000" in perfect["message"]
    big = eval_trust(_cfg(data={"train": "t.tsv", "eval": "e.tsv"}).data, {"eval_rows": 5000}, {"accuracy": 0.9})
    assert big["trust"] == "fair" and big["same_distribution_as_training"] is None
    assert eval_trust(cfg.data, {}, None) is None


def test_plan_and_the_summary_show_what_was_filled(toy_classification, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from tunelab.cli import app

    raw = {"task": "classification", "model": toy_classification["config"]["model"],
           "data": {"train": str(toy_classification["dir"] / "train.jsonl")}, "train": {"epochs": 1}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(app, ["plan", str(path), "--measure-steps", "0", "--no-suggestions", "--json"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.output.strip().splitlines()[-1])
    assert plan["defaults"]["optim.lr"]["value"] == SMALL_ENCODER_LR  # the tiny BERT is a small encoder
    assert plan["defaults"]["checkpoint.final"]["value"] == "last"
    text = CliRunner().invoke(app, ["plan", str(path), "--measure-steps", "0", "--no-suggestions"])
    assert "defaults (keys the config left unset)" in text.output and "optim.lr" in text.output
