"""`tunelab init TASK`: a commented starter config that trains as written once its data paths exist.

Each starter names the command that runs it on its first line, uses an embedded model (no network),
sets only the keys a newcomer decides, and says in a comment what the others default to. Every
starter is loaded through `load_config` by the tests, so it stays valid as the schema changes.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import InputError

COMMON_TAIL = """\
optim:
  lr: {lr}                  # AdamW; weight decay 0.01 (none on biases and norms)
schedule:
  name: cosine              # constant | linear | cosine | wsd; warmup is warmup_ratio of the steps
  warmup_ratio: 0.06
train:
  epochs: {epochs}
  batch_size: {batch}             # per device; the effective batch is batch_size x grad_accum
  grad_accum: 1
  precision: auto           # bf16 where the hardware has it, else fp32
  log_every: 10
  # eval_every: 100         # default: evaluate at each epoch's end
checkpoint:
  metric: {metric}     # the best checkpoint by this; final/ ships it{mode}
early_stopping:
  patience: 3               # evaluations without improvement before stopping
# monitor:
#   loggers: [tensorboard]  # also wandb, mlflow (keys stay in the environment)
# Every key, its default and its limits: tunelab config --list
"""

STARTERS = {
    "classification": ("""\
# tunelab train {path} -o runs/{stem}
#
# Text classification: a JSONL/CSV file with a text column and a label column.
# Check the data first: tunelab data check train.jsonl --eval eval.jsonl
task: classification
model:
  name: minilm              # embedded all-MiniLM-L6-v2; or a local HF folder, or a hub id when online
  max_length: 128           # longer texts are truncated
data:
  train: train.jsonl        # relative to this file
  eval: eval.jsonl          # or leave it out: 10% of train is held out (stratified)
  text_column: text
  label_column: label
method: full                # full | freeze | feature_extraction | lora | qlora
""", {"lr": "5.0e-5", "epochs": 3, "batch": 16, "metric": "eval_accuracy"}),
    "chat": ("""\
# tunelab train {path} -o runs/{stem}
#
# Chat / instruction SFT: conversations (OpenAI messages, ShareGPT, Alpaca or prompt/completion JSONL),
# rendered with the model's own chat template; the loss is on assistant tokens only.
task: chat
model:
  name: smollm2-135m-instruct   # embedded SmolLM2-135M-Instruct; or a local HF folder / hub id
  max_length: 512
data:
  train: train.jsonl
  eval_split: 0.1           # or data.eval: a file of held-out conversations
  format: auto              # detected from the first record
  packing: true             # several conversations per row, never attending across each other
method: lora                # full | lora | qlora
lora:
  r: 16
  alpha: 32
  target_modules: auto      # every attention and MLP projection
""", {"lr": "2.0e-4", "epochs": 2, "batch": 4, "metric": "eval_loss"}),
    "causal_lm": ("""\
# tunelab train {path} -o runs/{stem}
#
# Domain adaptation: plain text (a .txt file or JSONL with a "text" field); every token is supervised.
task: causal_lm
model:
  name: smollm2-135m-instruct
  max_length: 512
data:
  train: corpus.txt
  eval_split: 0.05
  packing: true
method: full                # full | freeze | lora | qlora
# probe:
#   data: general_text.jsonl   # forgetting probe: embedding drift and LM loss before vs after
""", {"lr": "2.0e-5", "epochs": 1, "batch": 4, "metric": "eval_loss"}),
}
TASK_ALIASES = {"classify": "classification", "text-classification": "classification", "sft": "chat",
                "instruct": "chat", "lm": "causal_lm", "causal-lm": "causal_lm", "text": "causal_lm",
                "domain": "causal_lm", "pretrain": "causal_lm"}


def starter_text(task: str, path: Path) -> str:
    task = TASK_ALIASES.get(task, task)
    if task not in STARTERS:
        raise InputError(f"unknown task '{task}': choose one of {', '.join(STARTERS)}", field="TASK")
    head, values = STARTERS[task]
    mode = "\n  mode: min                 # lower is better" if values["metric"] == "eval_loss" else ""
    return head.format(path=path, stem=path.stem) + COMMON_TAIL.format(**values, mode=mode)


def write_starter(task: str, path: Path, force: bool = False) -> dict:
    """Write the starter for `task` to `path` (refusing to overwrite unless `force`)."""
    path = Path(path)
    if path.exists() and not force:
        raise InputError("already exists; choose another -o or pass --force", file=path)
    if not path.parent.exists():
        raise InputError("the folder does not exist", file=path.parent)
    text = starter_text(task, path)
    path.write_text(text, encoding="utf-8")
    return {"config": str(path), "task": TASK_ALIASES.get(task, task),
            "next": f"tunelab train {path} -o runs/{path.stem}"}
