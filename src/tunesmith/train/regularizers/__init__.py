"""Regularisers, registered by name: the only list of them in tunesmith (``train.regularize``).

A regulariser is one file here: a pydantic model (its YAML fields, documented on the fields) that is also
the implementation, overriding the hooks below that default to doing nothing. The modules import torch only
inside the hooks, so a config is validated without it. The runner calls every hook of every configured
regulariser unconditionally, in the registry's (alphabetical) order; nothing asks which one runs:

- ``check(train_cfg, objective_cfg)``: refuse, before any weights load, a combination that cannot work;
- ``apply(model)``: once on the tuned model, before compile (embedding hooks, dropout rates);
- ``wrap_loss(loss_fn)``: the training loss ``(model, batch) -> (sum, count, extras)`` wrapped in another
  (evaluation keeps the objective's own loss);
- ``param_groups(model, groups)``: the optimizer's parameter groups rewritten (weight-decay groups,
  layer-wise learning rates).

YAML: ``train.regularize: {neftune: {alpha: 5}, label_smoothing: {epsilon: 0.1}}``.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from ...errors import ConfigError, did_you_mean
from ...registering import add_config, import_all

if TYPE_CHECKING:
    import torch
    from torch import nn

_REGISTRY: dict[str, type["Regularizer"]] = {}

LossFn = Callable[[Any, dict], tuple]


class Regularizer(BaseModel):
    """Base of every regulariser: its fields are its YAML section, its hooks default to no-ops."""

    model_config = ConfigDict(extra="forbid", defer_build=True)
    summary: ClassVar[str]
    name: str = Field(description="Registered regulariser name.")

    def check(self, train_cfg, objective_cfg) -> None:
        """Raise ConfigError (naming the fields) for a run this regulariser cannot join."""

    def apply(self, model: nn.Module) -> None:
        """Once on the tuned model, before compile."""

    def wrap_loss(self, loss_fn: LossFn) -> LossFn:
        return loss_fn

    def param_groups(self, model: nn.Module, groups: list[dict]) -> list[dict]:
        return groups


def register(cls: type[Regularizer]) -> type[Regularizer]:
    add_config(_REGISTRY, cls, "regulariser")
    return cls


def all_regularizers() -> dict[str, type[Regularizer]]:
    import_all(__name__)
    return dict(sorted(_REGISTRY.items()))


def build(name: str, fields: Any) -> Regularizer:
    """The regulariser ``name`` from its YAML fields (a mapping, or null/true for its defaults)."""
    known = all_regularizers()
    if name not in known:
        raise ValueError(f"unknown regulariser {name!r}{did_you_mean(name, known)}; valid: {', '.join(known)}")
    if isinstance(fields, Regularizer):
        return fields
    if fields is None or fields is True:
        fields = {}
    if not isinstance(fields, dict):
        raise ValueError(f"regularize.{name}: expected a mapping of its fields, got {fields!r}")
    if fields.get("name", name) != name:
        raise ValueError(f"regularize.{name}: name {fields['name']!r} differs from the key {name!r}")
    return known[name].model_validate({**fields, "name": name})


def ordered(section: dict[str, Regularizer] | None) -> list[Regularizer]:
    return [section[k] for k in sorted(section or {})]


def check(train_cfg, objective_cfg) -> None:
    for reg in ordered(train_cfg.regularize):
        reg.check(train_cfg, objective_cfg)


def apply(train_cfg, model) -> None:
    for reg in ordered(train_cfg.regularize):
        reg.apply(model)


def param_groups(train_cfg, model, groups: list[dict]) -> list[dict]:
    for reg in ordered(train_cfg.regularize):
        groups = [g for g in reg.param_groups(model, groups) if g["params"]]
    return groups


def training_objective(train_cfg, objective):
    """``objective`` itself, or a stand-in whose ``loss`` is wrapped by the regularisers (training only)."""
    fn = objective.loss
    for reg in ordered(train_cfg.regularize):
        fn = reg.wrap_loss(fn)
    return objective if fn == objective.loss else _Wrapped(objective, fn)


class _Wrapped:
    """The objective with its training loss replaced; every other attribute is the objective's."""

    def __init__(self, objective, loss_fn: LossFn):
        self._objective, self.loss = objective, loss_fn

    def __getattr__(self, name):
        return getattr(self._objective, name)


# -- shared by the loss regularisers: the logits of a forward pass and the targets they are scored on -------

@contextlib.contextmanager
def captured_logits(model):
    """Collect the ``logits`` of each call of ``model`` inside the block (a list, one tensor a call)."""
    seen: list = []
    handle = model.register_forward_hook(lambda m, args, out: seen.append(getattr(out, "logits", None)))
    try:
        yield seen
    finally:
        handle.remove()


def scored(logits, batch: dict, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits (N, K), targets (N,))`` of the items a loss scores: each example's label for classification
    (``label``), each next token whose label is not -100 for a causal LM (``labels``)."""
    if logits is None:
        raise ConfigError(f"train.regularize.{who} needs the model's full logits; the loss made none "
                          "(set train.chunked_ce: false)")
    if "label" in batch and logits.dim() == 2:
        return logits.float(), batch["label"]
    labels = batch["labels"]
    if logits.shape[:2] != labels.shape:
        raise ConfigError(f"train.regularize.{who}: logits of shape {tuple(logits.shape)} do not line up with "
                          f"labels {tuple(labels.shape)}")
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()   # (B*(T-1), V)
    targets = labels[:, 1:].reshape(-1)                             # (B*(T-1),)
    keep = targets != -100
    return flat[keep], targets[keep]


def needs_logits(who: str, train_cfg, objective_cfg) -> None:
    """ConfigError unless the objective scores logits against ``label``/``labels`` (cls, sft, pt)."""
    if objective_cfg.tokenized not in ("sft", "pt", "cls"):
        raise ConfigError(f"train.regularize.{who} works with the cls, sft and pt objectives, not "
                          f"{objective_cfg.name!r}")
    if objective_cfg.tokenized != "cls" and _chunked(train_cfg.chunked_ce):
        raise ConfigError(f"train.regularize.{who} needs the full logits, which the chunked loss never makes "
                          f"(train.chunked_ce: {train_cfg.chunked_ce}, on this machine the chunked loss); set "
                          "train.chunked_ce: false")


def _chunked(flag) -> bool:
    if flag != "auto":
        return bool(flag)
    from ..objectives.causal_lm import default_chunked
    return default_chunked()
