"""Adapters in HF peft's on-disk format: adapter_config.json + adapter_model.safetensors.

Keys are peft's: ``base_model.model.<module path>.<param>``, with the adapter name removed and
``modules_to_save`` tensors stored under the module's own path. A ``tunesmith.json`` beside them
records the tunesmith method config (peft ignores it) and the base model as tunesmith names it
(``base``: an embedded name, a GGUF file, a model directory or hub id). ``base_model_name_or_path``
in adapter_config.json is written for peft users: an embedded model's hub id (its original
weights), never tunesmith's local conversion cache.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError, FileError
from ..files import load_safetensors, read_json, torch_load

if TYPE_CHECKING:  # torch is imported where it is used: the export command's help needs none of it
    import torch
    from torch import nn

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
META_NAME = "tunesmith.json"


def task_type(model: nn.Module) -> str:
    archs = getattr(getattr(model, "config", None), "architectures", None) or []
    cls = type(model).__name__
    if "SequenceClassification" in cls or any("SequenceClassification" in a for a in archs):
        return "SEQ_CLS"
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"
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


def write_configs(out_dir: Path, config: dict, meta: dict) -> None:
    """adapter_config.json (its base as peft users load it) and tunesmith.json (as tunesmith names it)."""
    from ..models.loader import peft_base_name
    if config.get("base_model_name_or_path"):
        config = {**config, "base_model_name_or_path": peft_base_name(config["base_model_name_or_path"])}
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    (out_dir / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))


def write_adapter(out_dir: Path, config: dict, state: dict[str, torch.Tensor], meta: dict) -> Path:
    from safetensors.torch import save_file
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(to_peft_keys(state), str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    write_configs(out_dir, config, meta)
    return out_dir


def read_adapter(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg_file, w_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_file.is_file():
        raise ConfigError(f"{path}: not an adapter directory (no {CONFIG_NAME})")
    config = read_json(cfg_file)
    if w_file.is_file():
        raw = load_safetensors(w_file)
    elif (path / "adapter_model.bin").is_file():
        raw = torch_load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ConfigError(f"{path}: no {WEIGHTS_NAME} beside {CONFIG_NAME}")
    return config, {from_peft_key(k): v for k, v in raw.items()}


def read_meta(path: Path) -> dict | None:
    """tunesmith.json of an adapter directory (None for a plain peft adapter), checked: it names the
    method (``method.name``) and the base model (``base``)."""
    f = Path(path) / META_NAME
    if not f.is_file():
        return None
    meta = read_json(f, required={"base": f"it should name the base model; pass base=... to tunesmith.load "
                                          f"or delete {META_NAME} to load the adapter as plain peft"})
    method = meta.get("method")
    if not isinstance(method, dict) or not isinstance(method.get("name"), str):
        raise FileError(f"{f}: field 'method' should be the method's config with its 'name', found "
                        f"{method!r}; delete {META_NAME} to load the adapter as plain peft")
    return meta


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Copy adapter tensors into the model's matching parameters; every tensor must land."""
    import torch
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
