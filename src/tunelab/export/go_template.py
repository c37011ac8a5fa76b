"""Render the subset of Go's text/template that Ollama chat templates use, to check a Modelfile.

Ollama renders a Modelfile's TEMPLATE with Go's text/template over `.Messages` (each with `.Role`
and `.Content`), `.System` and `.Prompt`. tunelab writes templates from that subset only, and
checks them by rendering here and comparing with the Hugging Face chat template's render. The
subset: text; `{{ .Field }}` and `{{ $.Field }}`; `{{ range .Messages }}` /
`{{ range $i, $m := .Messages }}`; `{{ if X }}`, `{{ if eq .Role "system" }}`, `{{ else }}`,
`{{ end }}`; the `{{-` and `-}}` trim markers (which drop the whitespace beside them, as in Go).
Anything else raises ValueError: a template this cannot render is one tunelab must not write.
"""

from __future__ import annotations

import re

_ACTION = re.compile(r"{{(-?)\s*(.*?)\s*(-?)}}", re.S)


def _lex(template: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", body)], with the trim markers applied to the neighbouring text."""
    out: list[tuple[str, str]] = []
    pos = 0
    trim_next = False
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        out.append(("text", text))
        out.append(("action", m.group(2)))
        trim_next = bool(m.group(3))
        pos = m.end()
    tail = template[pos:]
    out.append(("text", tail.lstrip() if trim_next else tail))
    return out


def _parse(tokens: list[tuple[str, str]], i: int = 0, stop=("end",)) -> tuple[list, int, str | None]:
    """A node list up to one of `stop` actions; returns (nodes, next index, the stop word met)."""
    nodes: list = []
    while i < len(tokens):
        kind, body = tokens[i]
        i += 1
        if kind == "text":
            if body:
                nodes.append(("text", body))
            continue
        word = body.split(" ", 1)[0]
        if word in stop:
            return nodes, i, word
        if word == "range":
            m = re.fullmatch(r"range\s+(?:\$\w+\s*,\s*\$\w+\s*:=\s*)?(\$?\.\w+)", body)
            if not m:
                raise ValueError(f"unsupported range: {body!r}")
            inner, i, _ = _parse(tokens, i, ("end",))
            nodes.append(("range", m.group(1), inner))
        elif word == "if":
            then, i, met = _parse(tokens, i, ("else", "end"))
            other = []
            if met == "else":
                other, i, _ = _parse(tokens, i, ("end",))
            nodes.append(("if", body[3:].strip(), then, other))
        elif re.fullmatch(r"\$?\.\w+", body):
            nodes.append(("field", body))
        else:
            raise ValueError(f"unsupported action: {{{{ {body} }}}}")
    return nodes, i, None


def _lookup(ref: str, dot: dict, root: dict):
    scope, name = (root, ref[2:]) if ref.startswith("$.") else (dot, ref[1:])
    if name not in scope:
        raise ValueError(f"unknown field {ref}")
    return scope[name]


def _truthy(cond: str, dot: dict, root: dict) -> bool:
    m = re.fullmatch(r'eq\s+(\$?\.\w+)\s+"([^"]*)"', cond)
    if m:
        return _lookup(m.group(1), dot, root) == m.group(2)
    if re.fullmatch(r"\$?\.\w+", cond):
        return bool(_lookup(cond, dot, root))
    raise ValueError(f"unsupported condition: {cond!r}")


def _render(nodes: list, dot: dict, root: dict) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "field":
            out.append(str(_lookup(node[1], dot, root)))
        elif node[0] == "range":
            for item in _lookup(node[1], dot, root):
                out.append(_render(node[2], item, root))
        else:
            _, cond, then, other = node
            out.append(_render(then if _truthy(cond, dot, root) else other, dot, root))
    return "".join(out)


def render(template: str, data: dict) -> str:
    """`template` rendered over `data` (e.g. {"Messages": [{"Role":..., "Content":...}], "System": ...})."""
    nodes, _, met = _parse(_lex(template), 0, ("end",))
    if met is not None:
        raise ValueError("{{ end }} without a range or if")
    return _render(nodes, data, data)


def ollama_messages(messages: list[dict], system: str | None) -> dict:
    """The data Ollama's chat endpoint renders a TEMPLATE over: its Modelfile SYSTEM is put first as a
    system message when the conversation has none of its own."""
    msgs = [{"Role": m["role"], "Content": m["content"]} for m in messages]
    if system and (not msgs or msgs[0]["Role"] != "system"):
        msgs = [{"Role": "system", "Content": system}] + msgs
    first_system = next((m["Content"] for m in msgs if m["Role"] == "system"), "")
    last_user = next((m["Content"] for m in reversed(msgs) if m["Role"] == "user"), "")
    return {"Messages": msgs, "System": first_system, "Prompt": last_user}
