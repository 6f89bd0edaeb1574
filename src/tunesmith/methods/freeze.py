"""Layer freezing: train chosen transformer blocks (and optionally embeddings/heads), freeze the rest.

Blocks are found without per-architecture code: the model's largest ``nn.ModuleList`` (by
parameter count) is taken as its stack of layers. Only the trained tensors are saved, as a delta
against the base model.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from torch import nn

from ..errors import ConfigError
from ..models.targets import task_heads
from . import delta
from .registry import Method, MethodConfig, register

LayerSpec = int | str


class FreezeConfig(MethodConfig):
    name: Literal["freeze"] = "freeze"
    layers: LayerSpec | list[LayerSpec] = Field(
        "last 2", description="Blocks to train: indices (negative counts from the end), 'a-b' ranges, "
                              "'first k', 'last k', 'all' or 'none'.")
    include: list[str] = Field(default_factory=list, description="Regexes (searched in parameter names) of "
                                                                 "further parameters to train.")
    exclude: list[str] = Field(default_factory=list, description="Regexes of parameters kept frozen even if "
                                                                 "selected above.")
    embeddings: bool = Field(False, description="Also train the input embeddings.")
    head: bool | None = Field(None, description="Train the task head (null: yes for classification heads).")

    @field_validator("include", "exclude")
    @classmethod
    def _regex(cls, v):
        for r in v:
            try:
                re.compile(r)
            except re.error as e:
                raise ValueError(f"invalid regex {r!r}: {e}") from None
        return v


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The dotted name and module of the model's stack of transformer blocks."""
    best, best_n = None, -1
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0:
            n = sum(p.numel() for p in m.parameters())
            if n > best_n:
                best, best_n = (name, m), n
    if best is None:
        raise ConfigError(f"method freeze: {type(model).__name__} has no ModuleList of layers")
    return best


def parse_layers(spec: LayerSpec | list[LayerSpec], n: int) -> list[int]:
    """Indices selected by ``spec`` among ``n`` blocks, sorted."""
    items = spec if isinstance(spec, list) else [spec]
    out: set[int] = set()
    for item in items:
        bad = ConfigError(f"method.layers: {item!r} is not a layer selector for a model with {n} layers "
                          f"(valid: 0..{n - 1}, -1..-{n}, 'a-b', 'first k', 'last k', 'all', 'none')")
        if isinstance(item, int):
            if not -n <= item < n:
                raise bad
            out.add(item % n)
            continue
        s = str(item).strip().lower()
        if s == "all":
            out.update(range(n))
        elif s == "none":
            continue
        elif m := re.fullmatch(r"(first|last)\s+(\d+)", s):
            k = int(m.group(2))
            if not 0 < k <= n:
                raise bad
            out.update(range(k) if m.group(1) == "first" else range(n - k, n))
        elif m := re.fullmatch(r"(-?\d+)\s*-\s*(-?\d+)", s):
            a, b = int(m.group(1)), int(m.group(2))
            if not (0 <= a <= b < n):
                raise bad
            out.update(range(a, b + 1))
        elif re.fullmatch(r"-?\d+", s):
            out.update(parse_layers(int(s), n))
        else:
            raise bad
    return sorted(out)


@register
class Freeze(Method):
    name = "freeze"
    family = "selective"
    summary = "Train chosen layers (index, range, first/last k, regex), freeze the rest; saves a delta."
    Config = FreezeConfig
    artifact = "delta"
    upcast_trainable = False
    identity_at_init = True
    mergeable = True
    invariant_cases = [
        {},
        {"options": {"layers": [0], "embeddings": True, "exclude": ["norm"]}},
        {"arch": "bert", "task": "classification", "options": {"layers": "first 1"}},
    ]

    def trainable_names(self, model: nn.Module) -> list[str]:
        cfg = self.cfg
        prefix, blocks = find_blocks(model)
        chosen = parse_layers(cfg.layers, len(blocks))
        layer_prefixes = tuple(f"{prefix}.{i}." for i in chosen)
        heads = tuple(f"{h}." for h in task_heads(model)) if cfg.head is not False else ()
        emb = model.get_input_embeddings() if cfg.embeddings else None
        emb_ids = {id(p) for p in emb.parameters()} if emb is not None else set()
        names = []
        for n, p in model.named_parameters():
            keep = n.startswith(layer_prefixes) or (heads and n.startswith(heads)) or id(p) in emb_ids
            keep = keep or any(re.search(r, n) for r in cfg.include)
            if keep and not any(re.search(r, n) for r in cfg.exclude):
                names.append(n)
        if not names:
            raise ConfigError(f"method freeze: the selection (layers={cfg.layers!r}, include={cfg.include}) "
                              "leaves no parameter to train")
        return names

    def apply(self, model: nn.Module) -> nn.Module:
        names = set(self.trainable_names(model))
        for n, p in model.named_parameters():
            p.requires_grad_(n in names)
        return model

    def save(self, model: nn.Module, out_dir: Path, base_name: str) -> Path:
        return delta.write_delta(out_dir / "delta", self.trainable_state(model), base=base_name,
                                 method=self.cfg.model_dump(mode="json"))

    @classmethod
    def load_artifact(cls, model: nn.Module, path: Path) -> nn.Module:
        return delta.apply_delta(model, path)
