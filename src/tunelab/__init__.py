"""tunelab: fine-tune pre-trained language models on your own data, safely.

The Python API (the same functions the `tunelab` command calls; README "Python API"):

    import tunelab
    result = tunelab.train("config.yaml", train_data=[{"text": "...", "label": "pos"}, ...])
    tunelab.evaluate(result.run_dir, "dev.jsonl")
    model, tokenizer = tunelab.load(result.run_dir)

Errors in the input raise `tunelab.InputError` (file, line, field), as the CLI reports them.
"""

import os as _os

from tunelab.errors import InputError, RunFailure


def _name_deepspeeds_accelerator_on_cpu_machines() -> None:
    """DeepSpeed, imported by accelerate (hence by peft and the zero strategies), prints "Setting
    accelerator to CPU" to stdout through its own handler on every import where it finds no GPU: it
    tears the live display and breaks `--json` stdout. Naming the accelerator it would pick anyway
    keeps it quiet. Only where no NVIDIA or AMD GPU driver is visible; a user's own setting wins."""
    gpu = any(_os.path.exists(p) for p in ("/proc/driver/nvidia/version", "/dev/nvidia0", "/dev/kfd"))
    if not gpu:
        _os.environ.setdefault("DS_ACCELERATOR", "cpu")


_name_deepspeeds_accelerator_on_cpu_machines()

__version__ = "0.1.0"

_API = ("train", "evaluate", "generate", "plan", "load", "RunResult", "Callbacks")
__all__ = [*_API, "Config", "InputError", "RunFailure", "__version__"]


def __getattr__(name: str):
    """The API on first use: `import tunelab` stays light (the CLI starts fast, torch loads when needed)."""
    if name in _API:
        from tunelab import api

        return getattr(api, name)
    if name == "Config":
        from tunelab.config import Config

        return Config
    raise AttributeError(f"module 'tunelab' has no attribute {name!r}")
