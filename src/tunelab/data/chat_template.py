"""Encode conversations with a model's own chat template, supervising only assistant tokens.

The supervised span of an assistant turn is derived from the template itself, so any template
works, with or without `{% generation %}` markers (SmolLM2's has none):

    P = render(messages[:i], add_generation_prompt=True)   # what the model sees at inference
    F = render(messages[:i+1])                              # the same plus assistant turn i

The characters F[len(P):] are what the model must produce after the prompt: the assistant content
and the template's end-of-turn marker. Trailing whitespace after the marker (ChatML's "\\n" after
`<|im_end|>`) is not supervised: at inference generation stops at the marker, so the model never
produces it. The full conversation is rendered once and tokenized once with offsets, and a token is
supervised when its characters overlap such a span. Everything else (system prompt, user turns,
role headers, turns with weight 0) gets the label -100.

Rendered text already holds the template's special tokens (BOS included, when the template writes
one), so it is always tokenized with `add_special_tokens=False`; `check_template` verifies that
this gives no double BOS and that the training tokens agree with the inference prompt's tokens.
"""

from __future__ import annotations

import bisect

import re
from dataclasses import dataclass, field

from tunelab.data.chat import ChatData, Message
from tunelab.errors import InputError

IGNORE_INDEX = -100
OVERFLOW_MODES = ("truncate", "drop")

# The ChatML template (SmolLM2, Qwen), offered as the fix when a tokenizer has none.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids (the loss shifts); -100 = not supervised; labels[0] is always -100
    source: str | None = field(default=None, compare=False)  # "file:line" of the conversation or text

    def __len__(self) -> int:
        return len(self.input_ids)

    def supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


# ---------------------------------------------------------------------------------------- render


def _as_dicts(messages: list[Message]) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in messages]


def _render(tokenizer, messages: list[Message], add_generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(_as_dicts(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja raises TemplateError / raise_exception() messages of the template
        raise InputError(f"the chat template refused this conversation ({type(e).__name__}: {e})") from None
    if not isinstance(text, str):  # some versions return a list for batched input
        text = text[0]
    return text


def require_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            "the tokenizer has no chat template, so conversations cannot be rendered the way the model will "
            "see them at inference; use the model's instruct/chat variant, or set a template on the tokenizer "
            "(tokenizer.chat_template = tunelab.data.chat_template.CHATML_TEMPLATE for ChatML, which needs the "
            "<|im_start|>/<|im_end|> tokens), or train on plain text instead",
            field="chat_template",
        )


def assistant_spans(messages: list[Message], tokenizer, *, full: str | None = None,
                    stop_at: int | None = None) -> tuple[str, list[tuple[int, int]], list[int]]:
    """Render the conversation; return its text, the supervised character spans and their turn indices.

    Each turn's span costs a render of the conversation up to it, so a conversation of n turns costs
    O(n^2); `stop_at` (a character offset: where truncation cuts the rendered text) stops at the first
    turn that starts past it, which keeps a 4000-message conversation cut at max_length linear.
    """
    full = _render(tokenizer, messages, add_generation_prompt=False) if full is None else full
    spans, turns = [], []
    for i, m in enumerate(messages):
        if not m.trained():
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        if stop_at is not None and len(prompt) >= stop_at:
            break
        upto = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not upto.startswith(prompt):
            raise InputError(
                f"the chat template renders assistant turn {i} differently from its own generation prompt "
                f"(add_generation_prompt=True gives ...{prompt[-40:]!r}, the conversation has ...{upto[len(prompt) - 40:len(prompt)]!r}): "
                "what the model learns would not match what it sees at inference; fix the template",
                field="chat_template",
            )
        if not full.startswith(upto):
            raise InputError(
                f"the chat template renders turn {i} differently once later turns follow it (e.g. it strips "
                "reasoning from earlier turns): split the conversation into one example per assistant turn",
                field="chat_template",
            )
        end = len(upto.rstrip())
        if end <= len(prompt):
            raise InputError(f"the chat template renders assistant turn {i} as nothing", field="chat_template")
        spans.append((len(prompt), end))
        turns.append(i)
    return full, spans, turns


def _span_flags(offsets, spans: list[tuple[int, int]]) -> list[bool]:
    """Per token (start, end) offsets: whether it overlaps a span. The spans are sorted and disjoint,
    so a binary search finds the one span a token can touch: O(tokens log spans), not tokens x spans."""
    ends = [b for _, b in spans]
    flags = []
    for s, e in offsets:
        j = bisect.bisect_right(ends, s)  # the first span ending after the token starts
        if j == len(spans):
            flags.append(False)
        elif e <= s:  # zero-width offsets (trimmed whitespace): judge by position
            flags.append(spans[j][0] <= s)
        else:
            flags.append(e > spans[j][0])
    return flags


def _tokenize(tokenizer, text: str, spans: list[tuple[int, int]], enc=None) -> tuple[list[int], list[bool]]:
    """Token ids of `text` (no added special tokens) and, per token, whether it overlaps a span.
    `enc`: the fast tokenizer's output for `text` with offsets, when the caller has it already."""
    if getattr(tokenizer, "is_fast", False):
        if enc is None:
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], _span_flags(enc["offset_mapping"], spans)
    # Slow tokenizers have no offsets: tokenize piece by piece at the span boundaries.
    cuts = sorted({0, len(text), *(p for span in spans for p in span)})
    starts = [a for a, _ in spans]
    ids, flags = [], []
    for a, b in zip(cuts, cuts[1:]):
        piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
        j = bisect.bisect_right(starts, a) - 1
        inside = j >= 0 and b <= spans[j][1]
        ids += piece
        flags += [inside] * len(piece)
    return ids, flags


def encode_full(messages: list[Message], tokenizer) -> EncodedExample:
    """The whole conversation, untruncated."""
    require_template(tokenizer)
    text, spans, _ = assistant_spans(messages, tokenizer)
    ids, flags = _tokenize(tokenizer, text, spans)
    labels = [t if f else IGNORE_INDEX for t, f in zip(ids, flags)]
    if labels:
        labels[0] = IGNORE_INDEX
    return EncodedExample(ids, labels)


def _cut(example: EncodedExample, max_length: int, overflow: str) -> EncodedExample | None:
    if overflow not in OVERFLOW_MODES:
        raise InputError(f"overflow must be one of {list(OVERFLOW_MODES)}, got {overflow!r}", field="overflow")
    if len(example) > max_length:
        if overflow == "drop":
            return None
        example = EncodedExample(example.input_ids[:max_length], example.labels[:max_length])
    return example if example.supervised() > 0 else None


def encode_conversation(messages: list[Message], tokenizer, max_length: int, overflow: str = "truncate") -> EncodedExample | None:
    """Token ids and labels of one conversation; None when no supervised token survives the cut.

    overflow="truncate" keeps the first max_length tokens; "drop" drops a conversation that does not
    fit whole. Either way a conversation whose supervised tokens all fall past max_length is dropped.
    """
    return encode_within(messages, tokenizer, max_length, overflow)[0]


def encode_within(messages: list[Message], tokenizer, max_length: int,
                  overflow: str = "truncate", rendered: tuple[str, dict] | None = None) -> tuple[EncodedExample | None, int]:
    """encode_conversation, plus the untruncated token count. With a fast tokenizer only the turns
    that start before the cut are rendered for their spans, so a long conversation costs linear time
    (the prefix renders of every turn would cost O(turns^2): 286 s for 4000 messages).

    `rendered`: (the conversation's rendered text, its fast-tokenizer encoding with offsets), when a
    batched tokenizer call made them already (data.parallel)."""
    if overflow not in OVERFLOW_MODES or not getattr(tokenizer, "is_fast", False):
        full = encode_full(messages, tokenizer)
        return _cut(full, max_length, overflow), len(full)
    require_template(tokenizer)
    if rendered is not None:
        text, enc = rendered
    else:
        text = _render(tokenizer, messages, add_generation_prompt=False)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    n, stop = len(enc["input_ids"]), None
    if n > max_length:
        if overflow == "drop":  # dropped whole: no need to find its spans
            return None, n
        stop = enc["offset_mapping"][max_length - 1][1]  # text past this is cut off
    text, spans, _ = assistant_spans(messages, tokenizer, full=text, stop_at=stop)
    ids, flags = _tokenize(tokenizer, text, spans, enc)
    labels = [t if f else IGNORE_INDEX for t, f in zip(ids, flags)]
    if labels:
        labels[0] = IGNORE_INDEX
    return _cut(EncodedExample(ids, labels), max_length, overflow), n


def encode_text(text: str, tokenizer, max_length: int, ids: list[int] | None = None) -> list[EncodedExample]:
    """Plain text for domain adaptation: every token supervised except the first of the text.

    The tokenizer's own special tokens are added (BOS when it uses one) and EOS is appended, so
    documents stay delimited when packed. Long texts are cut into chunks of max_length that
    overlap by one token: chunk k+1 starts with the last token of chunk k, whose label there is
    -100, so every token after the first is predicted exactly once.
    """
    if max_length < 2:
        raise InputError("max_length must be at least 2", field="max_length")
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"] if ids is None else ids)
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    chunks = []
    step = max_length - 1
    for start in range(0, max(len(ids) - 1, 1), step):
        piece = ids[start : start + max_length]
        if len(piece) < 2:
            break
        chunks.append(EncodedExample(piece, [IGNORE_INDEX] + piece[1:]))
    return chunks


def _conversation_chunk(chunk: list, tokenizer, max_length: int, overflow: str) -> list:
    """[(example or None, untruncated length, source)] for [(messages, source)]: each conversation
    rendered alone, the chunk tokenized in one batched fast-tokenizer call."""
    rendered = [None] * len(chunk)
    if getattr(tokenizer, "is_fast", False) and overflow in OVERFLOW_MODES:
        texts = []
        for messages, source in chunk:
            try:
                texts.append(_render(tokenizer, messages, add_generation_prompt=False))
            except InputError as e:
                raise _located(e, source) from None
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        rendered = [(t, {"input_ids": enc["input_ids"][k], "offset_mapping": enc["offset_mapping"][k]})
                    for k, t in enumerate(texts)]
    out = []
    for (messages, source), r in zip(chunk, rendered):
        try:
            ex, full_length = encode_within(messages, tokenizer, max_length, overflow, rendered=r)
        except InputError as e:
            raise _located(e, source) from None
        out.append((ex, full_length, source))
    return out


def _text_chunk(chunk: list, tokenizer, max_length: int) -> list:
    """[(chunks of the text, source)] for [(text, source)], tokenized in one batched call."""
    ids = tokenizer([t for t, _ in chunk], add_special_tokens=True)["input_ids"]
    return [(encode_text(t, tokenizer, max_length, ids=i), source) for (t, source), i in zip(chunk, ids)]


def encode_dataset(data: ChatData, tokenizer, max_length: int, overflow: str = "truncate",
                   num_proc: int = 1, require_examples: bool = True) -> tuple[list[EncodedExample], dict]:
    """Encode every conversation (or text) of a data file; return the examples and their statistics.

    Stats: examples, dropped_overflow (conversations dropped for length), truncated (cut but kept;
    for texts: texts split into several chunks), tokens, supervised_tokens, supervised_share,
    dropped_sources (the first 20 dropped conversations' file:line). `num_proc` worker processes
    encode chunks of records (data.parallel); the result does not depend on it.
    """
    from functools import partial

    from tunelab.data.parallel import map_chunks

    examples: list[EncodedExample] = []
    dropped, truncated, dropped_sources = 0, 0, []
    if data.kind == "text":
        items = list(zip(data.texts, data.sources or [None] * len(data.texts)))
        for chunks, source in map_chunks(partial(_text_chunk, tokenizer=tokenizer, max_length=max_length), items,
                                         num_proc, "encoding texts"):
            for chunk in chunks:
                chunk.source = source
            truncated += len(chunks) > 1
            examples += chunks
    else:
        require_template(tokenizer)
        if overflow not in OVERFLOW_MODES:
            raise InputError(f"overflow must be one of {list(OVERFLOW_MODES)}, got {overflow!r}", field="overflow")
        items = list(zip(data.conversations, data.sources))
        fn = partial(_conversation_chunk, tokenizer=tokenizer, max_length=max_length, overflow=overflow)
        for ex, full_length, source in map_chunks(fn, items, num_proc, "encoding conversations"):
            if ex is None:
                dropped += 1
                if len(dropped_sources) < 20:
                    dropped_sources.append(source)
                continue
            truncated += full_length > max_length
            ex.source = source
            examples.append(ex)
    tokens = sum(len(e) for e in examples)
    supervised = sum(e.supervised() for e in examples)
    stats = {
        "examples": len(examples),
        "dropped_overflow": dropped,
        "truncated": truncated,
        "tokens": tokens,
        "supervised_tokens": supervised,
        "supervised_share": supervised / tokens if tokens else 0.0,
        "dropped_sources": dropped_sources,
    }
    if not examples and require_examples:  # (a chunk of a streamed file may lose all its examples)
        raise InputError(
            f"no example left after encoding: all {dropped} were longer than max_length={max_length} "
            f"with overflow={overflow!r}; raise max_length or use overflow='truncate'",
            field="max_length",
        )
    return examples, stats


def _located(e: InputError, source: str) -> InputError:
    m = re.fullmatch(r"(.*):(\d+)", source)
    if m:
        return InputError(e.message, file=m.group(1), line=int(m.group(2)), field=e.field)
    return InputError(e.message, where=source, field=e.field)


def explain_mask(example: EncodedExample, tokenizer) -> str:
    """The example's text with supervised stretches in [[ ]], for `data check` and for eyes."""
    out, run, supervised = [], [], False
    for tok, lab in zip(example.input_ids, example.labels):
        if (lab != IGNORE_INDEX) != supervised and run:
            text = tokenizer.decode(run)
            out.append(f"[[{text}]]" if supervised else text)
            run = []
        supervised = lab != IGNORE_INDEX
        run.append(tok)
    if run:
        text = tokenizer.decode(run)
        out.append(f"[[{text}]]" if supervised else text)
    return "".join(out)


# ---------------------------------------------------------------------------------------- checks

PROBE = [
    Message("system", "You answer briefly."),
    Message("user", "What is two plus two?"),
    Message("assistant", "Four."),
    Message("user", "And three plus three?"),
    Message("assistant", "Six."),
]


def _head(messages: list[Message], turns: int = 32) -> list[Message]:
    """The first `turns` messages, ending at a trained assistant turn: what the template checks look
    at (checking every turn of a 4000-message conversation would cost O(turns^2) renders)."""
    if len(messages) <= turns:
        return messages
    last = max((i for i, m in enumerate(messages[:turns]) if m.trained()), default=None)
    if last is None:
        last = next(i for i, m in enumerate(messages) if m.trained())
    return messages[: last + 1]


def check_template(tokenizer, conversations: list[list[Message]], sample: int = 16) -> list[str]:
    """Check, before training, that the template and the masks agree with inference.

    Raises InputError when training would be wrong (no template, a double BOS, an assistant turn
    with no supervised tokens); returns warnings for what deserves a look (no special end-of-turn
    token, end-of-turn is not EOS, prompt tokens that differ between training and inference, a
    default system prompt injected by the template).
    """
    require_template(tokenizer)
    warnings: list[str] = []
    special = set(getattr(tokenizer, "all_special_ids", []) or []) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id
    end_tokens: set[int] = set()
    unmarked = mismatched = turns_seen = 0
    for messages in [*(_head(c) for c in conversations[:sample]), PROBE]:
        text, spans, turns = assistant_spans(messages, tokenizer)
        ex = encode_full(messages, tokenizer)
        if bos is not None and ex.input_ids[:2] == [bos, bos]:
            raise InputError(f"the encoded conversation starts with BOS twice ({tokenizer.bos_token!r}): fix the template",
                             field="chat_template")
        # The last supervised token of each span is the end-of-turn marker the model must learn.
        runs = _supervised_runs(ex.labels)
        if len(runs) != len(spans):
            raise InputError(f"{len(spans)} trained assistant turns but {len(runs)} supervised token runs: "
                             "the template's turns could not be located in the tokens", field="chat_template")
        for (_, last) in runs:
            tok = ex.input_ids[last]
            end_tokens.add(tok)
            unmarked += tok not in special
        # Training render == inference render, in tokens.
        for (start, _), i in zip(spans, turns):
            turns_seen += 1
            prompt_ids = tokenizer(text[:start], add_special_tokens=False)["input_ids"]
            if ex.input_ids[: len(prompt_ids)] != prompt_ids:
                mismatched += 1
    if unmarked:
        warnings.append(
            f"{unmarked} assistant turns end with an ordinary token, not a special end-of-turn token: "
            "the model may not learn where to stop"
        )
    marked = sorted(t for t in end_tokens if t in special)
    if eos is not None and marked and eos not in marked:
        names = [tokenizer.convert_ids_to_tokens(t) for t in marked]
        warnings.append(
            f"assistant turns end with {names}, but the tokenizer's EOS is {tokenizer.eos_token!r}: set the "
            "end-of-turn token as EOS (or in generation_config.eos_token_id) or generation will not stop"
        )
    if mismatched:
        warnings.append(
            f"{mismatched} of {turns_seen} assistant turns: the inference prompt (add_generation_prompt=True) "
            "tokenizes differently from the same text inside the training sequence (a token spans the "
            "prompt/response boundary), so the model trains on a prompt it will never see"
        )
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "PROBE"}], tokenize=False)
    if bos is not None and tokenizer.bos_token and rendered.startswith(tokenizer.bos_token):
        with_special = tokenizer(rendered, add_special_tokens=True)["input_ids"]
        if with_special[:2] == [bos, bos]:
            warnings.append(
                f"the template writes BOS ({tokenizer.bos_token!r}) and the tokenizer adds another by default: "
                "tunelab encodes rendered chats with add_special_tokens=False; do the same at inference"
            )
    injected = _injected_system_prompt(tokenizer, rendered)
    # only conversations without their own system message get the template's default one
    bare = sum(1 for conv in conversations if not conv or conv[0].role != "system")
    if injected and bare:
        warnings.append(
            f"{bare} of {len(conversations)} conversations have no system message, so the template injects its "
            f"default system prompt ({injected!r}): it is trained as context (not supervised) and costs tokens; "
            "pass your own system message to replace it"
        )
    return warnings


def _supervised_runs(labels: list[int]) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, x in enumerate([*labels, IGNORE_INDEX]):
        if x != IGNORE_INDEX and start is None:
            start = i
        elif x == IGNORE_INDEX and start is not None:
            runs.append((start, i - 1))
            start = None
    return runs


def _injected_system_prompt(tokenizer, rendered: str) -> str | None:
    """Words the template writes before a lone user message beyond role names and markup."""
    before = rendered[: rendered.find("PROBE")] if "PROBE" in rendered else ""
    for tok in sorted(getattr(tokenizer, "all_special_tokens", []) or [], key=len, reverse=True):
        before = before.replace(tok, " ")
    for added in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values():
        before = before.replace(str(added), " ")
    words = [w for w in re.findall(r"[A-Za-z]+", before) if w.lower() not in {"system", "user", "human", "inst", "sys"}]
    return " ".join(words) if len(words) >= 3 else None
