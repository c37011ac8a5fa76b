"""The README's SFT -> DPO example, its two commands as written (issue 15): `tunelab train
examples/chat/config.yaml --output-dir runs/chat-demo`, then `tunelab train
examples/preference/config.yaml --output-dir runs/dpo-demo` from the repository root, whose
`model.name: ../../runs/chat-demo` must find the first run. The example configs are copied
unchanged into a tree of the same layout; only the model (a tiny chat Llama instead of SmolLM2)
and the step counts are set on the command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_chat_tokenizer_build, tiny_llama_build
from tunelab.cli import app

pytestmark = pytest.mark.e2e
torch.set_num_threads(1)  # hidden-32 models: a second thread only waits for its core on a shared 2-core box

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_the_readme_sft_then_dpo_commands_chain(tmp_path, monkeypatch):
    root = tmp_path / "repo"
    for name in ("chat", "preference"):
        shutil.copytree(EXAMPLES / name, root / "examples" / name)
    model = tmp_path / "tiny_chat"
    tok = tiny_chat_tokenizer_build()
    tiny_llama_build(len(tok)).save_pretrained(model)
    tok.save_pretrained(model)
    monkeypatch.chdir(root)
    small = ["--set", "train.max_steps=1", "--set", "eval.generate.n=2", "--set", "eval.generate.max_new_tokens=4",
             "--no-progress"]
    sft = CliRunner().invoke(app, ["train", "examples/chat/config.yaml", "--output-dir", "runs/chat-demo",
                                   "--set", f"model.name={model}", *small])
    assert sft.exit_code == 0, sft.output
    dpo = CliRunner().invoke(app, ["train", "examples/preference/config.yaml", "--output-dir", "runs/dpo-demo", *small])
    assert dpo.exit_code == 0, dpo.output
    summary = json.loads((root / "runs" / "dpo-demo" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 1
    assert summary["data"]["reference"] == "adapter_off"  # method lora: the SFT model with the adapter off
    assert Path(summary["data"]["model_source"]).resolve() == (root / "runs" / "chat-demo" / "final").resolve()
    assert (root / "runs" / "dpo-demo" / "final" / "adapter_config.json").is_file()
    assert "eval_reward_margin" in summary["before"]  # the held-out pairs (eval_split 0.25) were evaluated
