"""tunelab: fine-tune pre-trained language models on your own data, safely.

The Python API (the same functions the `tunelab` command calls; README "Python API"):

    import tunelab
    result = tunelab.train("config.yaml", train_data=[{"text": "...", "label": "pos"}, ...])
    tunelab.evaluate(result.run_dir, "dev.jsonl")
    model, tokenizer = tunelab.load(result.run_dir)

Errors in the input raise `tunelab.InputError` (file, line, field), as the CLI reports them.
"""

from tunelab.errors import InputError, RunFailure

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
