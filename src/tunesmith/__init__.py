"""tunesmith: fine-tune language models with any PEFT method, one YAML, one CLI."""
from .api import apply, load, merge, methods, train
from .errors import ConfigError, ModelError, TunesmithError

__version__ = "0.1.0"
__all__ = ["train", "load", "apply", "merge", "methods", "ConfigError", "ModelError", "TunesmithError"]
