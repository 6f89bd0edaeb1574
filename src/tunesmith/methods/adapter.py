"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP").

An adapter maps h ↦ h + s · f(h W_down + b_down) W_up + b_up (§2.1, Fig. 2): a down-projection
to m = d / reduction_factor, a nonlinearity f and an up-projection, with a residual. Placements:

* ``houlsby`` — after the attention and after the feed-forward sublayer of every block, on the
  sublayer's output projection before the block's residual (and LayerNorm, in BERT).
* ``pfeiffer`` — after the feed-forward sublayer only (Pfeiffer et al. 2021, AdapterFusion).
* ``parallel`` — beside the feed-forward sublayer: FFN(x) + s · f(x W_down) W_up from the
  sublayer's input x (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer
  Learning", §3, eq. 6 with scaling s = 4 by default).

Initialisation is near-identity (§3.6): W_down ~ truncated N(0, 10⁻²); W_up and the biases start
at zero, so the adapted model equals the base model exactly at step 0 (He et al. 2022 / LoRA's
choice; Houlsby draw W_up with the same small std). The modules come from the architecture's
target-module data (``attn_out``, ``ff_in``, ``ff_out`` in models/targets.py); where no single linear
layer gives the feed-forward output (mixture-of-experts blocks: ``ffn``), the adapter follows (or,
parallel, sits beside) the whole feed-forward module. Encoder-decoders get adapters after self-
and cross-attention and the feed-forward sublayer of both stacks.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..models.targets import arch, task_heads
from . import peft_format
from .inject import LINEAR_KINDS, TunedLayer, freeze_all, resolve_targets, tuned_layers, unfreeze_modules, wrap
from .registry import Method, attach, register
from .configs.adapter import AdapterConfig

NONLINEARITIES = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class Bottleneck(nn.Module):
    """h ↦ f(h W_down + b_down) W_up + b_up, d → m → d."""

    def __init__(self, d: int, m: int, act: str, like: torch.Tensor):
        super().__init__()
        self.down = nn.Linear(d, m, device=like.device, dtype=like.dtype)
        self.act = NONLINEARITIES[act]()
        self.up = nn.Linear(m, d, device=like.device, dtype=like.dtype)
        with torch.no_grad():
            nn.init.trunc_normal_(self.down.weight, std=1e-2, a=-2e-2, b=2e-2)
            for t in (self.down.bias, self.up.weight, self.up.bias):
                nn.init.zeros_(t)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        w = self.down.weight
        return self.up(self.act(self.down(h.to(w.dtype)))).to(h.dtype)


def _first_param(module: nn.Module) -> torch.Tensor:
    return next(module.parameters())


class SerialAdapter(TunedLayer):
    """A sublayer's output projection (or its whole feed-forward module) followed by an adapter:
    y = f(x); y + s · A(y), y of width d."""

    def __init__(self, base: nn.Module, d: int, m: int, act: str, scaling: float):
        super().__init__(base)
        self.adapter = Bottleneck(d, m, act, _first_param(base))
        self.scaling = scaling

    def forward(self, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(*args, **kwargs)
        if self.disabled:
            return y
        return y + self.scaling * self.adapter(y)


class InputTap(TunedLayer):
    """The feed-forward input projection; it keeps its input for the parallel adapter of its block."""

    last_input: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last_input = x
        return self.base_layer(x)


class ParallelAdapter(TunedLayer):
    """Feed-forward output projection plus s · A(x), x the sublayer's input (read from its tap)."""

    def __init__(self, base: nn.Linear, tap: InputTap, m: int, act: str, scaling: float):
        super().__init__(base)
        d = tap.base_layer.in_features
        if d != base.out_features:
            raise ConfigError(f"method.placement: parallel needs the feed-forward input width ({d}) to equal "
                              f"its output width ({base.out_features})")
        self.adapter = Bottleneck(d, m, act, base.weight)
        self.scaling = scaling
        object.__setattr__(self, "tap", tap)  # a reference, not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        h, self.tap.last_input = self.tap.last_input, None
        if self.disabled:
            return y
        return y + self.scaling * self.adapter(h)


class ParallelBlock(TunedLayer):
    """A whole feed-forward module (a mixture-of-experts block) plus s · A(x) from its own input x."""

    def __init__(self, base: nn.Module, d: int, m: int, act: str, scaling: float):
        super().__init__(base)
        self.adapter = Bottleneck(d, m, act, _first_param(base))
        self.scaling = scaling

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return y
        return y + self.scaling * self.adapter(x)


def _names(model: nn.Module, key: str, kinds=LINEAR_KINDS) -> list[str]:
    a = arch(model)
    if not a or key not in a:
        raise ConfigError(f"method adapter: no {key!r} module names for model type "
                          f"{getattr(model.config, 'model_type', '?')!r} in models/targets.py (the families "
                          "adapters know are listed in docs/models.md)")
    return resolve_targets(model, a[key], kinds=kinds, field=f"method adapter ({key})")


def _ff_sites(model: nn.Module) -> tuple[list[str], bool]:
    """The feed-forward sites and whether they are whole modules (``ffn``) rather than output projections."""
    if "ffn" in arch(model):
        return _names(model, "ffn", kinds=(nn.Module,)), True
    attn_out = set(_names(model, "attn_out"))
    return [n for n in _names(model, "ff_out") if n not in attn_out], False


def _serial(model: nn.Module, sites: list[str], d: int, m: int, act: str, scaling: float) -> None:
    for n in sites:
        wrap(model, n, lambda _, base: SerialAdapter(base, getattr(base, "out_features", d), m, act, scaling))


def _houlsby(model: nn.Module, d: int, m: int, act: str, scaling: float) -> None:
    _serial(model, _names(model, "attn_out") + _ff_sites(model)[0], d, m, act, scaling)


def _pfeiffer(model: nn.Module, d: int, m: int, act: str, scaling: float) -> None:
    _serial(model, _ff_sites(model)[0], d, m, act, scaling)


def _parallel(model: nn.Module, d: int, m: int, act: str, scaling: float) -> None:
    sites, whole = _ff_sites(model)
    if whole:
        for n in sites:
            wrap(model, n, lambda _, base: ParallelBlock(base, d, m, act, scaling))
        return
    ff_in = _names(model, "ff_in")
    for n in sites:
        src = max(ff_in, key=lambda c: len(os.path.commonprefix([c, n])))  # the same block's input projection
        tap = model.get_submodule(src)
        if not isinstance(tap, InputTap):
            tap = wrap(model, src, lambda _, base: InputTap(base))
        wrap(model, n, lambda _, base: ParallelAdapter(base, tap, m, act, scaling))


#: placement -> (where the adapters go, default output scale)
PLACEMENTS = {"houlsby": (_houlsby, 1.0), "pfeiffer": (_pfeiffer, 1.0), "parallel": (_parallel, 4.0)}


@register
class Adapter(Method):
    Config = AdapterConfig
    identity_at_init = True
    mergeable = False
    unmergeable_reason = "the bottleneck's nonlinearity keeps the adapter out of the weights"
    invariant_cases = [
        {},
        {"arch": "qwen2", "options": {"placement": "parallel", "reduction_factor": 8, "nonlinearity": "gelu"}},
        {"arch": "bert", "task": "classification", "options": {"placement": "pfeiffer"}},
        {"arch": "bert", "task": "classification", "options": {"placement": "parallel"}},
    ]

    def bottleneck(self, model: nn.Module) -> int:
        return max(1, int(model.get_input_embeddings().weight.shape[1] / self.cfg.reduction_factor))

    def apply(self, model: nn.Module) -> nn.Module:
        cfg = self.cfg
        freeze_all(model)
        place, default_scale = PLACEMENTS[cfg.placement]
        d = model.get_input_embeddings().weight.shape[1]
        place(model, d, self.bottleneck(model), cfg.nonlinearity, cfg.scaling or default_scale)
        for _, layer in tuned_layers(model):
            for p in layer.parameters():
                p.requires_grad_(True)
            for p in layer.base_layer.parameters():
                p.requires_grad_(False)
        self.saved_modules = unfreeze_modules(model, task_heads(model))
        return model

    def save(self, model: nn.Module, out_dir: Path, base_name: str) -> Path:
        state = self.trainable_state(model)
        config = {"peft_type": None, "task_type": peft_format.task_type(model), "base_model_name_or_path": base_name,
                  "tunesmith_method": self.name}
        meta = {"method": self.cfg.model_dump(mode="json"), "base": base_name}
        return peft_format.write_adapter(out_dir / "adapter", config, state, meta)

    @classmethod
    def load_artifact(cls, model: nn.Module, path: Path) -> nn.Module:
        _, state = peft_format.read_adapter(path)
        meta = peft_format.read_meta(path)
        if meta is None:
            raise ConfigError(f"{path}: no {peft_format.META_NAME}; a bottleneck adapter needs it to be rebuilt")
        method = cls(cls.Config.model_validate(meta["method"]))
        method.apply(model)
        peft_format.load_into(model, state, path)
        attach(model, method)
        return model


def adapter_trainable_count(d: int, m: int, sites: int) -> int:
    """Closed form: per adapter 2·d·m + m + d."""
    return sites * (2 * d * m + m + d)
