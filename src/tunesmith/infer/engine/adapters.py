"""Several LoRA adapters on one base model, the adapter chosen per row of a batch.

Every adapted projection of the base model is wrapped once in a :class:`MultiLoraLinear` that
holds the low-rank factors of all loaded adapters side by side: A_cat (C, d_in) and B_cat
(d_out, C), C = the sum of their ranks, with ``col_slot`` (C,) naming the adapter of each column
and ``col_scale`` (C,) its scaling (alpha/r, or alpha/√r for rsLoRA). A_cat joins the base
weight as rows (:mod:`.joined`), so a mixed batch is two matmuls and one elementwise kernel per projection
whatever the number of adapters, with no gather of per-row weights. On the fast path, projections
that read one input (q/k/v, gate/up) are grouped (:mod:`.shared_input`) and the group holds its
layers' factors the same way, one pair of matmuls per group.

Adapters come from peft-format directories (tunesmith runs and adapters, peft's own) that are
plain LoRA: :func:`per_row_reasons` says why one is not (DoRA, trained biases or modules_to_save,
per-module ranks, methods whose base weights differ at load time such as QLoRA); those are
served with their own copy of the model instead. :class:`AdapterTable` adds and removes adapters
at run time.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
from torch import nn

from ...errors import ConfigError
from ...methods import peft_format
from ...methods.inject import TunedLayer, replace_module
from . import joined
from .shared_input import SharedInputLinear, unshare

Factors = dict[str, tuple[torch.Tensor, torch.Tensor, float]]   # module -> (A (r, d_in), B (d_out, r), scale)


def adapter_dir(path: str | Path) -> Path | None:
    """The peft-format adapter directory of a run directory or adapter directory (None: not one)."""
    p = Path(path)
    for cand in (p / "adapter", p):
        if (cand / peft_format.CONFIG_NAME).is_file():
            return cand
    return None


def per_row_reasons(path: Path) -> list[str]:
    """Why the adapter at ``path`` cannot be applied per row on a shared base (empty: it can)."""
    from ...export.rules import problems
    cfg = json.loads((path / peft_format.CONFIG_NAME).read_text())
    meta_file = path / peft_format.META_NAME
    reasons = []
    if meta_file.is_file():
        from ...methods import registry
        name = json.loads(meta_file.read_text())["method"]["name"]
        if not getattr(registry.get(name), "per_row_serving", False):
            reasons.append(f"it was trained with {name}, which changes how the base computes")
    _, state = peft_format.read_adapter(path)
    reasons += [r for r in problems("vllm", cfg, list(state)) if r not in reasons]
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        reasons.append("it has per-module ranks or alphas (rank_pattern/alpha_pattern)")
    return reasons


def read_factors(path: Path) -> Factors:
    """The (A, B, scale) of every adapted module of a plain LoRA adapter directory."""
    cfg, state = peft_format.read_adapter(path)
    r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", 8))
    scale = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
    out: Factors = {}
    for key, a in state.items():
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            b = state.get(module + ".lora_B.weight")
            if b is None:
                raise ConfigError(f"{path}: {key} has no matching lora_B tensor")
            out[module] = (a, b, scale)
    if not out:
        raise ConfigError(f"{path}: no lora_A/lora_B tensors in {peft_format.WEIGHTS_NAME}")
    return out


class MultiLoraLinear(TunedLayer):
    """A frozen linear layer plus the LoRA factors of every loaded adapter, chosen per row.

    The base weight lives inside ``W`` = [W0; A_cat] (:mod:`.joined`), the base layer's weight the
    view of its first d_out rows; ``B`` is B_cat."""

    def __init__(self, base: nn.Linear, table: "AdapterTable"):
        unshare(base)   # its weight becomes part of W below: out of its decode group first
        super().__init__(base)
        object.__setattr__(self, "table", table)   # not a submodule: shared by every wrapped layer
        self.parts: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
        for name in ("B", "W", "col_slot", "col_scale"):   # buffers: fixed addresses for CUDA graphs
            self.register_buffer(name, None, persistent=False)

    def set(self, slot: int, factors: tuple[torch.Tensor, torch.Tensor, float] | None) -> None:
        """Add (or with None remove) adapter ``slot``'s factors and rebuild the side-by-side tensors."""
        base = self.base_layer
        if factors is None:
            self.parts.pop(slot, None)
        else:
            a, b, s = factors
            if a.shape[1] != base.in_features or b.shape[0] != base.out_features:
                raise ConfigError(f"LoRA factors {tuple(b.shape)}·{tuple(a.shape)} do not fit a "
                                  f"{base.out_features}x{base.in_features} layer")
            self.parts[slot] = (a.to(base.weight.device, base.weight.dtype), b.to(base.weight.device, base.weight.dtype),
                                float(s))
        w0 = base.weight.detach()
        if not self.parts:
            base.weight = nn.Parameter(w0.contiguous(), requires_grad=False)   # its own storage again
            self.B = self.W = self.col_slot = self.col_scale = None
            return
        items = sorted(self.parts.items())
        dev, dtype = w0.device, w0.dtype
        self.W = joined.join(w0, torch.cat([a for _, (a, _, _) in items], dim=0))       # (d_out + C, d_in)
        self.B = torch.cat([b for _, (_, b, _) in items], dim=1)                        # (d_out, C)
        base.weight = nn.Parameter(self.W[: base.out_features], requires_grad=False)
        self.col_slot = torch.cat([torch.full((a.shape[0],), k, dtype=torch.long, device=dev)
                                   for k, (a, _, _) in items])
        self.col_scale = torch.cat([torch.full((a.shape[0],), s, dtype=dtype, device=dev)
                                    for _, (a, _, s) in items])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.table.rows
        if self.B is None or rows is None or self.disabled:
            return self.base_layer(x)
        m = joined.mask(rows, self.col_slot, self.col_scale, x.dtype)
        return joined.product(x, self.W, self.B, m, self.base_layer.bias)


class AdapterTable:
    """The named LoRA adapters installed on one base model; each has a slot id (>= 0)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.slots: dict[str, int] = {}
        self.modules: dict[str, list[str]] = {}
        self.rows: torch.Tensor | None = None
        self.version = 0     # bumped on every add / remove (compiled steps re-mark the new tensors)
        self._next = 0

    def __contains__(self, name: str) -> bool:
        return name in self.slots

    def names(self) -> list[str]:
        return list(self.slots)

    def add(self, name: str, factors: Factors) -> int:
        """Install ``factors`` under ``name``; returns its slot. All-or-nothing on a shape error."""
        if name in self.slots:
            raise ConfigError(f"adapter {name!r} is already loaded")
        found = dict(self.model.named_modules())
        for module, (a, b, _) in factors.items():
            m = found.get(module)
            base = m.base_layer if isinstance(m, MultiLoraLinear) else m
            if not isinstance(base, nn.Linear):
                raise ConfigError(f"adapter {name!r}: module {module!r} is not a linear layer of this base model "
                                  f"({type(self.model).__name__}); is the adapter for another base?")
            if a.shape[1] != base.in_features or b.shape[0] != base.out_features:
                raise ConfigError(f"adapter {name!r}: {module} is {base.out_features}x{base.in_features} here, "
                                  f"the adapter's factors are for {b.shape[0]}x{a.shape[1]} (another base model?)")
        slot = self._next
        self._next += 1
        for module, f in factors.items():
            m = found[module]
            if isinstance(m, SharedInputLinear):   # a layer of a decode group: the group takes its factors
                m._share.set(m._index, slot, f, self)
                continue
            if not isinstance(m, MultiLoraLinear):
                m = MultiLoraLinear(m, self)
                replace_module(self.model, module, m)
            m.set(slot, f)
        self.slots[name], self.modules[name] = slot, list(factors)
        self.version += 1
        return slot

    def remove(self, name: str) -> None:
        slot = self.slots.pop(name)
        for module in self.modules.pop(name):
            m = self.model.get_submodule(module)
            if isinstance(m, SharedInputLinear):
                m._share.set(m._index, slot, None, self)
                continue
            m.set(slot, None)
            if not m.parts:
                replace_module(self.model, module, m.base_layer)
        self.version += 1

    def layers(self) -> list:
        """Every wrapped layer and every decode group holding adapters (each with B, W, col_slot, col_scale)."""
        shares = [m._share for m in self.model.modules() if isinstance(m, SharedInputLinear) and m._index == 0]
        return [m for m in self.model.modules() if isinstance(m, MultiLoraLinear)] + [s for s in shares if s.B is not None]

    @contextlib.contextmanager
    def bind(self, slots: torch.Tensor, active: bool = True):
        """Within the block, row b of every forward uses adapter slot ``slots[b]`` (-1: none);
        ``active``: whether any row uses an adapter (known on the host, so no device sync here)."""
        self.rows = slots if self.slots and active else None
        try:
            yield
        finally:
            self.rows = None
