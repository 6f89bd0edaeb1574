"""tunesmith: fine-tune language models with any PEFT method, one YAML, one CLI.

Importing tunesmith loads neither torch nor transformers: they are imported when a function that
needs them is first called, so the command line answers `--help` and config errors at once.
"""
from . import train as _train_package  # noqa: F401  (loaded first so `tunesmith.train` stays the function)
from .api import apply, load, merge, methods, train
from .errors import ConfigError, ModelError, TunesmithError

__version__ = "0.1.0"
__all__ = ["train", "load", "apply", "merge", "methods", "generate", "score", "ConfigError", "ModelError", "TunesmithError"]


def __getattr__(name: str):
    if name == "generate":  # imported on first use: it brings in torch
        from .infer import generate
        return generate
    if name == "score":
        from .infer.score import score
        return score
    raise AttributeError(f"module 'tunesmith' has no attribute {name!r}")
