"""Config loading: defaults, overrides, and error locations (file, line, dotted field)."""

import pytest
import yaml

from tunelab.config import Config, load_config
from tunelab.errors import InputError

pytestmark = pytest.mark.unit


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_follow_the_recipe(tmp_path):
    from tunelab.defaults import SMALL_ENCODER_LR, resolved_defaults

    cfg = load_config(write(tmp_path, "data:\n  train: t.jsonl\n"))
    # the lr is the model family's default (tunelab.defaults: minilm is a small encoder), with its reason recorded
    assert cfg.optim.lr == SMALL_ENCODER_LR and cfg.optim.weight_decay == 0.01
    assert resolved_defaults(cfg)["optim.lr"]["value"] == SMALL_ENCODER_LR
    assert 0.06 <= cfg.schedule.warmup_ratio <= 0.10 and cfg.schedule.name == "cosine"
    assert cfg.train.max_grad_norm == 1.0
    assert 0.1 <= cfg.data.eval_split <= 0.2
    assert cfg.checkpoint.min_delta == 0.001 and cfg.early_stopping.patience == 3
    assert cfg.data.train == str((tmp_path / "t.jsonl").resolve())


def test_overrides_are_typed(tmp_path):
    cfg = load_config(write(tmp_path, "data:\n  train: t.jsonl\n"),
                      ["optim.lr=1e-4", "train.batch_size=4", "schedule.name=wsd", "data.labels=[a, b]"])
    assert cfg.optim.lr == 1e-4 and cfg.train.batch_size == 4 and cfg.schedule.name == "wsd"
    assert cfg.data.labels == ["a", "b"]


def test_scientific_notation_without_dot_is_a_float(tmp_path):
    cfg = load_config(write(tmp_path, "data:\n  train: t.jsonl\noptim:\n  lr: 3e-5\n"))
    assert cfg.optim.lr == 3e-5


@pytest.mark.parametrize("text,line,field", [
    ("data:\n  train: t.jsonl\noptim:\n  lrr: 1\n", 4, "optim.lrr"),
    ("data:\n  train: t.jsonl\ntrain:\n  batch_size: many\n", 4, "train.batch_size"),
    ("data:\n  train: t.jsonl\n\n\nbogus: 1\n", 5, "bogus"),
    ("model:\n  name: minilm\n", None, "data"),
])
def test_errors_name_line_and_field(tmp_path, text, line, field):
    with pytest.raises(InputError) as e:
        load_config(write(tmp_path, text))
    msg = e.value.one_line()
    assert e.value.field == field
    assert e.value.line == line
    assert f"c.yaml{':' + str(line) if line else ''}" in msg and f"field '{field}'" in msg
    assert "\n" not in msg


def test_resolved_config_round_trips(tmp_path):
    from tunelab.config import dump_config

    cfg = load_config(write(tmp_path, "data:\n  train: t.jsonl\n"), ["optim.layer_lr_decay=0.8"])
    dump_config(cfg, tmp_path / "resolved.yaml")
    data = yaml.safe_load((tmp_path / "resolved.yaml").read_text())
    assert "torch" in data["versions"] and "transformers" in data["versions"]
    again = Config.model_validate(data)
    assert again.optim.layer_lr_decay == 0.8 and again.data.train == cfg.data.train
