"""Training objectives, registered by name like methods. One file each."""
from __future__ import annotations

import importlib
import pkgutil
from typing import ClassVar

import torch
from torch import nn

from ...errors import ConfigError, did_you_mean

_OBJECTIVES: dict[str, type["Objective"]] = {}


class Objective:
    """Computes a loss from a batch. ``loss`` returns (sum of per-item losses, item count, extra sums).

    The loop divides the summed loss by the item count of the whole optimizer step, so gradient
    accumulation weights every token (or example) equally.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    task: ClassVar[str] = "causal_lm"       # model head to load: causal_lm | classification
    data_objective: ClassVar[str] = "sft"   # what build_datasets produces
    formats: ClassVar[tuple[str, ...]] = ()  # data formats this objective is chosen for by default
    encoder_decoder: ClassVar[bool] = False  # chosen by default for encoder-decoder models (else decoders)
    eval_tasks: ClassVar[tuple[str, ...]] = ("lm",)  # whose metrics train.eval_metrics may name (tunesmith.eval)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, dict]:
        """Extras may hold ``"records"``: one dict per item with the keys of ``tunesmith.eval.metrics``
        (for the metrics of ``train.eval_metrics``)."""
        raise NotImplementedError

    def configure(self, train_cfg) -> None:
        """Take the objective's options from the run's ``train`` config (default: none)."""

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """Items the loss is averaged over (known before the forward pass)."""
        raise NotImplementedError

    def uniform_loss(self, model: nn.Module) -> float | None:
        """The loss of a uniform guess over the outcomes (divergence detection); None when it has none."""
        return None


def register(cls):
    _OBJECTIVES[cls.name] = cls
    return cls


def all_objectives() -> dict[str, type[Objective]]:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    return dict(_OBJECTIVES)


def get(name: str) -> Objective:
    objs = all_objectives()
    if name not in objs:
        raise ConfigError(f"train.objective: unknown objective {name!r}{did_you_mean(name, objs)}; "
                          f"valid: auto, {', '.join(objs)}")
    return objs[name]()


def for_format(fmt: str, encoder_decoder: bool = False) -> str:
    """The default objective for a data format (and model kind: encoder-decoders have their own)."""
    found = [(name, cls) for name, cls in all_objectives().items() if fmt in cls.formats]
    for name, cls in found:
        if cls.encoder_decoder == encoder_decoder:
            return name
    if found:
        return found[0][0]
    raise ConfigError(f"train.objective: no default objective for data format {fmt!r}; set train.objective")
