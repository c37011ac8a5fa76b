"""What one training micro-batch costs, measured on a model that holds no memory.

The planner needs two numbers per batch shape: the bytes autograd keeps for backward (the
activations) and the floating-point operations of forward + backward. Formulas for them (e.g.
"34 s b h per layer") go stale with every attention kernel, norm and MLP variant, so we measure
instead: the model is built on the meta device (no weights allocated, a 7B model costs
nothing), the method is applied (freeze, LoRA through peft, gradient checkpointing), its
parameters become fake CPU tensors (shapes and dtypes only, so autocast applies as in training),
and one real forward + backward of the task's loss runs under torch's FakeTensorMode with

- `torch.autograd.graph.saved_tensors_hooks` adding up the storages autograd saves (each
  storage once; the parameters themselves are not activations), and
- `torch.utils.flop_counter.FlopCounterMode` counting matmul/attention FLOPs from the shapes.

Nothing is computed for real, so a probe takes well under a second for small models.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ProbeResult:
    saved_bytes: int  # activations autograd keeps until backward (parameters excluded)
    largest_saved_bytes: int  # the biggest single saved storage (a bound on backward's transients)
    flops: int  # forward + backward


def meta_model(cfg, num_labels: int | None):
    """The configured model built on the meta device, with its method applied (QLoRA as LoRA:
    4-bit storage changes the weights' bytes, which the planner accounts for, not the graph)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from tunelab.models.adapt import apply_method
    from tunelab.models.load import quiet_transformers
    from tunelab.models.registry import resolve_model

    quiet_transformers()
    source = resolve_model(cfg.model.name)
    config = AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file,
                                        trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision)
    with torch.device("meta"):
        if cfg.task == "classification":
            config.num_labels = num_labels or 2
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    method = "lora" if cfg.method == "qlora" else cfg.method
    with warnings.catch_warnings():  # peft still calls transformers' deprecated gradient-checkpointing names
        warnings.simplefilter("ignore", FutureWarning)
        model = apply_method(model, method, task=cfg.task, freeze_cfg=cfg.freeze, lora=cfg.lora)
        if cfg.train.gradient_checkpointing:
            from tunelab.run import enable_gradient_checkpointing

            enable_gradient_checkpointing(model)
    if cfg.unfreeze.every:  # gradual unfreezing ends with everything trainable: plan for that
        for p in model.parameters():
            p.requires_grad = True
    if cfg.train.weights_dtype == "bf16":  # as the run stores them: no autocast copies in the probe either
        from tunelab.train.precision import store_weights_bf16

        store_weights_bf16(model)
    return model


def fake_copy(model: nn.Module, mode):
    """The meta model with every parameter and buffer turned into a fake CPU tensor of the same shape."""
    fake = copy.deepcopy(model)
    conv, cpu = mode.fake_tensor_converter, torch.device("cpu")
    for module in fake.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = nn.Parameter(conv.from_meta_and_device(mode, p.data, cpu),
                                                        requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = conv.from_meta_and_device(mode, b, cpu)
    return fake


@dataclass(frozen=True)
class Speed:
    """The causal-LM switches (tasks/lm_speed.py) as the probe runs them: `loss_chunk` supervised tokens
    at a time through train/chunked_loss.py (0: all at once; task preference: its per-token log-probs),
    RMSNorms and gated MLP activations recomputed in backward (chat and causal_lm only)."""

    loss_chunk: int = 0
    recompute_norms: bool = False
    recompute_act: bool = False  # train.recompute_mlp_activation

    @classmethod
    def of(cls, cfg) -> "Speed":
        """What a run of `cfg` switches on: chat and causal_lm (lm_speed's tasks), and preference's chunked
        answer log-probs; the norms not under gradient checkpointing, which recomputes them anyway."""
        t = cfg.train
        if cfg.task == "preference":
            return cls(t.loss_chunk_tokens, False)
        if cfg.task not in ("chat", "causal_lm"):
            return cls()
        off = t.gradient_checkpointing
        return cls(t.loss_chunk_tokens, t.recompute_norms and not off, t.recompute_mlp_activation and not off)


def _loss(model, task: str, rows: int, width: int, supervised: int, packed: bool, speed: Speed) -> torch.Tensor:
    """The task's training loss on zeros of the given shape, the same graph the loop builds.

    Classification: the model's logits and cross-entropy. Chat / causal LM: the base model to
    hidden states, then the vocabulary projection at `supervised` positions only, as
    tunelab.evaluate.lm.supervised_logits does (a fixed slice here: a boolean mask would make the
    shape depend on data a fake tensor does not have), in chunks when `speed` says so; packed rows
    carry a 4-D float mask (train.packed_attention `split` reads positions, which a fake tensor
    does not have: planned as `mask`).
    """
    ids = torch.zeros(rows, width, dtype=torch.long)
    if task == "classification":
        logits = model(input_ids=ids, attention_mask=torch.ones(rows, width, dtype=torch.long)).logits.float()
        return nn.functional.cross_entropy(logits, torch.zeros(rows, dtype=torch.long), reduction="sum")
    if speed.recompute_norms:
        from tunelab.models.recompute import recompute_norms

        recompute_norms(model)
    if speed.recompute_act:
        from tunelab.models.recompute import recompute_gated_activations

        recompute_gated_activations(model)
    inputs = {"input_ids": ids}
    if packed:
        inputs["attention_mask"] = torch.zeros(rows, 1, width, width)
        inputs["position_ids"] = torch.zeros(rows, width, dtype=torch.long)
    body = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = body.base_model(**inputs, use_cache=False).last_hidden_state
    # a compact copy of the supervised positions, as the loop's boolean index makes (a view would keep
    # the whole reshaped row alive as the head's input)
    flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])[:supervised].clone()
    targets = torch.zeros(flat.shape[0], dtype=torch.long)
    if task == "preference" and speed.loss_chunk:  # tasks/preference_logps.answer_logps, then a scalar of them
        from tunelab.train.chunked_loss import linear_token_logps

        return -linear_token_logps(flat, model.get_output_embeddings(), targets, speed.loss_chunk).sum()
    if speed.loss_chunk:
        from tunelab.train.chunked_loss import linear_cross_entropy

        return linear_cross_entropy(flat, model.get_output_embeddings(), targets, speed.loss_chunk)
    logits = model.get_output_embeddings()(flat).float()
    return nn.functional.cross_entropy(logits, targets, reduction="sum")


def probe(model: nn.Module, task: str, *, rows: int, width: int, supervised: int = 0, packed: bool = False,
          autocast_dtype: torch.dtype | None = None, speed: Speed = Speed()) -> ProbeResult:
    """Saved-activation bytes and FLOPs of one forward + backward of the task's loss at this batch shape."""
    from tunelab.train.chunked_loss import takes_head

    if speed.loss_chunk and not takes_head(model.get_output_embeddings()):  # the loop falls back to the plain loss
        speed = Speed(0, speed.recompute_norms, speed.recompute_act)
    return probe_loss(model, lambda m: _loss(m, task, rows, width, supervised, packed, speed), autocast_dtype)


def probe_loss(model: nn.Module, build_loss, autocast_dtype: torch.dtype | None = None) -> ProbeResult:
    """Run `build_loss(fake_model)` and its backward on a fake copy of a meta `model`; count what they cost.

    Inputs that `build_loss` creates are fake too (it runs inside the fake mode), so nothing is
    allocated or computed for real.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = fake_copy(model, mode)
    fake.train()
    params = {p.untyped_storage()._cdata for p in fake.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in params:
            saved[key] = t.untyped_storage().nbytes()
        return t

    amp = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    with mode, FlopCounterMode(display=False) as counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
            loss = build_loss(fake)
        if loss.requires_grad:
            loss.backward()
    return ProbeResult(saved_bytes=sum(saved.values()), largest_saved_bytes=max(saved.values(), default=0),
                       flops=int(counter.get_total_flops()))
