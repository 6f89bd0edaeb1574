"""What differs between the transformers releases tunesmith supports, in one place.

transformers 5.24 renamed the KV-cache argument of every model's ``forward`` (and the field of
its outputs) from ``past_key_values`` to ``cache``; the old name is accepted with a warning until
5.40 and then goes. Code that hands a cache to a model or reads one back asks here for the name
the model takes, so it runs unchanged on 5.17 (``past_key_values`` only) through the newest
release (``cache`` only).
"""
from __future__ import annotations

import functools
import inspect

from torch import nn

#: Every name a KV cache has gone by, newest first.
CACHE_NAMES = ("cache", "past_key_values")


@functools.lru_cache(maxsize=None)
def _forward_cache_name(forward) -> str:
    params = inspect.signature(forward).parameters
    for name in CACHE_NAMES:
        if name in params:
            return name
    return CACHE_NAMES[-1]  # a forward taking only **kwargs: the name every release still reads


def cache_name(module: nn.Module) -> str:
    """The keyword under which ``module.forward`` takes its KV cache."""
    forward = getattr(type(module), "forward", None) or module.forward
    return _forward_cache_name(forward)


def pop_cache(kwargs: dict):
    """Remove the KV cache from a forward call's keyword arguments (under any name) and return it."""
    found = None
    for name in CACHE_NAMES:
        value = kwargs.pop(name, None)
        if value is not None:
            found = value
    return found


def takes_cache(module: nn.Module) -> bool:
    """Whether ``module.forward`` has a KV-cache parameter at all (DeBERTa's and ModernBERT's have none)."""
    forward = getattr(type(module), "forward", None) or module.forward
    return any(name in inspect.signature(forward).parameters for name in CACHE_NAMES)


def cache_kwargs(module: nn.Module, cache) -> dict:
    """``{name: cache}`` for a call of ``module``, under the name its transformers release takes."""
    return {cache_name(module): cache}


def output_cache(output):
    """The KV cache a model returned (``output.cache`` or ``output.past_key_values``), or None."""
    for name in CACHE_NAMES:
        value = output.get(name) if isinstance(output, dict) else getattr(output, name, None)
        if value is not None:
            return value
    return None


def checkpointing_on(model: nn.Module) -> bool:
    """Whether transformers' activation (gradient) checkpointing is on for ``model``.

    The property is ``is_activation_checkpointing`` from 5.2x on, ``is_gradient_checkpointing`` before.
    """
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), attr):
            return bool(getattr(model, attr))
    return False


def enable_checkpointing(model: nn.Module) -> None:
    """Turn on transformers' non-reentrant activation checkpointing (``activation_checkpointing_enable``
    from 5.2x on, ``gradient_checkpointing_enable`` before)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def experts_transposed(experts: nn.Module) -> bool:
    """Whether a mixture-of-experts module stores its fused 3-D weights as (experts, in, out).

    transformers 5.17 through 5.24 store every expert of a block in one 3-D parameter per projection
    (``gate_up_proj`` (E, 2·I, H), ``down_proj`` (E, H, I): (experts, out, in)), with no ``nn.Linear``
    per expert; the experts decorator marks the few models that keep (experts, in, out) by
    ``is_transposed``.
    """
    return bool(getattr(experts, "is_transposed", False))
