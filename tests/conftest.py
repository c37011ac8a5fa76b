"""Shared fixtures: tiny models built at test time (well under a second), paths to shared data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"

WORDS = (
    "the a movie film was great fun terrible boring awful lovely good bad not very really i loved hated it "
    "plot acting music story ending actors and but so too this that".split()
)


def tiny_bert_folder(path: Path, num_labels: int = 2) -> Path:
    """A 2-layer BERT (hidden 32) with a WordPiece tokenizer trained here; saved as an HF folder."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=120, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tk.train_from_iterator([" ".join(WORDS)] * 3, trainer)
    cls, sep = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tk.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=num_labels)
    model = BertForSequenceClassification(cfg)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return tiny_bert_folder(tmp_path_factory.mktemp("tiny_bert"))


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    """Learnable toy rows: positive words -> 'pos', negative words -> 'neg'."""
    import random

    rng = random.Random(seed)
    pos, neg = ["great", "fun", "lovely", "good", "loved"], ["terrible", "boring", "awful", "bad", "hated"]
    filler = ["the", "movie", "film", "was", "really", "very", "plot", "acting", "music", "story"]
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.sample(filler, 3) + [rng.choice(pos if label == "pos" else neg)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def toy_classification(tmp_path, tiny_bert) -> dict:
    """A config dict (tiny BERT, 64 train / 16 eval rows) and the folder it lives in."""
    write_jsonl(tmp_path / "train.jsonl", sentiment_rows(64, seed=1))
    write_jsonl(tmp_path / "eval.jsonl", sentiment_rows(16, seed=2))
    cfg = {
        "task": "classification",
        "model": {"name": str(tiny_bert), "max_length": 32},
        "data": {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl")},
        # the tiny model needs a sustained lr to leave its initial plateau (cosine at this budget does not)
        # head multiplier pinned: calibrated at 1, and the default (20) would give the head lr 0.06
        "optim": {"lr": 3e-3, "head_lr_multiplier": 1.0},
        "schedule": {"name": "constant", "warmup_ratio": 0.1},
        "train": {"epochs": 2, "batch_size": 8, "log_every": 2, "seed": 3},
        "early_stopping": {"enabled": False},
    }
    return {"dir": tmp_path, "config": cfg}


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on one torch thread: on a shared 2-core machine a second thread only adds contention
    (measured 6x slower for the tiny Llama). Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def needs_shared():
    return pytest.mark.skipif(not SHARED_DATASETS.is_dir(), reason="../shared/datasets is not present")


# --- chat SFT fixtures: a ChatML tokenizer trained here and a tiny Llama -----------------------

CHATML_TEMPLATE_NO_MARKERS = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_CORPUS = [
    "system user assistant You are a helpful assistant.",
    "What is two plus two? Four. And three plus three? Six.",
    "Write a short poem about the sea. The sea is blue and wide, it sings at every tide.",
    "Translate hello to French. Bonjour. Thank you! You are welcome.",
    "Name a color. Red. Name a fruit. Apple. Tell me a story about a cat and a dog.",
]


def tiny_chat_tokenizer_build():
    """A byte-level BPE (like SmolLM2's) with the ChatML special tokens at ids 0-2, no generation markers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=CHAT_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(CHAT_CORPUS * 3, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHATML_TEMPLATE_NO_MARKERS
    return tok


@pytest.fixture(scope="session")
def tiny_chat_tokenizer():
    return tiny_chat_tokenizer_build()


def tiny_llama_build(vocab_size: int, seed: int = 0, attn_implementation: str = "sdpa"):
    """LlamaForCausalLM, hidden 32, 2 layers, 4 heads, intermediate 64, random weights, eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=64, max_position_embeddings=256,
                      bos_token_id=None, eos_token_id=2, pad_token_id=0)
    cfg._attn_implementation = attn_implementation
    return LlamaForCausalLM(cfg).eval()


def stop_after(n_steps: int):
    """A `should_stop` for run_training that asks to stop at the n-th optimizer step."""
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return calls["n"] >= n_steps

    return should_stop
