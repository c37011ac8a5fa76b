"""Causal-LM forward on supervised tokens only, and the eval metrics built on it.

The vocabulary projection is the costliest part of a small LM's forward (49k x 576 per token for
SmolLM2) and most chat tokens are not supervised (system and user turns). So we run the base
model to hidden states, shift, keep only the positions whose next-token label is supervised, and
apply `lm_head` there alone. The sum of cross-entropies equals a plain transformers forward with
labels times the number of supervised tokens (tests/test_causal_lm.py checks it).
"""

from __future__ import annotations

import math

import torch

from tunelab.data.chat_template import IGNORE_INDEX
from tunelab.device import model_device, to_device


def supervised_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) at the supervised positions of `batch`, logits in fp32.

    `batch` holds input_ids, labels (IGNORE_INDEX where unsupervised) and attention_mask: 2-D (padding)
    or 4-D (packing: block-diagonal causal, so packed examples never see each other), plus
    position_ids when packed (positions restart at 0 for each example).
    """
    hidden, targets = supervised_hidden(model, batch)
    return model.get_output_embeddings()(hidden).float(), targets


def supervised_hidden(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states, targets) at the supervised positions of `batch`: what the vocabulary projection
    reads (train.chunked_loss projects them in chunks)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    body = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model wraps the LM
    hidden = body.base_model(**inputs, use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    return hidden[:, :-1][keep], targets[keep]


def supervised_loss(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over supervised tokens, and their number."""
    logits, targets = supervised_logits(model, batch)
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum"), int(targets.numel())


@torch.no_grad()
def lm_metrics(model, batches) -> dict:
    """Eval loss (mean per supervised token), perplexity and next-token accuracy on supervised tokens
    (at the caller's precision: the run wraps its whole evaluation in the training autocast)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    device = model_device(model)
    try:
        for batch in batches:
            batch = to_device(batch, device)
            logits, targets = supervised_logits(model, batch)
            loss_sum += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            correct += int((logits.argmax(-1) == targets).sum())
            n += int(targets.numel())
    finally:
        model.train(was_training)
    loss = loss_sum / n if n else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)) if n else float("nan"),
            "token_accuracy": correct / n if n else float("nan"), "supervised_tokens": n}
