"""Optimizer and learning-rate schedule (transformers' schedulers with warmup)."""
from __future__ import annotations

import torch
from transformers import get_scheduler


def build_optimizer(method, model, cfg, device: torch.device) -> torch.optim.Optimizer:
    groups = method.param_groups(model, cfg.lr, cfg.weight_decay)
    if not groups:
        raise ValueError(f"method {method.name} left no trainable parameters")
    if cfg.optimizer == "paged_adamw_8bit":
        from ..methods.qlora import paged_adamw_8bit
        return paged_adamw_8bit(groups, cfg)
    fused = device.type == "cuda" and all(p.dtype.is_floating_point for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay, fused=fused or None)


def build_scheduler(optimizer, cfg, total_steps: int):
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[cfg.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps)
