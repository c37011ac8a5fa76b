"""Generate a reply with exactly the model's saved chat template, stopping at the end of the turn.

The prompt is rendered by the tokenizer's own template with `add_generation_prompt=True` and
tokenized without adding special tokens again (the template already wrote them), so generation
sees the same token layout as training did. Generation stops at the end-of-turn token
(`<|im_end|>` for ChatML) as well as at the eos of the generation config.
"""

from __future__ import annotations

import torch

from tunelab.models.gguf import end_of_turn_id


def stop_token_ids(model, tokenizer) -> list[int]:
    ids = []
    eos = model.generation_config.eos_token_id
    for t in (eos if isinstance(eos, list) else [eos]) + [end_of_turn_id(tokenizer), tokenizer.eos_token_id]:
        if t is not None and t not in ids:
            ids.append(int(t))
    return ids


def render_prompt(tokenizer, messages: list[dict]) -> tuple[str, list[int]]:
    """(text, token ids) of the conversation so far plus the assistant header."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return text, tokenizer(text, add_special_tokens=False)["input_ids"]
    text = "\n".join(m["content"] for m in messages)  # a plain LM: continue the text
    return text, tokenizer(text)["input_ids"]


@torch.no_grad()
def generate_reply(model, tokenizer, messages: list[dict], *, max_new_tokens: int = 256,
                   temperature: float = 0.0, seed: int = 0) -> dict:
    """The assistant's next turn: reply text, token counts and why generation stopped."""
    model.eval()
    text, ids = render_prompt(tokenizer, messages)
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    input_ids = torch.tensor([ids], dtype=torch.long, device=model.device)
    sample = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    torch.manual_seed(seed)
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                         eos_token_id=stops, pad_token_id=pad, **sample)
    new = out[0, len(ids):].tolist()
    stopped = "end_of_turn" if new and new[-1] in stops else "max_new_tokens"
    return {"reply": tokenizer.decode(new, skip_special_tokens=True).strip(), "stopped": stopped,
            "prompt_tokens": len(ids), "new_tokens": len(new), "prompt_text": text}
