"""Optimizer and learning-rate schedule (transformers' schedulers with warmup)."""
from __future__ import annotations

import inspect
import math

import torch
from transformers import get_scheduler
from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

from ..errors import ConfigError
from ..models.targets import task_heads
from . import regularizers

#: train.scheduler -> transformers' scheduler name
SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine",
             "cosine_with_restarts": "cosine_with_restarts", "polynomial": "polynomial",
             "warmup_stable_decay": "warmup_stable_decay"}
_FIXED = {"optimizer", "num_warmup_steps", "num_training_steps", "last_epoch"}


def build_optimizer(method, model, cfg, device: torch.device) -> torch.optim.Optimizer:
    groups = head_groups(model, method.param_groups(model, cfg.lr, cfg.weight_decay), cfg.head_lr)
    groups = regularizers.param_groups(cfg, model, groups)   # weight-decay groups, layer-wise rates
    if not groups:
        raise ValueError(f"method {method.name} left no trainable parameters")
    if cfg.optimizer == "paged_adamw_8bit":
        from ..methods.qlora import paged_adamw_8bit
        return paged_adamw_8bit(groups, cfg)
    fused = device.type == "cuda" and all(p.dtype.is_floating_point for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay, fused=fused or None)


def head_groups(model, groups: list[dict], head_lr: float | None) -> list[dict]:
    """``groups`` with the task head's parameters (score, classifier) split into groups of their own at
    ``head_lr``, keeping the other keys (weight decay); unchanged without a head or when the rates agree."""
    heads = tuple(f"{h}." for h in task_heads(model))
    if not heads or head_lr is None or all(g["lr"] == head_lr for g in groups):
        return groups
    head = {id(p) for n, p in model.named_parameters() if n.startswith(heads)}
    out = []
    for g in groups:
        mine = [p for p in g["params"] if id(p) in head]
        rest = [p for p in g["params"] if id(p) not in head]
        out += [{**g, "params": rest}] if rest else []
        out += [{**g, "params": mine, "lr": head_lr, "head": True}] if mine else []
    return out


def scheduler_options(cfg) -> set[str]:
    """The keyword arguments train.scheduler's transformers function takes beyond the step counts."""
    fn = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(SCHEDULES[cfg.scheduler])]
    return set(inspect.signature(fn).parameters) - _FIXED


def check_scheduler(cfg) -> None:
    """ConfigError for a train.scheduler_options key the schedule does not take."""
    valid = scheduler_options(cfg)
    bad = sorted(set(cfg.scheduler_options) - valid)
    if bad:
        raise ConfigError(f"train.scheduler_options: {bad[0]!r} is not an option of scheduler {cfg.scheduler}; "
                          f"valid: {', '.join(sorted(valid)) or 'none'}")


def warmup_steps(cfg, total_steps: int) -> int:
    return math.ceil(cfg.warmup_ratio * total_steps) if cfg.warmup_ratio else cfg.warmup_steps


def build_scheduler(optimizer, cfg, total_steps: int):
    check_scheduler(cfg)
    options = dict(cfg.scheduler_options)
    warmup = warmup_steps(cfg, total_steps)
    if cfg.scheduler == "warmup_stable_decay" and "num_decay_steps" not in options:
        options["num_decay_steps"] = max(1, math.ceil(0.1 * total_steps))
    return get_scheduler(SCHEDULES[cfg.scheduler], optimizer, num_warmup_steps=warmup,
                         num_training_steps=total_steps, scheduler_specific_kwargs=options or None)
