"""The causal-LM task's speed and memory switches (train.packed_attention, loss_chunk_tokens, recompute_norms,
recompute_mlp_activation).

Each switch does the same math as the exact path in less memory (tests/test_packed_attention.py,
tests/test_chunked_loss.py compare them), so it is chosen by measurement (benchmarks/perf_sft.py,
README "Performance"), not by a trade of accuracy:

- packed_attention `split`: packed rows go to models/packed_attention.py (one causal sdpa call
  per packed example) and the rows carry no (1, 1, L, L) block mask; `mask` is the exact path
  with the mask. Only where the model runs transformers' sdpa attention (others keep the mask).
- loss_chunk_tokens N > 0: train/chunked_loss.py (the vocabulary projection and cross-entropy N
  supervised tokens at a time, gradients taken in the forward); 0 = evaluate.lm.supervised_loss.
- recompute_norms: models/recompute.py (RMSNorms recomputed in backward, bit-identical).
- recompute_mlp_activation: models/recompute.py (a gated MLP's act(gate) * up recomputed, bit-identical).
"""

from __future__ import annotations

import logging

log = logging.getLogger("tunelab")


def without_block_masks(collate):
    """The packed collate without its 4-D masks: positions restarting at 0 delimit the examples."""

    def collate_rows(idx: list[int]) -> dict:
        batch = collate(idx)
        if batch.get("attention_mask") is not None and batch["attention_mask"].ndim == 4:
            batch = {k: v for k, v in batch.items() if k != "attention_mask"}
        return batch

    return collate_rows


def lm_speed(train_cfg, model, collate, packing: bool):
    """(collate, loss_fn) of a causal-LM run under the switches above; the model is changed in place."""
    from tunelab.evaluate.lm import supervised_loss

    if not train_cfg.gradient_checkpointing:
        from tunelab.models.recompute import recompute_gated_activations, recompute_norms

        if train_cfg.recompute_norms:
            recompute_norms(model)
        if train_cfg.recompute_mlp_activation:
            recompute_gated_activations(model)

    if packing and train_cfg.packed_attention == "split":
        from tunelab.models.packed_attention import use_packed_attention

        if use_packed_attention(model):
            collate = without_block_masks(collate)
        else:
            log.info("train.packed_attention: split needs sdpa attention (%s uses %s); packed rows keep their mask",
                     type(model).__name__, getattr(model.config, "_attn_implementation", "?"))
    loss_fn = supervised_loss
    if train_cfg.loss_chunk_tokens:
        loss_fn = chunked_supervised_loss(train_cfg.loss_chunk_tokens)
    return collate, loss_fn


def chunked_supervised_loss(chunk: int):
    """A task loss_fn with supervised_loss's contract: (summed CE over supervised tokens, their number).

    Falls back to the plain loss where the output head is not one it takes (train.chunked_loss.takes_head:
    an adapter on it, a sharded weight). Here and not in train/chunked_loss.py (the math):
    it reads evaluate.lm's supervised positions, and train/ imports nothing above it."""
    from tunelab.evaluate.lm import supervised_hidden, supervised_loss
    from tunelab.train.chunked_loss import linear_cross_entropy, takes_head

    def loss_fn(model, batch: dict):
        head = model.get_output_embeddings()
        if not takes_head(head):
            return supervised_loss(model, batch)
        hidden, targets = supervised_hidden(model, batch)
        return linear_cross_entropy(hidden, head, targets, chunk), int(targets.numel())

    return loss_fn


__all__ = ["chunked_supervised_loss", "lm_speed", "without_block_masks"]
