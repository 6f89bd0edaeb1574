"""The one helper that finds target modules (and parameters) and wraps them.

Target selection follows HF peft's rules so that ``target_modules`` in an adapter_config.json
means the same thing in both: a list matches a module whose dotted name equals an entry or ends
with ``"." + entry``; a string is a regular expression that must match the whole name;
``"all-linear"`` is every linear layer inside the transformer blocks (never the output head).

Linear layers are ``nn.Linear`` and GPT-2's ``Conv1D`` (``y = x W + b`` with W stored transposed,
``(d_in, d_out)``). A wrapped ``Conv1D`` is handed to the method as :class:`Conv1DAsLinear`, an
``nn.Linear`` over a transposed view of the same weight, so every method sees one layout; unwrapping
turns it back into a ``Conv1D`` (peft's ``fan_in_fan_out``). Parameters that no linear layer holds —
the fused 3-D expert weights and the router of transformers' mixture-of-experts blocks — are
targeted by name (:func:`inject_params`, peft's ``target_parameters``) and wrapped by a
:class:`ParamTarget`, which calls the module that owns them with the adapted tensor in their place.
"""
from __future__ import annotations

import contextlib
import re
from typing import Callable, Iterable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import ConfigError
from ..models.targets import arch, default_targets, head_names

TargetSpec = str | list[str] | None
#: The layer types a method that wraps "linear layers" wraps.
LINEAR_KINDS = (nn.Linear, Conv1D)


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


class Conv1DAsLinear(nn.Linear):
    """GPT-2's ``Conv1D`` as the ``nn.Linear`` it computes: ``weight`` is a transposed view (d_out, d_in)
    of the Conv1D's (d_in, d_out) storage, ``bias`` the same parameter."""

    def __init__(self, conv: Conv1D):
        nn.Module.__init__(self)
        self.in_features, self.out_features = conv.weight.shape
        self.weight = nn.Parameter(conv.weight.data.t(), requires_grad=conv.weight.requires_grad)
        self.bias = conv.bias

    def to_conv1d(self) -> Conv1D:
        return conv1d_from(self)


def conv1d_from(linear: nn.Linear) -> Conv1D:
    """A Conv1D computing what ``linear`` computes (its weight transposed back to (d_in, d_out))."""
    with torch.device("meta"):
        conv = Conv1D(linear.out_features, linear.in_features)
    conv.weight = nn.Parameter(linear.weight.data.t().contiguous(), requires_grad=linear.weight.requires_grad)
    conv.bias = linear.bias
    return conv


def as_linear(module: nn.Module) -> nn.Module:
    """``module`` in nn.Linear layout: a Conv1D becomes a :class:`Conv1DAsLinear`; others are returned as they are."""
    return Conv1DAsLinear(module) if type(module) is Conv1D else module


def restore(module: nn.Module) -> nn.Module:
    """The inverse of :func:`as_linear`."""
    return module.to_conv1d() if isinstance(module, Conv1DAsLinear) else module


def fan_in_fan_out(model: nn.Module) -> bool:
    """Whether any wrapped layer of ``model`` is a Conv1D (peft's ``fan_in_fan_out`` for its adapter config)."""
    return any(isinstance(layer.base_layer, Conv1DAsLinear) for _, layer in tuned_layers(model))


def _is_block_linear(name: str, module: nn.Module, model: nn.Module) -> bool:
    if not isinstance(module, LINEAR_KINDS):
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


def resolve_targets(model: nn.Module, spec: TargetSpec, *, kinds=LINEAR_KINDS,
                    field: str = "method.target_modules") -> list[str]:
    """Names of the modules ``spec`` selects (None = the architecture's defaults)."""
    if spec is None:
        spec = default_targets(model, field)
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


def wrap(model: nn.Module, name: str, factory: Callable[[str, nn.Module], nn.Module]) -> nn.Module:
    """Replace module ``name`` by ``factory(name, module)`` (a Conv1D handed over in nn.Linear layout)."""
    new = factory(name, as_linear(model.get_submodule(name)))
    replace_module(model, name, new)
    return new


def inject(model: nn.Module, spec: TargetSpec, factory: Callable[[str, nn.Module], nn.Module], *,
           kinds=LINEAR_KINDS, field: str = "method.target_modules") -> list[str]:
    """Replace every module ``spec`` selects by ``factory(name, module)``; return their names."""
    names = resolve_targets(model, spec, kinds=kinds, field=field)
    for name in names:
        wrap(model, name, factory)
    return names


class ParamTarget(TunedLayer):
    """Base of wrappers that adapt one parameter of the module they hold (peft's ``ParamWrapper``):
    ``forward`` calls the held module with that parameter replaced by ``effective(W)``. Two targeted
    parameters of one module nest: the wrapper of the second holds the wrapper of the first."""

    def __init__(self, base: nn.Module, param_name: str):
        super().__init__(base)
        self.param_name = param_name
        owner, path = base, param_name
        while isinstance(owner, ParamTarget):
            owner, path = owner.base_layer, "base_layer." + path
        self._path = path                       # the parameter's name relative to base_layer
        object.__setattr__(self, "_owner", owner)  # the module that holds the parameter (not a submodule)

    def param(self) -> torch.Tensor:
        return getattr(self._owner, self.param_name)

    def effective(self, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, *args, **kwargs):
        if self.merged or self.disabled:
            return self.base_layer(*args, **kwargs)
        adapted = {self._path: self.effective(self.param())}
        return torch.func.functional_call(self.base_layer, adapted, args, kwargs, strict=False)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "_owner"):
                raise
            return getattr(self.base_layer, name)  # the owner's attributes (num_experts, top_k …)


def _expand(model: nn.Module, spec: list[str]) -> list[str]:
    """The words ``experts`` and ``router`` replaced by the architecture's own parameter names."""
    a, out = arch(model), []
    for item in spec:
        out += a.get(item, [item]) if item in ("experts", "router") else [item]
    return out


def resolve_params(model: nn.Module, spec: str | list[str], field: str = "method.target_parameters") -> list[str]:
    """Full names of the parameters ``spec`` selects (peft's rule on parameter names; ``experts`` and
    ``router`` stand for the architecture's mixture-of-experts weights)."""
    if isinstance(spec, list):
        spec = _expand(model, spec)
    names = [n for n, p in model.named_parameters() if p.ndim in (2, 3) and ".base_layer." not in n
             and matches(n, spec)]
    if not names:
        shapes = sorted({".".join(n.split(".")[-2:]) for n, p in model.named_parameters() if p.ndim == 3})
        hint = (f"its 3-D (expert) parameters are: {', '.join(shapes)}" if shapes
                else "it has no 3-D (expert) parameters; target linear layers with target_modules instead")
        raise ConfigError(f"{field}: {spec!r} matches no 2-D or 3-D parameter of this {type(model).__name__}; {hint}")
    return names


def inject_params(model: nn.Module, spec: str | list[str], factory: Callable[[str, nn.Module, str], ParamTarget],
                  field: str = "method.target_parameters") -> list[str]:
    """Wrap the owner of every parameter ``spec`` selects with ``factory(full_name, module, param_name)``,
    nesting in the order the owner registered them (as peft does); return the parameter names."""
    names = resolve_params(model, spec, field)
    by_owner: dict[str, list[str]] = {}
    for n in names:
        owner, _, leaf = n.rpartition(".")
        by_owner.setdefault(owner, []).append(leaf)
    for owner, leaves in by_owner.items():
        module = model.get_submodule(owner)
        if isinstance(module, TunedLayer):
            raise ConfigError(f"{field}: {owner} is already wrapped by target_modules; target either the module "
                              "or its parameters")
        order = [p for p in module._parameters if p in leaves]
        for leaf in order:
            module = factory(f"{owner}.{leaf}", module, leaf)
        replace_module(model, owner, module)
    return names


def tuned_layers(model: nn.Module) -> Iterable[tuple[str, TunedLayer]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, TunedLayer))


def unwrap(model: nn.Module) -> nn.Module:
    """Replace every TunedLayer by its base layer (after merging, this yields a plain model); nested
    wrappers go innermost first, and a Conv1D turns back into one."""
    for name, layer in reversed(list(tuned_layers(model))):
        replace_module(model, name, restore(layer.base_layer))
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


@contextlib.contextmanager
def frozen_adapters(model: nn.Module):
    """Within the block, layers that can (``freeze_adapter``) compute from a copy of their adapter in the
    compute dtype taken on entry: for decoding many tokens with weights that do not change meanwhile."""
    layers = [m for _, m in tuned_layers(model) if getattr(m, "decodes_frozen", False)]
    for m in layers:
        m.freeze_adapter(True)
    try:
        yield model
    finally:
        for m in layers:
            m.freeze_adapter(False)


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
