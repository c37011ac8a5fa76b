"""final/README.md: a Hugging Face model card for what a run shipped (a full model or a LoRA adapter).

The card follows the Hub's format (YAML metadata between `---` lines, then Markdown): the base
model by name (an embedded model's Hub id, a Hub id, or a local folder's name, never an absolute
path of this machine), task, method, data sizes, metrics before and after, the hyperparameters
that matter, the training command and the library versions. It is written from summary.json's
dict and the resolved config, so it says only what the run measured.
"""

from __future__ import annotations

import importlib.metadata as md
import shlex
import sys
from pathlib import Path

from tunelab.models.registry import EMBEDDED_ORIGIN  # re-exported: where the embedded models come from

PIPELINE = {"classification": "text-classification", "causal_lm": "text-generation", "chat": "text-generation"}
# the card's results table (summary.json has every measure)
CARD_METRICS = ("loss", "accuracy", "macro_f1", "perplexity", "token_accuracy", "gen_stop_rate", "gen_chrf", "gen_rouge_l")
VERSIONED = ("tunelab", "torch", "transformers", "peft", "tokenizers", "safetensors", "bitsandbytes")


def base_model_name(name: str) -> str:
    """A model as a person names it: the embedded name, a Hub id, or a local folder's portable name
    (relative to $TUNELAB_MODEL_ROOT, else its own name), never this machine's absolute path."""
    from tunelab.models.base_ref import portable_reference

    ref = portable_reference(name)
    return {"embedded": ref.get("name"), "hub": ref.get("id")}.get(ref["kind"]) or ref.get("relative") or ref["name"]


def base_model_hub_id(name: str) -> str | None:
    """The Hub id for the card's `base_model` field, when there is one (local folders have none)."""
    from tunelab.models.base_ref import portable_reference

    ref = portable_reference(name)
    return EMBEDDED_ORIGIN.get(ref.get("name")) if ref["kind"] == "embedded" else ref.get("id")


def human_count(n: int | None) -> str:
    """22.7M, 1.2k, 46: a parameter count as a person reads it."""
    if n is None:
        return "?"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def data_rows(info: dict) -> tuple[int | None, int | None]:
    """(train rows, eval rows) from a task's info dict (classification or LM)."""
    train = info.get("train_rows")
    if train is None and isinstance(info.get("train"), dict):
        train = info["train"].get("examples")
    evals = info.get("eval_rows")
    if evals is None and isinstance(info.get("eval"), dict):
        evals = info["eval"].get("examples")
    return train, evals


def training_command(argv: list[str] | None = None) -> str | None:
    """The command line that ran this training, when it was the tunelab CLI (not a library call)."""
    argv = sys.argv if argv is None else argv
    if not argv or Path(argv[0]).name not in ("tunelab", "cli.py") or "train" not in argv:
        return None
    return shlex.join(["tunelab", *argv[1:]])


def versions() -> dict[str, str]:
    out = {}
    for name in VERSIONED:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def _num(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3g}"
    return "–" if v is None else str(v)


def _front_matter(summary: dict, cfg, adapter: bool) -> list[str]:
    hub = base_model_hub_id(cfg.model.name)
    tags = ["tunelab", cfg.task.replace("_", "-"), cfg.method.replace("_", "-")]
    lines = ["---", f"library_name: {'peft' if adapter else 'transformers'}"]
    if hub:
        lines.append(f"base_model: {hub}")
    lines.append(f"pipeline_tag: {PIPELINE.get(cfg.task, 'text-generation')}")
    lines += ["tags:"] + [f"- {t}" for t in dict.fromkeys(tags)] + ["---", ""]
    return lines


def _metrics_table(summary: dict) -> list[str]:
    before, final = summary.get("before") or {}, summary.get("final") or {}
    keys = [k for k in CARD_METRICS if isinstance(final.get(k), (int, float)) and not isinstance(final.get(k), bool)]
    if not keys:
        return ["No evaluation was run (no eval data)." if not final else "No scalar metrics."]
    out = ["| metric | before training | after training |", "|---|---|---|"]
    out += [f"| {k} | {_num(before.get('eval_' + k))} | {_num(final[k])} |" for k in keys]
    return out


def _hyperparameters(cfg, summary: dict) -> list[str]:
    t, o, s = cfg.train, cfg.optim, cfg.schedule
    rows = [("learning rate", o.lr), ("schedule", f"{s.name}, warmup ratio {s.warmup_ratio}"),
            ("epochs", t.epochs), ("optimizer steps", summary.get("steps")),
            ("batch", f"{t.batch_size} x {t.grad_accum} accumulation x {summary.get('world_size', 1)} processes "
                      f"= {summary.get('global_batch_size')}"),
            ("precision", summary.get("precision")), ("max length", cfg.model.max_length),
            ("weight decay", o.weight_decay), ("max grad norm", t.max_grad_norm), ("seed", t.seed)]
    if cfg.method in ("lora", "qlora"):
        lo = cfg.lora
        rows.append(("LoRA", f"r {lo.r}, alpha {lo.alpha}, dropout {lo.dropout}, targets {lo.target_modules}"
                             + (", rsLoRA" if lo.rslora else "") + (", DoRA" if lo.dora else "")))
    return ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]


def _usage(cfg, adapter: bool, hub: str | None) -> list[str]:
    auto = "AutoModelForSequenceClassification" if cfg.task == "classification" else "AutoModelForCausalLM"
    if adapter:
        return ["```python", "from peft import PeftModel", f"from transformers import AutoTokenizer, {auto}", "",
                f"base = {auto}.from_pretrained({(hub or '<the base model folder>')!r})",
                "model = PeftModel.from_pretrained(base, 'path/to/this/folder')",
                "tokenizer = AutoTokenizer.from_pretrained('path/to/this/folder')", "```", "",
                "Or with tunelab, which rebuilds the base from `tunelab_adapter.json`: "
                f"`tunelab {'eval FOLDER --data FILE' if cfg.task == 'classification' else 'generate FOLDER --prompt TEXT'}`;"
                " `tunelab merge` folds the adapter into a plain model."]
    return ["```python", f"from transformers import AutoTokenizer, {auto}", "",
            f"model = {auto}.from_pretrained('path/to/this/folder')",
            "tokenizer = AutoTokenizer.from_pretrained('path/to/this/folder')", "```"]


def model_card(summary: dict, cfg, *, adapter: bool, command: str | None = None, run_name: str = "") -> str:
    """The card's text (see the module docstring)."""
    base, hub = base_model_name(cfg.model.name), base_model_hub_id(cfg.model.name)
    train_rows, eval_rows = data_rows(summary.get("data") or {})
    method = {"lora": "LoRA adapter", "qlora": "QLoRA adapter (4-bit NF4 base)", "full": "full fine-tune",
              "freeze": "partial fine-tune (frozen layers)",
              "feature_extraction": "feature extraction (frozen backbone, new head)"}.get(cfg.method, cfg.method)
    origin = f" ([{hub}](https://huggingface.co/{hub}))" if hub and hub != base else ""
    lines = _front_matter(summary, cfg, adapter) + [
        f"# {run_name or base + '-finetuned'}", "",
        f"A {method} of **{base}**{origin} for **{cfg.task}**, trained with "
        f"[tunelab](https://pypi.org/project/tunelab/).", "",
        "## Training data", "",
        f"- training rows: {train_rows if train_rows is not None else 'unknown'}",
        f"- evaluation rows: {eval_rows if eval_rows is not None else 'none (no evaluation)'}",
    ]
    labels = (summary.get("data") or {}).get("labels")
    if labels:
        lines.append(f"- labels: {', '.join(map(str, labels))}")
    lines += ["", "## Results", "", *_metrics_table(summary), ""]
    best = summary.get("best") or {}
    if best.get("value") is not None:
        lines += [f"Best {best.get('metric')}: {_num(best.get('value'))} at step {best.get('step')}; "
                  f"the weights here are {summary.get('final_weights', 'the last step')}.", ""]
    lines += ["## Training", "", *_hyperparameters(cfg, summary), "",
              f"Trainable parameters: {human_count(summary.get('trainable_params'))} of "
              f"{human_count(summary.get('total_params'))} ({summary.get('trainable_percent', 0):.3g}%). "
              f"Status: {summary.get('status')}; {summary.get('wall_seconds', 0):.0f} s on {summary.get('device')}.", "",
              "Command:", "", "```bash", command or "tunelab train config.yaml  # the run dir's config.yaml: every value",
              "```", "", "## How to use", "", *_usage(cfg, adapter, hub), "",
              "## Library versions", ""]
    lines += [f"- {k} {v}" for k, v in versions().items()]
    return "\n".join(lines) + "\n"


def write_model_card(final_dir: Path, summary: dict, cfg, command: str | None = None) -> Path:
    """Write final_dir/README.md; an adapter folder (adapter_config.json) gets a PEFT card."""
    final_dir = Path(final_dir)
    adapter = (final_dir / "adapter_config.json").is_file()
    run_name = final_dir.parent.name
    path = final_dir / "README.md"
    path.write_text(model_card(summary, cfg, adapter=adapter, command=command or training_command(),
                               run_name=run_name), encoding="utf-8")
    return path
