"""The one helper that finds target modules and wraps them.

Target selection follows HF peft's rules so that ``target_modules`` in an adapter_config.json
means the same thing in both: a list matches a module whose dotted name equals an entry or ends
with ``"." + entry``; a string is a regular expression that must match the whole name;
``"all-linear"`` is every ``nn.Linear`` inside the transformer blocks (never the output head).
"""
from __future__ import annotations

import contextlib
import re
from typing import Callable, Iterable

from torch import nn

from ..errors import ConfigError
from ..models.targets import default_targets, head_names

TargetSpec = str | list[str] | None


class TunedLayer(nn.Module):
    """Base of every wrapper that holds an original module as ``base_layer``.

    ``merge``/``unmerge`` fold the method into the base weights and back; ``disabled`` makes the
    layer act as its base layer (used by ``disable_adapters``).
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.merged = False
        self.disabled = False

    def merge(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot merge")

    def unmerge(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot unmerge")

    @property
    def weight(self):  # lets code that reads layer.weight (ties, dtype probes) keep working
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias


def _is_block_linear(name: str, module: nn.Module, model: nn.Module) -> bool:
    if not isinstance(module, nn.Linear):
        return False
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and module is out:
        return False
    leaf = name.rsplit(".", 1)[-1]
    return leaf not in head_names()


def matches(name: str, spec: str | list[str]) -> bool:
    """peft's matching rule for one module name."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def resolve_targets(model: nn.Module, spec: TargetSpec, *, kinds=(nn.Linear,),
                    field: str = "method.target_modules") -> list[str]:
    """Names of the modules ``spec`` selects (None = the architecture's defaults)."""
    if spec is None:
        spec = default_targets(model)
    names: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, TunedLayer) or ".base_layer" in name or not name:
            continue
        if spec == "all-linear":
            ok = _is_block_linear(name, module, model)
        else:
            ok = isinstance(module, kinds) and matches(name, spec)
        if ok:
            names.append(name)
    if not names:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, kinds)})
        raise ConfigError(f"{field}: {spec!r} matches no {'/'.join(k.__name__ for k in kinds)} module "
                          f"of this {type(model).__name__}; module names here include: {', '.join(leaves)}")
    return names


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject(model: nn.Module, spec: TargetSpec, factory: Callable[[str, nn.Module], nn.Module], *,
           kinds=(nn.Linear,), field: str = "method.target_modules") -> list[str]:
    """Replace every module ``spec`` selects by ``factory(name, module)``; return their names."""
    names = resolve_targets(model, spec, kinds=kinds, field=field)
    for name in names:
        replace_module(model, name, factory(name, model.get_submodule(name)))
    return names


def tuned_layers(model: nn.Module) -> Iterable[tuple[str, TunedLayer]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, TunedLayer))


def unwrap(model: nn.Module) -> nn.Module:
    """Replace every TunedLayer by its base layer (after merging, this yields a plain model)."""
    for name, layer in list(tuned_layers(model)):
        replace_module(model, name, layer.base_layer)
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Within the block the model computes as its base model."""
    layers = [m for _, m in tuned_layers(model)]
    old = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, o in zip(layers, old):
            m.disabled = o


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def unfreeze_modules(model: nn.Module, names: list[str] | None) -> list[str]:
    """Make the named modules (peft-style suffix match) trainable; returns full names."""
    if not names:
        return []
    found = [n for n, _ in model.named_modules() if n and matches(n, names) and ".base_layer" not in n]
    if not found:
        raise ConfigError(f"method.modules_to_save: {names!r} matches no module")
    for n in found:
        for p in model.get_submodule(n).parameters():
            p.requires_grad_(True)
    return found
