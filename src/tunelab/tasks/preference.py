"""task: preference — DPO, IPO, ORPO and SimPO on (prompt, chosen, rejected) pairs, on the one loop.

read + check (before the model is touched: bad pairs are reported as such whatever the model) +
encode with the model's chat template and the chat SFT masks (data.preference; through the
encoded-data cache, each eval source on its own, several training sources mixed by weight:
tasks.preference_data) -> batches
of pairs, chosen rows then rejected rows, right-padded -> the loss (train.preference_losses) of
the summed answer log-probs (tasks.preference_logps), summed over pairs and counted in pairs, so
the loop's normalisation gives the one-large-batch gradient under accumulation and DDP.

What the loop sees is a plain TaskRun: `loss_fn`, `collate`, `count`, `evaluate`, plus two hooks
it treats like any task's: `train_stats` (rewards, margins, accuracy, log-probs and the log-ratio
to the reference, summed like the loss and logged in the train rows) and `prepare` (full
fine-tuning: the reference log-probs, computed once into the run dir).

The model may be a tunelab SFT run's final/ (or the run dir): a full model folder loads as is; a
LoRA adapter is merged into its base first, so the SFT model is both the policy's start and the
reference (a new LoRA adapter on top, switched off, gives exactly it back).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from tunelab.data.encoded import UnitSources
from tunelab.data.packing import collate_padded
from tunelab.device import model_device, to_device
from tunelab.errors import InputError
from tunelab.models.gguf import end_of_turn_id, plain_source
from tunelab.models.load import load_causal_lm, load_tokenizer
from tunelab.models.quantization import quantization_for
from tunelab.models.registry import resolve_model
from tunelab.tasks.causal_lm import lm_saver
from tunelab.tasks.preference_data import check_preference_data, load_preference_data
from tunelab.tasks.preference_logps import ReferenceCache, adapter_off_logps, answer_logps
from tunelab.train.preference_losses import PreferenceLoss, loss_from_config
from tunelab.train.protocols import TaskRun, TrainSet
from tunelab.train.sizes import eval_batch_size, usable_max_length

log = logging.getLogger("tunelab")

# summed per micro-batch (train_stats) and per evaluation; the rows hold the means (measures_row)
STAT_NAMES = ("pairs", "loss", "reward_chosen", "reward_rejected", "correct", "logp_chosen", "tokens_chosen",
              "logp_rejected", "tokens_rejected", "logratio", "logratio_tokens")
MEASURES = ("reward_chosen", "reward_rejected", "reward_margin", "pref_accuracy", "logp_chosen", "logp_rejected",
            "kl_ref")
METRIC_NAMES = ["eval_loss", *(f"eval_{m}" for m in MEASURES)]


def measures_row(sums: dict) -> dict:
    """Means of summed measures: rewards, margin and accuracy per pair; log-probs per answer token;
    kl_ref = the mean per-token log-ratio log pi - log pi_ref over both answers (the data's answers,
    not the policy's samples: an estimate of how far the policy moved on this data; absent for
    reference-free losses)."""
    n = sums.get("pairs", 0.0)
    if not n:
        return {}
    row = {"reward_chosen": sums["reward_chosen"] / n, "reward_rejected": sums["reward_rejected"] / n,
           "reward_margin": (sums["reward_chosen"] - sums["reward_rejected"]) / n,
           "pref_accuracy": sums["correct"] / n,
           "logp_chosen": sums["logp_chosen"] / max(sums["tokens_chosen"], 1.0),
           "logp_rejected": sums["logp_rejected"] / max(sums["tokens_rejected"], 1.0)}
    if sums.get("logratio_tokens"):
        row["kl_ref"] = sums["logratio"] / sums["logratio_tokens"]
    return row


class PreferenceStats:
    """The `train_stats` hook: the loss_fn adds each micro-batch's sums; the loop takes and sums them."""

    names = STAT_NAMES

    def __init__(self):
        self._parts: list[torch.Tensor] = []

    def add(self, losses, reward_c, reward_r, logps, ntok, ref) -> None:
        n = losses.shape[0]
        values = [torch.tensor(float(n)), losses.detach().sum(), reward_c.sum(), reward_r.sum(),
                  (reward_c > reward_r).sum(), logps[:n].detach().sum(), ntok[:n].sum(),
                  logps[n:].detach().sum(), ntok[n:].sum()]
        if ref is not None:
            values += [(logps.detach() - ref).sum(), ntok.sum()]
        else:
            values += [torch.tensor(0.0), torch.tensor(0.0)]
        self._parts.append(torch.stack([v.detach().double().cpu() for v in values]))  # one sync per micro-batch

    def take(self) -> dict:
        total = torch.stack(self._parts).sum(0).tolist() if self._parts else [0.0] * len(STAT_NAMES)
        self._parts = []
        return dict(zip(STAT_NAMES, total))

    def row(self, sums: dict) -> dict:
        return measures_row(sums)


def pair_batch(pairs, idx: list[int], pad_id: int) -> dict:
    """Rows 0..B-1 the chosen sides of pairs `idx`, rows B..2B-1 their rejected sides."""
    examples = [pairs[i].chosen for i in idx] + [pairs[i].rejected for i in idx]
    return collate_padded(examples, list(range(len(examples))), pad_id)


def make_loss_fn(loss: PreferenceLoss, stats: PreferenceStats | None, chunk: int = 0):
    """loss_fn(model, batch) -> (summed per-pair loss, pairs). The reference comes in the batch
    (cached, full fine-tuning) or from the same model with its adapter off (LoRA/QLoRA); `chunk`:
    answer_logps' vocabulary chunk (train.loss_chunk_tokens)."""

    def loss_fn(model, batch: dict):
        logps, ntok = answer_logps(model, batch, chunk)
        n = logps.shape[0] // 2
        ref = None
        if loss.needs_reference:
            ref = batch["ref_logps"] if "ref_logps" in batch else adapter_off_logps(model, batch, chunk)
            ref = ref.to(logps.dtype)
        refs = (ref[:n], ref[n:]) if ref is not None else ()
        losses, reward_c, reward_r = loss(logps[:n], logps[n:], ntok[:n], ntok[n:], *refs)
        if stats is not None:
            stats.add(losses, reward_c, reward_r, logps, ntok, ref)
        return losses.sum(), n

    return loss_fn


@torch.no_grad()
def preference_sums(model, batches, loss_fn, chunk: int = 0) -> dict:
    """The summed measures (STAT_NAMES) over every pair of `batches`, in eval mode."""
    was_training = model.training
    model.eval()
    stats = PreferenceStats()
    device = model_device(model)
    fn = make_loss_fn(loss_fn, stats, chunk)
    try:
        for batch in batches:
            fn(model, to_device(batch, device))
    finally:
        model.train(was_training)
    return stats.take()


def metrics_of(sums: dict) -> dict:
    """Eval loss (mean per pair), the measures and the pair count of summed measures."""
    return {"loss": sums["loss"] / max(sums["pairs"], 1.0), **measures_row(sums), "pairs": int(sums["pairs"])}


def preference_metrics(model, batches, loss_fn, chunk: int = 0) -> dict:
    """Eval loss (mean per pair) and the measures over every eval pair."""
    return metrics_of(preference_sums(model, batches, loss_fn, chunk))


PER_SOURCE = ("loss", "pref_accuracy", "reward_margin")  # each eval source's own measures, eval_<name>_*


def load_policy(model_cfg, method: str):
    """(model source path, tokenizer, model): the starting model (`model_cfg`: the config's model
    section), a tunelab SFT adapter merged into its base; `method` qlora loads the base in NF4."""
    from tunelab.models.adapters import load_adapter, tunelab_start

    start = tunelab_start(model_cfg.name)
    if start is not None and (start / "adapter_config.json").is_file():
        if method == "qlora":
            raise InputError("QLoRA on top of a LoRA adapter would quantise the merged model, which cannot be done in "
                             "memory: run `tunelab merge RUN -o DIR` and set model.name: DIR", field="model.name")
        model, tokenizer, _ = load_adapter(start, merge=True)
        model.train()
        return str(start), tokenizer, model
    source, tokenizer = _plain_policy(model_cfg, start)
    pickles = {"allow_pickle": True} if getattr(model_cfg, "allow_pickle", False) else {}  # the key is new (issue 13)
    model = load_causal_lm(source, trust_remote_code=model_cfg.trust_remote_code, revision=model_cfg.revision,
                           quantization=quantization_for(method), **pickles)
    return source.path, tokenizer, model


def _plain_policy(model_cfg, start):
    """(plain source, tokenizer) of a starting model that is no LoRA run (`start`: tunelab_start's folder)."""
    source = plain_source(resolve_model(str(start) if start is not None else model_cfg.name))
    return source, load_tokenizer(source, trust_remote_code=model_cfg.trust_remote_code, revision=model_cfg.revision)


def policy_tokenizer(model_cfg) -> tuple:
    """(tokenizer, model config) of the starting model, as load_policy gives them, without the weights
    where it can (a model folder or name: tasks.prepare encodes the pairs before training); a tunelab
    LoRA run is loaded and merged (its tokenizer is the run's, its config the merged model's)."""
    from transformers import AutoConfig

    from tunelab.models.adapters import tunelab_start

    start = tunelab_start(model_cfg.name)
    if start is not None and (start / "adapter_config.json").is_file():
        _, tokenizer, model = load_policy(model_cfg, "full")
        return tokenizer, model.config
    source, tokenizer = _plain_policy(model_cfg, start)
    return tokenizer, AutoConfig.from_pretrained(source.path, trust_remote_code=model_cfg.trust_remote_code,
                                                 revision=model_cfg.revision)


def setup_preference(*, model_cfg, data_cfg, train_cfg, preference_cfg, method: str) -> TaskRun:
    """Model, tokenizer, encoded pairs and the loss/eval/save functions for task preference.

    The config's sections it reads (tunelab.compose chooses them): `model_cfg`, `data_cfg`,
    `train_cfg`, `preference_cfg`, and `method` (qlora loads NF4; lora / qlora need no cached
    reference). The metric is the task's default (eval_loss, min); checkpoint.metric / mode
    replace it in tunelab.compose."""
    check_preference_data(data_cfg)  # every pair checked before the model is touched
    source_path, tokenizer, model = load_policy(model_cfg, method)
    if not tokenizer.chat_template:
        raise InputError("the model's tokenizer has no chat template: preference pairs are rendered as chat turns; "
                         "use a chat model (or a tunelab chat SFT run)", field="model.name", file=source_path)
    max_len = usable_max_length(model_cfg.max_length, model.config)
    eot = end_of_turn_id(tokenizer)
    eos_id = eot if eot is not None else tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_id or 0)
    loss = loss_from_config(preference_cfg)
    chunk = train_cfg.loss_chunk_tokens

    data = load_preference_data(data_cfg, tokenizer, max_len, preference_cfg.max_prompt_length, seed=train_cfg.seed)
    train_pairs, evals = data.train, data.evals

    def split_of(name: str) -> str:  # the reference cache's name of an eval table
        return f"eval/{name}" if name else "eval"

    bs = eval_batch_size(train_cfg)
    orders = {n: np.argsort(t.lengths, kind="stable").tolist() for n, t in evals.items()}  # by tokens, stable
    eval_batches = {n: [sorted(order[s : s + bs]) for s in range(0, len(order), bs)] for n, order in orders.items()}
    cached = loss.needs_reference and method not in ("lora", "qlora")
    reference = None
    if cached:  # (no eval pairs: an empty "eval" split, so such a run keeps its fingerprint)
        splits = {"train": train_pairs, **({split_of(n): t for n, t in evals.items()} or {"eval": []})}
        reference = ReferenceCache(splits, lambda pairs, idx: pair_batch(pairs, idx, pad_id), bs,
                                   context=f"{model_cfg.name}|{train_cfg.precision}|{model_cfg.max_length}", chunk=chunk,
                                   batches={split_of(n): b for n, b in eval_batches.items()})

    def batch_of(split: str, pairs, idx: list[int]) -> dict:
        batch = pair_batch(pairs, idx, pad_id)
        if reference is not None:
            batch["ref_logps"] = reference.lookup(split, idx)
        return batch

    train_stats = PreferenceStats()
    evaluate = None
    if evals:
        def evaluate(model) -> dict:
            parts = {}
            for name, pairs in evals.items():
                batches = (batch_of(split_of(name), pairs, idx) for idx in eval_batches[name])
                parts[name] = preference_sums(model, batches, loss, chunk)
            out = metrics_of({k: sum(p[k] for p in parts.values()) for k in STAT_NAMES})
            if len(parts) > 1:
                for name, sums in parts.items():
                    own = metrics_of(sums)
                    out |= {f"{name}_{k}": own[k] for k in PER_SOURCE if k in own}
            return out

    per_source = [f"eval_{n}_{k}" for n in evals if n for k in PER_SOURCE]
    mixing = {"sources": data.sources, "mix_sampling": data_cfg.mix_sampling} if data.sources else {}
    return TaskRun(
        model=model, tokenizer=tokenizer,
        train=TrainSet(lengths=train_pairs.lengths.tolist(), collate=lambda idx: batch_of("train", train_pairs, idx),
                       count=len, sources=UnitSources(train_pairs),
                       epoch_subset=data.mix.epoch_subset if data.mix else None,
                       epoch_size=data.mix.epoch_size if data.mix else None,
                       unit_source=data.mix.unit_source if data.mix else None),
        loss_fn=make_loss_fn(loss, train_stats, chunk),
        evaluate=evaluate, save_final=lm_saver(tokenizer, eos_id, pad_id),
        metric="eval_loss", mode="min",
        info={"metric_names": METRIC_NAMES + per_source, "kind": "preference", "model_source": source_path,
              "max_length": max_len,
              "loss": {"name": loss.name, "beta": loss.beta, "label_smoothing": loss.label_smoothing,
                       "gamma": loss.gamma},
              "reference": "cached" if cached else ("adapter_off" if loss.needs_reference else "none"),
              "train_rows": len(train_pairs), "eval_rows": sum(len(t) for t in evals.values()),
              "encode_stats": data.stats, "eval_encode_stats": data.eval_stats, "eos_token_id": eos_id, **mixing},
        train_stats=train_stats,
        prepare=reference.prepare if reference is not None else None,
    )


__all__ = ["setup_preference", "make_loss_fn", "preference_metrics", "preference_sums", "metrics_of", "measures_row",
           "pair_batch", "load_policy", "policy_tokenizer"]
