"""Generate replies for N prompts, greedy and sampled (seeded), and measure them (generation_metrics).

Used three ways: during training (`eval.generate`: the untouched model first, then at each
evaluation or at the end), by `tunelab eval` on a causal-LM or chat model, and by the forgetting
probe's generative view (the same general prompts before and after). Prompts come from a data
file: a conversation's turns before its last assistant turn (that turn is the reference answer),
a plain text's first half (its second half is the reference continuation), or a prompts-only file.

Replies are generated in left-padded batches with exactly the template `generate` uses
(evaluate/generate.py), stop at the end-of-turn token, and are cut at the first stop token. The
global RNG is left as it was (`torch.random.fork_rng`), so generating in the middle of training
changes nothing about the training itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.config import GenerateEvalConfig
from tunelab.errors import InputError
from tunelab.evaluate.generate import render_prompt, stop_token_ids
from tunelab.evaluate.generation_metrics import ROW_KEYS, generation_metrics, reference_scores


# Below this many parameters a decoding step is too small to split across threads: a hidden-32 Llama,
# 8 prompts x 32 new tokens, on 2 busy cores took 13.8 s with torch's 2 threads and 0.86 s with 1
# (each tiny op waited for the second thread to be scheduled).
TINY_PARAMS = 20_000_000


@dataclass
class Prompt:
    """One prompt: a conversation so far (`messages`) or a text to continue (`text`), and its reference."""

    messages: list[dict] | None = None
    text: str | None = None
    reference: str | None = None
    source: str = ""

    def shown(self) -> str:
        """The prompt as a person reads it (the last user turn, or the text)."""
        if self.messages:
            return self.messages[-1]["content"]
        return self.text or ""


def prompts_from_chat_data(data, n: int) -> list[Prompt]:
    """The first `n` prompts of a tunelab.data.chat.ChatData (conversations or plain texts)."""
    out = []
    if data.kind == "conversations":
        for conv, source in zip(data.conversations, data.sources):
            last = max(i for i, m in enumerate(conv) if m.role == "assistant")
            messages = [{"role": m.role, "content": m.content} for m in conv[:last]]
            out.append(Prompt(messages=messages, reference=conv[last].content, source=source))
            if len(out) >= n:
                break
    else:
        for text, source in zip(data.texts, data.sources):
            parts = text.split()
            if len(parts) < 2:
                continue
            half = len(parts) // 2
            out.append(Prompt(text=" ".join(parts[:half]), reference=" ".join(parts[half:]), source=source))
            if len(out) >= n:
                break
    return out


def read_prompts(path: str | Path, n: int, field_name: str = "eval.generate.prompts") -> list[Prompt]:
    """Prompts from a file: records with a `prompt` string (optional `reference`), or any chat/text
    data file tunelab trains on (prompt = the turns before the last assistant turn)."""
    from tunelab.data.chat import read_chat_data
    from tunelab.data.readers import read_records

    path = Path(path)
    if not path.is_file():
        raise InputError("prompts file not found", file=path, field=field_name)
    if path.suffix.lower() != ".txt":
        records = read_records(path)
        if "prompt" in records[0].fields and "completion" not in records[0].fields:
            out = []
            for rec in records[:n]:
                prompt, ref = rec.fields.get("prompt"), rec.fields.get("reference")
                if not isinstance(prompt, str) or not prompt.strip():
                    raise InputError("expected a non-empty string", file=path, field="prompt", **rec.where())
                out.append(Prompt(messages=[{"role": "user", "content": prompt}],
                                  reference=ref if isinstance(ref, str) and ref.strip() else None,
                                  source=f"{path}:{rec.line}"))
            return out
    prompts = prompts_from_chat_data(read_chat_data(path), n)
    if not prompts:
        raise InputError("no prompt in this file", file=path, field=field_name)
    return prompts


def template_markers(tokenizer) -> list[str]:
    """Strings that must never appear inside a reply: the tokenizer's special tokens (the reply's own
    final stop token is cut before looking) and the role headers the chat template writes."""
    markers = {t for t in getattr(tokenizer, "all_special_tokens", []) if t}
    markers |= {str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)}
    if getattr(tokenizer, "chat_template", None):
        try:
            user = [{"role": "user", "content": "\x00"}]
            with_prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
            bare = tokenizer.apply_chat_template(user, add_generation_prompt=False, tokenize=False)
            before, _, after = with_prompt.partition("\x00")
            header = with_prompt[len(bare):] if with_prompt.startswith(bare) else ""
            for piece in (before.rstrip().splitlines()[-1:] if before.strip() else []) + [header]:
                if len(piece.strip()) >= 3:
                    markers.add(piece.strip())
        except Exception:  # a template that refuses a one-turn conversation has no headers to learn here
            pass
    return sorted(markers)


def _prompt_ids(tokenizer, prompt: Prompt) -> list[int]:
    if prompt.messages is not None:
        return render_prompt(tokenizer, prompt.messages)[1]
    return tokenizer(prompt.text)["input_ids"]


@torch.no_grad()
def generate_replies(model, tokenizer, prompts: list[Prompt], *, max_new_tokens: int, temperature: float = 0.0,
                     seed: int = 0, batch_size: int = 8) -> list[dict]:
    """One reply per prompt: {reply, raw, tokens, stopped}. temperature 0 = greedy; else pure
    temperature sampling (top_k and top_p off), seeded per batch."""
    from transformers import GenerationConfig

    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    sample = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad, **sample)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    threads = torch.get_num_threads()
    if device.type == "cpu" and sum(p.numel() for p in model.parameters()) < TINY_PARAMS:
        torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for start in range(0, len(prompts), batch_size):
                ids = [_prompt_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
                width = max(len(x) for x in ids)
                input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
                mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
                torch.manual_seed(seed + start)
                gen = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=gen_cfg)
                out += [_cut(row[width:].tolist(), stops, tokenizer) for row in gen]
    finally:
        torch.set_num_threads(threads)
        model.train(was_training)
    return out


def _cut(new: list[int], stops: list[int], tokenizer) -> dict:
    end = next((i for i, t in enumerate(new) if t in stops), None)
    reply = new if end is None else new[:end]
    return {"reply": tokenizer.decode(reply, skip_special_tokens=True).strip(), "ids": reply,
            "raw": tokenizer.decode(reply, skip_special_tokens=False), "tokens": len(reply), "stopped": end is not None}


class GenerationEval:
    """The generation evaluation of one run (or one `tunelab eval`): fixed prompts, settings and
    markers; each call generates greedy and sampled replies with the model as it is now and keeps
    the result in `history`, so the summary and report show before vs after."""

    def __init__(self, tokenizer, prompts: list[Prompt], settings: GenerateEvalConfig):
        """`settings`: the config's eval.generate section (n, max_new_tokens, temperature, seed, batch_size)."""
        self.tokenizer = tokenizer
        self.prompts = prompts[: settings.n]
        self.settings = settings
        self.markers = template_markers(tokenizer) if any(p.messages is not None for p in self.prompts) else []
        self.references = [p.reference for p in self.prompts]
        self.reference_tokens = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) if r else None
                                 for r in self.references]
        self.history: list[dict] = []

    def __call__(self, model, label: str, step: int | None = None) -> dict:
        s = self.settings
        result = {"label": label, "step": step}
        for mode, temperature in (("greedy", 0.0), ("sampled", s.temperature)):
            replies = generate_replies(model, self.tokenizer, self.prompts, max_new_tokens=s.max_new_tokens,
                                       temperature=temperature, seed=s.seed, batch_size=s.batch_size)
            metrics = generation_metrics(replies, self.references, self.markers, self.reference_tokens)
            metrics["max_new_tokens"] = s.max_new_tokens
            result[mode] = metrics
            result.setdefault("replies", {})[mode] = [r["reply"] for r in replies]
            result.setdefault("stopped", {})[mode] = [r["stopped"] for r in replies]
        self.history.append(result)
        return result

    def flat(self, result: dict) -> dict:
        """The row measures: gen_<m> (greedy) and gen_sampled_<m>, for metrics.jsonl and health;
        gen_chat 1 when the prompts are conversations (stopping and leakage mean something)."""
        row = {}
        for mode, prefix in (("greedy", "gen_"), ("sampled", "gen_sampled_")):
            row.update({prefix + k: result[mode][k] for k in ROW_KEYS if isinstance(result[mode].get(k), (int, float))})
        if result["greedy"].get("reference_length_median") is not None:
            row["gen_reference_length_median"] = result["greedy"]["reference_length_median"]
        row["gen_max_new_tokens"] = result["greedy"]["max_new_tokens"]
        row["gen_chat"] = int(any(p.messages is not None for p in self.prompts))
        return row

    def record(self) -> dict:
        """generations.json: settings, prompts, references and every evaluation (replies included)."""
        return {"settings": settings_dict(self.settings), "markers": self.markers,
                "prompts": [{"prompt": p.shown(), "messages": p.messages, "text": p.text, "source": p.source}
                            for p in self.prompts],
                "references": self.references, "evaluations": self.history}


def settings_dict(settings: GenerateEvalConfig) -> dict:
    """The settings as written into summary.json and generations.json (the prompts file is named elsewhere)."""
    return settings.model_dump(exclude={"prompts"})


def compare_generations(before: dict, after: dict) -> dict:
    """Before vs after for the same prompts: each measure's two values, and how far the replies moved
    (chrF of the new replies against the old ones: 100 = unchanged)."""
    out = {}
    for mode in ("greedy", "sampled"):
        b, a = before[mode], after[mode]
        out[mode] = {k: {"before": b.get(k), "after": a.get(k)} for k in ROW_KEYS if k in b or k in a}
        if before["replies"][mode]:
            out[mode]["chrf_vs_before"] = reference_scores(after["replies"][mode], before["replies"][mode])["chrf"]
    return out
