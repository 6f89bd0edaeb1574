"""How a config validation error is told: each error's field in YAML terms (``data.mixture[0].weight``),
an unknown key with the valid keys of its own section and the nearest one, and the blame on the
command-line override that set the field, else on the file."""
from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError

from .errors import did_you_mean
from .train.objectives import ObjectiveConfig
from .train.strategies import StrategyConfig


def format_errors(err: ValidationError, root: Any, prefix: str = "") -> list[tuple[str, str]]:
    """``(dotted field, message)`` for each error; unknown keys list the valid keys of their section
    (of ``root``, the model that was validated: the RunConfig or one section's config)."""
    out = []
    for e in err.errors():
        loc = _dotted(e["loc"])
        where = f"{prefix}{loc}" if loc else prefix.rstrip(".")
        if e["type"] == "extra_forbidden":
            out.append((where, f"unknown key{_key_hint(e['loc'], root, prefix)}"))
        elif e["type"] == "missing":
            out.append((where, "required field is missing"))
        elif e["type"] == "value_error":   # tunesmith's own validators: the message says what was given
            out.append((where, e["msg"].removeprefix("Value error, ")))
        else:
            out.append((where, f"{e['msg']} (got {e.get('input')!r})"))
    return out


def _dotted(loc) -> str:
    """A field's location as written in YAML terms: ``data.mixture[0].weight``."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _key_hint(loc, root, prefix: str = "") -> str:
    *parent, key = [str(p) for p in loc]
    fields = _fields_at(parent, root)
    if not fields:
        return ""
    kind = next((k for k, base in (("objective", ObjectiveConfig), ("strategy", StrategyConfig))
                 if isinstance(root, type) and issubclass(root, base)), "method")
    named = "name" in root.model_fields   # a method, objective or strategy config, not the whole RunConfig
    section = f"{kind} {root.model_fields['name'].default}" if named else (
        _dotted([int(p) if p.isdigit() else p for p in parent]) or "the config")
    return f" '{key}'{did_you_mean(key, fields)}; valid keys for {section}: {', '.join(fields)}"


def _model_in(annotation: Any) -> Any:
    """The pydantic model an annotation holds (itself, or inside ``X | None`` / ``list[X]``), or None."""
    if hasattr(annotation, "model_fields"):
        return annotation
    return next((m for a in getattr(annotation, "__args__", ()) if (m := _model_in(a)) is not None), None)


def _fields_at(path: list[str], root: Any) -> list[str]:
    model: Any = root
    for p in path:
        if p.isdigit():   # an entry of a list (data.mixture.0)
            continue
        info = getattr(model, "model_fields", {}).get(p)
        model = _model_in(info.annotation) if info is not None else None
        if model is None:
            return []
    return [info.alias or name for name, info in model.model_fields.items()]   # as written in YAML (lambda)


def _blame(where: str, overrides: dict[str, str]) -> str | None:
    """The override that set field ``where`` (or a section above it), if any."""
    parts = re.sub(r"\[\d+\]", "", where).split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in overrides:
            return overrides[".".join(parts[:i])]
    return None


def message(errors: list[tuple[str, str]], source: str, overrides: dict[str, str]) -> str:
    """One message: errors from command-line overrides name the override, the others the file."""
    parts = []
    for where, text in errors:
        item = _blame(where, overrides)
        parts.append(f"override {item!r}: {where}: {text}" if item else f"{source}: {where}: {text}")
    return "; ".join(parts)
