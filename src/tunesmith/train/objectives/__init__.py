"""Training objectives, registered by name like methods: the only list of objectives in tunesmith.

An objective is two parts, as a method is. Its config, ``train/objectives/configs/<name>.py``, is an
:class:`ObjectiveConfig` subclass (the YAML ``objective:`` section: ``name`` plus the objective's own
fields) that also declares what the objective needs, as class variables: the model head (``task``,
``num_labels``), the data formats it reads (``formats``) and picks by default (``default_for``), the
tokenized shape it consumes (``tokenized``, a key of ``data.tokenize.SHAPES``), whether padding-free
packing (``packing``) and the chunked loss (``chunked_ce``) apply. The configs import neither torch nor
transformers, so a run is checked before anything heavy loads. Its implementation,
``train/objectives/<name>.py``, subclasses :class:`Objective` (the loss, the ``prepare`` hook) and is
imported when first asked for. Nothing else in tunesmith lists objective names.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from ...errors import ConfigError, did_you_mean
from ...registering import add_config, import_all, registered_name

if TYPE_CHECKING:
    import torch
    from torch import nn

_OBJECTIVES: dict[str, type["Objective"]] = {}
_CONFIGS: dict[str, type["ObjectiveConfig"]] = {}
TASKS = ("causal_lm", "classification", "seq2seq")
DECLARED = ("task", "num_labels", "formats", "default_for", "encoder_decoder", "tokenized", "packing", "chunked_ce",
            "loss_chunks", "eval_tasks", "online")


class ObjectiveConfig(BaseModel):
    """Fields common to every objective; each objective's config subclasses this, sets ``name:
    Literal["x"] = "x"``, ``summary`` and what it needs (the class variables below)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, defer_build=True)
    summary: ClassVar[str]
    #: The model head to load: causal_lm | classification | seq2seq.
    task: ClassVar[str] = "causal_lm"
    #: Outputs of a classification head fixed by the objective (rm: 1 scalar); None: from the data's labels.
    num_labels: ClassVar[int | None] = None
    #: Data formats the objective reads; ``default_for``: those for which objective auto picks it.
    formats: ClassVar[tuple[str, ...]] = ()
    default_for: ClassVar[tuple[str, ...]] = ()
    #: Picked by default for encoder-decoder models (True) or for the others (False).
    encoder_decoder: ClassVar[bool] = False
    #: The tokenized examples it consumes (``data.tokenize.SHAPES``).
    tokenized: ClassVar[str] = "sft"
    #: Whether ``train.padding_free`` and ``train.chunked_ce`` apply to it.
    packing: ClassVar[bool] = False
    chunked_ce: ClassVar[bool] = False
    #: Whether its chunked loss takes ``train.loss_chunk_logits`` (the causal LM loss of sft and pt).
    loss_chunks: ClassVar[bool] = False
    #: Whose metrics train.eval_metrics may name (tunesmith.eval).
    eval_tasks: ClassVar[tuple[str, ...]] = ("lm",)
    #: Whether it learns from its own samples (online RL: prompts as data, its own step; train/rl/).
    online: ClassVar[bool] = False
    name: str = Field(description="Registered objective name (see the objectives table in the README).")

    def check(self, train_cfg, method_cls, model_kind: str) -> None:
        """Refuse, before the model loads, a combination with the run that cannot work (ConfigError naming
        the fields). ``model_kind``: decoder | encoder | encoder-decoder."""


class Objective:
    """Computes a loss from a batch. ``loss`` returns (sum of per-item losses, item count, extra sums).

    The loop divides the summed loss by the item count of the whole optimizer step, so gradient
    accumulation weights every token (or example) equally. Extra sums (``{"correct": n}``,
    ``{"margin": Σ margin}``) are divided by the same count and logged as metrics (``correct`` as
    ``accuracy``). Hooks default to doing nothing, so the loop calls them unconditionally.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    Config: ClassVar[type[ObjectiveConfig]] = ObjectiveConfig

    def __init__(self, cfg: ObjectiveConfig | None = None):
        self.cfg = cfg if cfg is not None else self.Config()

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, dict]:
        """Extras may hold ``"records"``: one dict per item with the keys of ``tunesmith.eval.metrics``
        (for the metrics of ``train.eval_metrics``)."""
        raise NotImplementedError

    def configure(self, train_cfg) -> None:
        """Take options from the run's ``train`` config (default: none)."""

    def prepare(self, model: nn.Module, method, datasets: list, *, run) -> None:
        """Once before training (and before the method's own ``prepare``): what the objective needs from the
        tuned model and the method (a reference policy, cached reference log-probs). ``datasets``: the
        tokenized train and validation datasets; ``run``: the RunContext (config, device, precision, pad id)."""

    def train_step(self, *, batches, tokenizer, run):
        """The step the loop runs for this objective (train/step.py: a callable ``(loop, state) -> record``);
        None (the default): the offline step over ``batches``. Online RL objectives return their rollout step."""
        return None

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """Items the loss is averaged over (known before the forward pass)."""
        raise NotImplementedError

    def uniform_loss(self, model: nn.Module) -> float | None:
        """The loss of a uniform guess over the outcomes (divergence detection); None when it has none."""
        return None


def register_config(cls: type[ObjectiveConfig]) -> type[ObjectiveConfig]:
    """Class decorator: add an objective's config under its ``name`` field's default."""
    if cls.task not in TASKS:
        raise ValueError(f"{cls.__name__}: task {cls.task!r} not in {TASKS}")
    add_config(_CONFIGS, cls, "objective")
    return cls


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: add an objective under its config's name (name and summary come from there)."""
    name = registered_name(cls, _CONFIGS, "objective", "train/objectives/configs/")
    cls.name, cls.summary = name, cls.Config.summary
    for attr in DECLARED:  # what the config declares, readable on the implementation too
        setattr(cls, attr, getattr(cls.Config, attr))
    _OBJECTIVES[name] = cls
    return cls


def all_configs() -> dict[str, type[ObjectiveConfig]]:
    """Every objective's config by name; imports no torch."""
    import_all(f"{__name__}.configs")
    return dict(sorted(_CONFIGS.items()))


def all_objectives() -> dict[str, type[Objective]]:
    import_all(__name__, skip={"configs"})
    return {name: _OBJECTIVES[name] for name in all_configs() if name in _OBJECTIVES}


def config_class(name: str) -> type[ObjectiveConfig]:
    """The config of objective ``name``; ConfigError naming the valid objectives otherwise (no torch)."""
    configs = all_configs()
    if not isinstance(name, str) or name not in configs:
        raise ConfigError(f"objective.name: unknown objective {name!r}{did_you_mean(str(name), configs)}; "
                          f"valid: auto, {', '.join(configs)}")
    return configs[name]


def build_config(data: Any) -> ObjectiveConfig:
    """Validate an ``objective:`` section (a name, or a mapping with ``name``) against its config."""
    if isinstance(data, ObjectiveConfig):
        return data
    if isinstance(data, str):
        data = {"name": data}
    if not isinstance(data, dict) or "name" not in data:
        raise ConfigError("objective: needs a 'name' (see the objectives table in the README)")
    return config_class(data["name"]).model_validate(data)


def get(name_or_cfg: str | ObjectiveConfig | dict) -> Objective:
    """An objective instance for a name (its default fields) or a validated ``objective:`` section."""
    cfg = build_config(name_or_cfg)
    if cfg.name not in _OBJECTIVES:
        all_objectives()
    if cfg.name not in _OBJECTIVES:
        raise ConfigError(f"objective.name: objective {cfg.name!r} has a config but no implementation")
    return _OBJECTIVES[cfg.name](cfg)


def for_format(fmt: str, encoder_decoder: bool = False) -> str:
    """The default objective for a data format (and model kind: encoder-decoders have their own)."""
    found = [(name, cls) for name, cls in all_configs().items() if fmt in cls.default_for]
    for name, cls in found:
        if cls.encoder_decoder == encoder_decoder:
            return name
    if found:
        return found[0][0]
    raise ConfigError(f"objective: no default objective for data format {fmt!r}; set objective.name "
                      "(or train.objective)")
