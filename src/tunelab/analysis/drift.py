"""Weight drift: how far a fine-tuned model (or a LoRA adapter) moved from its base, tensor by tensor.

Why: forgetting lives in the layers that moved furthest from their pre-trained weights, and a
run that "worked" can still have bulldozed half the network. These numbers say where.

For each parameter tensor W of the fine-tuned model and its base counterpart W0 (float64, CPU):

- relative change  ||W - W0||_F / ||W0||_F
- cosine           <W, W0> / (||W||_F ||W0||_F)
- delta norm       ||W - W0||_F

A layer (`bert.encoder.layer.3`, `model.layers.7`, `bert.embeddings`, `classifier`) and the whole
model are measured as one long vector made of their tensors, so the sums of squares and dot
products simply add up. Tensors without a base counterpart (a new classification head) are
reported as `new`, never as drift; base tensors the model lacks as `missing`.

A LoRA adapter folder is measured without merging the model: each adapted matrix's effective
change is peft's `get_delta_weight`, scale * B @ A (scale = alpha / r, or alpha / sqrt(r) with
rsLoRA; transposed for fan_in_fan_out layers), and DoRA's merged weight m * (W0 + dW) / ||W0 + dW||
(row norms) minus W0, the same formulas peft's merge applies. The tensors an adapter leaves alone
still count in their layer's and the model's norm, so the layer and overall figures of an adapter
equal those of its merged model and compare with a full fine-tune's.

Memory: tensors are read one at a time from the safetensors files (`safe_open`) and summed in
float64 chunks, so a base tensor and its counterpart are held at once, not two models.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.errors import InputError

DEFAULT_TOP = 10
# a layer that moved by more than a tenth of its norm: far beyond a typical fine-tune (~0.1-2%)
DEFAULT_THRESHOLD = 0.1
# what the report computes by itself at the end of a run; bigger bases: `tunelab drift RUN`
REPORT_MAX_BASE_BYTES = 2 * 2**30
# task heads that are meant to move (they start from scratch or are re-purposed): never flagged
HEAD_NAMES = {"classifier", "score", "qa_outputs"}
CHUNK = 1 << 22
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
ADAPTER_PREFIX = "base_model.model."
_BLOCK = re.compile(r"^((?:.*?\.)?(?:layer|layers|h|blocks|block)\.\d+)\.")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|"
                       r"lora_embedding_B|lora_magnitude_vector(?:\.weight)?)$")


# ---------------------------------------------------------------- the numbers


@dataclass
class Sums:
    """Sums that add up over tensors: ||W0||^2, ||W||^2, <W, W0>, ||W - W0||^2 and the element count."""

    base_sq: float = 0.0
    model_sq: float = 0.0
    dot: float = 0.0
    delta_sq: float = 0.0
    params: int = 0
    tensors: int = 0

    @classmethod
    def of(cls, w0, *, w=None, delta=None) -> "Sums":
        """From a base tensor and either the tuned tensor or the change, in float64 chunks of CHUNK elements
        (so a 50k-row embedding costs no float64 copies of itself); ||dW||^2 sums the change itself, never
        ||W||^2 - 2<W, W0> + ||W0||^2, which cancels for small changes."""
        w0 = w0.reshape(-1)
        other = (w if delta is None else delta).reshape(-1)
        out = cls(params=w0.numel(), tensors=1)
        for i in range(0, w0.numel(), CHUNK):
            a = w0[i:i + CHUNK].double()
            if delta is None:
                b = other[i:i + CHUNK].double()
                d = b - a
            else:
                d = other[i:i + CHUNK].double()
                b = a + d
            out.base_sq += float(a @ a)
            out.model_sq += float(b @ b)
            out.dot += float(b @ a)
            out.delta_sq += float(d @ d)
        return out

    @classmethod
    def unchanged(cls, w0) -> "Sums":
        """A tensor that did not move: W = W0."""
        w0 = w0.reshape(-1)
        sq = sum(float(c @ c) for c in (w0[i:i + CHUNK].double() for i in range(0, w0.numel(), CHUNK)))
        return cls(sq, sq, sq, 0.0, w0.numel(), 1)

    def __add__(self, o: "Sums") -> "Sums":
        return Sums(self.base_sq + o.base_sq, self.model_sq + o.model_sq, self.dot + o.dot,
                    self.delta_sq + o.delta_sq, self.params + o.params, self.tensors + o.tensors)

    def measures(self) -> dict:
        """relative_change and cosine are None where undefined (a zero base, e.g. a bias initialised to 0)."""
        base, model = math.sqrt(self.base_sq), math.sqrt(self.model_sq)
        rel = math.sqrt(self.delta_sq) / base if base > 0 else None
        cos = max(-1.0, min(1.0, self.dot / (base * model))) if base > 0 and model > 0 else None
        return {"relative_change": _finite(rel), "cosine": _finite(cos), "delta_norm": _finite(math.sqrt(self.delta_sq)),
                "base_norm": _finite(base), "params": self.params, "tensors": self.tensors}


def _finite(x):
    """JSON has no NaN: a weight that went NaN/Inf shows as the string 'nan'/'inf'."""
    return x if x is None or math.isfinite(x) else str(x)


def lora_delta(a, b, scale: float, *, fan_in_fan_out: bool = False, embedding: bool = False):
    """peft's `get_delta_weight` for Linear (and Embedding) LoRA layers: scale * B @ A, in W's layout."""
    delta = (b @ a) * scale
    return delta.T if (fan_in_fan_out or embedding) else delta


def dora_delta(w0, delta, magnitude, *, fan_in_fan_out: bool = False):
    """DoRA's merged weight minus W0: m * (W0 + dW) / ||W0 + dW||, norms per output row (peft's merge)."""
    if fan_in_fan_out:
        w0, delta = w0.T, delta.T
    merged = w0 + delta
    merged = (magnitude / merged.norm(dim=1)).reshape(-1, 1) * merged
    out = merged - w0
    return out.T if fan_in_fan_out else out


def lora_scale(module: str, rank: int, adapter_config: dict) -> float:
    """alpha / r (alpha / sqrt(r) with rsLoRA), alpha looked up in alpha_pattern as peft does
    (`adapter_config`: the adapter's adapter_config.json)."""
    from tunelab.models.quantization import quiet_bitsandbytes

    quiet_bitsandbytes()  # peft imports bitsandbytes, which warns about a kernel tunelab does not use
    from peft.utils.other import get_pattern_key

    patterns = adapter_config.get("alpha_pattern") or {}
    alpha = patterns.get(get_pattern_key(patterns.keys(), module), adapter_config["lora_alpha"])
    return alpha / math.sqrt(rank) if adapter_config.get("use_rslora") else alpha / rank


# ---------------------------------------------------------------- names


def block_of(name: str) -> str:
    """The layer a tensor belongs to: `...layer.3` / `...layers.7` / `...h.2`, else its first two module names."""
    m = _BLOCK.match(name)
    if m:
        return m.group(1)
    module = name.split(".")[:-1] or [name]
    return ".".join(module[:2])


def natural_key(s: str) -> list:
    """`layer.2` before `layer.10`."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def align_keys(keys, base_keys) -> dict[str, str | None]:
    """Each model key's base key, or None. A task model wraps its base (`bert.` + a BertModel's keys),
    so the one prefix to strip (or add) is the one that matches the most keys."""
    base = set(base_keys)
    best, best_hits = (lambda k: k), sum(k in base for k in keys)
    for p in {k.split(".", 1)[0] + "." for k in keys if "." in k}:
        hits = sum(k.startswith(p) and k[len(p):] in base for k in keys)
        if hits > best_hits:
            best, best_hits = (lambda k, p=p: k[len(p):] if k.startswith(p) else k), hits
    for p in {k.split(".", 1)[0] + "." for k in base if "." in k}:
        hits = sum(p + k in base for k in keys)
        if hits > best_hits:
            best, best_hits = (lambda k, p=p: p + k), hits
    return {k: k if k in base else (best(k) if best(k) in base else None) for k in keys}


# ---------------------------------------------------------------- reading


class Weights:
    """The tensors of a folder's *.safetensors files (sharded or not), read one at a time.

    Each read opens its file and closes it again: safe_open maps the whole file, and every page a
    read touches stays in this process's resident set until the handle closes, so handles kept open
    over a whole comparison held both models in RSS (measured on SmolLM2-135M: +538 MB per file, the
    report phase's peak of a run); per tensor the header is parsed again (a few KB: well under 1 ms).
    """

    def __init__(self, files: list[Path]):
        from safetensors import SafetensorError, safe_open

        self.where, self._meta, self._float = {}, {}, None
        for f in files:
            try:
                with safe_open(f, framework="pt") as handle:
                    for k in handle.keys():
                        part = handle.get_slice(k)
                        self.where[k], self._meta[k] = f, (part.get_dtype(), tuple(part.get_shape()))
            except (SafetensorError, OSError, ValueError) as e:
                raise InputError(f"not a valid safetensors file ({str(e).splitlines()[0][:200]})", file=f) from None

    def float_keys(self) -> list[str]:
        """Parameter tensors in natural order; integer buffers (position ids) are not weights."""
        if self._float is None:
            self._float = sorted((k for k in self.where if self._meta[k][0] in FLOAT_DTYPES), key=natural_key)
        return self._float

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][1]

    def get(self, key: str):
        from safetensors import safe_open

        with safe_open(self.where[key], framework="pt") as handle:
            return handle.get_tensor(key)


def safetensors_files(folder: Path, what: str) -> list[Path]:
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise InputError(f"{what} has no *.safetensors weights (drift reads safetensors only)", file=folder)
    return files


# ---------------------------------------------------------------- comparing


@dataclass
class Comparison:
    """Per-tensor sums plus what could not be compared."""

    rows: list[tuple[str, tuple, Sums, dict]]  # (name, shape, sums, extra fields)
    new: list[dict]
    missing: list[str]
    resized: list[dict]
    # tensors an adapter leaves as they are: they count in their layer's and the model's norm, not as rows
    unchanged: list[tuple[str, Sums]] = field(default_factory=list)


def compare_full(model: Weights, base: Weights) -> Comparison:
    """Every float tensor of a fine-tuned model against its base counterpart."""
    keys = model.float_keys()
    mapping = align_keys(keys, base.float_keys())
    rows, new, resized = [], [], []
    for key in keys:
        bkey = mapping[key]
        if bkey is None:
            new.append({"name": key, "shape": list(model.shape(key))})
            continue
        w, w0 = model.get(key), base.get(bkey)
        if w.shape != w0.shape:
            if w.dim() != w0.dim() or w.shape[1:] != w0.shape[1:]:
                resized.append({"name": key, "base_shape": list(w0.shape), "shape": list(w.shape), "compared_rows": 0})
                continue
            n = min(w.shape[0], w0.shape[0])  # a resized vocabulary: compare the rows both have
            resized.append({"name": key, "base_shape": list(w0.shape), "shape": list(w.shape), "compared_rows": n})
            w, w0 = w[:n], w0[:n]
        rows.append((key, tuple(w.shape), Sums.of(w0, w=w), {}))
        del w, w0
    used = {v for v in mapping.values() if v is not None}
    missing = [k for k in base.float_keys() if k not in used]
    return Comparison(rows, new, missing, resized)


def _adapter_parts(keys) -> tuple[dict[str, dict[str, str]], list[str]]:
    """{module: {part: key}} for LoRA tensors, and the fully saved tensors (peft modules_to_save)."""
    modules, full = {}, []
    for key in keys:
        m = _LORA_KEY.match(key)
        if m:
            part = m.group("part").split(".")[0] + ("_bias" if m.group("part") == "lora_B.bias" else "")
            modules.setdefault(m.group("module").removeprefix(ADAPTER_PREFIX), {})[part] = key
        elif ".lora_" in key:
            raise InputError(f"adapter tensor {key} is not a LoRA matrix that drift knows")
        else:
            full.append(key)
    return modules, full


def compare_adapter(adapter_dir: Path, adapter: Weights, base: Weights) -> tuple[Comparison, dict]:
    """Each adapted matrix's effective change (no merge), plus the adapter's fully saved tensors (a head)."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise InputError(f"drift reads LoRA adapters; this one is {cfg.get('peft_type')}", file=adapter_dir)
    modules, full = _adapter_parts(adapter.where)
    own = [m + ".weight" for m in modules] + [m + ".bias" for m in modules if "lora_B_bias" in modules[m]]
    mapping = align_keys(own + [k.removeprefix(ADAPTER_PREFIX) for k in full], base.float_keys())
    rows = []
    fif = bool(cfg.get("fan_in_fan_out"))
    for module in sorted(modules, key=natural_key):
        parts, wkey = modules[module], module + ".weight"
        if mapping[wkey] is None:
            raise InputError(f"the adapter changes {module}, which the base model lacks (wrong base?)", file=adapter_dir)
        w0 = base.get(mapping[wkey]).double()
        embedding = "lora_embedding_A" in parts
        a = adapter.get(parts["lora_embedding_A" if embedding else "lora_A"]).double()
        b = adapter.get(parts["lora_embedding_B" if embedding else "lora_B"]).double()
        scale = lora_scale(module, a.shape[0], cfg)
        delta = lora_delta(a, b, scale, fan_in_fan_out=fif, embedding=embedding)
        if "lora_magnitude_vector" in parts:
            if embedding:
                raise InputError(f"DoRA on an embedding ({module}) is not supported by drift", file=adapter_dir)
            magnitude = adapter.get(parts["lora_magnitude_vector"]).double()
            delta = dora_delta(w0, delta, magnitude, fan_in_fan_out=fif)
        rows.append((wkey, tuple(w0.shape), Sums.of(w0, delta=delta), {"rank": a.shape[0], "scale": scale}))
        if "lora_B_bias" in parts and mapping[module + ".bias"] is not None:
            b0 = base.get(mapping[module + ".bias"])
            bias_delta = adapter.get(parts["lora_B_bias"]).double() * scale
            rows.append((module + ".bias", tuple(b0.shape), Sums.of(b0, delta=bias_delta), {}))
    new = []
    for key in full:
        name = key.removeprefix(ADAPTER_PREFIX)
        if mapping[name] is None or base.shape(mapping[name]) != adapter.shape(key):
            new.append({"name": name, "shape": list(adapter.shape(key))})
        else:
            w0 = base.get(mapping[name])
            rows.append((name, tuple(w0.shape), Sums.of(w0, w=adapter.get(key)), {"saved_in_full": True}))
    info = {"r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"), "use_rslora": bool(cfg.get("use_rslora")),
            "use_dora": bool(cfg.get("use_dora")), "adapted_matrices": len(modules)}
    return Comparison(rows, new, [], [], _unchanged(base, mapping)), info


def _unchanged(base: Weights, mapping: dict[str, str | None]) -> list[tuple[str, Sums]]:
    """The base tensors an adapter does not touch, named as in the adapted model (the prefix `mapping` found)."""
    k, v = next(((k, v) for k, v in mapping.items() if v is not None), ("", ""))
    add = k[: len(k) - len(v)] if k != v and k.endswith(v) else ""  # the model wraps the base: `bert.` + key
    strip = v[: len(v) - len(k)] if k != v and v.endswith(k) else ""
    used = {v for v in mapping.values() if v is not None}
    return [(add + key.removeprefix(strip), Sums.unchanged(base.get(key)))
            for key in base.float_keys() if key not in used]


# ---------------------------------------------------------------- summary


def summarize(comparison: Comparison, *, top: int, threshold: float) -> dict:
    """Per tensor, per layer and overall measures; the top-k layers; layers past the threshold, each with a reason."""
    tensors, layers, overall = [], {}, Sums()
    for name, shape, sums, extra in comparison.rows:
        block = block_of(name)
        tensors.append({"name": name, "layer": block, "shape": list(shape), **sums.measures(), **extra})
        layers[block] = layers.get(block, Sums()) + sums
        overall = overall + sums
    for name, sums in comparison.unchanged:
        layers[block_of(name)] = layers.get(block_of(name), Sums()) + sums
        overall = overall + sums
    layer_rows = [{"layer": b, **layers[b].measures()} for b in sorted(layers, key=natural_key)]
    ranked = sorted((r for r in layer_rows if r["relative_change"] not in (None, 0.0)),  # layers that moved
                    key=lambda r: -math.inf if isinstance(r["relative_change"], str) else -r["relative_change"])
    flagged = []
    for r in layer_rows:
        rel = r["relative_change"]
        if r["layer"].rsplit(".", 1)[-1] in HEAD_NAMES or rel is None:
            continue
        if isinstance(rel, str):
            flagged.append({"layer": r["layer"], "relative_change": rel,
                            "reason": "its weights hold NaN/Inf: the run diverged"})
        elif rel > threshold:
            flagged.append({"layer": r["layer"], "relative_change": rel,
                            "reason": f"moved {rel:.3g} of its norm (> {threshold:g}) from the pre-trained weights: "
                                      "forgetting risk; try a lower lr, fewer steps, L2-SP/EWC or freezing it"})
    return {"threshold": threshold, "overall": overall.measures(),
            "top_layers": ranked[:top], "flagged": flagged, "layers": layer_rows, "tensors": tensors,
            "new": comparison.new, "missing": comparison.missing, "resized": comparison.resized}


# ---------------------------------------------------------------- what to compare with what


@dataclass
class DriftInputs:
    """A located comparison: the fine-tuned folder (model or adapter), the base name and where it came from."""

    model_dir: Path
    base_name: str
    base_from: str  # "--base", or the file that names the base: the run's config, the adapter's info
    revision: str | None = None
    is_adapter: bool = False
    base_field: str = "model.name"  # the key that names it in `base_from`


def _is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() and any((path / n).exists() for n in ("final", "metrics.jsonl", "summary.json"))


def _run_config_model(config: Path) -> tuple[str, str | None]:
    import yaml

    try:
        model = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("model") or {}
    except (OSError, ValueError, yaml.YAMLError, AttributeError) as e:
        raise InputError(f"cannot read the run's config ({type(e).__name__})", file=config) from None
    if not isinstance(model, dict) or not model.get("name"):
        raise InputError("the run's config names no base model", file=config, field="model.name")
    return str(model["name"]), model.get("revision")


def locate(path: str | Path, base: str | None = None) -> DriftInputs:
    """A run dir (its final/ against the base its config.yaml names), a run's final/, an adapter folder
    (its tunelab_adapter.json names the base) or a bare model folder (needs `base`)."""
    path = Path(path)
    if not path.exists():
        raise InputError("not found", file=path)
    if not path.is_dir():
        raise InputError("expected a run dir or a model folder, found a file", file=path)
    run_dir = path if _is_run_dir(path) else path.parent if _is_run_dir(path.parent) and path.name == "final" else None
    model_dir = path / "final" if run_dir == path else path
    if run_dir == path and not model_dir.is_dir():
        raise InputError("run dir has no final/ (the run has not finished; resume it with tunelab train --resume auto)",
                         file=path)
    is_adapter = (model_dir / "adapter_config.json").is_file()
    if not is_adapter and not (model_dir / "config.json").is_file():
        raise InputError("not a run dir (config.yaml + final/), a model folder (config.json) "
                         "nor an adapter folder (adapter_config.json)", file=path)
    if base:
        return DriftInputs(model_dir, base, "--base", None, is_adapter)
    if run_dir is not None:
        name, revision = _run_config_model(run_dir / "config.yaml")
        return DriftInputs(model_dir, name, str(run_dir / "config.yaml"), revision, is_adapter)
    if is_adapter:
        for info_file, key in (("tunelab_adapter.json", "base_model"), ("adapter_config.json", "base_model_name_or_path")):
            if (model_dir / info_file).is_file():
                name = json.loads((model_dir / info_file).read_text()).get(key)
                if name:
                    return DriftInputs(model_dir, name, str(model_dir / info_file), None, True, key)
    raise InputError("the base model is unknown for a bare model folder; pass --base NAME_OR_PATH", file=path)


def base_folder(inputs: DriftInputs, *, prepare: bool = True) -> Path:
    """The base's local folder: embedded, local, a converted GGUF or a hub snapshot. `prepare=False` never
    downloads or converts (then only what is already here counts)."""
    from tunelab.models.registry import resolve_model

    try:
        source = resolve_model(inputs.base_name)
    except InputError as e:
        if inputs.base_from == "--base":
            raise InputError(e.message, file=e.file, where="--base") from None
        named = f" ({e.file})" if e.file else ""
        raise InputError(f"base model: {e.message}{named}", file=inputs.base_from, field=inputs.base_field) from None
    if source.gguf_file:
        from tunelab.models.gguf import MARKER, converted_folder, plain_source

        done = converted_folder(Path(source.path) / source.gguf_file)
        if not prepare and not (done / MARKER).is_file():
            raise InputError(f"base {inputs.base_name} is a GGUF not converted yet; `tunelab drift` converts it")
        return Path(plain_source(source).path)
    if source.is_hub:
        return _hub_snapshot(source.path, inputs.revision, local_only=not prepare)
    return Path(source.path)


def _hub_snapshot(repo_id: str, revision: str | None, *, local_only: bool) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=local_only,
                                      allow_patterns=["*.safetensors", "*.json"]))
    except Exception as e:  # offline, not cached, no such repo: all mean "not available here"
        raise InputError(f"base {repo_id} is not available locally ({type(e).__name__}); "
                         "download it or pass --base with a local folder") from None


@contextmanager
def _one_thread():
    """These sums are memory-bound passes over each tensor; on a busy 2-core machine every multi-threaded
    op paid ~8 ms of thread hand-off (measured: SmolLM2-135M drift 13.7 s with 2 threads, 0.6 s with 1)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def compute_drift(inputs: DriftInputs, base_dir: Path, *, top: int = DEFAULT_TOP,
                  threshold: float = DEFAULT_THRESHOLD) -> dict:
    """The drift of a located model against a local base folder (see the module docstring)."""
    with ExitStack() as stack:
        stack.enter_context(_one_thread())
        base = Weights(safetensors_files(base_dir, "base model folder"))
        if inputs.is_adapter:
            adapter = Weights(safetensors_files(inputs.model_dir, "adapter folder"))
            comparison, lora = compare_adapter(inputs.model_dir, adapter, base)
        else:
            comparison, lora = compare_full(Weights(safetensors_files(inputs.model_dir, "model folder")), base), None
    if not comparison.rows:
        raise InputError(f"no tensor of the model matches the base {inputs.base_name} (wrong base?)", file=inputs.model_dir)
    out = {"model": str(inputs.model_dir), "base": inputs.base_name, "base_path": str(base_dir),
           "kind": "lora" if inputs.is_adapter else "full"}
    if lora:
        out["adapter"] = lora
    return {**out, **summarize(comparison, top=top, threshold=threshold)}


def weight_drift(path: str | Path, base: str | None = None, *, top: int = DEFAULT_TOP,
                 threshold: float = DEFAULT_THRESHOLD, prepare: bool = True) -> dict:
    """Drift of a run dir's final/, an adapter or a model folder against its base (`base` overrides)."""
    inputs = locate(path, base)
    return compute_drift(inputs, base_folder(inputs, prepare=prepare), top=top, threshold=threshold)


def drift_for_report(run_dir: str | Path, *, top: int = DEFAULT_TOP,
                     max_base_bytes: int = REPORT_MAX_BASE_BYTES) -> tuple[dict | None, str | None]:
    """(drift, None) when it is cheap here (final/ exists, the base is local and not huge), else (None, why).

    Never raises: a report must not fail because its drift section cannot be computed.
    """
    try:
        inputs = locate(run_dir)
        folder = base_folder(inputs, prepare=False)
        size = sum(f.stat().st_size for f in safetensors_files(folder, "base model folder"))
        if size > max_base_bytes:
            return None, (f"base weights are {size / 2**30:.1f} GiB, more than the report computes by itself; "
                          f"run `tunelab drift {run_dir}`")
        return compute_drift(inputs, folder, top=top), None
    except InputError as e:
        return None, e.one_line()
    except Exception as e:  # noqa: BLE001 - the report goes on without this section, saying why
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def format_drift(d: dict) -> str:
    """A few lines for the terminal: overall, the top layers, new tensors, flags."""
    def num(x, digits: str = ".4g"):
        return format(x, digits) if isinstance(x, float) else str(x)

    o = d["overall"]
    kind = "LoRA adapter" if d["kind"] == "lora" else "full fine-tune"
    lines = [f"{d['model']} vs base {d['base']} ({kind}): relative change {num(o['relative_change'])}, "
             f"cosine {num(o['cosine'], '.6f')}, {o['tensors']} tensors, {o['params']} params"]
    lines.append(f"{'layer':<44} {'rel. change':>12} {'cosine':>10} {'|dW|':>10}")
    for r in d["top_layers"]:
        lines.append(f"{r['layer']:<44} {num(r['relative_change']):>12} {num(r['cosine'], '.6f'):>10} "
                     f"{num(r['delta_norm']):>10}")
    if d["new"]:
        lines.append("new (no base counterpart, not drift): " + ", ".join(t["name"] for t in d["new"]))
    if d["missing"]:
        lines.append(f"missing (in the base only): {len(d['missing'])} tensors, e.g. {d['missing'][0]}")
    for f in d["flagged"]:
        lines.append(f"FLAG {f['layer']}: {f['reason']}")
    return "\n".join(lines)
