"""Errors that tunesmith raises for bad user input. Each names the place, the value and what is valid."""
from __future__ import annotations

import difflib


class TunesmithError(Exception):
    """Base class: the message is meant for the user, printed without a traceback by the CLI."""


class ConfigError(TunesmithError, ValueError):
    """A config file, override or option is invalid."""


class ModelError(TunesmithError, ValueError):
    """A model path or name cannot be loaded."""


class FileError(TunesmithError, ValueError):
    """A file tunesmith reads back (adapter, checkpoint, run metadata) is damaged, incomplete or lacks a
    field; the message names the file and what is wrong with it."""


class TrainingDiverged(TunesmithError):
    """A run stopped because its loss, gradients or weights went bad; the message says what to change.
    ``first_bad_step``: the first optimizer step that showed it (the weights before it are the last good)."""

    def __init__(self, message: str, first_bad_step: int | None = None):
        super().__init__(message)
        self.first_bad_step = first_bad_step


# Names other tools (peft, transformers, LLaMA-Factory) use for tunesmith's fields.
ALIASES = {
    "rank": "r", "lora_r": "r", "lora_rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "target": "target_modules", "learning_rate": "lr", "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
    "max_length": "max_seq_len", "cutoff_len": "max_seq_len", "model_max_length": "max_seq_len",
    "warmup": "warmup_steps", "model_name_or_path": "name_or_path", "output_dir": "dir",
    "lr_scheduler_type": "scheduler",
}


def did_you_mean(word: str, choices) -> str:
    """' (did you mean 'x'?)' when a close match (or the tunesmith name for another tool's) exists, else ''."""
    names = [str(c) for c in choices]
    alias = ALIASES.get(str(word).lower())
    if alias in names:
        return f" (did you mean '{alias}'?)"
    close = difflib.get_close_matches(str(word), names, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
