"""The run config: pydantic models for the YAML sections model, method, objective, data, train, output.

Every field is documented once, on the field; the config reference (docs/config.md, written by
``python -m tunesmith.docs``) and CLI help come from these descriptions. Unknown keys are errors. YAML is read with ``yaml.safe_load`` only.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from .data.config import DataConfig
from .config_errors import format_errors, message
from .errors import ConfigError, did_you_mean
from .methods import registry
from .methods.registry import MethodConfig
from .models.config import ModelConfig
from .train import objectives, regularizers
from .train.objectives import ObjectiveConfig
from .train import strategies
from .train.strategies import StrategyConfig
from .train.regularizers import Regularizer

SECTIONS = ("model", "method", "objective", "data", "train", "output", "init_from", "strategies")
_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: str | int | float | None, field_name: str = "train.memory_limit") -> int | None:
    """``24GiB``, ``24 GB``, ``1.5e10`` or a number of bytes → bytes (None stays None)."""
    if value is None or isinstance(value, (int, float)):
        return None if value is None else int(value)
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([KMGT]i?B|B)?\s*", str(value), re.IGNORECASE)
    if not m:
        raise ConfigError(f"{field_name}: {value!r} is not a size; write e.g. 24GiB, 80GB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)
    objective: str = Field("auto", description="Shorthand for `objective: {name: ...}` (the objective with its "
                                               "default fields); auto: from data.format, and seq2seq for "
                                               "encoder-decoder models. Always equals objective.name once resolved.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs when set.")
    epochs: float | None = Field(None, gt=0, description="Passes over the training data (default 1 when max_steps is unset).")
    lr: float | None = Field(None, gt=0, description="Peak learning rate (null: the method's own default, listed by "
                                                    "`tunesmith methods` and said in the summary).")
    head_lr: float | None = Field(None, gt=0, description="Peak learning rate of a classification task head (score, "
                                                         "classifier), which starts at random (null: with lr unset "
                                                         "too, the method's own head rate; with lr set, lr).")
    batch_size: int = Field(4, ge=1, description="Examples per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_seq_len: int = Field(512, ge=8, description="Tokens per example after truncation (block size when packing).")
    seed: int = Field(42, description="Seed for initialisation, data order, splits and dropout.")
    scheduler: Literal["constant", "linear", "cosine", "cosine_with_restarts", "polynomial", "warmup_stable_decay"] = Field(
        "cosine", description="Learning-rate schedule after warmup (transformers' get_scheduler): constant, linear "
                              "or cosine decay to 0, cosine_with_restarts (num_cycles hard restarts), polynomial "
                              "(to lr_end with power), warmup_stable_decay (constant, then decay over "
                              "num_decay_steps; default the last 10%). Options in scheduler_options.")
    scheduler_options: dict[str, float | int | str] = Field(
        default_factory=dict, description="Keyword arguments of the schedule's transformers function, e.g. "
                                          "{num_cycles: 2} for cosine_with_restarts, {power: 2, lr_end: 1e-6} for "
                                          "polynomial, {num_decay_steps: 100, min_lr_ratio: 0.1} for "
                                          "warmup_stable_decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps from 0 to lr.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Warmup as a fraction of the run's steps (rounded up); "
                                                            "set this or warmup_steps, not both.")
    regularize: dict[str, SerializeAsAny[Regularizer]] = Field(
        default_factory=dict, description="Regularisers by name with their fields, e.g. {neftune: {alpha: 5}, "
                                          "label_smoothing: {epsilon: 0.1}} (docs/regularization.md lists them).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (matrices only).")
    optimizer: Literal["adamw", "paged_adamw_8bit"] = Field(
        "adamw", description="Optimizer: adamw (fused on CUDA) or paged_adamw_8bit (bitsandbytes, CUDA; "
                             "QLoRA's paged 8-bit AdamW).")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float | None = Field(1.0, description="Gradient clipping norm; null disables.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Compute precision: auto = bf16 autocast on CUDA, fp32 on CPU.")
    speed: Literal["auto", "off"] = Field(
        "auto", description="auto: on CUDA, the speed fields left unset (compile, gradient_checkpointing, "
                            "checkpoint_layers, offload_activations, offload_kept_layers) are chosen from the model, the "
                            "batch and the GPU's free memory (within memory_limit), and the summary says what and why; "
                            "off: unset fields mean off. Either way nothing changes on the CPU.")
    memory_limit: str | None = Field(
        None, description="GPU memory the speed choice may plan for, e.g. 24GiB (null: the GPU's free memory).")
    gradient_checkpointing: bool | None = Field(
        None, description="Recompute activations in backward to save memory (null: chosen by train.speed).")
    checkpoint_layers: int | None = Field(
        None, ge=0, description="With gradient_checkpointing: recompute only this many transformer blocks, spread "
                                "evenly (null: chosen by train.speed, or all with speed off); the others keep their "
                                "activations: faster, more memory. 0 (with offload_activations and compile): no "
                                "block recomputes, and every block's activations wait in host memory except those "
                                "of the offload_kept_layers last ones.")
    offload_activations: bool | None = Field(
        None, description="With gradient_checkpointing: keep each checkpointed block's input in pinned host memory, "
                          "copied on a side stream (CUDA). Frees layers × tokens × width of GPU memory: long context. "
                          "With compile, also the activations of the blocks outside checkpoint_layers. "
                          "Null: chosen by train.speed.")
    offload_kept_layers: int | None = Field(
        None, ge=0, description="With offload_activations and compile: how many of the last blocks outside "
                                "checkpoint_layers keep their activations on the GPU instead of in host memory "
                                "(null: chosen by train.speed, or 1). Backward reaches them first, before a round trip to the host could end; "
                                "each costs one block's activations of GPU memory and spares the host link its copies.")
    chunked_ce: bool | Literal["auto"] = Field(
        "auto", description="Causal LM loss through the chunked linear cross-entropy (no full logits tensor); "
                            "auto = on CUDA only.")
    loss_chunk_logits: int | None = Field(
        None, ge=1, description="Logits per chunk of the chunked loss of sft and pt (chunked_ce): larger chunks "
                                "take more memory (4 bytes a logit, and the logits' gradient) and fewer, larger "
                                "matrix products and launches a step. Null: 2^27 with a trained head, else 2^25, "
                                "and on CUDA train.speed takes 2^27 where its plan leaves the memory for it.")
    liger: bool = Field(False, description="Patch liger-kernel's Triton RMSNorm, SwiGLU and RoPE into the model "
                                           "(CUDA; `pip install liger-kernel`).")
    compile: bool | None = Field(None, description="torch.compile each decoder layer (one graph a layer) and the "
                                                    "chunked loss's per-chunk softmax; the first steps include "
                                                    "compile time. Null: chosen by train.speed.")
    padding_free: bool = Field(False, description="Pack whole examples end to end into one row per micro-batch, "
                                                  "with document-masked attention and no pad tokens (the objectives that "
                                                  "declare packing: sft, pt, and dpo, orpo, simpo, whose pairs "
                                                  "become two documents each).")
    max_tokens_per_batch: int | None = Field(
        None, ge=8, description="Tokens per packed micro-batch with padding_free (default batch_size × max_seq_len).")
    eval_every: int | None = Field(None, ge=1, description="Evaluate every N steps (always at start and end).")
    eval_batches: int | None = Field(None, ge=1, description="Cap on evaluation batches (null = the whole set).")
    eval_metrics: list[str] | None = Field(
        None, description="Metrics computed at each evaluation besides the loss, written to metrics.jsonl and "
                          "drawn in loss.png: names from `tunesmith eval`'s registry (docs/eval.md), e.g. "
                          "[accuracy, f1, confusion_matrix] for cls, [perplexity, rouge, bleu, exact_match] for sft "
                          "(generation metrics decode the evaluated validation prompts greedily). Null: accuracy "
                          "and f1 (macro, micro, per class) for cls, none otherwise.")
    save_every: int | None = Field(None, ge=1, description="Checkpoint every N steps (default: at each eval and at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept in checkpoints/ (oldest removed first).")
    log_every: int = Field(1, ge=1, description="Write a train-loss line to metrics.jsonl every N steps.")
    divergence_steps: int | None = Field(
        5, ge=1, description="Stop the run (keeping the last good checkpoint, saving no result) when for this "
                             "many steps in a row the loss sits at the level of a uniform guess after starting "
                             "below it, or rises above twice its start plus 1, or the gradient norm is exactly 0 "
                             "(needs max_grad_norm); a NaN/inf loss stops at once. null: only NaN/inf stops.")
    progress: bool = Field(True, description="Show a progress bar.")
    report_to: list[str] = Field(
        default_factory=list, description="Experiment trackers that receive every metrics.jsonl record as well: "
                                          "tensorboard (event files in RUN_DIR/tensorboard; `pip install "
                                          "tensorboard`), wandb (`pip install wandb`; project $WANDB_PROJECT).")
    parallel: Literal["auto", "fsdp", "ddp"] = Field(
        "auto", description="With more than one process (`torchrun --nproc_per_node N -m tunesmith train`, or "
                            "`tunesmith train CONFIG --nproc N`): fsdp shards weights, gradients and optimizer states "
                            "over the processes (FSDP2); ddp keeps the whole model on each and averages the gradients once "
                            "a step; auto: ddp where weights, gradients and AdamW states take at most half a GPU's "
                            "memory (always on the CPU) or the method's hooks need whole tensors, else fsdp "
                            "(docs/distributed.md). Ignored with one process.")

    @field_validator("regularize", mode="before")
    @classmethod
    def _regularize(cls, v):
        if not isinstance(v, dict):
            raise ValueError(f"expected a mapping of regulariser names to their fields, got {v!r}")
        out = {}
        for name, fields in v.items():
            try:
                out[name] = regularizers.build(name, fields)
            except ValidationError as e:
                first = e.errors()[0]
                where = ".".join(str(x) for x in first["loc"])
                raise ValueError(f"{name}.{where}: {first['msg']} (got {first.get('input')!r})") from None
        return out

    @field_validator("report_to")
    @classmethod
    def _trackers(cls, v):
        from .train.tracking import TRACKERS
        bad = [n for n in v if n not in TRACKERS]
        if bad:
            raise ValueError(f"unknown tracker {bad[0]!r}{did_you_mean(bad[0], TRACKERS)}; valid: {', '.join(TRACKERS)}")
        return v

    @field_validator("memory_limit")
    @classmethod
    def _size(cls, v):
        try:
            parse_bytes(v)
        except ConfigError as e:
            raise ValueError(str(e).split(": ", 1)[1]) from None
        return v

    @field_validator("eval_metrics")
    @classmethod
    def _metrics(cls, v):
        if v is not None:
            from .eval import metrics
            try:
                metrics.check(v, where="eval_metrics")
            except ConfigError as e:
                raise ValueError(str(e).split(": ", 1)[1]) from None
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("set either max_steps or epochs, not both")
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("set either warmup_steps or warmup_ratio, not both")
        return self


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)
    dir: str = Field("runs/run", description="Run directory; if it exists a suffix -2, -3, … is added.")
    plot: bool = Field(True, description="Draw loss.png (train and eval curves).")


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), defer_build=True)
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: SerializeAsAny[MethodConfig] = Field(description="Method name plus its fields (see `tunesmith methods`).")
    objective: SerializeAsAny[ObjectiveConfig] | None = Field(
        None, description="Objective name plus its fields (the README's objectives table); null: train.objective, "
                          "or picked from data.format.")
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    init_from: str | None = Field(
        None, description="A completed run directory to start from (same method): its final trainable weights (the "
                          "adapter, the delta or the model's weights) are loaded after the method is applied, and "
                          "training continues from them (docs/strategies.md).")
    strategies: list[SerializeAsAny[StrategyConfig]] = Field(
        default_factory=list, description="Extra loss terms plugged into the loop, each name plus its fields: ewc, "
                                          "l2 (towards the init_from weights), dann (docs/strategies.md).")

    @field_validator("strategies", mode="before")
    @classmethod
    def _strategies(cls, v: Any):
        return [strategies.build_config(x) for x in (v or [])]

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, v: Any):
        if isinstance(v, MethodConfig):
            return v
        if isinstance(v, str):
            v = {"name": v}
        return registry.build_config(v)

    @field_validator("objective", mode="before")
    @classmethod
    def _objective(cls, v: Any):
        return v if v is None else objectives.build_config(v)

    @model_validator(mode="after")
    def _shorthand(self):
        """``train.objective`` names the objective section's objective (or builds it, with defaults)."""
        short = self.train.objective
        if self.objective is None and short != "auto":
            self.objective = objectives.build_config(short)
        elif self.objective is not None and short not in ("auto", self.objective.name):
            raise ValueError(f"train.objective {short!r} and objective.name {self.objective.name!r} differ; "
                             "set one of them")
        if self.objective is not None:
            self.train.objective = self.objective.name
        return self


def with_method_lr(cfg: RunConfig) -> tuple[RunConfig, str]:
    """(a copy of ``cfg`` with ``train.lr`` and ``train.head_lr`` filled, where ``lr`` came from: ``train.lr``
    or ``method default``). The method's defaults come as a pair: an unset ``head_lr`` takes the method's
    head rate when ``lr`` is unset too, and ``lr`` when the user set it."""
    update, source = {}, "train.lr"
    if cfg.train.lr is None:
        update["lr"], source = cfg.method.learning_rate(), "method default"
    if cfg.train.head_lr is None:
        update["head_lr"] = cfg.method.head_learning_rate() if source == "method default" else cfg.train.lr
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=update)}), source


def validate(data: dict, source: str = "config", overrides: dict[str, str] | None = None) -> RunConfig:
    """Validate a config dict; errors name the source (or the override), the field, the value and
    what is valid. ``overrides`` maps dotted keys set on the command line to how they were given."""
    overrides = overrides or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with sections {', '.join(SECTIONS)}")
    unknown = [k for k in data if k not in SECTIONS]
    if unknown:
        k = unknown[0]
        raise ConfigError(f"{source}: unknown section '{k}'{did_you_mean(k, SECTIONS)}; valid: {', '.join(SECTIONS)}")
    method = data.get("method")
    if isinstance(method, str):
        method = {"name": method}
        data = {**data, "method": method}
    if isinstance(method, dict):  # validate the method first so its errors say method.<field>
        try:
            cls = registry.config_class(method["name"]) if "name" in method else None  # ConfigError if unknown
            registry.build_config(method)
        except ConfigError as e:
            raise ConfigError(message([("method.name", str(e).split(": ", 1)[-1])], source, overrides)) from None
        except ValidationError as e:
            raise ConfigError(message(format_errors(e, cls or RunConfig, "method."), source, overrides)) from None
    objective = data.get("objective")
    if isinstance(objective, str):
        objective = {"name": objective}
        data = {**data, "objective": objective}
    short = (data.get("train") or {}).get("objective") if isinstance(data.get("train"), dict) else None
    if isinstance(short, str) and short != "auto" and objective is None:
        objective, where = {"name": short}, "train.objective"
    else:
        where = "objective.name"
    if isinstance(objective, dict):  # validated first so that its errors say objective.<field>
        try:
            ocls = objectives.config_class(objective.get("name"))
            ocls.model_validate(objective)
        except ConfigError as e:
            raise ConfigError(message([(where, str(e).split(": ", 1)[-1])], source, overrides)) from None
        except ValidationError as e:
            raise ConfigError(message(format_errors(e, ocls, "objective."), source, overrides)) from None
    for i, entry in enumerate(data.get("strategies") or [] if isinstance(data.get("strategies"), list) else []):
        where = f"strategies[{i}]"   # validated first so that its errors say strategies[i].<field>
        try:
            strategies.build_config(entry)
        except ValidationError as e:
            scls = strategies.all_configs()[entry if isinstance(entry, str) else entry["name"]]
            raise ConfigError(message(format_errors(e, scls, f"{where}."), source, overrides)) from None
        except ValueError as e:
            raise ConfigError(message([(where, str(e))], source, overrides)) from None
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(message(format_errors(e, RunConfig), source, overrides)) from None


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = path.read_bytes()
        data = yaml.safe_load(raw.decode("utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {col}); "
                          "re-save the file as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    return data or {}


def apply_overrides(data: dict, overrides: list[str] | dict[str, Any]) -> dict:
    """Apply ``a.b=value`` overrides (values parsed as YAML scalars) to a config dict, returning a copy."""
    import copy
    out = copy.deepcopy(data)
    items = overrides.items() if isinstance(overrides, dict) else [_split(o) for o in overrides]
    for key, value in items:
        parts = key.split(".")
        if parts[0] not in SECTIONS:
            raise ConfigError(f"override {key!r}: unknown section '{parts[0]}'{did_you_mean(parts[0], SECTIONS)}; "
                              f"valid: {', '.join(SECTIONS)}")
        if parts[0] in ("method", "objective") and isinstance(out.get(parts[0]), str) and len(parts) > 1:
            out[parts[0]] = {"name": out[parts[0]]}  # `method: lora` given as a name
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: '{p}' is not a section")
        node[parts[-1]] = value
    return out


def _split(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.sub=value, e.g. train.lr=1e-4")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load(path_or_dict: str | Path | dict | RunConfig, overrides=None) -> RunConfig:
    """Config from a YAML path, a dict or a RunConfig, with optional overrides."""
    if isinstance(path_or_dict, RunConfig):
        if not overrides:
            return path_or_dict
        path_or_dict = path_or_dict.model_dump(mode="json")
    source = str(path_or_dict) if isinstance(path_or_dict, (str, Path)) else "config"
    data = load_yaml(path_or_dict) if isinstance(path_or_dict, (str, Path)) else path_or_dict
    if overrides:
        data = apply_overrides(data, overrides)
    return validate(data, source, given_overrides(overrides))


def given_overrides(overrides) -> dict[str, str]:
    """Dotted key -> the override as given, for :func:`validate` to blame its errors on."""
    if isinstance(overrides, dict):
        return {k: f"{k}={v}" for k, v in overrides.items()}
    return {o.split("=", 1)[0].strip(): o.strip() for o in overrides or []}


def load_run(run_dir: str | Path, overrides=None) -> RunConfig:
    """The config of the run directory ``run_dir`` (for --resume), with optional overrides."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.yaml there; is it a tunesmith run directory?")
    return load(path, overrides)


def dump(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
