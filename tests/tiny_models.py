"""The tiny models every test builds at test time (well under a second each), in one place.

tiny_bert_folder: a 2-layer BERT classifier (hidden 32) with a WordPiece tokenizer trained here.
tiny_llama_folder: a 2-layer Llama (hidden 32) with a byte-level BPE tokenizer and a ChatML template.
tiny_chat_tokenizer_build + tiny_llama_build: a SmolLM2-like ChatML tokenizer and a random tiny Llama,
in memory. conftest.py turns them into fixtures; test files import them from here, not from each other.
"""

from __future__ import annotations

from pathlib import Path

import torch

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



CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SENTENCES = [
    "what colour is the sky", "the sky is blue", "name a fruit", "an apple is a fruit",
    "how many legs has a cat", "a cat has four legs", "say hello", "hello there friend",
    "what is two plus two", "two plus two is four", "where do fish live", "fish live in water",
]


def tiny_llama_folder(path: Path) -> Path:
    """A 2-layer Llama (hidden 32) with a byte-level BPE tokenizer trained here and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(SENTENCES * 5 + ["user assistant system\n"] * 5, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.chat_template = CHATML
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tk.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def conversations(n: int) -> list[dict]:
    pairs = list(zip(SENTENCES[::2], SENTENCES[1::2]))
    rows = []
    for i in range(n):
        q, a = pairs[i % len(pairs)]
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if i % 3 == 0:
            q2, a2 = pairs[(i + 1) % len(pairs)]
            msgs += [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
        rows.append({"messages": msgs})
    return rows


def preference_pairs(n: int) -> list[dict]:
    """n {prompt, chosen, rejected} string pairs over the tiny tokenizer's sentences: the chosen answer
    a sentence, the rejected one another (never the same), of varied lengths."""
    k = len(SENTENCES)
    return [{"prompt": SENTENCES[i % k], "chosen": SENTENCES[(i + 1) % k],
             "rejected": " ".join(SENTENCES[(i + 2 + j) % k] for j in range(1 + i % 2))} for i in range(n)]


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
