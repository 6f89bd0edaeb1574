"""tunesmith: fine-tune language models with any PEFT method, one YAML, one CLI."""
from . import train as _train_package  # noqa: F401  (loaded first so `tunesmith.train` stays the function)
from .api import apply, load, merge, methods, train
from .errors import ConfigError, ModelError, TunesmithError
from .infer import generate

__version__ = "0.1.0"
__all__ = ["train", "load", "apply", "merge", "methods", "generate", "ConfigError", "ModelError", "TunesmithError"]
