"""Read chat and instruction data into conversations (or plain texts), every record located.

Accepted formats, detected from the keys of the first record (override with `fmt`):

- `openai`: `{"messages": [{"role": "system"|"user"|"assistant", "content": str, "weight": 0|1?}]}`
- `sharegpt`: `{"conversations": [{"from": "human"|"gpt"|"system"|"user"|"assistant", "value": str}]}`
- `alpaca`: `{"instruction": str, "input": str?, "output": str}`; a non-empty input is appended to
  the instruction after a blank line. Self-instruct seed records (`instruction` plus a list of
  `instances`, each with `input`/`output`) give one conversation per instance.
- `prompt_completion`: `{"prompt": str, "completion": str}` (one user turn, one assistant turn);
  TRL's conversational variant, where both are lists of messages, is accepted too.
- `text`: `{"text": str}` in jsonl/json/csv/tsv/parquet, or a `.txt` file, for domain adaptation.
  A `.txt` file holds one document per paragraph: documents are separated by one or more blank
  lines, and the line breaks inside a paragraph are kept. (Put a whole book in one `text` record
  when its paragraphs must stay together; long documents are cut into chunks at encoding time.)

Rules for conversations, each violation an InputError naming file, line and field: roles are
system/user/assistant only; a system message may only come first; the first message after the
optional system prompt must be from the user (a conversation opening with an assistant turn is
almost always a scrape that lost its first question, and several templates refuse it); every
conversation has at least one assistant turn with non-empty content and at least one of them
trained; `weight` is 0 or 1 and only on assistant messages (weight None = trained).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.data.readers import (MAX_FIELD_CHARS, DroppableRowError, Record, check_data_file, check_line_lengths,
                                  read_records)
from tunelab.errors import InputError

FORMATS = ("openai", "sharegpt", "alpaca", "prompt_completion", "text")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Message:
    role: str
    content: str
    weight: float | None = None  # 1 train / 0 skip; None = default (assistant turns trained)

    def trained(self) -> bool:
        return self.role == "assistant" and self.weight != 0


@dataclass
class ChatData:
    kind: str  # "conversations" | "text"
    conversations: list[list[Message]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # "file.jsonl:12", one per conversation or text

    def __len__(self) -> int:
        return len(self.conversations) if self.kind == "conversations" else len(self.texts)


def read_chat_data(path: str | Path, fmt: str = "auto") -> ChatData:
    """Read a chat/instruction/text data file; raise InputError at the first bad record."""
    path = Path(path)
    if fmt not in ("auto", *FORMATS):
        raise InputError(f"unknown chat data format '{fmt}'; use one of {['auto', *FORMATS]}", field="format")
    if path.suffix.lower() == ".txt":
        if fmt not in ("auto", "text"):
            raise InputError(f"a .txt file can only be read as plain text, not as '{fmt}'", file=path)
        return _read_txt(path)
    records = read_records(path)
    return chat_records(records, path, resolved_format(path, records[0], fmt))


def resolved_format(path: Path, first: Record, fmt: str) -> str:
    """`fmt`, or for auto the format the file's first record shows."""
    return detect_chat_format(path, first) if fmt == "auto" else fmt


def chat_records(records: list[Record], path: Path, fmt: str) -> ChatData:
    """Records of a known format (a file's, or a chunk of it) as validated conversations or texts."""
    data = ChatData("text" if fmt == "text" else "conversations")
    for rec in records:
        parsed = parse_record(rec, path, fmt)
        if isinstance(parsed, str):
            data.texts.append(parsed)
            data.sources.append(_source(path, rec))
        else:
            data.conversations += parsed
            data.sources += [_source(path, rec)] * len(parsed)
    return data


def parse_record(rec: Record, path: Path, fmt: str) -> str | list[list[Message]]:
    """One record of a known format: its text (`fmt` 'text') or its validated conversations.

    A record with nothing to learn (empty text, empty assistant turn, no assistant turn) raises
    DroppableRowError, so `data clean` can drop it where training stops at it.
    """
    if fmt == "text":
        return _string(rec, path, "text", rec.fields.get("text"), allow_empty=False)
    reader = {"openai": _openai, "sharegpt": _sharegpt, "alpaca": _alpaca, "prompt_completion": _prompt_completion}[fmt]
    conversations = reader(rec, path)
    for conv in conversations:
        _validate_conversation(conv, rec, path)
    return conversations


def detect_chat_format(path: Path, record: Record) -> str:
    keys = set(record.fields)
    if "messages" in keys:
        return "openai"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys:
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    raise InputError(
        f"cannot tell the chat data format from the keys {sorted(keys)}: expected 'messages' (OpenAI), "
        "'conversations' (ShareGPT), 'instruction'/'output' (Alpaca), 'prompt'/'completion' or 'text'; "
        "or set data.format",
        file=path,
        **record.where(),
    )


def _source(path: Path, rec: Record) -> str:
    return f"{path}:{rec.line}" if rec.line is not None else f"{path}#{rec.index}"


def _error(msg: str, rec: Record, path: Path, field_name: str, *, droppable: str | None = None) -> InputError:
    """The located error for a record; with `droppable` (a curation reason) a DroppableRowError."""
    if droppable:
        return DroppableRowError(msg, reason=droppable, file=path, field=field_name, **rec.where())
    return InputError(msg, file=path, field=field_name, **rec.where())


def _string(rec: Record, path: Path, name: str, value: Any, *, allow_empty: bool = True) -> str:
    if value is None:
        raise _error("missing key" if name not in rec.fields else "value is null", rec, path, name)
    if not isinstance(value, str):
        raise _error(f"expected a string, got {type(value).__name__}", rec, path, name)
    if not allow_empty and not value.strip():
        raise _error("is empty", rec, path, name, droppable="empty")
    if len(value) > MAX_FIELD_CHARS:
        raise _error(f"has {len(value):,} characters, more than the limit of {MAX_FIELD_CHARS:,}", rec, path, name)
    return value


def _list(rec: Record, path: Path, name: str) -> list:
    if name not in rec.fields:
        raise _error("missing key", rec, path, name)
    value = rec.fields[name]
    if not isinstance(value, list):
        raise _error(f"expected a list of messages, got {type(value).__name__}", rec, path, name)
    if not value:
        raise _error("the conversation is empty", rec, path, name, droppable="empty")
    return value


def _weight(rec: Record, path: Path, name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or value not in (0, 1):
        raise _error(f"weight must be 0 or 1, got {value!r}", rec, path, name)
    return float(value)


def _messages(rec: Record, path: Path, items: list, name: str, role_key: str, content_key: str, roles: dict) -> list[Message]:
    out = []
    for i, m in enumerate(items):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise _error(f"expected a message object, got {type(m).__name__}", rec, path, where)
        if m.get("tool_calls") is not None:
            raise _error("tool calls are not supported (they would be dropped without a word); remove them or the "
                         "message", rec, path, f"{where}.tool_calls")
        if role_key not in m:
            raise _error("missing key", rec, path, f"{where}.{role_key}")
        raw_role = m[role_key]
        if not isinstance(raw_role, str) or raw_role.lower() not in roles:
            raise _error(f"unknown role {raw_role!r}; expected one of {sorted(roles)}", rec, path, f"{where}.{role_key}")
        if content_key not in m:
            raise _error("missing key", rec, path, f"{where}.{content_key}")
        content = m[content_key]
        if not isinstance(content, str):
            raise _error(f"expected a string, got {type(content).__name__}", rec, path, f"{where}.{content_key}")
        if len(content) > MAX_FIELD_CHARS:
            raise _error(f"has {len(content):,} characters, more than the limit of {MAX_FIELD_CHARS:,}", rec, path,
                         f"{where}.{content_key}")
        for key in ("tool_calls", "function_call", "tool_call_id"):
            if m.get(key) is not None:
                raise _error("tool calls are not supported (they would be dropped without a word); remove them or "
                             "the message", rec, path, f"{where}.{key}")
        role = roles[raw_role.lower()]
        weight = _weight(rec, path, f"{where}.weight", m.get("weight"))
        if weight is not None and role != "assistant":
            raise _error("weight applies to assistant messages only", rec, path, f"{where}.weight")
        if role == "assistant" and not content.strip():
            raise _error("empty assistant turn", rec, path, f"{where}.{content_key}", droppable="empty_assistant")
        out.append(Message(role, content, weight))
    return out


def _openai(rec: Record, path: Path) -> list[list[Message]]:
    items = _list(rec, path, "messages")
    return [_messages(rec, path, items, "messages", "role", "content", {r: r for r in ROLES})]


def _sharegpt(rec: Record, path: Path) -> list[list[Message]]:
    items = _list(rec, path, "conversations")
    return [_messages(rec, path, items, "conversations", "from", "value", SHAREGPT_ROLES)]


def _alpaca(rec: Record, path: Path) -> list[list[Message]]:
    f = rec.fields
    if "instruction" not in f:
        raise _error("missing key", rec, path, "instruction")
    instruction = _string(rec, path, "instruction", f["instruction"], allow_empty=False)
    if "output" not in f and isinstance(f.get("instances"), list):
        convs = []
        for i, inst in enumerate(f["instances"]):
            if not isinstance(inst, dict):
                raise _error(f"expected an object, got {type(inst).__name__}", rec, path, f"instances[{i}]")
            convs.append(_alpaca_pair(rec, path, instruction, inst, f"instances[{i}]."))
        if not convs:
            raise _error("no instances", rec, path, "instances")
        return convs
    return [_alpaca_pair(rec, path, instruction, f, "")]


def _alpaca_pair(rec: Record, path: Path, instruction: str, f: dict, prefix: str) -> list[Message]:
    extra = f.get("input", "")
    if extra is None:
        extra = ""
    if not isinstance(extra, str):
        raise _error(f"expected a string, got {type(extra).__name__}", rec, path, prefix + "input")
    if "output" not in f:
        raise _error("missing key", rec, path, prefix + "output")
    output = f["output"]
    if not isinstance(output, str):
        raise _error(f"expected a string, got {type(output).__name__}", rec, path, prefix + "output")
    if not output.strip():
        raise _error("empty assistant turn", rec, path, prefix + "output", droppable="empty_assistant")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [Message("user", prompt), Message("assistant", output)]


def _prompt_completion(rec: Record, path: Path) -> list[list[Message]]:
    f = rec.fields
    for key in ("prompt", "completion"):
        if key not in f:
            raise _error("missing key", rec, path, key)
    prompt, completion = f["prompt"], f["completion"]
    roles = {r: r for r in ROLES}
    if isinstance(prompt, list) and isinstance(completion, list):
        msgs = _messages(rec, path, prompt, "prompt", "role", "content", roles)
        return [msgs + _messages(rec, path, completion, "completion", "role", "content", roles)]
    prompt = _string(rec, path, "prompt", prompt, allow_empty=False)
    completion = _string(rec, path, "completion", completion)
    if not completion.strip():
        raise _error("empty assistant turn", rec, path, "completion", droppable="empty_assistant")
    return [[Message("user", prompt), Message("assistant", completion)]]


def _validate_conversation(conv: list[Message], rec: Record, path: Path) -> None:
    name = _conversation_key(rec)
    for i, m in enumerate(conv):
        if m.role == "system" and i != 0:
            raise _error("a system message may only come first", rec, path, f"{name}[{i}]")
    first = 1 if conv and conv[0].role == "system" else 0
    if first >= len(conv):
        raise _error("the conversation holds only a system message", rec, path, name, droppable="no_assistant_turn")
    if conv[first].role != "user":
        raise _error("the first message (after the system prompt) must be from the user, not the assistant",
                     rec, path, f"{name}[{first}]")
    if not any(m.role == "assistant" for m in conv):
        raise _error("conversation without an assistant turn: nothing to learn", rec, path, name,
                     droppable="no_assistant_turn")
    if not any(m.trained() for m in conv):
        raise _error("every assistant turn has weight 0: nothing to learn", rec, path, name)


def _conversation_key(rec: Record) -> str:
    for key in ("messages", "conversations", "prompt"):
        if key in rec.fields:
            return key
    return "instruction"


def _read_txt(path: Path) -> ChatData:
    check_data_file(path)
    raw = path.read_bytes()
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise InputError("holds a NUL byte (a binary file, or a corrupt one), not text", file=path,
                         line=raw.count(b"\n", 0, nul) + 1)
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise InputError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x}); re-save the file as UTF-8", file=path,
                         line=raw.count(b"\n", 0, e.start) + 1) from None
    check_line_lengths(path, text, MAX_FIELD_CHARS)
    data = ChatData("text")
    block: list[str] = []
    start = 0
    for lineno, line in enumerate([*text.splitlines(), ""], start=1):
        if line.strip():
            if not block:
                start = lineno
            block.append(line)
        elif block:
            if sum(map(len, block)) > MAX_FIELD_CHARS:
                raise InputError(f"a paragraph of more than {MAX_FIELD_CHARS:,} characters (blank lines lost?)",
                                 file=path, line=start)
            data.texts.append("\n".join(block))
            data.sources.append(f"{path}:{start}")
            block = []
    if not data.texts:
        raise InputError("file is empty", file=path)
    return data
