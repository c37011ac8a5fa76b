"""api.as_config with a `Config` object and --set style overrides: only the keys the user set count as
set, so defaults.py still fills (and re-resolves) the others (issue 20)."""

from __future__ import annotations

import pytest

from tunelab.api import as_config
from tunelab.config import Config, DataConfig, OptimConfig, config_from_dict, given_keys
from tunelab.defaults import SMALL_ENCODER_LR, resolved_defaults

pytestmark = pytest.mark.unit


def test_a_config_object_with_overrides_keeps_only_its_users_keys():
    built = Config(task="classification", data=DataConfig(train="t.tsv"))  # built in Python: no defaults yet
    cfg = as_config(built, ["train.epochs=1"])
    assert cfg.train.epochs == 1
    assert cfg.optim.lr == SMALL_ENCODER_LR and "optim.lr" in resolved_defaults(cfg)  # minilm's, not the field's 2e-5
    assert cfg.checkpoint.final == "last"  # eval rows split from the training file
    assert built.optim.lr == 2e-5 and built.train.epochs != 1  # the caller's object is left as it was


def test_keys_the_user_set_stay_set_and_filled_ones_re_resolve():
    own = as_config(Config(data=DataConfig(train="t.tsv"), optim=OptimConfig(lr=3e-5)), ["train.epochs=1"])
    assert own.optim.lr == 3e-5 and "optim.lr" not in resolved_defaults(own)
    loaded = config_from_dict({"data": {"train": "t.tsv"}})  # defaults applied: lr 1e-4 filled, not user-set
    assert as_config(loaded, ["method=lora"]).optim.lr == 1e-3  # LoRA's own default, not the full fine-tune's
    assigned = Config(data=DataConfig(train="t.tsv"))
    assigned.train.batch_size = 4  # a section changed only by assignment still counts
    assert as_config(assigned, ["train.epochs=1"]).train.batch_size == 4
    assert given_keys(assigned)["train"] == {"batch_size": 4}
