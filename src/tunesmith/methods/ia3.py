"""(IA)³ (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning"), §3.3.

Learned vectors rescale the keys, the values and the feed-forward intermediate activations:
softmax(Q (l_k ⊙ K)ᵀ / √d) (l_v ⊙ V) and (l_ff ⊙ γ(W_1 x)) W_2, all initialised to ones (so the
model starts as the base model). Keys/values scale the projection's output; feed-forward
modules scale the input of the feed-forward output projection, as in HF peft (parameter
``ia3_l``, shape (d_out, 1) or (1, d_in), saved under peft's key names). Both fold into the
weights: W ← diag(l) W (and the bias) for outputs, W ← W diag(l) for inputs.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..models.targets import arch, task_heads, unknown_architecture
from . import peft_format
from .inject import (TunedLayer, fan_in_fan_out, freeze_all, inject, matches, resolve_targets, tuned_layers,
                     unfreeze_modules, unwrap)
from .registry import Method, attach, register
from .configs.ia3 import Ia3Config, Targets


class Ia3Out(TunedLayer):
    """y = l ⊙ (W x + b), l ∈ R^{d_out} (keys, values)."""

    def __init__(self, base: nn.Linear):
        super().__init__(base)
        w = base.weight
        self.ia3_l = nn.Parameter(torch.ones(base.out_features, 1, device=w.device, dtype=w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged or self.disabled:
            return y
        return (y * self.ia3_l.flatten()).to(y.dtype)

    def merge(self) -> None:
        if not self.merged:
            self._scale(self.ia3_l.data)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._scale(1.0 / self.ia3_l.data)
            self.merged = False

    def _scale(self, l: torch.Tensor) -> None:
        base = self.base_layer
        base.weight.data = (base.weight.data * l).to(base.weight.dtype)           # rows: diag(l) W
        if base.bias is not None:
            base.bias.data = (base.bias.data * l.flatten()).to(base.bias.dtype)


class Ia3In(Ia3Out):
    """y = W (l ⊙ x) + b, l ∈ R^{d_in} (feed-forward intermediate activations)."""

    def __init__(self, base: nn.Linear):
        TunedLayer.__init__(self, base)
        w = base.weight
        self.ia3_l = nn.Parameter(torch.ones(1, base.in_features, device=w.device, dtype=w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base_layer(x)
        return self.base_layer((x * self.ia3_l.flatten()).to(x.dtype))

    def _scale(self, l: torch.Tensor) -> None:
        base = self.base_layer
        base.weight.data = (base.weight.data * l).to(base.weight.dtype)           # columns: W diag(l)


def default_targets(model: nn.Module) -> tuple[list[str], list[str]]:
    """The architecture's key and value projections and feed-forward output projections (models/targets.py);
    a fused query-key-value projection is rescaled whole, as peft does; mixture-of-experts blocks keep their
    fused experts unscaled (no linear layer holds the intermediate activation there)."""
    a = arch(model)
    if not a:
        raise unknown_architecture(model, "method.target_modules")
    return list(dict.fromkeys(a["keys"] + a["values"] + a["ff_out"])), a["ff_out"]


@register
class Ia3(Method):
    Config = Ia3Config
    peft_type = "IA3"
    loads_peft = True
    identity_at_init = True
    mergeable = True
    invariant_cases = [
        {},
        {"arch": "qwen2", "options": {"target_modules": ["v_proj", "up_proj", "down_proj"],
                                      "feedforward_modules": ["down_proj"]}},
        {"arch": "bert", "task": "classification"},
    ]

    def specs(self, model: nn.Module) -> tuple[Targets, Targets]:
        targets, ff = self.cfg.target_modules, self.cfg.feedforward_modules
        if targets is None:
            targets, default_ff = default_targets(model)
            ff = default_ff if ff is None else ff
        return targets, ([] if ff is None else ff)

    def apply(self, model: nn.Module) -> nn.Module:
        freeze_all(model)
        targets, ff = self.specs(model)
        names = resolve_targets(model, targets)
        ff_names = {n for n in names if ff and matches(n, ff)}
        if ff and not ff_names:
            raise ConfigError(f"method.feedforward_modules: {ff!r} matches none of the target modules "
                              f"({', '.join(sorted({n.rsplit('.', 1)[-1] for n in names}))})")
        inject(model, targets, lambda n, m: Ia3In(m) if n in ff_names else Ia3Out(m))
        self.targets, self.ff_targets = names, sorted(ff_names)
        for _, layer in tuned_layers(model):
            layer.ia3_l.requires_grad_(True)
        self.saved_modules = unfreeze_modules(model, task_heads(model))
        return model

    def peft_config(self, model: nn.Module, base_name: str) -> dict:
        targets, ff = self.specs(model)
        return {"peft_type": "IA3", "task_type": peft_format.task_type(model),
                "base_model_name_or_path": base_name,
                "target_modules": targets if isinstance(targets, str) else sorted(targets),
                "feedforward_modules": ff if isinstance(ff, str) else sorted(ff),
                "fan_in_fan_out": fan_in_fan_out(model), "init_ia3_weights": True, "inference_mode": True,
                "modules_to_save": self.saved_modules or None}

    def save(self, model: nn.Module, out_dir: Path, base_name: str) -> Path:
        state = {n.replace(".base_layer.", "."): p.detach() for n, p in model.named_parameters() if p.requires_grad}
        meta = {"method": self.cfg.model_dump(mode="json"), "base": base_name}
        return peft_format.write_adapter(out_dir / "adapter", self.peft_config(model, base_name), state, meta)

    @classmethod
    def load_artifact(cls, model: nn.Module, path: Path) -> nn.Module:
        peft_cfg, state = peft_format.read_adapter(path)
        meta = peft_format.read_meta(path)
        if meta is not None:
            cfg = cls.Config.model_validate(meta["method"])
        else:
            cfg = cls.Config(name=cls.name, target_modules=peft_cfg.get("target_modules"),
                             feedforward_modules=peft_cfg.get("feedforward_modules") or None)
        method = cls(cfg)
        method.apply(model)
        peft_format.load_into(model, state, path)
        attach(model, method)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        for _, layer in tuned_layers(model):
            layer.merge()
        return unwrap(model)


def ia3_trainable_count(model: nn.Module, targets: list[str], ff_targets: list[str]) -> int:
    """Closed form: d_out for each rescaled output, d_in for each rescaled feed-forward input."""
    total = 0
    for n in targets:
        m = model.get_submodule(n)
        base = m.base_layer if isinstance(m, TunedLayer) else m
        total += base.in_features if n in ff_targets else base.out_features
    return total
