"""LoRA: low-rank adaptation (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

h = W0 x + (alpha / r) * B A x    (eq. 3), with A: r x d_in, B: d_out x r, B = 0 at init.
rsLoRA (Kalajdzievski 2023) scales by alpha / sqrt(r) instead.
PiSSA (Meng et al. 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation"):
A, B start from the top-r SVD of W0 and the base keeps the residual W_res = W0 - scaling * B A.
LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models"): B trains
with learning rate lr_ratio_b * lr.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from . import peft_format
from .inject import (TunedLayer, as_linear, fan_in_fan_out, freeze_all, inject, inject_params, resolve_targets, tuned_layers,
                     unfreeze_modules, unwrap)
from .registry import Method, MethodConfig, attach, module_params, register
from ..errors import ConfigError
from ..kernels.lora import compute_dtype, frozen_weight, lora_linear, lora_linear_frozen
from ..models.targets import task_heads
from .configs.lora import LoraConfig


@torch.no_grad()
def init_lora_(a: torch.Tensor, b: torch.Tensor, init: str, r: int) -> None:
    """B = 0 and A by ``init`` (LoraConfig.init); A is (rows, d_in)."""
    if init == "kaiming":
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    elif init == "gaussian":
        nn.init.normal_(a, std=1 / r)
    elif init == "zero_b":
        nn.init.normal_(a, std=1 / math.sqrt(a.shape[1]))
    else:
        raise ValueError(f"unknown LoRA init {init!r}")
    nn.init.zeros_(b)


class LoraLinear(TunedLayer):
    """nn.Linear plus a low-rank update; parameter names match peft's (lora_A, lora_B)."""

    decodes_frozen = True   # forward honours freeze_adapter (subclasses with their own forward say False)

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, use_rslora: bool = False):
        super().__init__(base)
        self.r = r
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        w = base.weight
        # a quantized base (uint8 storage) gets adapters in its compute dtype
        dtype = w.dtype if w.dtype.is_floating_point else getattr(base, "compute_dtype", None) or torch.bfloat16
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=w.device, dtype=dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=w.device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.frozen_ab: tuple[torch.Tensor, torch.Tensor] | None = None   # see freeze_adapter
        self.frozen = False

    def reset(self, init: str) -> None:
        init_lora_(self.lora_A.weight, self.lora_B.weight, init, self.r)

    @torch.no_grad()
    def freeze_adapter(self, on: bool) -> None:
        """``on``: copy s·A and B in the base's compute dtype into fixed buffers, which forward under
        no-grad then reads (a decode step does no casts; the buffers keep their addresses across calls,
        as a CUDA graph needs). ``off``: forward reads the parameters again. Call again after an update."""
        self.frozen = on
        if not on:
            return
        w = self.base_layer.weight   # a quantized base (uint8 storage) computes in its compute dtype
        dt = w.dtype if w.dtype.is_floating_point else (getattr(self.base_layer, "compute_dtype", None)
                                                         or self.lora_A.weight.dtype)
        a, b = self.lora_A.weight, self.lora_B.weight
        if self.frozen_ab is None or self.frozen_ab[0].dtype != dt:
            self.frozen_ab = (torch.empty(a.shape, dtype=dt, device=a.device),
                              torch.empty(b.shape, dtype=dt, device=b.device))
            from torch import _dynamo
            for t in self.frozen_ab:
                _dynamo.mark_static_address(t)
        self.frozen_ab[0].copy_(a * self.scaling)
        self.frozen_ab[1].copy_(b)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scaling · B A, shape (d_out, d_in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.merged or self.disabled:
            return base(x)
        weight = frozen_weight(base)  # None: a base layer without a fused path
        if weight is not None and type(self.lora_dropout) is nn.Identity:  # fused, see kernels/lora.py
            if self.frozen and not torch.is_grad_enabled() and compute_dtype(x) == self.frozen_ab[0].dtype:
                return lora_linear_frozen(x, weight, base.bias, *self.frozen_ab)
            return lora_linear(x, weight, base.bias, self.lora_A.weight, self.lora_B.weight, self.scaling)
        y = base(x)
        a = self.lora_A.weight
        return y + self.lora_B(self.lora_A(self.lora_dropout(x.to(a.dtype)))).to(y.dtype) * self.scaling

    def merge(self) -> None:
        if not self.merged:
            self.base_layer.weight.data += self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight.data -= self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = False


class PissaLinear(LoraLinear):
    """LoRA whose A, B start as the principal singular directions of W (PiSSA, Meng et al. 2024, §3).

    W = U S V^T; B0 = U_r sqrt(S_r / scaling), A0 = sqrt(S_r / scaling) V_r^T and the base weight
    becomes W_res = W - scaling * B0 A0, so the output at init equals the base's. A0 and B0 are kept
    (not saved) so that ``disabled`` computes the original W x and saving can express the update
    against the original W: ΔW = scaling (B A - B0 A0) = scaling [B | -B0] [A; A0].
    """

    def reset(self, init: str) -> None:
        w = self.base_layer.weight
        if not w.dtype.is_floating_point:
            raise TypeError("PiSSA needs a float base weight (initialise before quantizing)")
        u, s, vh = torch.linalg.svd(w.detach().float(), full_matrices=False)
        s_r = s[: self.r] / self.scaling
        b0 = u[:, : self.r] @ torch.diag(torch.sqrt(s_r))   # (d_out, r)
        a0 = torch.diag(torch.sqrt(s_r)) @ vh[: self.r]     # (r, d_in)
        with torch.no_grad():
            self.lora_A.weight.copy_(a0)
            self.lora_B.weight.copy_(b0)
            a0, b0 = self.lora_A.weight.detach().clone(), self.lora_B.weight.detach().clone()
            # the residual of the adapter as stored (bf16 rounding included), so W_res + s·B0 A0 = W
            w.copy_((w.float() - self.scaling * b0.float() @ a0.float()).to(w.dtype))
        self.register_buffer("pissa_A0", a0, persistent=False)
        self.register_buffer("pissa_B0", b0, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.disabled and not self.merged:  # the original base: W_res x + scaling B0 A0 x
            a0 = self.pissa_A0
            y = y + (x.to(a0.dtype) @ a0.T @ self.pissa_B0.T).to(y.dtype) * self.scaling
        return y

    def as_plain_lora(self, prefix: str, state: dict[str, torch.Tensor]) -> None:
        """Rewrite this layer's A, B in ``state`` as the rank-2r LoRA for the original base weight."""
        a, b = state[prefix + "lora_A.weight"], state[prefix + "lora_B.weight"]
        state[prefix + "lora_A.weight"] = torch.cat([a, self.pissa_A0.to(a.dtype)], dim=0)
        state[prefix + "lora_B.weight"] = torch.cat([b, -self.pissa_B0.to(b.dtype)], dim=1)


class LowRankMethod(Method):
    """Shared behaviour of the LoRA family: wrapping, bias/heads, peft-format save and load."""

    peft_type = "LORA"
    identity_at_init = True
    mergeable = True
    invariant_cases = [
        {},
        {"options": {"r": 4, "target_modules": ["q_proj", "v_proj"], "bias": "all", "use_rslora": True}},
        {"arch": "qwen2", "options": {"bias": "lora_only", "init": "gaussian"}},
        {"arch": "bert", "task": "classification", "options": {"r": 2}},
    ]

    def make_layer(self, name: str, base: nn.Module) -> TunedLayer:
        raise NotImplementedError

    def apply(self, model: nn.Module) -> nn.Module:
        cfg = self.cfg
        freeze_all(model)
        self.targets = inject(model, cfg.target_modules, self.make_layer) if cfg.target_modules != [] else []
        self.param_targets = self.inject_parameters(model)
        for _, layer in tuned_layers(model):
            for n, p in layer.named_parameters():
                if not n.startswith("base_layer."):
                    p.requires_grad_(True)
        self._apply_bias(model)
        self.saved_modules = unfreeze_modules(model, self.modules_to_save(model))
        return model

    def rank_params(self, base: nn.Module) -> int:
        """Trainable parameters of one wrapped linear layer ``base``: r·(d_in + d_out) (LoRA's A and B)."""
        return self.cfg.r * (base.in_features + base.out_features)

    def trainable_count(self, model: nn.Module) -> int:
        """Closed form: ``rank_params`` summed over the target layers, plus the saved modules (heads)."""
        cfg = self.cfg
        if getattr(cfg, "target_parameters", None) or getattr(cfg, "bias", "none") != "none":
            return super().trainable_count(model)  # parameter targets and trained biases: counted on the model
        targets = resolve_targets(model, cfg.target_modules) if cfg.target_modules != [] else []
        return (sum(self.rank_params(as_linear(model.get_submodule(n))) for n in targets)
                + module_params(model, self.modules_to_save(model)))

    def inject_parameters(self, model: nn.Module) -> list[str]:
        """Wrap the parameters the method targets directly (none here; Lora's target_parameters)."""
        return []

    def modules_to_save(self, model: nn.Module) -> list[str]:
        return list(dict.fromkeys((getattr(self.cfg, "modules_to_save", None) or []) + task_heads(model)))

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """Decay on matrices only; B matrices (and B biases) at lr_ratio_b × lr (LoRA+, Hayou et al. 2024 §4)."""
        ratio = getattr(self.cfg, "lr_ratio_b", 1.0)
        b_ids = {id(p) for _, layer in tuned_layers(model) for n, p in layer.named_parameters()
                 if n.startswith("lora_B")}
        buckets: dict[tuple[bool, bool], list] = {(b, d): [] for b in (False, True) for d in (True, False)}
        for p in model.parameters():
            if p.requires_grad:
                buckets[(id(p) in b_ids, p.ndim >= 2)].append(p)
        groups = [{"params": ps, "lr": lr * ratio if is_b else lr, "weight_decay": weight_decay if decay else 0.0}
                  for (is_b, decay), ps in buckets.items()]
        return [g for g in groups if g["params"]]

    def _apply_bias(self, model: nn.Module) -> None:
        bias = getattr(self.cfg, "bias", "none")
        if bias == "all":
            for n, p in model.named_parameters():
                if n.endswith("bias"):
                    p.requires_grad_(True)
        elif bias == "lora_only":
            for _, layer in tuned_layers(model):
                if getattr(layer.base_layer, "bias", None) is not None:
                    layer.base_layer.bias.requires_grad_(True)

    def peft_config(self, model: nn.Module, base_name: str) -> dict:
        cfg = self.cfg
        targets = cfg.target_modules
        if targets is None or targets == "all-linear":
            targets = sorted({n.rsplit(".", 1)[-1] for n in self.targets})
        out = {
            "peft_type": self.peft_type, "task_type": peft_format.task_type(model),
            "base_model_name_or_path": base_name, "r": cfg.r, "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout, "target_modules": targets, "bias": cfg.bias,
            "use_rslora": cfg.use_rslora, "modules_to_save": self.modules_to_save(model) or None,
            "init_lora_weights": True, "fan_in_fan_out": fan_in_fan_out(model), "inference_mode": True,
            "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
        }
        if getattr(self, "param_targets", None):
            out["target_parameters"] = list(self.param_targets)
        return out

    def save(self, model: nn.Module, out_dir: Path, base_name: str) -> Path:
        state = self.trainable_state(model)
        peft_cfg = self.peft_config(model, base_name)
        meta = {"method": self.cfg.model_dump(mode="json"), "base": base_name}
        self.to_portable(model, state, peft_cfg, meta)
        return peft_format.write_adapter(out_dir / "adapter", peft_cfg, state, meta)

    def to_portable(self, model: nn.Module, state: dict, peft_cfg: dict, meta: dict) -> None:
        """Rewrite what ``save`` writes so that it applies to the unmodified base model (no-op here)."""

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        # peft names the bias of a wrapped layer <path>.bias, not <path>.base_layer.bias (nested
        # parameter wrappers keep their <path>.base_layer.lora_A names, as peft's)
        return {_BASE_LEAF.sub(r".\1", n): p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        peft_format.load_into(model, state, Path("<checkpoint>"))

    @classmethod
    def config_from_peft(cls, peft_cfg: dict) -> MethodConfig:
        from ._param_lora import parameter_fields
        if peft_cfg.get("rank_pattern") or peft_cfg.get("alpha_pattern"):
            raise ConfigError("adapter_config.json: rank_pattern/alpha_pattern (per-module ranks) are not "
                              "supported for peft_type LORA; merge the adapter in peft instead")
        return cls.Config(name=cls.name, r=peft_cfg["r"], alpha=peft_cfg.get("lora_alpha", 8),
                          dropout=peft_cfg.get("lora_dropout", 0.0),
                          target_modules=_as_targets(peft_cfg.get("target_modules")),
                          bias=peft_cfg.get("bias", "none"), use_rslora=peft_cfg.get("use_rslora", False),
                          modules_to_save=peft_cfg.get("modules_to_save"),
                          init=_init_from_peft(peft_cfg.get("init_lora_weights", True)),
                          **parameter_fields(cls.Config, peft_cfg))

    @classmethod
    def from_saved(cls, peft_cfg: dict, meta: dict | None) -> "LowRankMethod":
        """The method that rebuilds a saved adapter (from tunesmith.json when present)."""
        return cls(cls.Config.model_validate(meta["method"]) if meta else cls.config_from_peft(peft_cfg))

    @classmethod
    def load_artifact(cls, model: nn.Module, path: Path) -> nn.Module:
        peft_cfg, state = peft_format.read_adapter(path)
        method = cls.from_saved(peft_cfg, peft_format.read_meta(path))
        method.apply(model)
        peft_format.load_into(model, state, path)
        attach(model, method)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        for _, layer in tuned_layers(model):
            layer.merge()
        return unwrap(model)


_BASE_LEAF = re.compile(r"\.base_layer\.(weight|bias)$")


def _as_targets(t):
    return sorted(t) if isinstance(t, (list, set, tuple)) else t


def _init_from_peft(init) -> str:
    """peft's init_lora_weights as our ``init``. Inits that rewrite the base weight must be re-run at
    load time (peft does the same); only the deterministic one, exact-SVD PiSSA, can be."""
    if init == "pissa" or init == "gaussian":
        return init
    if isinstance(init, str) and init.lower().startswith(("pissa_niter", "olora", "corda", "loftq", "lora_ga")):
        raise ConfigError(f"adapter_config.json: init_lora_weights={init!r} changes the base weights in a way "
                          "tunesmith cannot redo; convert it in peft with save_pretrained(..., "
                          "path_initial_model_for_weight_conversion=...) and load that")
    return "kaiming"


@register
class Lora(LowRankMethod):
    auto_compile = True
    loads_peft = True
    per_row_serving = True
    Config = LoraConfig
    invariant_cases = LowRankMethod.invariant_cases + [
        {"options": {"init": "pissa", "r": 4, "use_rslora": True, "lr_ratio_b": 16.0}},
        {"arch": "qwen2", "options": {"init": "pissa", "target_modules": ["q_proj", "down_proj"], "bias": "lora_only"}},
    ]

    @classmethod
    def accepts_peft(cls, peft_cfg: dict) -> bool:
        return super().accepts_peft(peft_cfg) and not peft_cfg.get("use_dora")

    def inject_parameters(self, model: nn.Module) -> list[str]:
        if not self.cfg.target_parameters:
            return []
        from ._param_lora import ParamLora

        def make(name: str, owner: nn.Module, param_name: str) -> ParamLora:
            layer = ParamLora(owner, param_name, self.cfg.r, self.cfg.alpha, self.cfg.use_rslora)
            layer.reset(self.cfg.init)
            return layer
        return inject_params(model, self.cfg.target_parameters, make)

    def make_layer(self, name: str, base: nn.Module) -> LoraLinear:
        layer_cls = _LAYER_FOR_INIT.get(self.cfg.init, LoraLinear)
        layer = layer_cls(base, self.cfg.r, self.cfg.alpha, self.cfg.dropout, self.cfg.use_rslora)
        layer.reset(self.cfg.init)
        return layer

    def to_portable(self, model: nn.Module, state: dict, peft_cfg: dict, meta: dict) -> None:
        """PiSSA changed the base weight: save ΔW = scaling (B A - B0 A0) as a rank-2r LoRA for the
        original base, exactly as peft's ``save_pretrained(path_initial_model_for_weight_conversion=...)``."""
        pissa = [(n, layer) for n, layer in tuned_layers(model) if isinstance(layer, PissaLinear)]
        for name, layer in pissa:
            layer.as_plain_lora(name + ".", state)
        if pissa:
            cfg = self.cfg
            alpha = cfg.alpha * (math.sqrt(2) if cfg.use_rslora else 2)  # keeps scaling for rank 2r
            peft_cfg.update(r=2 * cfg.r, lora_alpha=alpha)
            meta["method"].update(r=2 * cfg.r, alpha=alpha, init="kaiming")
            meta["converted_from"] = "pissa"


_LAYER_FOR_INIT: dict[str, type[LoraLinear]] = {"pissa": PissaLinear}


def lora_trainable_count(model: nn.Module, r: int, targets: list[str]) -> int:
    """Closed form: sum over targets of r·(d_in + d_out)."""
    total = 0
    for n in targets:
        m = model.get_submodule(n)
        base = m.base_layer if isinstance(m, TunedLayer) else m
        total += r * (base.in_features + base.out_features)
    return total


__all__ = ["Lora", "LoraConfig", "LoraLinear", "LowRankMethod", "PissaLinear", "lora_trainable_count", "resolve_targets"]
