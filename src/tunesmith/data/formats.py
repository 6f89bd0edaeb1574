"""Row formats: detection, per-row validation and normalisation to canonical shapes.

Canonical shapes after :func:`normalize`:

- alpaca: ``{"instruction": str, "input": str, "output": str}``
- messages / sharegpt: ``{"messages": [{"role": str, "content": str}, ...]}``
- text: ``{"text": str}``
- classification: ``{"text": str, "text_pair": str | None, "label": int | str}``
- kto: ``{"prompt": str | list, "completion": str | list, "label": bool}``
- preference: ``{"prompt": str | list | None, "chosen": str | list, "rejected": str | list, "margin"?: float}``
- prompt: ``{"prompt": str | list, "fields": {every other key of the row}}`` (online RL: the prompts to sample from)
"""

from __future__ import annotations

from typing import Any

from .errors import DataError, short, type_name
from .readers import Row

# What each format expects, for error messages ("?" = optional).
EXPECTS = {
    "alpaca": "instruction, input (optional), output",
    "messages": "messages (a list of {role, content})",
    "sharegpt": "conversations (a list of {from, value})",
    "text": "text",
    "classification": "text (or sentence), text_pair (optional), label",
    "preference": "prompt, chosen, rejected (chosen/rejected may be message lists)",
    "kto": "prompt, completion (a str or message list), label (true: desirable, false: undesirable)",
    "prompt": "prompt (a str or message list), any other fields (passed to the reward functions)",
}

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user",
                  "gpt": "assistant", "assistant": "assistant", "model": "assistant"}


def detect_format(row: Row) -> str:
    """Format of a row from its keys; DataError listing what each format expects otherwise."""
    keys = set(row.data)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if {"prompt", "completion", "label"} <= keys:
        return "kto"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if "label" in keys and keys & {"text", "sentence"}:
        return "classification"
    if "text" in keys:
        return "text"
    if "prompt" in keys:
        return "prompt"
    expected = "; ".join(f"{f}: {e}" for f, e in EXPECTS.items())
    raise DataError(
        f"{row.loc}: cannot detect the data format from keys {sorted(keys)}. Expected keys "
        f"per format -- {expected}. Set data.format or data.field_map."
    )


def check_objective(fmt: str, objective) -> None:
    """DataError unless ``fmt`` can feed ``objective`` (an objective config: its ``name`` and ``formats``)."""
    if fmt not in objective.formats:
        raise DataError(
            f"format {fmt!r} cannot be used for objective {objective.name!r}; "
            f"objective {objective.name!r} takes format {', '.join(objective.formats)}"
        )


def apply_field_map(row: Row, field_map: dict[str, str]) -> Row:
    """``row`` with source keys renamed; a renamed key wins over an existing key of that name."""
    if not field_map:
        return row
    targets = set(field_map.values())
    data = {k: v for k, v in row.data.items() if k not in field_map and k not in targets}
    data.update({field_map[k]: v for k, v in row.data.items() if k in field_map})
    return Row(row.loc, data, row.error)


def normalize(row: Row, fmt: str) -> dict[str, Any]:
    """Validated canonical dict for ``row``; DataError naming loc, field, value and expectation."""
    return _NORMALIZERS[fmt](row)


def _get(row: Row, fmt: str, field: str, types: tuple[type, ...], *, optional: bool = False):
    """The field's value; a required str field must not be empty (optional ones may be)."""
    value = row.data.get(field)
    if value is None:
        if optional:
            return None
        raise DataError(f"{row.loc}: missing field {field!r} (format {fmt} expects {EXPECTS[fmt]})")
    if not isinstance(value, types) or isinstance(value, bool):
        expected = " or ".join("list" if t is list else t.__name__ for t in types)
        raise DataError(
            f"{row.loc}: field {field!r} has type {type_name(value)} (value {short(value)}), "
            f"expected {expected}"
        )
    if isinstance(value, str) and not optional and not value.strip():
        raise DataError(f"{row.loc}: field {field!r} is empty ({short(value)}); format {fmt} needs text in it "
                        "(fix or remove the row, or set data.on_error: skip to drop such rows)")
    return value


def _alpaca(row: Row) -> dict[str, Any]:
    return {
        "instruction": _get(row, "alpaca", "instruction", (str,)),
        "input": _get(row, "alpaca", "input", (str,), optional=True) or "",
        "output": _get(row, "alpaca", "output", (str,)),
    }


def _turns(row: Row, field: str, items: list, role_key: str, text_key: str,
           roles: dict[str, str]) -> list[dict[str, str]]:
    """Validate a list of turns and convert it to ``{"role", "content"}`` dicts."""
    if not items:
        raise DataError(f"{row.loc}: field {field!r} is an empty list, expected at least one turn")
    out = []
    for i, turn in enumerate(items):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{row.loc}: field {where!r} has type {type_name(turn)}, expected "
                            f"an object with {role_key!r} and {text_key!r}")
        role, text = turn.get(role_key), turn.get(text_key)
        if role not in roles:
            raise DataError(f"{row.loc}: field '{where}.{role_key}' has value {short(role)}, "
                            f"expected one of {', '.join(roles)}")
        if not isinstance(text, str):
            raise DataError(f"{row.loc}: field '{where}.{text_key}' has type {type_name(text)} "
                            f"(value {short(text)}), expected str")
        if not text.strip():
            raise DataError(f"{row.loc}: field '{where}.{text_key}' is empty ({short(text)}); every turn needs "
                            "text (fix or remove the row, or set data.on_error: skip to drop such rows)")
        out.append({"role": roles[role], "content": text})
    if not any(t["role"] == "assistant" for t in out):
        raise DataError(f"{row.loc}: field {field!r} has no assistant turn; at least one is "
                        "needed to train on")
    return out


def _messages(row: Row) -> dict[str, Any]:
    items = _get(row, "messages", "messages", (list,))
    return {"messages": _turns(row, "messages", items, "role", "content", {r: r for r in ROLES})}


def _sharegpt(row: Row) -> dict[str, Any]:
    items = _get(row, "sharegpt", "conversations", (list,))
    return {"messages": _turns(row, "conversations", items, "from", "value", SHAREGPT_ROLES)}


def _text(row: Row) -> dict[str, Any]:
    return {"text": _get(row, "text", "text", (str,))}


def _classification(row: Row) -> dict[str, Any]:
    field = "text" if "text" in row.data or "sentence" not in row.data else "sentence"
    return {
        "text": _get(row, "classification", field, (str,)),
        "text_pair": _get(row, "classification", "text_pair", (str,), optional=True),
        "label": _get(row, "classification", "label", (int, str)),
    }


def _preference(row: Row) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for side in ("chosen", "rejected"):
        value = _get(row, "preference", side, (str, list))
        if isinstance(value, list):
            value = _turns(row, side, value, "role", "content", {r: r for r in ROLES})
            if value[-1]["role"] != "assistant":
                raise DataError(f"{row.loc}: field {side!r} must end with an assistant turn, "
                                f"found role {value[-1]['role']!r}")
        out[side] = value
    if type(out["chosen"]) is not type(out["rejected"]):
        raise DataError(f"{row.loc}: fields 'chosen' and 'rejected' must both be str or both "
                        f"be message lists, found {type_name(out['chosen'])} and "
                        f"{type_name(out['rejected'])}")
    needs_prompt = isinstance(out["chosen"], str)
    prompt = _get(row, "preference", "prompt", (str, list), optional=not needs_prompt)
    if isinstance(prompt, list):
        if needs_prompt:
            raise DataError(f"{row.loc}: field 'prompt' is a message list but 'chosen' is a "
                            "str; use str for all three or message lists")
        prompt = _prompt_turns(row, prompt)
    out["prompt"] = prompt
    if out["chosen"] == out["rejected"]:
        raise DataError(f"{row.loc}: fields 'chosen' and 'rejected' are identical ({short(out['chosen'])}); a "
                        "preference pair needs two different responses (fix or remove the row, or set "
                        "data.on_error: skip to drop such rows)")
    margin = row.data.get("margin")
    if margin is not None:
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise DataError(f"{row.loc}: field 'margin' has type {type_name(margin)} (value {short(margin)}), "
                            "expected a number")
        out["margin"] = float(margin)
    return out


def _kto(row: Row) -> dict[str, Any]:
    completion = _get(row, "kto", "completion", (str, list))
    if isinstance(completion, list):
        completion = _turns(row, "completion", completion, "role", "content", {r: r for r in ROLES})
        if completion[-1]["role"] != "assistant":
            raise DataError(f"{row.loc}: field 'completion' must end with an assistant turn, "
                            f"found role {completion[-1]['role']!r}")
    prompt = _get(row, "kto", "prompt", (str, list))
    if isinstance(prompt, list):
        if isinstance(completion, str):
            raise DataError(f"{row.loc}: field 'prompt' is a message list but 'completion' is a str; use str "
                            "for both or message lists")
        prompt = _prompt_turns(row, prompt)
    label = row.data.get("label")
    if not isinstance(label, bool):
        raise DataError(f"{row.loc}: field 'label' has type {type_name(label)} (value {short(label)}), expected "
                        "a boolean: true for a desirable completion, false for an undesirable one")
    return {"prompt": prompt, "completion": completion, "label": label}


def _prompt_turns(row: Row, items: list) -> list[dict[str, str]]:
    turns = []
    for i, t in enumerate(items):
        if not (isinstance(t, dict) and t.get("role") in ROLES and isinstance(t.get("content"), str)):
            raise DataError(f"{row.loc}: field 'prompt[{i}]' has value {short(t)}, expected "
                            f"{{role: {'|'.join(ROLES)}, content: str}}")
        turns.append({"role": t["role"], "content": t["content"]})
    return turns


def _prompt(row: Row) -> dict[str, Any]:
    prompt = _get(row, "prompt", "prompt", (str, list))
    if isinstance(prompt, list):
        prompt = _prompt_turns(row, prompt)
        if not prompt or prompt[-1]["role"] == "assistant":
            raise DataError(f"{row.loc}: field 'prompt' must end with a user turn for the model to answer")
    return {"prompt": prompt, "fields": {k: v for k, v in row.data.items() if k != "prompt"}}


_NORMALIZERS = {
    "alpaca": _alpaca, "messages": _messages, "sharegpt": _sharegpt, "text": _text,
    "classification": _classification, "preference": _preference, "kto": _kto, "prompt": _prompt,
}
