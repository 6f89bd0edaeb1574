"""Delta checkpoints: only the tensors (or tensor entries) a method changed, loaded onto the base.

``delta/`` holds ``delta.safetensors`` and ``delta_config.json``::

    {"format": "tunesmith-delta", "version": 2, "base_model_name_or_path": ..., "method": {...},
     "tensors": {"<param name>": {"kind": "dense"},
                 "<param name>": {"kind": "sparse", "shape": [...], "count": k}},
     "stats": {"dense_tensors": ..., "sparse_tensors": ..., "stored_values": ..., "bytes": ...}}

A dense entry (safetensors key ``<name>``) replaces the whole base tensor. A sparse entry stores
the flat positions ``<name>@indices`` (int32, or int64 for tensors of 2^31 entries or more) and
the new values ``<name>@values`` (the base tensor's dtype) of the changed entries: loading writes
``base.flatten()[indices] = values``. Values are stored, not differences, so base + delta equals
the trained tensor bit for bit. :func:`pack` picks dense storage whenever the sparse form would
not be smaller (which includes every small tensor). Version-1 deltas (dense entries only) load unchanged.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import ConfigError, FileError
from ..files import load_safetensors, read_json

CONFIG_NAME = "delta_config.json"
WEIGHTS_NAME = "delta.safetensors"
#: Header bytes a sparse entry costs beyond its data (two safetensors keys and a JSON entry); a
#: tensor is stored dense unless its sparse form is smaller by at least this much, so small
#: tensors (biases, norm weights) are always dense.
SPARSE_OVERHEAD = 256


@dataclass
class Sparse:
    """Changed entries of one tensor: flat ``indices`` into a tensor of ``shape`` and their ``values``."""

    indices: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, ...]

    def nbytes(self) -> int:
        return self.indices.numel() * self.indices.element_size() + self.values.numel() * self.values.element_size()


Entry = torch.Tensor | Sparse


def index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def pack(tensor: torch.Tensor, indices: torch.Tensor | None) -> Entry:
    """The smaller of dense ``tensor`` and its entries at flat ``indices`` (None: dense)."""
    dense_bytes = tensor.numel() * tensor.element_size()
    if indices is None or indices.numel() * (4 + tensor.element_size()) + SPARSE_OVERHEAD >= dense_bytes:
        return tensor
    idx = indices.to(index_dtype(tensor.numel()))
    sparse = Sparse(idx, tensor.reshape(-1)[idx.long()], tuple(tensor.shape))
    return sparse if sparse.nbytes() + SPARSE_OVERHEAD < dense_bytes else tensor


def write_delta(out_dir: Path, tensors: dict[str, Entry], *, base: str, method: dict) -> Path:
    """Write ``tensors`` (dense tensors or :class:`Sparse` entries, by parameter name) to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    flat: dict[str, torch.Tensor] = {}
    specs: dict[str, dict] = {}
    for name, entry in tensors.items():
        if isinstance(entry, Sparse):
            flat[f"{name}@indices"] = entry.indices
            flat[f"{name}@values"] = entry.values
            specs[name] = {"kind": "sparse", "shape": list(entry.shape), "count": int(entry.values.numel())}
        else:
            flat[name] = entry
            specs[name] = {"kind": "dense"}
    save_file({k: v.detach().contiguous().cpu() for k, v in flat.items()}, str(out_dir / WEIGHTS_NAME))
    kinds = [s["kind"] for s in specs.values()]
    stats = {"dense_tensors": kinds.count("dense"), "sparse_tensors": kinds.count("sparse"),
             "stored_values": sum(int(flat[k].numel()) for k in flat if not k.endswith("@indices")),
             "bytes": (out_dir / WEIGHTS_NAME).stat().st_size}
    cfg = {"format": "tunesmith-delta", "version": 2, "base_model_name_or_path": base, "method": method,
           "tensors": specs, "stats": stats}
    (out_dir / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
    return out_dir


def read_config(path: Path) -> dict:
    f = Path(path) / CONFIG_NAME
    if not f.is_file():
        raise ConfigError(f"{path}: not a tunesmith delta directory (no {CONFIG_NAME})")
    cfg = read_json(f)
    if not isinstance(cfg.get("tensors"), dict):
        raise FileError(f"{f}: field 'tensors' is {cfg.get('tensors')!r}, expected the delta's tensor list; "
                        "the file is damaged")
    return cfg


def apply_delta(model: nn.Module, path: Path) -> nn.Module:
    """Write the delta's tensors into ``model`` (a freshly loaded base) in place."""
    path = Path(path)
    cfg = read_config(path)
    tensors = load_safetensors(path / WEIGHTS_NAME)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, spec in cfg["tensors"].items():
            if name not in params:
                raise ConfigError(f"{path}: tensor {name} is not a parameter of the base model")
            target = params[name]
            if spec["kind"] == "dense":
                _check_shape(path, name, tuple(tensors[name].shape), target)
                target.copy_(tensors[name].to(target.dtype))
            elif spec["kind"] == "sparse":
                _check_shape(path, name, tuple(spec["shape"]), target)
                idx = tensors[f"{name}@indices"].to(target.device).long()
                target.view(-1)[idx] = tensors[f"{name}@values"].to(target.device, target.dtype)
            else:
                raise ConfigError(f"{path}: tensor {name} has unknown kind {spec['kind']!r} (valid: dense, sparse)")
    return model


def _check_shape(path: Path, name: str, shape: tuple, target: torch.Tensor) -> None:
    if shape != tuple(target.shape):
        raise ConfigError(f"{path}: tensor {name} has shape {list(shape)} but the base model's is "
                          f"{list(target.shape)}; is this delta for another base model?")


def size_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
