"""The method registry: the only list of fine-tuning methods in tunesmith.

A method is two parts: its pydantic ``Config`` (the YAML ``method:`` section, with the method's
``family`` and ``summary``), in ``tunesmith/methods/configs/<name>.py`` and registered with
:func:`register_config`; and its implementation, a subclass of :class:`Method` with an ``apply``, in
``tunesmith/methods/<name>.py`` and registered with :func:`register`. The configs import neither torch
nor transformers, so a config is validated, and ``tunesmith methods`` answers, before anything heavy
is loaded; a method's implementation is imported when it is first asked for. CLI help, docs tables,
tests and benchmarks all read :func:`all_configs` / :func:`all_methods`; every module in the two
packages is discovered, so a new method is one config file and one implementation file.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError, did_you_mean
from ..registering import add_config, config_name, import_all as _import_all, registered_name

if TYPE_CHECKING:
    import torch
    from torch import nn

FAMILIES = ("full", "selective", "additive", "low-rank")
_REGISTRY: dict[str, type["Method"]] = {}
_CONFIGS: dict[str, type["MethodConfig"]] = {}
_NOT_METHODS = {"registry", "inject", "layers", "peft_format", "delta", "configs"}


class MethodConfig(BaseModel):
    """Fields common to every method; each method's Config subclasses this and sets ``family`` and
    ``summary`` (one line for `tunesmith methods` and the docs)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, defer_build=True)
    family: ClassVar[str]
    summary: ClassVar[str]
    name: str = Field(description="Registered method name (see `tunesmith methods`).")
    #: The peak learning rate a run uses when ``train.lr`` is unset (docs/defaults.md has the runs
    #: behind each value); ``learning_rate()`` may make it depend on the method's options.
    default_lr: ClassVar[float] = 2e-4
    #: The peak rate of a classification task head (it starts at random, so it learns faster than the
    #: method's own parameters) when neither ``train.lr`` nor ``train.head_lr`` is set (None: the lr).
    default_head_lr: ClassVar[float | None] = 3e-2

    def learning_rate(self) -> float:
        """The default peak learning rate for this configuration of the method."""
        return self.default_lr

    def head_learning_rate(self) -> float:
        """The default peak rate of a classification task head (the method's own rate without a head default)."""
        return self.default_head_lr or self.learning_rate()


class Method:
    """A fine-tuning method. Subclasses set the class attributes and override ``apply``.

    Hooks default to doing nothing, so the training loop calls them unconditionally and never
    branches on the method's name.
    """

    name: ClassVar[str]
    family: ClassVar[str]
    summary: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    #: "adapter" (peft-format adapter/), "model" (full transformers dir) or "delta" (changed tensors).
    artifact: ClassVar[str] = "adapter"
    #: peft's ``peft_type`` for methods whose adapters peft can load (None: tunesmith-only format).
    peft_type: ClassVar[str | None] = None
    #: Whether ``tunesmith.load`` picks this method for a plain peft adapter (see accepts_peft).
    loads_peft: ClassVar[bool] = False
    #: Invariant-matrix declarations (tests/methods/test_invariants.py): the output equals the
    #: base model's at init; merge() folds the method into plain weights; configs to test.
    identity_at_init: ClassVar[bool] = False
    mergeable: ClassVar[bool] = False
    #: Why ``merge`` refuses a method that is not mergeable (said in the error).
    unmergeable_reason: ClassVar[str] = "its trained modules are not a change of the base weights"
    invariant_cases: ClassVar[list[dict]] = [{}]
    #: Keep trainable weights in fp32 when the base model is bf16/fp16.
    upcast_trainable: ClassVar[bool] = True
    #: Whether ``train.speed: auto`` compiles the model's blocks for this method on CUDA (methods whose
    #: compiled blocks are measured in bench/gpu_train.py; ``train.compile: true`` works for any method).
    auto_compile: ClassVar[bool] = False
    #: Whether the method trains on padding-free packed rows (``train.padding_free``).
    supports_packing: ClassVar[bool] = True
    #: Whether the model should load on the CPU, with ``apply`` placing it on ``self.device`` (QLoRA:
    #: the full-precision weights never occupy the GPU, each layer is quantized as it moves there).
    stages_on_cpu: ClassVar[bool] = False
    #: What the method needs beyond the model (said in docs/models.md), and whether this machine has it.
    requires: ClassVar[str | None] = None
    #: Whether a saved adapter is a plain LoRA computed on the unchanged base model, so the generation
    #: engine can apply it per row of a batch on a base shared with other adapters.
    per_row_serving: ClassVar[bool] = False

    def __init__(self, cfg: MethodConfig):
        self.cfg = cfg
        self.device: torch.device | None = None  # the run's device, where apply places a staged model

    @classmethod
    def available(cls) -> bool:
        """Whether this machine has what ``requires`` names (apply raises a ConfigError otherwise)."""
        return True

    # -- coverage (tests/test_coverage.py checks each against what apply and merge do) ---------
    def unsupported(self, model: nn.Module) -> str | None:
        """Why this method cannot be applied to ``model`` (None: it can), judged from the model's
        structure alone, so that docs/models.md can ask of weightless models; apply then raises a
        ConfigError that says so."""
        return None

    def merge_refusal(self, model: nn.Module) -> str | None:
        """Why ``merge`` refuses to fold this method into ``model`` (None: it folds)."""
        return None if self.mergeable else self.unmergeable_reason

    @classmethod
    def accepts_peft(cls, peft_cfg: dict) -> bool:
        """Whether a peft adapter_config.json (without tunesmith.json) is loaded by this method."""
        return cls.loads_peft and cls.peft_type == peft_cfg.get("peft_type")

    # -- building -------------------------------------------------------------------------
    def apply(self, model: nn.Module) -> nn.Module:
        """Wrap or mark modules of ``model`` in place and return it. Sets requires_grad."""
        raise NotImplementedError

    def prepare(self, model: nn.Module, batches, objective) -> None:
        """Called once before training with an iterable of training batches (e.g. Fisher masks)."""

    # -- training hooks -------------------------------------------------------------------
    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups; decay applies to matrices only."""
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay},
                  {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def on_train_begin(self, model: nn.Module, total_steps: int) -> None:
        """Once before a run's first optimizer step (and again on resume), with the run's step count."""

    def on_step_begin(self, model: nn.Module, step: int) -> None:
        """Before the forward passes of optimizer step ``step`` (0-based)."""

    def regularization(self, model: nn.Module) -> torch.Tensor | None:
        """An extra loss term added to the objective, or None."""
        return None

    def before_optimizer_step(self, model: nn.Module, step: int) -> None:
        """After backward and clipping, before ``optimizer.step()`` (gradient masks go here)."""

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """After ``optimizer.step()`` (rank allocation, re-masking)."""

    def param_counts(self, model: nn.Module) -> tuple[int, int]:
        """(trainable, total) parameters for the run summary; methods whose trainable tensors stand
        in for entries of frozen base tensors override it so that those are not counted twice."""
        seen, trainable, total = set(), 0, 0
        for p in model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
                trainable += p.numel() if p.requires_grad else 0
        return trainable, total

    # -- planning (`tunesmith estimate`) ---------------------------------------------------
    def trainable_count(self, model: nn.Module) -> int:
        """The parameters ``apply`` will train on ``model``, asked before it is applied, of a model that
        may hold no weights (the meta device). Methods give their closed form; this default applies the
        method to ``model`` (which needs no weights when a method only wraps or marks) and counts."""
        return self.param_counts(self.apply(model))[0]

    def memory_extras(self, model: nn.Module, act) -> dict[str, float]:
        """Bytes the method adds to a training step beyond weights, gradients, optimizer states and the
        blocks' activations, by what they are (``act``: planning.estimate.Activations, the step's shape)."""
        return {}

    def prepare_bytes(self, model: nn.Module, act) -> float:
        """Bytes ``prepare`` holds beside the weights before training (Fisher estimation), or 0."""
        return 0.0

    # -- state ----------------------------------------------------------------------------
    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What a checkpoint must hold to restore the method's weights: trainable params + state."""
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        import torch
        params = dict(model.named_parameters())
        missing = [k for k in state if k not in params]
        if missing:
            raise ConfigError(f"checkpoint holds tensors the model lacks: {missing[:5]}")
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)

    def save(self, model: nn.Module, out_dir: Path, base_name: str) -> Path:
        """Write the final artifact under ``out_dir`` and return its path."""
        raise NotImplementedError

    @classmethod
    def load_artifact(cls, model: nn.Module, path: Path) -> nn.Module:
        """Rebuild the method on a freshly loaded base ``model`` from a saved artifact."""
        raise NotImplementedError

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold the method into plain transformers modules and return the model (methods whose
        weights already sit in place need nothing); a method that cannot be folded refuses."""
        if not self.mergeable:
            raise ConfigError(f"merge: {self.name} cannot be folded into the weights of a plain model "
                              f"({self.unmergeable_reason}); use its adapter instead: tunesmith.load, "
                              "tunesmith.generate, or peft's PeftModel.from_pretrained")
        return model


def module_params(model: nn.Module, names: list[str]) -> int:
    """Parameters (each counted once) of the modules ``names`` of ``model``."""
    seen = {id(p): p.numel() for n in names for p in model.get_submodule(n).parameters()}
    return sum(seen.values())


def register_config(cls: type[MethodConfig]) -> type[MethodConfig]:
    """Class decorator: add a method's config under its ``name`` field's default."""
    if getattr(cls, "family", None) not in FAMILIES:
        raise ValueError(f"{cls.__name__}: family {getattr(cls, 'family', None)!r} not in {FAMILIES}")
    add_config(_CONFIGS, cls, "method")
    return cls


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method under its config's name; name, family and summary come from there."""
    name = registered_name(cls, _CONFIGS, "method", "tunesmith/methods/configs/")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"method name {name!r} registered twice")
    cls.name, cls.family, cls.summary = name, cls.Config.family, cls.Config.summary
    _REGISTRY[name] = cls
    return cls


def all_configs() -> dict[str, type[MethodConfig]]:
    """Every method's config by name, grouped by family; imports no torch."""
    _import_all("tunesmith.methods.configs")
    order = sorted(_CONFIGS.values(), key=lambda c: (FAMILIES.index(c.family), config_name(c)))
    return {config_name(c): c for c in order}


def all_methods() -> dict[str, type[Method]]:
    """Every registered method by name, grouped by family (full, selective, additive, low-rank)."""
    _import_all("tunesmith.methods", _NOT_METHODS)
    return {name: _REGISTRY[name] for name in all_configs() if name in _REGISTRY}


def config_class(name: str) -> type[MethodConfig]:
    """The config of method ``name``; ConfigError naming the valid methods otherwise (no torch import)."""
    if not isinstance(name, str):
        raise ConfigError(f"method.name: expected a method name, got {name!r} (see `tunesmith methods`)")
    configs = all_configs()
    if name not in configs:
        raise ConfigError(f"method.name: unknown method {name!r}{did_you_mean(name, configs)}; "
                          f"valid: {', '.join(configs)}")
    return configs[name]


def get(name: str) -> type[Method]:
    """The implementation of method ``name`` (imported on first use)."""
    config_class(name)
    if name not in _REGISTRY:
        try:
            importlib.import_module(f"tunesmith.methods.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"tunesmith.methods.{name}":
                raise
        if name not in _REGISTRY:
            all_methods()
    if name not in _REGISTRY:
        raise ConfigError(f"method.name: method {name!r} has a config but no implementation registered")
    return _REGISTRY[name]


def build_config(data: dict[str, Any]) -> MethodConfig:
    """Validate a ``method:`` section against the named method's Config."""
    if not isinstance(data, dict) or "name" not in data:
        raise ConfigError("method: needs a 'name' (see `tunesmith methods`)")
    return config_class(data["name"]).model_validate(data)


def attached(model: nn.Module) -> Method | None:
    """The method applied to ``model`` by tunesmith, if any."""
    return getattr(model, "_tunesmith_method", None)


def attach(model: nn.Module, method: Method) -> None:
    object.__setattr__(model, "_tunesmith_method", method)
