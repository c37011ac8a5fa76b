"""`tunelab eval` on causal-LM / chat models (loss on the training masks against a plain transformers
forward, generation measures, --json), classification still working, and model/task mismatches
refused with a line that says what fits."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import sentiment_rows, write_jsonl
from tiny_models import conversations, tiny_llama_folder
from tunelab.cli import app


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_llama_folder(tmp_path_factory.mktemp("llama"))


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parity
def test_eval_chat_model_loss_matches_transformers_and_generates(tmp_path, llama):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.data.chat import read_chat_data
    from tunelab.data.chat_template import encode_dataset

    data = write_jsonl(tmp_path / "eval.jsonl", conversations(6))
    res = _run("eval", llama, "--data", data, "--json", "--n", "3", "--max-new-tokens", "4")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    # reference: a plain transformers forward with labels, per example, weighted by its supervised targets
    model = AutoModelForCausalLM.from_pretrained(llama, dtype="float32").eval()
    tok = AutoTokenizer.from_pretrained(llama)
    examples, _ = encode_dataset(read_chat_data(data), tok, 512)
    total, n = 0.0, 0
    with torch.no_grad():
        for e in examples:
            k = sum(1 for t in e.labels[1:] if t != -100)
            total += model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss.item() * k
            n += k
    assert out["supervised_tokens"] == n
    assert out["loss"] == pytest.approx(total / n, rel=1e-4)
    assert out["perplexity"] == pytest.approx(torch.exp(torch.tensor(total / n)).item(), rel=1e-3)
    assert 0 <= out["token_accuracy"] <= 1
    g = out["generation"]
    assert g["greedy"]["n"] == 3 and g["sampled"]["n"] == 3 and len(g["samples"]) == 3
    assert {"stop_rate", "distinct_2", "cross_similarity", "repeated_4gram_share", "leakage_rate", "chrf",
            "rouge_l"} <= set(g["greedy"])
    assert g["samples"][0]["reference"] == conversations(1)[0]["messages"][-1]["content"]  # the last assistant turn

    text = _run("eval", llama, "--data", data, "--n", "2", "--max-new-tokens", "3")
    assert text.exit_code == 0 and "perplexity" in text.output and "stop_rate" in text.output


@pytest.mark.e2e
def test_mismatches_are_input_errors_that_say_what_fits(tmp_path, llama, tiny_bert):
    labelled = write_jsonl(tmp_path / "labelled.jsonl", sentiment_rows(8))
    chat = write_jsonl(tmp_path / "chat.jsonl", conversations(3))

    res = _run("eval", llama, "--data", labelled)
    assert res.exit_code == 2 and "classification file" in res.output and "classifier" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1

    res = _run("eval", tiny_bert, "--data", chat)
    assert res.exit_code == 2 and "sequence classifier" in res.output and "labelled file" in res.output

    res = _run("generate", tiny_bert, "--prompt", "hi")
    assert res.exit_code == 2 and "sequence classifier" in res.output and "causal-LM" in res.output

    named = write_jsonl(tmp_path / "named.jsonl", [{**r, "label": f"LABEL_{int(r['label'] == 'neg')}"}
                                                   for r in sentiment_rows(8)])
    res = _run("eval", tiny_bert, "--data", named, "--json")  # classification keeps working
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["rows"] == 8
