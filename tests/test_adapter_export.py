"""Adapters that travel (portable base reference) and the checked merge / export of an adapter run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_chat_tokenizer_build, tiny_llama_build

from tunelab.cli import app
from tunelab.errors import InputError

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")



def make_adapter(root: Path, monkeypatch) -> tuple[Path, Path]:
    """(base folder, adapter folder): a tiny Llama base under $TUNELAB_MODEL_ROOT and a LoRA adapter on it,
    written by the same adapter_saver a run's final/ goes through; lora_B set non-zero so it changes logits."""
    from tunelab.config import LoraConfig, ModelConfig
    from tunelab.models.adapters import adapter_saver, apply_lora

    monkeypatch.setenv("TUNELAB_MODEL_ROOT", str(root))
    tok = tiny_chat_tokenizer_build()
    base = root / "llamas" / "base"
    tiny_llama_build(len(tok), seed=2).save_pretrained(base)
    tok.save_pretrained(base)
    model_cfg, lora = ModelConfig(name=str(base)), LoraConfig(r=4)
    from transformers import AutoModelForCausalLM

    model = apply_lora(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), lora, task="chat")
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)

    def save_final(m, out):
        m.save_pretrained(out)
        tok.save_pretrained(out)

    adapter = root / "run" / "final"
    adapter_saver(save_final, model_cfg, lora, method="lora", task="chat")(model, adapter)
    return base, adapter


def _logits(model, tok):
    with torch.no_grad():
        return model(input_ids=torch.tensor([tok("Name a fruit. Apple.")["input_ids"]])).logits


@pytest.mark.unit
def test_adapter_loads_after_the_base_moves(tmp_path, monkeypatch):
    from tunelab.models.adapters import load_adapter

    base, adapter = make_adapter(tmp_path / "a", monkeypatch)
    info = json.loads((adapter / "tunelab_adapter.json").read_text())
    assert info["base"] == {"kind": "local", "name": "base", "path": str(base.resolve()), "relative": "llamas/base"}
    peft_cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert peft_cfg["base_model_name_or_path"] == "llamas/base"  # no absolute path of this machine
    before, tok, _ = load_adapter(adapter)
    expected = _logits(before, tok)

    other = tmp_path / "elsewhere"  # "another machine": the base under another root, the old path gone
    other.mkdir()
    shutil.move(str(tmp_path / "a" / "llamas"), str(other / "llamas"))
    moved_adapter = other / "final"
    shutil.copytree(adapter, moved_adapter)
    monkeypatch.setenv("TUNELAB_MODEL_ROOT", str(other))
    after, tok2, _ = load_adapter(moved_adapter)
    assert torch.equal(_logits(after, tok2), expected)

    monkeypatch.delenv("TUNELAB_MODEL_ROOT")
    with pytest.raises(InputError, match="TUNELAB_MODEL_ROOT") as e:
        load_adapter(moved_adapter)
    assert "llamas/base" in e.value.one_line()


@pytest.mark.unit
def test_embedded_and_hub_references_are_names():
    from tunelab.models.base_ref import peft_base_name, portable_reference, resolve_reference

    emb = portable_reference("smollm2-135m-instruct")
    assert emb == {"kind": "embedded", "name": "smollm2-135m-instruct"}
    assert peft_base_name(emb) == "HuggingFaceTB/SmolLM2-135M-Instruct" and resolve_reference(emb) == emb["name"]
    hub = portable_reference("org/model-x", "abc123")
    assert hub == {"kind": "hub", "id": "org/model-x", "revision": "abc123"} and resolve_reference(hub) == "org/model-x"


@pytest.mark.e2e
def test_merge_dtypes_are_checked_and_a_corrupted_merge_fails(tmp_path, monkeypatch):
    from tunelab.export.check import ExportMismatch
    from tunelab.export.merge import merge_checked

    _, adapter = make_adapter(tmp_path, monkeypatch)
    r = runner.invoke(app, ["merge", str(adapter.parent), "-o", str(tmp_path / "m16"), "--dtype", "bf16", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["dtype"] == "bf16" and out["check"]["passed"]
    weights = json.loads((tmp_path / "m16" / "config.json").read_text())
    assert weights.get("dtype", weights.get("torch_dtype")) == "bfloat16"
    assert json.loads((tmp_path / "m16" / "export_check.json").read_text())["kind"] == "bf16"
    fp32 = merge_checked(adapter, tmp_path / "m32", "fp32")
    assert fp32["check"]["relative_logit_diff"] < 1e-4 < out["check"]["relative_logit_diff"]

    def corrupt(model):  # what a wrong scale or a dropped delta looks like
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight.mul_(-1.0)

    with pytest.raises(ExportMismatch):
        merge_checked(adapter, tmp_path / "bad", "fp32", corrupt=corrupt)
    assert sorted(p.name for p in (tmp_path / "bad").iterdir()) == ["export_check.json"]
    r = runner.invoke(app, ["merge", str(adapter), "-o", str(tmp_path / "x"), "--dtype", "int8"])
    assert r.exit_code == 2 and "field '--dtype'" in r.stderr


@pytest.mark.parity
def test_export_of_an_adapter_merges_first(tmp_path, monkeypatch):
    from tunelab.export.run_export import export_run

    _, adapter = make_adapter(tmp_path, monkeypatch)
    from tunelab.models.adapters import load_adapter
    from tunelab.models.gguf import read_gguf

    out = export_run(adapter.parent, tmp_path / "g", "gguf", ["f32"])
    assert out["files"][0]["check"]["passed"]
    unmerged, tok, _ = load_adapter(adapter)  # the adapter as trained, on its base: the GGUF must equal it
    back, _ = read_gguf(out["files"][0]["file"])
    assert torch.allclose(_logits(back, tok), _logits(unmerged, tok), atol=1e-5)


@pytest.mark.e2e
def test_push_plan_lists_what_would_be_sent(tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    from tunelab.export.push import plan_push, push
    from tunelab.export.run_export import export_run

    _, adapter = make_adapter(tmp_path, monkeypatch)
    run = adapter.parent
    export_run(run, run / "export-gguf", "gguf", ["q8_0"])
    plan = plan_push(run, "me/tiny-adapter")
    paths = [f["path"] for f in plan["files"]]
    assert paths[0] == "README.md" and "adapter_model.safetensors" in paths and "adapter_config.json" in paths
    assert "gguf/run-q8_0.gguf" in paths and not any(p.endswith(".check.json") for p in paths)
    size = {f["path"]: f["bytes"] for f in plan["files"]}
    assert size["adapter_model.safetensors"] == (adapter / "adapter_model.safetensors").stat().st_size
    card = ModelCard(plan["card"])
    assert card.data.library_name == "peft" and "tunelab" in card.data.tags and card.data.base_model == "llamas/base"
    assert str(tmp_path) not in plan["card"]  # peft put this machine's path in its card; it does not travel

    class FakeApi:  # records what would go over the network
        def __init__(self):
            self.calls = []

        def create_repo(self, repo_id, **kw):
            self.calls.append(("create_repo", repo_id, kw))

        def create_commit(self, repo_id, operations, **kw):
            self.calls.append(("create_commit", repo_id, [op.path_in_repo for op in operations]))

    api = FakeApi()
    push(run, "me/tiny-adapter", api=api)
    assert api.calls[0][0] == "create_repo" and api.calls[0][2]["exist_ok"]
    assert api.calls[1] == ("create_commit", "me/tiny-adapter", paths)
    r = runner.invoke(app, ["push", str(run), "not a repo id", "--dry-run"])
    assert r.exit_code == 2 and "REPO_ID" in r.stderr
