"""The fast first pass (data.parallel): chunked, batched and multi-process encoding gives exactly
what encoding record by record gives, and a bad record met in a worker still names file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import write_jsonl
from tiny_models import SENTENCES, conversations, tiny_llama_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_folder(tmp_path_factory.mktemp("tiny_llama")))


@pytest.mark.unit
@pytest.mark.parametrize("num_proc", [1, 2])
def test_chunked_batched_encoding_equals_record_by_record(tmp_path, tokenizer, num_proc):
    from tunelab.data.chat import read_chat_data
    from tunelab.data.chat_template import encode_dataset, encode_text, encode_within
    from tunelab.data.parallel import CHUNK

    data = read_chat_data(write_jsonl(tmp_path / "c.jsonl", conversations(2 * CHUNK + 37)))
    got, stats = encode_dataset(data, tokenizer, 40, "truncate", num_proc=num_proc)
    want = [encode_within(m, tokenizer, 40, "truncate") for m in data.conversations]  # the unbatched reference
    assert [(e.input_ids, e.labels, e.source) for e in got] == [(e.input_ids, e.labels, s) for (e, _), s in
                                                               zip(want, data.sources) if e is not None]
    assert stats["truncated"] == sum(n > 40 for _, n in want) > 0

    dropped, _ = encode_dataset(data, tokenizer, 40, "drop", num_proc=num_proc)
    assert [e.input_ids for e in dropped] == [e.input_ids for e, n in want if n <= 40]

    texts = read_chat_data(write_jsonl(tmp_path / "t.jsonl", [{"text": " ".join(SENTENCES[i % 12:] * 3)}
                                                             for i in range(CHUNK + 5)]))
    got, _ = encode_dataset(texts, tokenizer, 16, num_proc=num_proc)
    want = [c for t in texts.texts for c in encode_text(t, tokenizer, 16)]
    assert [(e.input_ids, e.labels) for e in got] == [(e.input_ids, e.labels) for e in want] and len(want) > len(texts)


@pytest.mark.unit
def test_a_bad_record_in_a_worker_names_its_file_and_line(tmp_path, tokenizer):
    from tunelab.data.chat import read_chat_data
    from tunelab.data.chat_template import encode_dataset
    from tunelab.data.parallel import CHUNK
    from tunelab.errors import InputError

    rows = conversations(2 * CHUNK)
    rows[CHUNK + 10]["messages"][0]["content"] = "say FORBIDDEN"  # in the second chunk: a worker meets it
    data = read_chat_data(write_jsonl(tmp_path / "c.jsonl", rows))
    tok = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    loop = "{% for message in messages %}"
    tok.chat_template = tokenizer.chat_template.replace(loop, loop + "{% if 'FORBIDDEN' in message['content'] %}"
                                                        "{{ raise_exception('no forbidden words') }}{% endif %}")
    with pytest.raises(InputError) as err:
        encode_dataset(data, tok, 64, num_proc=2)
    assert err.value.file == str(tmp_path / "c.jsonl") and err.value.line == CHUNK + 11
    assert "no forbidden words" in err.value.message


@pytest.mark.unit
def test_progress_bar_counts_every_record_on_a_terminal(monkeypatch):
    import sys

    from tunelab.data.parallel import CHUNK, map_chunks

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    seen = []
    out = map_chunks(lambda chunk: (seen.append(len(chunk)), chunk)[1], list(range(3 * CHUNK + 1)), 1, "test")
    assert out == list(range(3 * CHUNK + 1)) and seen == [CHUNK, CHUNK, CHUNK, 1]
