"""Errors that tunesmith raises for bad user input. Each names the place, the value and what is valid."""
from __future__ import annotations

import difflib


class TunesmithError(Exception):
    """Base class: the message is meant for the user, printed without a traceback by the CLI."""


class ConfigError(TunesmithError, ValueError):
    """A config file, override or option is invalid."""


class ModelError(TunesmithError, ValueError):
    """A model path or name cannot be loaded."""


def did_you_mean(word: str, choices) -> str:
    """' (did you mean 'x'?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
