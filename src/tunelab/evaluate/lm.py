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


EVAL_CHUNK = 256  # supervised positions projected at a time in lm_metrics


@torch.no_grad()
def head_loss_in_chunks(head, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = EVAL_CHUNK) -> tuple[float, int]:
    """(summed cross-entropy, correct argmax count) of `head(hidden)` against `targets` (positions x
    hidden, no IGNORE_INDEX inside), `chunk` positions at a time: never the whole (positions, vocab)
    logits at once, in bf16 and again in fp32."""
    loss_sum, correct = 0.0, 0
    for start in range(0, int(targets.numel()), chunk):
        logits = head(hidden[start : start + chunk]).float()
        part = targets[start : start + chunk]
        loss_sum += torch.nn.functional.cross_entropy(logits, part, reduction="sum").item()
        correct += int((logits.argmax(-1) == part).sum())
        del logits
    return loss_sum, correct


@torch.no_grad()
def lm_metrics(model, batches, chunk: int = EVAL_CHUNK) -> dict:
    """Eval loss (mean per supervised token), perplexity and next-token accuracy on supervised tokens
    (at the caller's precision: the run wraps its whole evaluation in the training autocast).

    The vocabulary projection, cross-entropy and argmax run `chunk` supervised positions at a time:
    a 4 x 512 packed batch has ~1,900 of them, whose logits over SmolLM2's 49k vocabulary are ~190 MB
    in bf16 plus ~370 MB as fp32, more than a LoRA training step's whole activation memory (measured:
    a run's peak 2,748 MB with the evaluation, 2,178 MB without it). Per position the logits are the
    same; only the loss's summation order changes."""
    was_training = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    device = model_device(model)
    head = model.get_output_embeddings()
    try:
        for batch in batches:
            batch = to_device(batch, device)
            hidden, targets = supervised_hidden(model, batch)
            batch_loss, batch_correct = head_loss_in_chunks(head, hidden, targets, chunk)
            loss_sum += batch_loss
            correct += batch_correct
            n += int(targets.numel())
    finally:
        model.train(was_training)
    loss = loss_sum / n if n else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)) if n else float("nan"),
            "token_accuracy": correct / n if n else float("nan"), "supervised_tokens": n}
