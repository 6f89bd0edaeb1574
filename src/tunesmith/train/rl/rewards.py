"""Reward functions: built-ins by name, your own by import path, several with weights.

A reward function takes the batch's prompts and completions (texts) and, as keyword arguments, the rows'
other data fields (one list per field, in the same order), and returns one number per completion::

    def my_reward(prompts: list[str], completions: list[str], **fields) -> list[float]:
        return [float(len(c) < 200) for c in completions]

and is named in the objective's ``rewards`` list as ``"my_module:my_reward"`` (importable from the
current directory or the Python path). Each entry's ``options`` are passed as keyword arguments too. The
total reward is Σ_k weight_k · r_k; every function's mean and std are logged as ``reward/<name>``.

Built-ins (``function: <name>``):

* ``answer`` — 1 when the completion's final answer equals the row's (GSM8K: the number after ``####``).
  options: ``field`` (default ``final_answer``, else the text after ``####`` in ``answer``), ``extract``
  (a regex whose first group is the completion's answer; default: the number after ``####``, else the last
  number of the completion).
* ``exact_match`` — 1 when the stripped completion equals the row's ``field`` (default ``answer``).
* ``format`` — 1 when the completion matches ``pattern`` (``re.search``, DOTALL), else 0.
* ``length_penalty`` — −max(0, characters − ``target``) / ``scale`` (defaults 400 and 400).
* ``reward_model`` — the score of a reward model trained with ``objective: rm`` (option ``run``: its run
  directory), through ``tunesmith.score``.

A function that raises or returns something other than one finite number per completion stops the run with
one error naming the function and the row (its file:line).
"""
from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass
from typing import Callable

from ...errors import ConfigError

NUMBER = r"-?[\d,]*\.?\d+"


def normalise_number(text: str | None) -> str | None:
    """'1,234.50' -> '1234.5'; None when there is no number."""
    if text is None:
        return None
    found = re.findall(NUMBER, str(text))
    if not found:
        return None
    s = found[-1].replace(",", "")
    try:
        v = float(s)
    except ValueError:
        return None
    return str(int(v)) if v.is_integer() else repr(v)


def extract_answer(completion: str, extract: str | None = None) -> str | None:
    """The completion's final answer: ``extract``'s first group, else the number after ``####``, else the
    last number in it."""
    if extract:
        m = re.search(extract, completion, re.DOTALL)
        return normalise_number(m.group(1)) if m else None
    m = re.search(r"####\s*(" + NUMBER + ")", completion)
    return normalise_number(m.group(1) if m else completion)


def _reference_answer(fields: dict, i: int, field: str) -> str | None:
    if field in fields:
        return normalise_number(fields[field][i])
    if "answer" in fields:
        text = str(fields["answer"][i])
        return normalise_number(text.split("####")[-1])
    raise KeyError(f"the row has no field {field!r} (nor 'answer'); fields: {', '.join(fields) or 'none'}")


def answer(prompts, completions, *, field: str = "final_answer", extract: str | None = None, **fields):
    out = []
    for i, c in enumerate(completions):
        got = extract_answer(c, extract)
        out.append(float(got is not None and got == _reference_answer(fields, i, field)))
    return out


def exact_match(prompts, completions, *, field: str = "answer", **fields):
    if field not in fields:
        raise KeyError(f"the row has no field {field!r}; fields: {', '.join(fields) or 'none'}")
    return [float(c.strip() == str(ref).strip()) for c, ref in zip(completions, fields[field])]


def format_reward(prompts, completions, *, pattern: str, **fields):
    rx = re.compile(pattern, re.DOTALL)
    return [float(rx.search(c) is not None) for c in completions]


def length_penalty(prompts, completions, *, target: int = 400, scale: float = 400.0, **fields):
    return [-max(0, len(c) - target) / scale for c in completions]


def reward_model(prompts, completions, *, run: str, batch_size: int = 8, **fields):
    from ...infer.score import score
    return [float(s) for s in score(run, list(prompts), list(completions), batch_size=batch_size)]


BUILTINS: dict[str, Callable] = {"answer": answer, "exact_match": exact_match, "format": format_reward,
                                 "length_penalty": length_penalty, "reward_model": reward_model}


def resolve(spec: str) -> Callable:
    """A built-in's function or ``module:function``'s; ConfigError naming what was tried otherwise."""
    if spec in BUILTINS:
        return BUILTINS[spec]
    if ":" not in spec:
        raise ConfigError(f"objective.rewards: unknown reward {spec!r}; built-ins: {', '.join(BUILTINS)}, or "
                          "module:function for your own")
    mod, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"objective.rewards: cannot import {spec!r} ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise ConfigError(f"objective.rewards: {spec!r} is not a function")
    return fn


@dataclass
class Reward:
    name: str        # what it is logged as: reward/<name>
    fn: Callable
    weight: float
    options: dict


def build(specs) -> list[Reward]:
    """The reward functions of an objective's ``rewards`` list (each with function, weight, options, name)."""
    out, seen = [], set()
    for s in specs:
        name = s.name or s.function.rsplit(":", 1)[-1]
        if name in seen:
            raise ConfigError(f"objective.rewards: two rewards are called {name!r}; give one a `name`")
        seen.add(name)
        out.append(Reward(name, resolve(s.function), s.weight, dict(s.options)))
    return out


def _call(r: Reward, prompts, completions, fields, locs, offset: int = 0):
    try:
        values = r.fn(prompts, completions, **r.options, **{k: v for k, v in fields.items() if k not in r.options})
    except Exception as e:
        if len(completions) > 1:   # find the row that fails
            for i in range(len(completions)):
                _call(r, prompts[i:i + 1], completions[i:i + 1], {k: v[i:i + 1] for k, v in fields.items()},
                      locs[i:i + 1], offset + i)
        raise ConfigError(f"reward {r.name} raised {type(e).__name__}: {e} (row {locs[0]}, completion "
                          f"{completions[0][:80]!r})") from None
    values = list(values) if not isinstance(values, (str, bytes)) and hasattr(values, "__len__") else values
    if not isinstance(values, list) or len(values) != len(completions):
        raise ConfigError(f"reward {r.name} returned {type(values).__name__} "
                          f"{values if not isinstance(values, list) else len(values)!r} for {len(completions)} "
                          f"completions (row {locs[0]}); it must return a list of one number per completion")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            raise ConfigError(f"reward {r.name} returned {v!r} for row {locs[i]} (completion {completions[i][:80]!r})"
                              "; it must return a finite number per completion")
    return [float(v) for v in values]


def score(rewards: list[Reward], prompts: list[str], completions: list[str], fields: list[dict],
          locs: list[str]) -> dict[str, list[float]]:
    """Each reward function's values over the batch, by name (the weighted total is :func:`total`)."""
    keys = sorted({k for f in fields for k in f})
    columns = {k: [f.get(k) for f in fields] for k in keys}
    return {r.name: _call(r, prompts, completions, columns, locs) for r in rewards}


def total(rewards: list[Reward], values: dict[str, list[float]]) -> list[float]:
    n = len(next(iter(values.values()))) if values else 0
    return [sum(r.weight * values[r.name][i] for r in rewards) for i in range(n)]
