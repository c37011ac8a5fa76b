"""Memory per device from formulas: model states under each sharding strategy, activations, logits.

Model states (Rajbhandari et al. 2020, "ZeRO", section 3 and Table 1). Mixed-precision Adam keeps,
per parameter, 16-bit weights (2 bytes) and gradients (2) plus K = 12 bytes of optimizer state:
an fp32 master copy (4) and Adam's two moments (4 + 4). Sharding over N data-parallel devices
divides what a stage partitions by N:

    ddp            (2 + 2 + K) psi                      nothing sharded
    zero1 (P_os)   2 psi + 2 psi + K psi / N            optimizer state (master + moments)
    zero2 (P_os+g) 2 psi + (2 + K) psi / N              + gradients
    zero3 (P_os+g+p) (2 + 2 + K) psi / N                + weights; fsdp (FULL_SHARD) is the same cut

Frozen parameters (LoRA/QLoRA bases) have weights only. tunelab's own single-device and DDP
training keeps fp32 parameters and computes under autocast (`layout="autocast"`: weights 4 bytes,
gradients 4, moments 8, no separate master: the same 16 bytes, split differently); DeepSpeed's
bf16/fp16 engine keeps the ZeRO layout (`layout="zero"`). fp32 training is 4 + 4 + 8 without
DeepSpeed and 4 + 4 + 12 with it (its optimizer partition holds an fp32 copy even of fp32 weights).
`offload` (`distributed.cpu_offload`) moves to host memory what each strategy offloads: DeepSpeed's
ZeRO-Offload the optimizer partition (master + moments; zero1/2), ZeRO-3 with offload_param as well
(distributed.zero sets both) also the 16-bit parameter partition and, with the optimizer's, the
gradient partition; FSDP2's CPUOffloadPolicy the sharded parameters, gradients and optimizer state; it is reported as `cpu_bytes`, not counted against the
device.

`train.weights_dtype: bf16` (train/bf16_adamw.py, ddp only) stores the weights and gradients themselves in bf16
(2 + 2 bytes) with fp32 moments (8) and no master copy (`layout="bf16"`: 12 bytes a trainable parameter), and
computes without autocast: no 16-bit weight copies, a bf16 residual stream.

`optim.name: adamw_8bit` (Dettmers et al. 2022; bitsandbytes' AdamW8bit, train/optim.py) keeps both moments in
one byte each plus an fp32 absmax per 256-value block (2 + 8/256 bytes), except for tensors under 4,096 values,
which keep fp32 moments (8): `adam_state_bytes` counts per tensor, `optimizer_bytes_per_param` where only totals
are known. It runs under ddp only (config.py refuses it with sharding).

QLoRA (Dettmers et al. 2023): NF4 stores 4 bits per weight plus one absmax per 64-weight block;
fp32 absmax costs 32/64 = 0.5 bits (4.5 in all); double quantisation stores the absmax in 8 bits
with one fp32 constant per 256 blocks: 4 + 8/64 + 32/(64*256) = 4.127 bits.

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", section 4.1): one GPT layer without parallelism saves s*b*h*(34 + 5*a*s/h) bytes in
16-bit: attention 11sbh + 5as^2b, MLP 19sbh, two LayerNorms 4sbh. `layer_activations` adds the
same terms up for the layer actually configured (MLP width i instead of 4h, gated MLPs, grouped
KV heads, head size, dropout present or not, norm inputs in fp32 when the residual stream is fp32
under autocast, RMSNorm's fp32 internals) and reproduces 34sbh + 5as^2b exactly for the paper's
layer. Fused attention (sdpa/flash) keeps no s x s scores: only its output and an fp32 log-sum-exp
per row (4abs bytes).
Full recomputation (gradient checkpointing) keeps each layer's input (2sbh in the paper) and brings
one layer's activations back during its backward.
"""

from __future__ import annotations

from tunelab.plan.arch import Shape

STRATEGIES = ("ddp", "fsdp", "zero1", "zero2", "zero3")
SHARDED = {"ddp": (), "zero1": ("master", "optimizer"), "zero2": ("master", "optimizer", "gradients"),
           "zero3": ("master", "optimizer", "gradients", "weights"),
           "fsdp": ("master", "optimizer", "gradients", "weights")}
CUDA_CONTEXT_BYTES = 2**30  # CUDA context, cuBLAS/NCCL workspaces and allocator reserve: 1 GiB, stated


def layout_for(strategy: str, weights_dtype: str = "fp32") -> str:
    """How a strategy keeps mixed-precision parameters (as tunelab's distributed.strategy runs them):
    DeepSpeed's bf16 engine (zero1/2/3) holds 16-bit weights and gradients plus an fp32 master copy in
    the optimizer partition; DDP and FSDP2 keep fp32 parameters (FSDP2's sharded ones are the master);
    `train.weights_dtype: bf16` (ddp) keeps bf16 parameters and gradients and no master."""
    if weights_dtype == "bf16":
        return "bf16"
    return "zero" if strategy.startswith("zero") else "autocast"


def compute_bytes(precision: str) -> int:
    """Element size of what is computed and gathered: 2 under bf16/fp16 (autocast's casts, FSDP2's
    MixedPrecisionPolicy(param_dtype=bf16), DeepSpeed's 16-bit engine), 4 in fp32."""
    return 2 if precision in ("bf16", "fp16") else 4


def device_states(total: float, trainable: float, *, quantized: float = 0, precision: str = "bf16",
                  strategy: str = "ddp", n: int = 1, offload: bool = False, unit_params: float = 0,
                  root_params: float = 0, root_trainable: float = 0, whole_bucket: bool = True,
                  gloo: bool = False, optim: str = "adamw", weights_dtype: str = "fp32") -> dict:
    """`model_states` in the layout the strategy keeps (`layout_for`) plus its communication buffers
    (`buffers`, `comm_overhead` over the unsharded gradients and `unit_params`, the parameters of the
    largest unit gathered at a time; under fsdp also `root_params` / `root_trainable`, FSDP2's root unit,
    see `fsdp_root_bytes`; under zero3 `zero3_buffers`, its bucket counted whole on a GPU and as far as
    it is written (`whole_bucket` False) in a CPU process's resident memory): the one definition both
    planners use (plan.model_plan for other hardware, plan.planner for `--nproc` on this machine).

    `gloo` (CPU processes): gloo's reduce_scatter_tensor reduces a full-size copy of its input
    (measured, 2 processes: a 46 MiB fp32 input raised the peak by 48 MiB beyond the output's pages;
    all_gather_into_tensor by nothing beyond its output), so under fsdp the largest reduce-scatter
    input, the root unit's or a block's fp32 gradients, is held once more (`gloo_reduce_scatter_copy`)."""
    layout = layout_for(strategy, weights_dtype)
    common = dict(precision=precision, strategy=strategy, layout=layout, quantized=quantized, optim=optim)
    out = model_states(total, trainable, n=n, offload=offload, **common)
    whole_gradients = model_states(total, trainable, n=1, **common)["gradients"]
    out["buffers"] = comm_overhead(strategy, grad_bytes=whole_gradients, largest_layer_params=unit_params,
                                   act_bytes=compute_bytes(precision), n=n, total_params=total, trainable=trainable,
                                   whole_bucket=whole_bucket, offload=offload)
    if strategy == "fsdp" and n > 1:
        out["buffers"] += fsdp_root_bytes(root_params, root_trainable, act_bytes=compute_bytes(precision))
        if gloo:
            out["buffers"] += gloo_reduce_scatter_copy(root_trainable, unit_params if trainable >= total else 0.0)
    out["layout"] = layout
    return out


def nf4_bits(double_quant: bool = True, block: int = 64, block2: int = 256) -> float:
    """Bits per weight of NF4: 4-bit codes + the absmax of each block (fp32, or 8-bit + fp32 per block2)."""
    return 4 + (8 / block + 32 / (block * block2) if double_quant else 32 / block)


OPTIMIZERS = ("adamw", "adamw_8bit")
MIN_8BIT_SIZE = 4096  # bitsandbytes' min_8bit_size (train/optim.py): smaller tensors keep fp32 moments
BLOCK_8BIT = 256  # values per absmax of the 8-bit blockwise moments


def adam_state_bytes(numels, optim: str = "adamw") -> float:
    """Bytes of AdamW's two moments over trainable tensors of `numels` values each, as `optim.name` keeps them
    (adamw_8bit: uint8 codes + an fp32 absmax per block, and the two 256-code maps every tensor shares)."""
    if optim not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optim!r}")
    if optim == "adamw":
        return 8.0 * sum(numels)
    numels = list(numels)
    codes = 2 * BLOCK_8BIT * 4 if any(n >= MIN_8BIT_SIZE for n in numels) else 0  # the two code maps, shared
    return float(codes + sum(8 * n if n < MIN_8BIT_SIZE else 2 * n + 2 * 4 * -(-n // BLOCK_8BIT) for n in numels))


def optimizer_bytes_per_param(optim: str = "adamw") -> float:
    """Moment bytes per trainable parameter when only the total is known (every tensor taken as >= 4,096
    values: a transformer's norms and biases are a fraction of a percent of its parameters)."""
    if optim not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optim!r}")
    return 8.0 if optim == "adamw" else 2 + 2 * 4 / BLOCK_8BIT


def model_states(total: float, trainable: float, *, precision: str = "bf16", strategy: str = "ddp", n: int = 1,
                 offload: bool = False, layout: str = "zero", quantized: float = 0,
                 double_quant: bool = True, optim: str = "adamw") -> dict:
    """Bytes per device of weights, gradients, master weights and optimizer moments (AdamW).

    `total` parameters of which `trainable` get gradients and optimizer state and `quantized`
    (frozen) are stored in NF4; `n` data-parallel devices; `offload`: master + moments on the host;
    `optim`: optim.name (adamw_8bit's moments: `optimizer_bytes_per_param`); `layout` "bf16":
    train.weights_dtype bf16 (2-byte weights and gradients, no master).
    """
    if strategy not in SHARDED:
        raise ValueError(f"unknown strategy {strategy!r}")
    half = (precision in ("bf16", "fp16") and layout == "zero") or layout == "bf16"
    wbytes, gbytes = (2, 2) if half else (4, 4)
    mbytes = 4 if layout == "zero" else 0  # DeepSpeed's fp32 partition exists in fp32 training too
    frozen_plain = total - trainable - quantized
    items = {"weights": (trainable + frozen_plain) * wbytes + quantized * nf4_bits(double_quant) / 8,
             "gradients": trainable * gbytes, "master_weights": trainable * mbytes,
             "optimizer": trainable * optimizer_bytes_per_param(optim)}
    shard = SHARDED[strategy]
    out = {}
    for key, value in items.items():
        short = "master" if key == "master_weights" else key
        out[key] = value / n if short in shard else value
    cpu = 0.0
    if offload:
        moved = ("weights", "gradients", "master_weights", "optimizer") if strategy in ("fsdp", "zero3") else (
            "master_weights", "optimizer")
        cpu = sum(out[k] for k in moved)
        out.update({k: 0.0 for k in moved})
    out["model_states"] = sum(out[k] for k in ("weights", "gradients", "master_weights", "optimizer"))
    out["cpu"] = cpu
    return out


def gloo_reduce_scatter_copy(root_trainable: float, block_trainable: float) -> float:
    """The copy gloo's reduce_scatter_tensor makes of FSDP2's largest reduce-scatter input (fp32, its
    reduce_dtype): the root unit's trainable gradients or a block's (0 under LoRA, whose blocks reduce
    only their adapters'). Measured in tests/test_plan_sharding.py."""
    return max(root_trainable, block_trainable) * 4


def norm_saved(shape: Shape, norm_bytes: int, *, recompute: bool = False, trained: bool = True) -> int:
    """Bytes per token x hidden one norm keeps. RMSNorm as transformers writes it: its fp32 input and
    (when its weight trains) its normalised product; recomputed in backward (train.recompute_norms,
    models/recompute.py) only its input, which the recomputation starts from. LayerNorm: its input."""
    if shape.norm != "rmsnorm" or recompute:
        return norm_bytes
    return 4 + (norm_bytes if trained else 0)


def packed_terms(shape: Shape, s: int, b: int, *, packed: str | None, attention: str, act_bytes: int) -> tuple:
    """(bytes per layer, bytes once) that packed rows add (data.packing; train.packed_attention).

    `mask`: the collate's fp32 (1, 1, L, L) block mask per row is held for the step, and sdpa keeps a
    16-bit cast of it per layer when it computes in 16 bits (autocast casts it at every call; in fp32
    the one mask is what each layer keeps). `split` (sdpa only, models/packed_attention.py): no mask;
    each example's attention output is kept by its own sdpa call besides the concatenated output the
    output projection keeps, one more output per layer. Eager attention adds the mask to its scores
    (keeps nothing more); flash-attention takes packed rows by their positions."""
    if not packed or attention == "flash":
        return 0, 0
    if packed == "split" and attention == "sdpa":
        return act_bytes * s * b * shape.heads * shape.head_dim, 0
    per_layer = act_bytes * b * s * s if attention == "sdpa" and act_bytes != 4 else 0
    return per_layer, 4 * b * s * s


def layer_activations(shape: Shape, s: int, b: int, *, act_bytes: int = 2, norm_bytes: int | None = None,
                      attention: str = "sdpa", autocast: bool = False, mask_bytes: int = 1,
                      softmax_fp32: bool = True, recompute_norms: bool = False, packed: str | None = None,
                      recompute_act: bool = False) -> float:
    """Bytes one transformer layer saves for backward at micro-batch b x sequence s (Korthikanti's terms).

    `norm_bytes`: the residual stream's element size (what a norm saves as its input); `autocast`:
    the residual stream is fp32 and every projection casts its own 16-bit copy of its input (three
    for separate q/k/v, two for gate/up), as torch.autocast does over fp32 parameters. RMSNorm as
    transformers writes it saves its fp32 input and its normalised output (LayerNorm: the input).
    Under sdpa/eager transformers repeats grouped KV heads before attention (saved at full width);
    flash-attention-2 takes them grouped. `mask_bytes`: a dropout mask's element (CUDA keeps bool
    masks; the CPU kernel one of the input's dtype). `softmax_fp32`: transformers' eager attention
    takes the softmax in fp32 and saves that too (the paper's layer: False). `recompute_norms` and
    `packed`: `norm_saved`, `packed_terms`; `recompute_act` (train.recompute_mlp_activation,
    models/recompute.py): a gated MLP keeps no act(gate).
    """
    norm_bytes = act_bytes if norm_bytes is None else norm_bytes
    sb, h, i = s * b, shape.hidden, shape.intermediate
    q_dim = shape.heads * shape.head_dim
    kv_dim = shape.kv_heads * shape.head_dim if attention == "flash" else q_dim
    drop_h = mask_bytes if shape.hidden_dropout > 0 else 0  # masks after attention and after the MLP
    qkv_inputs = 3 if autocast and not shape.fused_qkv else 1
    attn = qkv_inputs * act_bytes * sb * h  # input of the QKV projection(s): the norm's output
    attn += act_bytes * sb * (q_dim + kv_dim)  # Q and K for QK^T
    attn += act_bytes * sb * kv_dim  # V
    attn += act_bytes * sb * q_dim  # input of the output projection (the attention output)
    attn += drop_h * sb * h
    if attention == "eager":
        scores = shape.heads * s * s * b
        attn += act_bytes * scores  # softmax output (the AV matmul's input)
        if softmax_fp32 and act_bytes != 4:  # transformers' eager softmax runs in fp32, saved too
            attn += 4 * scores
        if shape.attention_dropout > 0:
            attn += mask_bytes * scores + act_bytes * scores  # dropout mask and dropout output
    else:  # fused kernels keep the output (counted above) and an fp32 log-sum-exp per query row
        attn += 4 * shape.heads * s * b
    mlp_inputs = 2 if autocast and shape.gated_mlp else 1
    mlp = mlp_inputs * act_bytes * sb * h  # input of the first projection(s)
    mlp += act_bytes * sb * i * (2 if not shape.gated_mlp else 3 if recompute_act else 4)  # gate, up, act(gate), product
    mlp += drop_h * sb * h
    norms = 2 * norm_saved(shape, norm_bytes, recompute=recompute_norms) * sb * h
    packing = packed_terms(shape, s, b, packed=packed, attention=attention, act_bytes=act_bytes)[0]
    return attn + mlp + norms + packing


def lora_layer_activations(shape: Shape, s: int, b: int, *, roles: set[str], r: int, dropout: float,
                           act_bytes: int = 2, norm_bytes: int | None = None, attention: str = "sdpa",
                           autocast: bool = False, mask_bytes: int = 1, softmax_fp32: bool = True,
                           recompute_norms: bool = False, packed: str | None = None,
                           lean_dropout: bool = False, recompute_act: bool = False,
                           recompute_inputs: bool = False) -> float:
    """One layer's saved bytes when only LoRA adapters train: what backward needs to pass gradients
    through the frozen layer and to the adapters, term by term as in `layer_activations`.

    A frozen projection saves nothing (its input gradient needs only its weight); an adapted one
    saves its input for lora_A (its dropout output and mask under LoRA dropout; autocast's 16-bit
    copy; in fp32 the one input tensor its siblings share) and lora_A's r-wide output for lora_B.
    Attention keeps Q, K, V (and its output under fused kernels), activation functions and the gated
    product their inputs, frozen norms their input. `roles`: the adapted projections of a layer
    (q, k, v, qkv for a fused c_attn, o, gate, up, down). `lean_dropout` (lora.lean_dropout,
    models/lora_dropout.py): each adapted projection keeps its dropout mask bit-packed (1/8 byte a
    value), and its group's input is kept once as it came (the norm's output, `norm_bytes`; the
    attention output is already kept). `recompute_inputs` (lora.recompute_inputs, models/recompute.py):
    with lean dropout, a recomputed norm's output (q/k/v's and gate/up's input) and, with recompute_act,
    the gated product (down's input) are made again in backward, not kept.
    """
    norm_bytes = act_bytes if norm_bytes is None else norm_bytes
    sb, h, i = s * b, shape.hidden, shape.intermediate
    q_dim = shape.heads * shape.head_dim
    kv_dim = shape.kv_heads * shape.head_dim if attention == "flash" else q_dim
    fan_in = {"q": h, "k": h, "v": h, "qkv": h, "o": q_dim, "gate": h, "up": h, "down": i}
    groups = [("q", "k", "v", "qkv"), ("o",), ("gate", "up"), ("down",)]
    shared = {"o": attention != "eager"}  # fused attention saves its output, which o_proj reads
    total = 0.0
    for group in groups:
        saved = shared.get(group[0], False)
        norm_input = group[0] in ("q", "gate")  # the group reads a norm's output (else o's or down's input)
        again = recompute_inputs and (recompute_norms if norm_input
                                      else recompute_act and shape.gated_mlp and group[0] == "down")
        for role in group:
            if role not in roles:
                continue
            total += act_bytes * sb * r  # lora_A's output, for lora_B
            if dropout > 0 and lean_dropout:
                total += sb * fan_in[role] / 8  # the mask, bit-packed: 1 bit a value
                if not saved and not again:
                    total += (norm_bytes if norm_input else act_bytes) * sb * fan_in[role]
                    saved = True
            elif dropout > 0:
                total += (act_bytes + mask_bytes) * sb * fan_in[role]
            elif autocast or not saved:
                total += act_bytes * sb * fan_in[role]
                saved = True
    total += act_bytes * sb * (q_dim + 2 * kv_dim)  # Q, K, V
    if attention == "eager":
        scores = shape.heads * s * s * b
        total += act_bytes * scores + (4 * scores if softmax_fp32 and act_bytes != 4 else 0)
        if shape.attention_dropout > 0:
            total += mask_bytes * scores + act_bytes * scores
    else:
        total += act_bytes * sb * q_dim + 4 * shape.heads * s * b  # output + log-sum-exp
    total += act_bytes * sb * i * (1 if not shape.gated_mlp else 2 if recompute_act else 3)  # act input (+ act output, up output)
    drop_h = mask_bytes if shape.hidden_dropout > 0 else 0
    total += 2 * drop_h * sb * h
    total += 2 * norm_saved(shape, norm_bytes, recompute=recompute_norms, trained=False) * sb * h  # their input
    return total + packed_terms(shape, s, b, packed=packed, attention=attention, act_bytes=act_bytes)[0]


def activations(shape: Shape, s: int, b: int, *, act_bytes: int = 2, norm_bytes: int | None = None,
                attention: str = "sdpa", checkpointing: bool = False, autocast: bool = False,
                mask_bytes: int = 1, softmax_fp32: bool = True, lora: dict | None = None,
                recompute_norms: bool = False, packed: str | None = None, chunked_loss: bool = False,
                recompute_act: bool = False) -> dict:
    """All layers' saved activations, with full recomputation or without; the final norm and head input.
    `lora`: {"roles", "r", "dropout"[, "lean_dropout"]} when only adapters train (`lora_layer_activations`);
    `recompute_norms`, `recompute_act` (moot under checkpointing, as in training), `packed`: the layer's terms;
    `chunked_loss` (train.loss_chunk_tokens): the head keeps no input (the loss, `loss_bytes`, keeps
    the gradients it took in the forward instead)."""
    norm_bytes = act_bytes if norm_bytes is None else norm_bytes
    recompute_norms = recompute_norms and not checkpointing
    common = dict(act_bytes=act_bytes, norm_bytes=norm_bytes, attention=attention, autocast=autocast,
                  mask_bytes=mask_bytes, softmax_fp32=softmax_fp32, recompute_norms=recompute_norms, packed=packed,
                  recompute_act=recompute_act and not checkpointing)
    one = layer_activations(shape, s, b, **common) if lora is None else lora_layer_activations(
        shape, s, b, roles=set(lora["roles"]), r=lora["r"], dropout=lora["dropout"],
        lean_dropout=lora.get("lean_dropout", False), recompute_inputs=lora.get("recompute_inputs", False), **common)
    embed_drop = mask_bytes if shape.hidden_dropout > 0 else 0
    # the final norm, the head's input (a frozen head under LoRA, or the chunked loss, keeps none),
    # the embedding dropout mask, the packed rows' mask
    final_norm = norm_saved(shape, norm_bytes, recompute=recompute_norms, trained=lora is None)
    head_input = act_bytes if lora is None and not chunked_loss else 0
    head_in = (final_norm + head_input + embed_drop) * s * b * shape.hidden
    head_in += packed_terms(shape, s, b, packed=packed, attention=attention, act_bytes=act_bytes)[1]
    if checkpointing:  # each layer's input kept; one layer recomputed at a time in backward
        kept = shape.layers * norm_bytes * s * b * shape.hidden
        return {"per_layer": one, "kept": kept + head_in, "recompute": one, "total": kept + head_in + one}
    return {"per_layer": one, "kept": shape.layers * one + head_in, "recompute": 0.0,
            "total": shape.layers * one + head_in}


def loss_bytes(tokens: int, vocab: int, hidden: int, *, act_bytes: int = 2, hidden_bytes: int | None = None,
               chunk: int = 0, head_trains: bool = True, weight_bytes: int = 4) -> dict:
    """The loss over the vocabulary: what autograd saves for its backward (`saved`, what the planner's
    probe counts) and its peak on top of the body's saved activations (`peak`: per_device's logits_bytes).

    All at once (chunk 0, evaluate.lm.supervised_loss): log-softmax keeps its fp32 output, and its
    backward holds that, the gradient arriving at it and the one it passes on, fp32 each: 12 bytes
    per logit at the peak whatever the compute dtype.
    In chunks (train.loss_chunk_tokens, train/chunked_loss.py): one chunk's fp32 logits (and their
    16-bit cast) at a time; the gradients are taken in the forward and kept: the hidden states'
    (`hidden_bytes`, the final norm's output dtype) and, when the head trains, its weight's in an fp32
    accumulator each chunk's product is added into in place (16-bit products `chunked_loss.PRODUCT_ROWS`
    vocabulary rows at a time); a head weight kept in another dtype (`weight_bytes`) is cast for the
    forward. Backward scales the accumulator in place and hands it on as the weight's gradient (cast
    where the weight is not fp32): 4 bytes per head weight, where the product and its fp32 copy
    beside the accumulator held 10 before."""
    from tunelab.train.chunked_loss import PRODUCT_ROWS

    n, v, h = tokens, vocab, hidden
    hb = act_bytes if hidden_bytes is None else hidden_bytes
    if not chunk:
        return {"saved": 4.0 * n * v, "peak": 12.0 * n * v}
    weight = v * h if head_trains else 0
    cast = v * h * act_bytes if act_bytes != weight_bytes else 0
    chunk_logits = min(chunk, n) * v * (4 + (act_bytes if act_bytes != 4 else 0))
    product = min(PRODUCT_ROWS, v) * h * act_bytes if head_trains and act_bytes != 4 else 0  # fp32: addmm_ in place
    saved = n * h * hb  # d_hidden; the weight's gradient lives on the autograd context, not among its saved tensors
    forward = 2 * n * h * hb + cast + chunk_logits + product + weight * 4  # input, d_hidden, ...
    backward = saved + n * h * hb + weight * 4 + (weight * weight_bytes if weight_bytes != 4 else 0)
    return {"saved": float(saved), "peak": float(max(forward, backward))}


def logp_bytes(tokens: int, vocab: int, hidden: int, *, act_bytes: int = 2, hidden_bytes: int | None = None,
               chunk: int = 0, head_trains: bool = True, weight_bytes: int = 4) -> dict:
    """Per-position log-probs over the vocabulary (task preference's answer log-probs): what autograd
    saves for backward (`saved`) and the peak on top of the body's saved activations (`peak`).

    All at once (chunk 0, log-softmax then gather): as loss_bytes' plain path, the fp32 log-softmax
    kept, 12 bytes per logit at backward's peak.
    In chunks (train.loss_chunk_tokens, train/chunked_loss.linear_token_logps), one chunk's fp32
    logits (and their 16-bit cast) at a time:
    - head frozen (LoRA/QLoRA): the hidden states' gradient is taken in the forward and kept (n x
      hidden, `hidden_bytes`); backward makes the scaled copy beside it.
    - head trained: forward keeps each position's log-sum-exp (4 bytes; the head's input is kept as
      its input anyway); backward projects the chunks again and holds the weight's fp32 gradient
      accumulator (4 bytes per head weight, plus its cast where the weight is not fp32), one 16-bit
      product slice, and the hidden states' gradient."""
    from tunelab.train.chunked_loss import PRODUCT_ROWS

    n, v, h = tokens, vocab, hidden
    hb = act_bytes if hidden_bytes is None else hidden_bytes
    if not chunk:
        return {"saved": 4.0 * n * v, "peak": 12.0 * n * v}
    cast = v * h * act_bytes if act_bytes != weight_bytes else 0
    chunk_logits = min(chunk, n) * v * (4 + (act_bytes if act_bytes != 4 else 0))
    if not head_trains:
        saved = n * h * hb
        forward = n * 4 + saved + cast + chunk_logits
        backward = 2 * saved
    else:
        saved = n * 4
        product = min(PRODUCT_ROWS, v) * h * act_bytes if act_bytes != 4 else 0
        forward = n * 4 + saved + cast + chunk_logits
        backward = (saved + n * h * hb + cast + chunk_logits + product + v * h * 4
                    + (v * h * weight_bytes if weight_bytes != 4 else 0))
    return {"saved": float(saved), "peak": float(max(forward, backward))}


def fsdp_root_bytes(root_params: float, root_trainable: float, *, act_bytes: int = 2) -> float:
    """FSDP2's root unit (what lies outside the blocks: embeddings, final norm, pooler, heads) during a
    step: the root is not resharded after forward, so its parameters stay gathered whole (in the
    compute dtype) from forward to the end of backward, its trainable ones get an unsharded gradient
    (compute dtype) and the reduce-scatter's input copy of it (reduce dtype fp32): root * act_bytes +
    trainable * (act_bytes + 4). For MiniLM (12.1M of its 22.7M parameters in the root, fp32) 138 MiB
    per process, the block-sized buffer alone had 27."""
    return root_params * act_bytes + root_trainable * (act_bytes + 4)


def comm_overhead(strategy: str, *, grad_bytes: float, largest_layer_params: int, act_bytes: int = 2,
                  n: int = 1, total_params: float = 0, trainable: float = 0, whole_bucket: bool = True,
                  offload: bool = False) -> float:
    """Communication buffers: DDP's gradient buckets (a second copy of the gradients), ZeRO-1/2's
    reduce bucket (one bucket of gradients at a time, bounded by the gradients themselves), ZeRO-3's
    own buffers (`zero3_buffers`, from `total_params` / `trainable`), and for FSDP2 the gathered
    weights and their gradients of the block being computed plus the next one (prefetch)."""
    if strategy == "zero3":  # DeepSpeed runs stage 3's gathers and bucket in one process too
        return zero3_buffers(total_params, trainable, n=n, act_bytes=act_bytes, whole_bucket=whole_bucket,
                             offload=offload)["total"]
    if n <= 1:
        return 0.0
    if strategy == "ddp":
        return grad_bytes
    if strategy in ("zero1", "zero2"):
        return min(grad_bytes, 5e8 * act_bytes)  # DeepSpeed's reduce_bucket_size default, 5e8 elements
    return 2 * 2 * largest_layer_params * act_bytes


# DeepSpeed 0.19's ZeRO-3 defaults (deepspeed/runtime/zero/config.py; the DeepSpeed config JSON docs), but
# the persistence threshold, which tunelab's distributed/zero.py sets to 0 (every parameter partitioned)
ZERO3_DEFAULTS = {"reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7, "stage3_max_live_parameters": 1e9,
                  "stage3_max_reuse_distance": 1e9, "stage3_param_persistence_threshold": 0, "sub_group_size": 1e9}


def zero3_gathered(total_params: float, *, reuse_distance: float = ZERO3_DEFAULTS["stage3_max_reuse_distance"],
                   prefetch: float = ZERO3_DEFAULTS["stage3_prefetch_bucket_size"],
                   max_live: float = ZERO3_DEFAULTS["stage3_max_live_parameters"]) -> float:
    """Parameters ZeRO-3 holds gathered whole at its peak, the turn from forward to backward.

    After its first step (the traced one) DeepSpeed releases a module's parameters after use only when
    they are not used again within `stage3_max_reuse_distance` parameters of the trace
    (partitioned_param_coordinator.__params_to_release). Forward ends with the last blocks, which
    backward uses first: a parameter d parameters before the end of forward is used again about 2d
    later, so the last reuse_distance / 2 stay gathered, and the prefetch (`stage3_prefetch_bucket_size`,
    while fewer than `stage3_max_live_parameters` are live) fetches the next ones backward needs.
    A model under that, MiniLM's 22.7M, stays gathered whole from forward to the end of backward."""
    prefetched = min(prefetch, max(0.0, max_live - reuse_distance / 2))
    return min(total_params, reuse_distance / 2 + prefetched)


def zero3_buffers(total_params: float, trainable: float, *, n: int, act_bytes: int = 2, whole_bucket: bool = True,
                  offload: bool = False, reduce_bucket: float = ZERO3_DEFAULTS["reduce_bucket_size"],
                  sub_group: float = ZERO3_DEFAULTS["sub_group_size"]) -> dict:
    """Bytes per process DeepSpeed's ZeRO-3 keeps beyond the partitioned model states (stage3.py):

    - `gathered`: the whole parameters held at the peak (`zero3_gathered`), in the compute dtype;
    - `bucket`: the contiguous gradient bucket each backward copies the gradients into before their
      reduce-scatter, `reduce_bucket_size` elements of the communication dtype (the compute dtype),
      allocated whole at start (torch.empty: on the CPU only the pages written count, the gradients
      of min(bucket, trainable) parameters; `whole_bucket` False);
    - `reduce_scatter`: a full bucket's reduce-scatter (comm.coalesced_collectives.reduce_scatter_coalesced)
      concatenates its gradients' padded partitions into one flat input and writes this process's
      partition out: min(bucket, trainable) x (1 + 1/N) elements while the bucket is still held;
    - `fp32_gradients`: the fp32 gradient the optimizer steps each sub-group with (initialize_optimizer_states'
      gradient_buffer, held through the first step; then each step's flattened copy,
      _prepare_fp32_grad_for_sub_group): the largest sub-group's partition, at most `sub_group_size`
      elements; taken as all of this process's trainable partition, one parameter group; on the host
      under `offload` (offload_optimizer: the optimizer steps its partition there).

    One process (n = 1) keeps them too: stage 3 gathers, buckets and partitions at any world size.

    Measured (MiniLM, fp32, 2 gloo processes, /proc per phase): all 22.7M parameters gathered at the end
    of forward (86.6 MB), the bucket's 1907 MB allocated and 86.6 MB of it written, the partitions
    (43.3 MB each) as planned; peak RSS in the second backward, 1106 MB."""
    gathered = zero3_gathered(total_params) * act_bytes
    filled = min(reduce_bucket, trainable)
    bucket = (reduce_bucket if whole_bucket else filled) * act_bytes
    reduce_scatter = filled * (1 + 1 / n) * act_bytes
    fp32_gradients = 0.0 if offload else min(trainable / n, sub_group) * 4
    return {"gathered": gathered, "bucket": bucket, "reduce_scatter": reduce_scatter, "fp32_gradients": fp32_gradients,
            "total": gathered + bucket + reduce_scatter + fp32_gradients}
