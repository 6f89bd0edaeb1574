"""Adapters in HF peft's on-disk format: adapter_config.json + adapter_model.safetensors.

Keys are peft's: ``base_model.model.<module path>.<param>``, with the adapter name removed and
``modules_to_save`` tensors stored under the module's own path. A ``tunesmith.json`` beside them
records the tunesmith method config (peft ignores it).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ConfigError

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
META_NAME = "tunesmith.json"


def task_type(model: nn.Module) -> str:
    archs = getattr(getattr(model, "config", None), "architectures", None) or []
    cls = type(model).__name__
    if "SequenceClassification" in cls or any("SequenceClassification" in a for a in archs):
        return "SEQ_CLS"
    if "CausalLM" in cls or "LMHead" in cls:
        return "CAUSAL_LM"
    return "FEATURE_EXTRACTION"


def to_peft_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {PREFIX + k: v.detach().contiguous().cpu() for k, v in state.items()}


def from_peft_key(key: str) -> str:
    key = key[len(PREFIX):] if key.startswith(PREFIX) else key
    # peft stores modules_to_save as <path>.weight, and older versions as
    # <path>.modules_to_save.weight; adapter names (".default") are removed on save.
    return key.replace(".modules_to_save.", ".").replace(".default.", ".")


def write_adapter(out_dir: Path, config: dict, state: dict[str, torch.Tensor], meta: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(to_peft_keys(state), str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    (out_dir / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out_dir


def read_adapter(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg_file, w_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_file.is_file():
        raise ConfigError(f"{path}: not an adapter directory (no {CONFIG_NAME})")
    config = json.loads(cfg_file.read_text())
    if w_file.is_file():
        raw = load_file(str(w_file))
    elif (path / "adapter_model.bin").is_file():
        raw = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ConfigError(f"{path}: no {WEIGHTS_NAME} beside {CONFIG_NAME}")
    return config, {from_peft_key(k): v for k, v in raw.items()}


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Copy adapter tensors into the model's matching parameters; every tensor must land."""
    params = dict(model.named_parameters())
    unknown = []
    with torch.no_grad():
        for k, v in state.items():
            target = params.get(k)
            if target is None:
                target = params.get(k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias"))
            if target is None:
                unknown.append(k)
                continue
            if target.shape != v.shape:
                raise ConfigError(f"{source}: tensor {k} has shape {tuple(v.shape)}, model expects {tuple(target.shape)}")
            target.copy_(v.to(target.dtype))
    if unknown:
        raise ConfigError(f"{source}: {len(unknown)} adapter tensors match no parameter of the model, "
                          f"e.g. {unknown[:3]} (is this adapter for another base model?)")
