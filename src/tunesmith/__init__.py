"""tunesmith: fine-tune language models with any PEFT method, one YAML, one CLI.

Importing tunesmith loads neither torch nor transformers: they are imported when a function that
needs them is first called, so the command line answers `--help` and config errors at once.
"""
import logging as _logging

# peft imports bitsandbytes whenever it is installed, and bitsandbytes' CPU backend then asks the hub `kernels`
# package (a dependency of transformers >= 5.25) for an optional kernel, and both warn when it is not there (offline,
# or kernels not installed); bitsandbytes' own CPU path is what QLoRA on a CPU uses, so the warnings are noise here.
for _noisy in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    _logging.getLogger(_noisy).setLevel(_logging.ERROR)

from . import train as _train_package  # noqa: E402,F401  (loaded first so `tunesmith.train` stays the function)
from .api import apply, load, merge, methods, train  # noqa: E402
from .errors import ConfigError, ModelError, TunesmithError  # noqa: E402

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
