"""Forgetting probe: how much fine-tuning changed what the model does on reference text.

Two measures, computed on the same texts before and after fine-tuning:
- embedding drift (any model): the backbone's mean-pooled last hidden state per text; we report
  the mean cosine similarity between the pre-trained and fine-tuned embeddings (1.0 = unchanged).
  For a sentence encoder like MiniLM this is exactly the capability fine-tuning can destroy.
- language-model loss (causal LMs only): mean next-token loss on the texts, and its relative
  change; a large increase means the model forgot general language.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tunelab.data.readers import read_records
from tunelab.errors import InputError
from tunelab.evaluate.generation import compare_generations
from tunelab.evaluate.lm import head_loss_in_chunks


def read_probe_texts(path: str | Path, text_column: str, max_rows: int) -> list[str]:
    path = Path(path)
    if path.suffix == ".txt":
        if not path.is_file():
            raise InputError("probe data file not found", file=path, field="probe.data")
        texts = [t.strip() for t in path.read_text(encoding="utf-8").split("\n\n") if t.strip()]
    else:
        records = read_records(path)
        if any(k in records[0].fields for k in ("messages", "conversations", "instruction", "prompt")):
            from tunelab.data.chat import read_chat_data  # conversations: each one's text, turns joined

            texts = ["\n".join(m.content for m in conv) for conv in read_chat_data(path).conversations]
            return texts[:max_rows]
        column = text_column if text_column in records[0].fields else next(
            (c for c in ("text", "sentence", "content", "output") if c in records[0].fields), None)
        if column is None:
            raise InputError(f"no text column ({text_column}) in the probe data", file=path, field="probe.data")
        texts = [str(r.fields[column]) for r in records if str(r.fields.get(column) or "").strip()]
    if not texts:
        raise InputError("the probe data holds no text", file=path, field="probe.data")
    return texts[:max_rows]


def _backbone(model):
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    return getattr(model, "base_model", model)


def _is_causal_lm(model) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return hasattr(inner, "lm_head") or type(inner).__name__.endswith("ForCausalLM")


def probe_generation_for(probe, generate, task: str, tokenizer):
    """The probe's generative view (chat, causal_lm): the first probe.generate_n prompts of the probe
    data, answered with the eval.generate settings; None for classification or generate_n 0.
    `probe`, `generate`: the config's probe and eval.generate sections."""
    if task == "classification" or not probe.generate_n:
        return None
    from tunelab.evaluate.generation import GenerationEval, read_prompts

    settings = generate.model_copy(update={"n": probe.generate_n})
    return GenerationEval(tokenizer, read_prompts(probe.data, settings.n, "probe.data"), settings)


@torch.no_grad()
def probe_measures(model, tokenizer, texts: list[str], max_length: int = 128, batch_size: int = 16,
                   generation=None) -> dict:
    """Normalised embeddings per text (tensor), for causal LMs the mean token loss, and with
    `generation` (probe_generation_for) the replies to the probe's prompts and their measures."""
    was_training = model.training
    model.eval()
    embeddings, loss_sum, loss_tokens = [], 0.0, 0
    device = next(model.parameters()).device
    try:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start : start + batch_size], truncation=True, max_length=max_length,
                            padding=True, return_tensors="pt").to(device)
            last = _backbone(model)(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            hidden = last.float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            embeddings.append(torch.nn.functional.normalize(emb, dim=-1).cpu())
            if _is_causal_lm(model):  # the head on the backbone's states, a few positions at a time (lm.py)
                targets = enc["input_ids"][:, 1:]
                keep = enc["attention_mask"][:, 1:] != 0
                batch_loss, _ = head_loss_in_chunks(model.get_output_embeddings(), last[:, :-1][keep], targets[keep])
                loss_sum += batch_loss
                loss_tokens += int(keep.sum())
    finally:
        model.train(was_training)
    out = {"embeddings": torch.cat(embeddings), "lm_loss": loss_sum / loss_tokens if loss_tokens else None}
    if generation is not None:
        out["generation"] = generation(model, "final" if generation.history else "before")
    return out


def compare(before: dict, after: dict, warn_loss_increase: float, min_cosine: float = 0.9) -> dict:
    """The probe's verdict for summary.json."""
    cos = (before["embeddings"] * after["embeddings"]).sum(-1)
    result = {"rows": int(cos.numel()), "embedding_cosine_mean": float(cos.mean()),
              "embedding_cosine_min": float(cos.min())}
    flags = []
    if result["embedding_cosine_mean"] < min_cosine:
        flags.append(f"embeddings moved far from the pre-trained ones (mean cosine {result['embedding_cosine_mean']:.3f})")
    if before["lm_loss"] is not None and after["lm_loss"] is not None:
        change = (after["lm_loss"] - before["lm_loss"]) / before["lm_loss"]
        result.update({"lm_loss_before": before["lm_loss"], "lm_loss_after": after["lm_loss"], "lm_loss_change": change})
        if change > warn_loss_increase:
            flags.append(f"LM loss on the probe data rose {100 * change:.0f}% (forgetting)")
    if before.get("generation") and after.get("generation"):
        result["generation"] = compare_generations(before["generation"], after["generation"])
        flags += generation_flags(result["generation"]["greedy"])
    result["forgetting_flag"] = bool(flags)
    result["message"] = "; ".join(flags) or "no sign of forgetting on the probe data"
    return result


def generation_flags(greedy: dict, drop: float = 0.25) -> list[str]:
    """Forgetting in words: general prompts that stopped being answered properly (greedy replies)."""
    flags = []
    stop, loops = greedy.get("stop_rate", {}), greedy.get("loop_rate", {})
    if stop.get("before") is not None and stop.get("after") is not None and stop["after"] < stop["before"] - drop:
        flags.append(f"replies to the probe's general prompts stop less often ({stop['before']:.0%} -> {stop['after']:.0%})")
    if loops.get("before") is not None and loops.get("after") is not None and loops["after"] > loops["before"] + drop:
        flags.append(f"replies to the probe's general prompts loop more often ({loops['before']:.0%} -> {loops['after']:.0%})")
    return flags
