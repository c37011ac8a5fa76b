"""An Ollama Modelfile that renders conversations exactly as training did.

Ollama does not run Jinja: a Modelfile's TEMPLATE is a Go text/template. A general Jinja -> Go
translation does not exist, so tunelab knows the template families it can write (`FAMILIES`:
ChatML, as SmolLM2 and Qwen use, and Llama 3) and picks the one whose render equals the Hugging
Face template's render on probe conversations (with and without a system message, multi-turn).
A default system prompt the Jinja template injects (SmolLM2: "You are a helpful AI assistant
named SmolLM, ...") becomes the Modelfile's SYSTEM, which Ollama inserts the same way: as the
first message when a conversation has no system message of its own. Stop tokens are the
end-of-turn token and the family's turn openers; num_ctx is the training context.

No family matching is an InputError: a Modelfile that renders differently from training is the
silent failure this module exists to prevent. `check_modelfile` is the same comparison on the
written file (parsed back), run after every `--format ollama` export.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tunelab.errors import InputError
from tunelab.export.go_template import ollama_messages, render

MODELFILE = "Modelfile"


@dataclass(frozen=True)
class Family:
    name: str
    template: str
    stops: tuple[str, ...]
    default_system: str  # regex over the render of a lone user turn: group 1 = an injected system prompt


FAMILIES = (
    Family("chatml",
           "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
           ("<|im_end|>", "<|im_start|>"), r"^<\|im_start\|>system\n(.*?)<\|im_end\|>\n"),
    Family("llama3",
           "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
           "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
           ("<|eot_id|>", "<|start_header_id|>"),
           r"^(?:<\|begin_of_text\|>)?<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>"),
)

PROBES = (
    [{"role": "user", "content": "Hello there."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "Four."},
     {"role": "user", "content": "And three plus three?"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Tell me a story."}],
)


@dataclass
class Modelfile:
    """The parts of a Modelfile tunelab writes (and parses back)."""

    gguf: str
    template: str
    system: str | None = None
    parameters: list[tuple[str, str]] = field(default_factory=list)

    def text(self) -> str:
        lines = [f"FROM ./{self.gguf}", f'TEMPLATE """{self.template}"""']
        if self.system:
            lines.append(f'SYSTEM """{self.system}"""')
        lines += [f"PARAMETER {k} {v}" for k, v in self.parameters]
        return "\n".join(lines) + "\n"

    def stops(self) -> list[str]:
        return [json_unquote(v) for k, v in self.parameters if k == "stop"]


def json_unquote(v: str) -> str:
    return v[1:-1].replace('\\"', '"') if v.startswith('"') and v.endswith('"') else v


def parse_modelfile(text: str) -> Modelfile:
    """FROM, TEMPLATE / SYSTEM (triple-quoted or one line) and PARAMETER lines, as Ollama reads them."""
    parts: dict = {"parameters": []}
    pattern = re.compile(r'^(FROM|TEMPLATE|SYSTEM|PARAMETER)\s+("""(.*?)"""|[^\n]*)', re.S | re.M | re.I)
    for m in pattern.finditer(text):
        cmd, value = m.group(1).upper(), m.group(3) if m.group(3) is not None else m.group(2).strip()
        if cmd == "PARAMETER":
            key, _, val = value.partition(" ")
            parts["parameters"].append((key, val.strip()))
        else:
            parts[cmd.lower()] = value
    if "from" not in parts or "template" not in parts:
        raise ValueError("a Modelfile needs FROM and TEMPLATE")
    return Modelfile(parts["from"].removeprefix("./"), parts["template"], parts.get("system"), parts["parameters"])


def ollama_render(mf: Modelfile, messages: list[dict], bos: str = "") -> str:
    """The prompt text Ollama builds for `messages` (plus llama.cpp's BOS when the GGUF adds one)."""
    return bos + render(mf.template, ollama_messages(messages, mf.system))


def hf_render(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _bos_text(tokenizer, add_bos: bool) -> str:
    return tokenizer.bos_token if add_bos and tokenizer.bos_token else ""


def build_modelfile(tokenizer, gguf_name: str, *, add_bos: bool, num_ctx: int, system: str | None = None,
                    generation_config=None) -> Modelfile:
    """The Modelfile for this tokenizer's chat template; InputError when no known family renders like it."""
    if not isinstance(tokenizer.chat_template, str):
        raise InputError("--format ollama needs a chat template (the model has none); export --format gguf instead",
                         field="--format")
    lone = hf_render(tokenizer, PROBES[0])
    bos = _bos_text(tokenizer, add_bos)
    for fam in FAMILIES:
        m = re.match(fam.default_system, lone.removeprefix(bos), re.S)
        mf = Modelfile(gguf_name, fam.template, system if system is not None else (m.group(1) if m else None),
                       _parameters(fam, tokenizer, num_ctx, generation_config))
        if system is None and all(ollama_render(mf, p, bos) == hf_render(tokenizer, p) for p in PROBES):
            return mf
        if system is not None and all(ollama_render(mf, p, bos) == hf_render(tokenizer, p) for p in PROBES[1::2]):
            return mf  # a chosen SYSTEM replaces the template's default: compare where conversations bring their own
    raise InputError("the chat template is not one tunelab can write as an Ollama template (known: "
                     f"{', '.join(f.name for f in FAMILIES)}); export --format gguf and write the TEMPLATE by hand",
                     field="--format")


def _parameters(fam: Family, tokenizer, num_ctx: int, generation_config) -> list[tuple[str, str]]:
    from tunelab.models.gguf import end_of_turn_id

    stops = list(fam.stops)
    eot = end_of_turn_id(tokenizer)
    if eot is not None:
        eot_text = tokenizer.convert_ids_to_tokens(eot)
        stops = [eot_text] + [s for s in stops if s != eot_text]
    params = [("stop", f'"{s}"') for s in stops] + [("num_ctx", str(int(num_ctx)))]
    gc = generation_config
    if gc is not None and getattr(gc, "do_sample", False):
        params += [(k, str(getattr(gc, k))) for k in ("temperature", "top_p", "top_k") if getattr(gc, k, None) is not None]
    else:
        params.append(("temperature", "0"))  # tunelab generate's default: greedy
    return params


def check_modelfile(text: str, tokenizer, add_bos: bool) -> dict:
    """Parse a written Modelfile and render the probe conversations as Ollama would: equal to training?"""
    mf = parse_modelfile(text)
    bos = _bos_text(tokenizer, add_bos)
    probes = PROBES if mf.system is None or _template_default(tokenizer, bos) == mf.system else PROBES[1::2]
    equal = [ollama_render(mf, p, bos) == hf_render(tokenizer, p) for p in probes]
    return {"conversations": len(probes), "renders_equal": sum(equal), "passed": all(equal),
            "stops": mf.stops(), "system": mf.system}


def _template_default(tokenizer, bos: str) -> str | None:
    lone = hf_render(tokenizer, PROBES[0]).removeprefix(bos)
    for fam in FAMILIES:
        m = re.match(fam.default_system, lone, re.S)
        if m:
            return m.group(1)
    return None
