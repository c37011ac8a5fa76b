"""`tunelab eval` / `generate` on any saved model: what kind it is, whether the data fits it, and the
causal-LM / chat evaluation (loss, perplexity and token accuracy on the training masks, plus the
generation measures on the file's prompts).

A model/task mismatch is an input error that says what fits: a classifier cannot generate, a
chat or causal-LM model cannot be scored on a labelled classification file, a classifier cannot
be scored on conversations.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.config import GenerateEvalConfig
from tunelab.errors import InputError

CHAT_KEYS = ("messages", "conversations", "instruction", "prompt")


def resolve_model_dir(path: str | Path) -> Path:
    """A model folder, or a run dir's final/."""
    path = Path(path)
    if path.is_dir() and not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file() \
            and (path / "final").is_dir():
        return path / "final"
    return path


def model_kind(path: Path) -> str:
    """'causal_lm' or 'classifier', from the folder's adapter_config.json task_type or config.json architectures."""
    if not path.exists():
        raise InputError("model folder not found", file=path)
    if not path.is_dir():
        raise InputError("expected a model folder or a run dir, found a file", file=path)
    for name, key in (("adapter_config.json", "task_type"), ("config.json", "architectures")):
        f = path / name
        if f.is_file():
            try:
                value = json.loads(f.read_text(encoding="utf-8")).get(key)
            except ValueError as e:
                raise InputError(f"not valid JSON ({e})", file=f) from None
            text = " ".join(value) if isinstance(value, list) else str(value or "")
            if "SEQ_CLS" in text or "ForSequenceClassification" in text:
                return "classifier"
            if "CAUSAL_LM" in text or "ForCausalLM" in text or "LMHeadModel" in text:
                return "causal_lm"
            raise InputError(f"cannot tell what kind of model this is ({key}: {text or 'missing'}); tunelab evaluates "
                             "sequence classifiers and causal LMs", file=f, field=key)
    raise InputError("not a model folder (no config.json or adapter_config.json) nor a run dir with final/", file=path)


def data_kind(data: str | Path, label_column: str = "label") -> str:
    """'classification' for a labelled file (a label column, no chat keys), else 'lm' (chat or plain text)."""
    from tunelab.data.readers import read_records

    data = Path(data)
    if data.suffix.lower() == ".txt":
        return "lm"
    first = read_records(data)[0].fields
    if label_column in first and not any(k in first for k in CHAT_KEYS):
        return "classification"
    return "lm"


def check_fits(model_dir: Path, kind: str, data: str | Path, label_column: str = "label") -> None:
    """Raise the input error that says what fits when the model and the data are of different tasks."""
    dkind = data_kind(data, label_column)
    if kind == "causal_lm" and dkind == "classification":
        raise InputError(f"is a labelled classification file (a '{label_column}' column) but {model_dir} is a "
                         "causal-LM/chat model: evaluate it on conversations or plain text, or evaluate a "
                         "classifier (a classification run's final/) on this file", file=data, field=label_column)
    if kind == "classifier" and dkind == "lm":
        raise InputError(f"holds conversations or plain text but {model_dir} is a sequence classifier: give a "
                         f"labelled file (text and '{label_column}' columns), or evaluate a chat/causal-LM model "
                         "on this file", file=data)


def require_causal_lm(model_dir: Path, verb: str) -> None:
    if model_kind(model_dir) == "classifier":
        raise InputError(f"is a sequence classifier; `tunelab {verb}` needs a causal-LM or chat model (a chat or "
                         "causal_lm run's final/); use `tunelab eval --data FILE` for a classifier", file=model_dir)


def _batches(examples: list, pad_id: int, batch_size: int):
    from tunelab.data.packing import collate_padded

    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    for start in range(0, len(order), batch_size):
        yield collate_padded(examples, order[start : start + batch_size], pad_id)


def evaluate_saved_lm(model_dir: str | Path, data: str | Path, *, max_length: int = 512, batch_size: int = 8,
                      settings: GenerateEvalConfig | None = None) -> dict:
    """Loss, perplexity and token accuracy on the supervised tokens of `data` (the masks training
    uses: assistant turns of conversations, every token of plain text), and the generation measures
    (greedy and sampled) on its first `settings.n` prompts."""
    from tunelab.data.chat import read_chat_data
    from tunelab.data.chat_template import encode_dataset
    from tunelab.evaluate.generation import GenerationEval, prompts_from_chat_data, settings_dict
    from tunelab.evaluate.lm import lm_metrics
    from tunelab.models.gguf import end_of_turn_id
    from tunelab.models.saved import load_saved_causal_lm

    model_dir = Path(model_dir)
    chat = read_chat_data(data)
    model, tok = load_saved_causal_lm(model_dir)
    max_length = min(max_length, getattr(model.config, "max_position_embeddings", max_length))
    if chat.kind == "conversations" and not tok.chat_template:
        raise InputError("holds conversations but the model's tokenizer has no chat template; evaluate it on plain "
                         "text, or use a chat model", file=data)
    examples, stats = encode_dataset(chat, tok, max_length)
    eot = end_of_turn_id(tok) if chat.kind == "conversations" else None
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (eot if eot is not None else tok.eos_token_id or 0)
    out = {"model": str(model_dir), "data": str(data), "kind": chat.kind, "rows": len(chat),
           **lm_metrics(model, _batches(examples, pad_id, batch_size)),
           "dropped_overflow": stats["dropped_overflow"], "truncated": stats["truncated"]}
    settings = settings or GenerateEvalConfig()
    if settings.n:
        gen = GenerationEval(tok, prompts_from_chat_data(chat, settings.n), settings)
        result = gen(model, "eval")
        out["generation"] = {"settings": settings_dict(settings), "greedy": result["greedy"], "sampled": result["sampled"],
                             "samples": [{"prompt": p.shown(), "reference": p.reference, "greedy": g, "sampled": s}
                                         for p, g, s in zip(gen.prompts, result["replies"]["greedy"],
                                                            result["replies"]["sampled"])]}
    return out


def _f(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v))


def lm_eval_lines(out: dict) -> list[str]:
    """The text form of `evaluate_saved_lm`'s result: the loss line, a measures table, three samples."""
    lines = [f"{out['kind']} rows {out['rows']}  supervised tokens {out['supervised_tokens']}  loss {_f(out['loss'])}  "
             f"perplexity {_f(out['perplexity'])}  token accuracy {_f(out['token_accuracy'])}"]
    gen = out.get("generation")
    if not gen:
        return lines
    g, s = gen["greedy"], gen["sampled"]
    lines.append(f"generation on {g['n']} prompts, max {gen['settings']['max_new_tokens']} new tokens "
                 f"(greedy | sampled at T={gen['settings']['temperature']}, seed {gen['settings']['seed']}):")
    for key in ("stop_rate", "length_mean", "length_median", "reference_length_mean", "distinct_1", "distinct_2",
                "cross_similarity", "repeated_4gram_share", "loop_rate", "leakage_rate", "chrf", "rouge_l"):
        if key in g or key in s:
            lines.append(f"  {key:<22} {_f(g.get(key)):>10} | {_f(s.get(key))}")
    for sample in gen["samples"][:3]:
        lines.append(f"  prompt: {sample['prompt'][:100]!r}")
        lines.append(f"    greedy:  {sample['greedy'][:160]!r}")
    return lines
