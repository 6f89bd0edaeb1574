"""Delta checkpoints: only the tensors a method changed, loaded onto the base model.

``delta/`` holds ``delta.safetensors`` and ``delta_config.json``::

    {"format": "tunesmith-delta", "version": 1, "base_model_name_or_path": ..., "method": {...},
     "tensors": {"<param name>": {"kind": "dense"}}}

A dense entry replaces the base tensor. (Sparse entries store indices and values.)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ConfigError

CONFIG_NAME = "delta_config.json"
WEIGHTS_NAME = "delta.safetensors"


def write_delta(out_dir: Path, tensors: dict[str, torch.Tensor], *, base: str, method: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(out_dir / WEIGHTS_NAME))
    cfg = {"format": "tunesmith-delta", "version": 1, "base_model_name_or_path": base, "method": method,
           "tensors": {k: {"kind": "dense"} for k in tensors}}
    (out_dir / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
    return out_dir


def read_config(path: Path) -> dict:
    f = path / CONFIG_NAME
    if not f.is_file():
        raise ConfigError(f"{path}: not a tunesmith delta directory (no {CONFIG_NAME})")
    return json.loads(f.read_text())


def apply_delta(model: nn.Module, path: Path) -> nn.Module:
    """Write the delta's tensors into ``model`` (a freshly loaded base) in place."""
    cfg = read_config(path)
    tensors = load_file(str(path / WEIGHTS_NAME))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, spec in cfg["tensors"].items():
            if name not in params:
                raise ConfigError(f"{path}: tensor {name} is not a parameter of the base model")
            if spec["kind"] != "dense":
                raise ConfigError(f"{path}: tensor {name} has unknown kind {spec['kind']!r}")
            params[name].copy_(tensors[name].to(params[name].dtype))
    return model


def size_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
