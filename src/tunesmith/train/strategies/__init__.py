"""Training strategies: extra loss terms plugged into the one loop, registered by name (the only list).

A strategy is two parts, as a method or an objective is: a torch-free config in
``train/strategies/configs/<name>.py`` (an entry of the run's top-level ``strategies:`` list: ``name``
plus its fields) and an implementation in ``train/strategies/<name>.py``. The runner builds the
strategies after the method is applied and ``init_from`` loaded, calls ``prepare`` once, adds their
own trainable parameters (a domain discriminator) to the optimizer, and the loop adds each one's
``loss(model)`` to every micro-batch's loss (divided by the micro-batches of the step, so a penalty
counts once per step) and logs its ``metrics()`` with the step. The loop never asks which strategy runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from ...errors import ConfigError, did_you_mean
from ...registering import add_config, import_all, registered_name

if TYPE_CHECKING:
    import torch
    from torch import nn

_STRATEGIES: dict[str, type["Strategy"]] = {}
_CONFIGS: dict[str, type["StrategyConfig"]] = {}


class StrategyConfig(BaseModel):
    """Fields common to every strategy; each one's config sets ``name: Literal["x"] = "x"`` and ``summary``."""

    model_config = ConfigDict(extra="forbid", defer_build=True)
    summary: ClassVar[str]
    name: str = Field(description="Registered strategy name (docs/strategies.md).")


@dataclass
class StrategyContext:
    """What a strategy's ``prepare`` may use of the run."""
    cfg: Any                 # the RunConfig
    tokenizer: Any
    objective: Any           # the Objective instance
    method: Any
    device: Any
    precision: str
    pad_id: int
    total_steps: int
    grad_accum: int
    max_seq_len: int
    seed: int


class Strategy:
    """Hooks default to nothing, so the loop calls them unconditionally."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Config: ClassVar[type[StrategyConfig]] = StrategyConfig

    def __init__(self, cfg: StrategyConfig):
        self.cfg = cfg

    def prepare(self, model: nn.Module, ctx: StrategyContext) -> None:
        """Once before training, on the model as it starts (after init_from)."""

    def parameters(self) -> list[torch.nn.Parameter]:
        """The strategy's own trainable parameters, optimised with the model's."""
        return []

    def param_group(self, lr: float) -> dict | None:
        """The optimizer group of ``parameters()`` (``lr``: the run's), or None when there are none."""
        params = self.parameters()
        return {"params": params, "lr": lr, "weight_decay": 0.0} if params else None

    def loss(self, model: nn.Module) -> torch.Tensor | float:
        """The term added to each micro-batch's loss, called right after the objective's forward pass."""
        return 0.0

    def metrics(self) -> dict[str, float]:
        """Values logged with the step (e.g. ``ewc/penalty``)."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps of the strategy beyond ``prepare`` (its own weights, its counters)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_dict`` returned, in place (the optimizer holds the parameters)."""


def register_config(cls: type[StrategyConfig]) -> type[StrategyConfig]:
    add_config(_CONFIGS, cls, "strategy")
    return cls


def register(cls: type[Strategy]) -> type[Strategy]:
    name = registered_name(cls, _CONFIGS, "strategy", "train/strategies/configs/")
    cls.name, cls.summary = name, cls.Config.summary
    _STRATEGIES[name] = cls
    return cls


def all_configs() -> dict[str, type[StrategyConfig]]:
    """Every strategy's config by name; imports no torch."""
    import_all(f"{__name__}.configs")
    return dict(sorted(_CONFIGS.items()))


def build_config(data: Any) -> StrategyConfig:
    """Validate one entry of ``strategies:`` (a name, or a mapping with ``name``)."""
    if isinstance(data, StrategyConfig):
        return data
    if isinstance(data, str):
        data = {"name": data}
    configs = all_configs()
    if not isinstance(data, dict) or "name" not in data:
        raise ValueError(f"a strategy needs a 'name'; valid: {', '.join(configs)}")
    if data["name"] not in configs:
        raise ValueError(f"unknown strategy {data['name']!r}{did_you_mean(str(data['name']), configs)}; "
                         f"valid: {', '.join(configs)}")
    return configs[data["name"]].model_validate(data)


def get(cfg: StrategyConfig) -> Strategy:
    if cfg.name not in _STRATEGIES:
        import_all(__name__, skip={"configs"})
    if cfg.name not in _STRATEGIES:
        raise ConfigError(f"strategies: {cfg.name!r} has a config but no implementation")
    return _STRATEGIES[cfg.name](cfg)


def trainable(model) -> list[tuple[str, "torch.nn.Parameter"]]:
    """The model's trainable parameters by name (what EWC and L2 anchor)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
