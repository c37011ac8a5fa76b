"""Read and encode preference pairs: a prompt, a chosen answer and a rejected one.

Records (jsonl/json/csv/tsv/parquet), detected from their keys like the chat formats:

- `{"prompt": str, "chosen": str, "rejected": str}`: one user turn, one assistant answer each;
- conversational (TRL's format): `prompt` a list of OpenAI messages (the shared history, ending
  with a user turn), `chosen` / `rejected` lists holding the final assistant turn or turns.

Each side is rendered with the model's own chat template as one conversation, prompt + answer,
and masked by the same machinery as chat SFT (data.chat_template.encode_full): the supervised
tokens are exactly the answer's assistant turns and their end-of-turn token; the prompt's own
assistant turns get weight 0 and are never supervised. Bad pairs are InputErrors naming file,
line and field: identical chosen and rejected, an empty answer, a prompt that alone fills
model.max_length. A pair longer than max_length is cut as TRL does it: the prompt loses its
beginning (its end, next to the answer, is kept) down to `max_prompt_length` tokens, then the
answers lose their ends (their start is kept); both cuts are counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunelab.data.chat import ROLES, Message, _error, _messages, _source, _string, _validate_conversation
from tunelab.data.chat_template import IGNORE_INDEX, EncodedExample, _located, encode_full, require_template
from tunelab.data.readers import Record, read_records
from tunelab.errors import InputError

ANSWERS = ("chosen", "rejected")


@dataclass
class PreferencePair:
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    source: str  # "file.jsonl:12"


@dataclass
class EncodedPair:
    chosen: EncodedExample
    rejected: EncodedExample
    source: str

    def tokens(self) -> int:
        return len(self.chosen) + len(self.rejected)


def is_preference_record(record: Record) -> bool:
    return {"chosen", "rejected"} <= set(record.fields)


def read_preference_data(path: str | Path, fmt: str = "auto") -> list[PreferencePair]:
    """Every pair of a data file, validated; InputError (file, line, field) at the first bad one."""
    check_format(fmt)
    return parse_pairs(read_records(path), Path(path))


def check_format(fmt: str) -> None:
    if fmt not in ("auto", "preference"):
        raise InputError(f"task 'preference' reads prompt/chosen/rejected records, not '{fmt}': set data.format: auto "
                         "or preference", field="data.format")


def parse_pairs(records: list[Record], path: Path, first: bool = True) -> list[PreferencePair]:
    """The pairs of records (a file's, or a chunk of them: `first` says it holds the file's first record,
    whose keys must be a preference record's)."""
    if first and records and not is_preference_record(records[0]):
        raise InputError(f"a preference record needs the keys prompt, chosen and rejected; found {sorted(records[0].fields)}",
                         file=path, **records[0].where())
    return [parse_pair(rec, path) for rec in records]


def _side(rec: Record, path: Path, name: str, value, role: str) -> list[Message]:
    """A prompt or an answer: a string (one message of `role`) or a list of OpenAI messages."""
    roles = {r: r for r in ROLES}
    if isinstance(value, list):
        if not value:
            raise _error("is empty", rec, path, name, droppable="empty")
        return _messages(rec, path, value, name, "role", "content", roles)
    text = _string(rec, path, name, value, allow_empty=False)
    return [Message(role, text)]


def parse_pair(rec: Record, path: Path) -> PreferencePair:
    f = rec.fields
    for key in ("prompt", *ANSWERS):
        if key not in f:
            raise _error("missing key", rec, path, key)
    prompt = [Message(m.role, m.content, 0.0 if m.role == "assistant" else None)  # history: context, not trained
              for m in _side(rec, path, "prompt", f["prompt"], "user")]
    if prompt[-1].role != "user":
        raise _error("the prompt must end with a user turn (the answers continue it)", rec, path,
                     f"prompt[{len(prompt) - 1}]" if isinstance(f["prompt"], list) else "prompt")
    answers = {}
    for key in ANSWERS:
        msgs = _side(rec, path, key, f[key], "assistant")
        if msgs[0].role != "assistant":
            raise _error("an answer starts with an assistant turn", rec, path, f"{key}[0].role")
        if any(m.role == "system" for m in msgs):
            raise _error("a system message belongs in the prompt, not in an answer", rec, path, key)
        _validate_conversation(prompt + msgs, rec, path)
        answers[key] = msgs
    if [(m.role, m.content.strip()) for m in answers["chosen"]] == [(m.role, m.content.strip()) for m in answers["rejected"]]:
        raise _error("chosen and rejected are identical: the pair prefers nothing", rec, path, "rejected",
                     droppable="identical_pair")
    return PreferencePair(prompt, answers["chosen"], answers["rejected"], _source(path, rec))


# ---------------------------------------------------------------------------------------- encode


def prompt_length(example: EncodedExample) -> int:
    """Tokens before the answer: the first supervised position (labels mark exactly the answer)."""
    return next(i for i, t in enumerate(example.labels) if t != IGNORE_INDEX)


def _cut(example: EncodedExample, start: int, keep_prompt: int, answer_budget: int) -> EncodedExample:
    """Keep the last `keep_prompt` prompt tokens and the first `answer_budget` answer tokens."""
    lo = start - keep_prompt
    ids, labels = example.input_ids[lo : start + answer_budget], example.labels[lo : start + answer_budget]
    labels = [IGNORE_INDEX, *labels[1:]]  # the first token is never a target
    return EncodedExample(ids, labels)


def encode_pair(pair: PreferencePair, tokenizer, max_length: int, max_prompt_length: int) -> tuple[EncodedPair, dict]:
    """Both sides encoded and masked; the cuts made, as {"prompt": bool, "answer": bool}."""
    chosen = encode_full(pair.prompt + pair.chosen, tokenizer)
    rejected = encode_full(pair.prompt + pair.rejected, tokenizer)
    p_c, p_r = prompt_length(chosen), prompt_length(rejected)
    prompt = max(p_c, p_r)
    if prompt >= max_length:
        raise InputError(f"the prompt alone is {prompt} tokens, model.max_length is {max_length}: no answer token would "
                         "fit; raise model.max_length or shorten the prompt", field="prompt")
    longest = max(len(chosen) - p_c, len(rejected) - p_r)
    cuts = {"prompt": False, "answer": False}
    if prompt + longest <= max_length:
        return EncodedPair(chosen, rejected, pair.source), cuts
    keep = max(min(prompt, max_prompt_length), max_length - longest)  # cut the prompt only as far as needed
    keep = max(1, min(keep, prompt, max_length - 1))
    budget = max_length - keep
    cuts = {"prompt": keep < prompt, "answer": longest > budget}
    out = [_cut(ex, p, min(keep, p), budget) for ex, p in ((chosen, p_c), (rejected, p_r))]
    return EncodedPair(out[0], out[1], pair.source), cuts


def encode_pairs(pairs: list[PreferencePair], tokenizer, max_length: int,
                 max_prompt_length: int | None = None) -> tuple[list[EncodedPair], dict]:
    """Every pair encoded (InputErrors located at the pair's line); stats with the cut counts."""
    require_template(tokenizer)
    max_prompt_length = max_prompt_length or max_length // 2
    out, prompts_cut, answers_cut = [], 0, 0
    for pair in pairs:
        try:
            enc, cuts = encode_pair(pair, tokenizer, max_length, max_prompt_length)
        except InputError as e:
            raise _located(e, pair.source) from None
        prompts_cut += cuts["prompt"]
        answers_cut += cuts["answer"]
        out.append(enc)
    tokens = sum(p.tokens() for p in out)
    answer_tokens = sum(p.chosen.supervised() + p.rejected.supervised() for p in out)
    return out, pair_stats([{"pairs": len(out), "truncated_prompts": prompts_cut, "truncated_answers": answers_cut,
                             "tokens": tokens, "answer_tokens": answer_tokens}])


def pair_stats(parts: list[dict]) -> dict:
    """Encode statistics of several chunks of pairs as of one: the counts summed, the answer share of them."""
    keys = ("pairs", "truncated_prompts", "truncated_answers", "tokens", "answer_tokens")
    out = {k: sum(p[k] for p in parts) for k in keys}
    out["answer_share"] = round(out["answer_tokens"] / out["tokens"], 4) if out["tokens"] else 0.0
    return out
