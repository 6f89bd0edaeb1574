"""Reading back the files tunesmith and peft write: adapters, deltas, checkpoints, run metadata.

Each reader raises one :class:`~tunesmith.errors.FileError` naming the file and what is wrong with
it (not JSON, truncated, a field missing) instead of the library's own exception.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

from .errors import FileError

DAMAGED = "the file is truncated or damaged (an interrupted copy or write?)"


def read_json(path: Path, *, required: dict[str, str] | None = None) -> dict[str, Any]:
    """The JSON object in ``path``; ``required`` maps field names that must hold a string to a hint
    on what to do when one is missing."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileError(f"{path}: file is missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FileError(f"{path}: cannot be read ({e}); {DAMAGED}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise FileError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); {DAMAGED}") from None
    if not isinstance(data, dict):
        raise FileError(f"{path}: expected a JSON object, found {type(data).__name__}; {DAMAGED}")
    for key, hint in (required or {}).items():
        if not isinstance(data.get(key), str) or not data[key]:
            found = "missing" if key not in data else f"{data[key]!r}, not a name or path"
            raise FileError(f"{path}: field '{key}' is {found}; {hint}")
    return data


def load_safetensors(path: Path) -> dict:
    """Tensors of a ``.safetensors`` file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise FileError(f"{path}: file is missing") from None
    except (SafetensorError, OSError) as e:
        raise FileError(f"{path}: not a readable safetensors file ({e}); {DAMAGED}") from None


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names of a ``.safetensors`` file (its header only)."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), "pt") as st:
            return list(st.keys())
    except FileNotFoundError:
        raise FileError(f"{path}: file is missing") from None
    except (SafetensorError, OSError) as e:
        raise FileError(f"{path}: not a readable safetensors file ({e}); {DAMAGED}") from None


def torch_load(path: Path, **kw) -> Any:
    """An object saved with ``torch.save`` (optimizer, scheduler and RNG states)."""
    import torch
    try:
        return torch.load(path, **kw)
    except FileNotFoundError:
        raise FileError(f"{path}: file is missing") from None
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileError(f"{path}: cannot be read by torch.load ({first}); {DAMAGED}") from None
