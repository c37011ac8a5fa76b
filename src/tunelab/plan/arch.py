"""A model known from its config.json alone: built on the meta device, its shapes and parameter counts.

`tunelab plan --model NAME|DIR|CONFIG_JSON` must answer for a 70B model on a laptop: nothing here
reads weights or a tokenizer. The model is built by transformers from the config on the meta
device (tensors with shapes, no storage), so the parameter counts are the real model's by
construction (tied embeddings counted once, as `model.parameters()` does), and the shapes the
memory and FLOP formulas need (layers, hidden size, heads, KV heads, head size, MLP width, gated or
not, vocabulary, dropout) are read from the same config transformers used.

LoRA counts are analytic: r x (in + out) per adapted linear layer (A is r x in, B is out x r),
over the modules `--lora-targets` names (leaf names as in the model, `all-linear`, or `auto`: the
same defaults `tunelab train` picks). GPT-2-style models fuse Q, K and V into one `c_attn`
(Conv1D, d -> 3d); there `q`, `k`, `v` name its slices, each counted as a d -> d layer:
r x (d + d). This is the LoRA paper's accounting for GPT-3 (Wq and Wv adapted separately); peft
itself can only wrap the whole `c_attn` (r x (d + 3d)), which is what the printed `tunelab train`
command then asks for (`lora.target_modules=[c_attn]`), and the plan says so.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from tunelab.errors import InputError
from tunelab.models import families

FUSED_SLICES = ("q", "k", "v")  # virtual targets: slices of a fused c_attn


@dataclass
class Shape:
    """What the memory and FLOP formulas read from an architecture."""

    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    gated_mlp: bool  # SwiGLU/GeGLU (gate and up projections) vs one up projection
    vocab: int
    causal: bool
    attention_dropout: float
    hidden_dropout: float
    norm: str  # "rmsnorm" (Llama, Mistral, Qwen2, Gemma) or "layernorm" (GPT-2, BERT)
    fused_qkv: bool  # one projection for Q, K and V (GPT-2's c_attn)

    def as_dict(self) -> dict:
        return asdict(self)


def read_config(spec: str, *, trust_remote_code: bool = False, revision: str | None = None):
    """The transformers config of an embedded name, a model folder, a config.json file or a hub id."""
    from transformers import AutoConfig

    from tunelab.models.load import quiet_transformers
    from tunelab.models.registry import resolve_model

    quiet_transformers()
    path = Path(spec).expanduser()
    try:
        if path.is_file() and path.suffix == ".json":
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise InputError(f"not a readable JSON config: {e}", file=path, field="--model") from None
            return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        try:
            source = resolve_model(spec)
        except InputError as e:
            raise InputError(e.message, file=e.file, field="--model") from None
        return AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file,
                                          trust_remote_code=trust_remote_code, revision=revision)
    except InputError:
        raise
    except (OSError, ValueError, KeyError) as e:  # no such repo offline, an unknown model_type, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot read a model config from {spec!r}: {first}", field="--model") from None


def default_task(config) -> str:
    """causal_lm for models with a causal-LM class, classification for encoders (models.families: BERT,
    RoBERTa, XLM-R, ELECTRA, ... some of which have a causal-LM class too)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return "causal_lm" if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not getattr(
        config, "is_encoder_decoder", False) and not families.is_encoder(config.model_type) else "classification"


def build_meta(config, task: str, num_labels: int = 2) -> nn.Module:
    """The model transformers builds from `config`, on the meta device (no memory, no weights read)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if task == "classification":
            config.num_labels = num_labels
            return AutoModelForSequenceClassification.from_config(config)
        return AutoModelForCausalLM.from_config(config)


def shape_of(config, task: str) -> Shape:
    """The shape fields, from the config as transformers reads it (attribute maps resolve GPT-2's n_embd etc.)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden, heads = text.hidden_size, text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    inter = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
    act = str(getattr(text, "hidden_act", getattr(text, "activation_function", "")))
    gated = families.gated_mlp(text.model_type, act)
    drop = [getattr(text, k, 0.0) or 0.0 for k in ("hidden_dropout_prob", "resid_pdrop", "hidden_dropout", "dropout")]
    att = [getattr(text, k, 0.0) or 0.0 for k in ("attention_probs_dropout_prob", "attn_pdrop", "attention_dropout")]
    return Shape(model_type=text.model_type, layers=text.num_hidden_layers, hidden=hidden, heads=heads,
                 kv_heads=getattr(text, "num_key_value_heads", None) or heads, head_dim=head_dim,
                 intermediate=inter, gated_mlp=gated, vocab=text.vocab_size, causal=task != "classification",
                 attention_dropout=float(max(att)), hidden_dropout=float(max(drop)),
                 norm="rmsnorm" if getattr(text, "rms_norm_eps", None) is not None else "layernorm",
                 fused_qkv=families.fused_qkv(text.model_type))


# ---------------------------------------------------------------- parameter counts


def linear_layers(model: nn.Module, task: str) -> dict[str, tuple[int, int]]:
    """Linear (and GPT-2 Conv1D) layers outside the task head, by full name: (in_features, out_features)."""
    from transformers.pytorch_utils import Conv1D

    from tunelab.models.adapters import head_modules

    heads = head_modules(model, task)
    out = {}
    for name, m in model.named_modules():
        if any(name == h or name.startswith(h + ".") for h in heads):
            continue
        if isinstance(m, nn.Linear):
            out[name] = (m.in_features, m.out_features)
        elif isinstance(m, Conv1D):
            out[name] = (m.weight.shape[0], m.weight.shape[1])
    return out


def resolve_targets(model: nn.Module, task: str, targets) -> list[str]:
    """Leaf names to adapt: `auto` and `all-linear` as `tunelab train` resolves them, names checked against
    the model (`q`, `k`, `v` also name the slices of a fused `c_attn`)."""
    from tunelab.models.adapters import head_modules
    from tunelab.models.adapters import resolve_targets as train_targets

    wanted = targets if isinstance(targets, str) else [t for t in targets if t not in FUSED_SLICES]
    has_fused = any(n.rsplit(".", 1)[-1] == "c_attn" for n in linear_layers(model, task))
    slices = [] if isinstance(targets, str) else [t for t in targets if t in FUSED_SLICES]
    if slices and not has_fused:
        wanted = list(wanted) + slices  # let the library's check name the real modules
    try:
        names = train_targets(model, wanted, head_modules(model, task)) if wanted else []
    except InputError as e:
        raise InputError(e.message, field="--lora-targets") from None
    return names + (slices if has_fused else [])


def lora_params(model: nn.Module, task: str, targets, r: int) -> dict:
    """Adapter parameters r x (in + out) per adapted layer; `c_attn` slices count d -> d each."""
    layers = linear_layers(model, task)
    names = resolve_targets(model, task, targets)
    total, adapted = 0, 0
    for full, (fan_in, fan_out) in layers.items():
        leaf = full.rsplit(".", 1)[-1]
        if leaf in names:
            total += r * (fan_in + fan_out)
            adapted += 1
        if leaf == "c_attn":
            for s in set(names) & set(FUSED_SLICES):
                total += r * (fan_in + fan_out // 3)
                adapted += 1
    return {"targets": names, "adapted_layers": adapted, "params": total,
            "roles": sorted(adapted_roles(model, task, names))}


def adapted_roles(model: nn.Module, task: str, names: list[str]) -> set[str]:
    """The roles (q, k, v, qkv, o, gate, up, down) of a layer's projections that `names` adapt, read
    from the first transformer block's module paths (BERT's three `dense`, GPT-2's two `c_proj`)."""
    roles = set()
    block = [n for n in linear_layers(model, task) if _first_block(n)]
    for full in block:
        leaf = full.rsplit(".", 1)[-1]
        if leaf not in names and not (leaf == "c_attn" and set(names) & set(FUSED_SLICES)):
            continue
        attn = "attn" in full or "attention" in full
        if leaf in ("q_proj", "query"):
            roles.add("q")
        elif leaf in ("k_proj", "key"):
            roles.add("k")
        elif leaf in ("v_proj", "value"):
            roles.add("v")
        elif leaf in ("c_attn", "qkv_proj", "query_key_value", "Wqkv"):
            roles.add("qkv")
        elif leaf in ("o_proj", "out_proj") or (attn and leaf in ("c_proj", "dense")):
            roles.add("o")
        elif leaf == "gate_proj":
            roles.add("gate")
        elif leaf in ("up_proj", "c_fc", "fc1", "gate_up_proj") or (leaf == "dense" and "intermediate" in full):
            roles.add("up")
        else:  # down_proj, fc2, the MLP's c_proj, BERT's output.dense
            roles.add("down")
    return roles


def _first_block(name: str) -> bool:
    """A module inside the first repeated block (a path with a `.0.` index)."""
    parts = name.split(".")
    return any(p == "0" for p in parts[:-1])


def gathered_unit_params(model: nn.Module) -> int:
    """Parameters of the unit a parameter-sharding strategy gathers at a time: one transformer block
    (models.anatomy.find_blocks, FSDP2's wrapping unit, also taken for ZeRO-3's layer-by-layer
    fetch); the largest single module where no blocks are found."""
    from tunelab.models.anatomy import find_blocks

    try:
        _, blocks = find_blocks(model)
    except InputError:
        return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return sum(p.numel() for p in blocks[0].parameters())


def root_unit_params(model: nn.Module) -> tuple[int, int]:
    """Parameters (all, trainable) outside the repeated blocks: FSDP2's root unit (embeddings, final
    norm, pooler, heads), gathered whole for the step (its root is not resharded after forward); 0
    where no blocks are found (every module then counts as its own unit)."""
    from tunelab.models.anatomy import find_blocks

    try:
        _, blocks = find_blocks(model)
    except InputError:
        return 0, 0
    inside = {id(p) for b in blocks for p in b.parameters()}
    outside = [p for p in model.parameters() if id(p) not in inside]
    return sum(p.numel() for p in outside), sum(p.numel() for p in outside if p.requires_grad)


def head_params(model: nn.Module, task: str) -> int:
    """Parameters of a new classification head (trained fully under every method); 0 for causal LMs."""
    if task != "classification":
        return 0
    from tunelab.models.adapters import head_modules

    return sum(p.numel() for h in head_modules(model, task) for p in model.get_submodule(h).parameters())


def counts(model: nn.Module, task: str) -> dict:
    """Total parameters; those in input embeddings (no matmul); those in quantisable linear layers
    (QLoRA's 4-bit base: every Linear/Conv1D outside the heads, as tunelab's NF4 config skips them);
    the output projection's V x h (a matmul every token even when tied to the embeddings)."""
    total = sum(p.numel() for p in model.parameters())
    emb = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    quantizable = sum(i * o for i, o in linear_layers(model, task).values())
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = out.weight.numel() if out is not None else 0
    return {"total": total, "embedding": emb, "quantizable": quantizable, "output_projection": head,
            "matmul": total - emb + (head if _tied(model) else 0)}


def plain_linear_params(model: nn.Module, task: str) -> int:
    """Weights of the plain nn.Linear layers outside the task head that share no parameter (an lm_head tied
    to the embeddings is out): what lora.base_dtype stores in bf16 (models/frozen_weights.py)."""
    tied = _tied(model)
    out_emb = model.get_output_embeddings() if tied else None
    inside = set(linear_layers(model, task))
    total = 0
    for name, m in model.named_modules():
        if type(m) is nn.Linear and name in inside and m is not out_emb:
            total += m.weight.numel()
    return total


def _tied(model: nn.Module) -> bool:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return out is not None and inp is not None and out.weight is inp.weight

