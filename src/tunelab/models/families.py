"""What tunelab knows about model families, by the `model_type` of their config.json: one table.

The defaults (defaults.py: encoder or causal LM, and a size estimate from the shape) read a
config.json as plain JSON, the planner (plan/arch.py: the shapes its memory and FLOP formulas
need) reads it through transformers; both ask here, so a family added for one is known to both.
"""

from __future__ import annotations

# encoders: classification models, never planned or defaulted as causal LMs (several of them also
# have a *ForCausalLM class in transformers, which is not what anyone fine-tunes them as)
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2", "albert",
                 "camembert", "mpnet", "modernbert", "xlm", "ernie")
# gated MLPs (SwiGLU / GeGLU: gate and up projections, then down): 3 h x i weights per layer, not 2
GATED_MLP_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "mixtral",
                   "olmo", "olmo2", "granite")
# one projection for Q, K and V (GPT-2's c_attn, Phi-3's qkv_proj)
FUSED_QKV_TYPES = ("gpt2", "gpt_bigcode", "phi3", "falcon", "bloom")


def is_encoder(model_type: str) -> bool:
    return model_type in ENCODER_TYPES


def gated_mlp(model_type: str, activation: str | None = None) -> bool:
    """A gated MLP: a listed family, or an activation named as one (`swiglu`, `geglu`)."""
    return model_type in GATED_MLP_TYPES or "glu" in str(activation or "")


def fused_qkv(model_type: str) -> bool:
    return model_type in FUSED_QKV_TYPES


__all__ = ["ENCODER_TYPES", "FUSED_QKV_TYPES", "GATED_MLP_TYPES", "fused_qkv", "gated_mlp", "is_encoder"]
