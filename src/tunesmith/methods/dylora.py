"""DyLoRA: dynamic search-free low-rank adaptation (Valipour et al. 2023, "DyLoRA: Parameter-Efficient
Tuning of Pre-trained Models using Dynamic Search-Free Low-Rank Adaptation", eq. 4):

    h = W0 x + (alpha / b) · B[:, :b] A[:b, :] x,    b ~ U{r_min, …, r_max} drawn each step

Nested-dropout training over ranks: every optimizer step draws one b for all layers and uses only
the first b rows of A and columns of B (gradients reach all of them, the paper's non-frozen
variant), so after one run every rank up to r_max is a working adapter. Outside a training step
the layers run at ``rank`` (r_max unless :func:`set_rank` chose another). The saved adapter is a
plain LoRA of rank r_max; :meth:`DyLora.export_rank` cuts it to any rank b as a plain LoRA.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import peft_format
from .inject import fan_in_fan_out, tuned_layers
from .lora import LoraLinear, LowRankMethod
from .registry import MethodConfig, register
from ..errors import ConfigError
from .configs.dylora import DyLoraConfig


class DyLoraLinear(LoraLinear):
    """LoRA of rank r_max that computes with its first ``rank`` components."""

    decodes_frozen = False

    def __init__(self, base: nn.Linear, r_max: int, alpha: float, dropout: float):
        super().__init__(base, r_max, alpha, dropout)
        self.alpha = alpha
        self.set_rank(r_max)

    def set_rank(self, b: int) -> None:
        if self.merged:
            raise RuntimeError("cannot change the rank of a merged DyLoRA layer; unmerge first")
        self.rank, self.scaling = b, self.alpha / b

    def delta_weight(self) -> torch.Tensor:
        """ΔW at the current rank: (alpha/b) · B[:, :b] A[:b], shape (d_out, d_in)."""
        b = self.rank
        return (self.lora_B.weight[:, :b] @ self.lora_A.weight[:b]) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged or self.disabled:
            return y
        a = self.lora_A.weight[: self.rank]                                   # (b, d_in)
        h = F.linear(self.lora_dropout(x.to(a.dtype)), a)                     # (..., b)
        return y + F.linear(h, self.lora_B.weight[:, : self.rank]).to(y.dtype) * self.scaling


def set_rank(model: nn.Module, b: int) -> None:
    """Make every DyLoRA layer of ``model`` compute at rank ``b``."""
    layers = [layer for _, layer in tuned_layers(model) if isinstance(layer, DyLoraLinear)]
    if not layers:
        raise ConfigError("set_rank: the model has no DyLoRA layers")
    r_max = layers[0].r
    if not 1 <= b <= r_max:
        raise ConfigError(f"rank {b} is outside 1..{r_max} (this adapter's r_max)")
    for layer in layers:
        layer.set_rank(b)


@register
class DyLora(LowRankMethod):
    per_row_serving = True
    Config = DyLoraConfig
    invariant_cases = [
        {"options": {"r_min": 2, "r_max": 6}},
        {"arch": "qwen2", "options": {"r_max": 4, "target_modules": ["q_proj", "v_proj"], "dropout": 0.1}},
        {"arch": "bert", "task": "classification", "options": {"r_max": 3}},
    ]

    def rank_params(self, base: nn.Module) -> int:
        return self.cfg.r_max * (base.in_features + base.out_features)

    def make_layer(self, name: str, base: nn.Module) -> DyLoraLinear:
        layer = DyLoraLinear(base, self.cfg.r_max, self.cfg.alpha, self.cfg.dropout)
        layer.reset("kaiming")
        return layer

    def sample_rank(self, step: int) -> int:
        """The rank of optimizer step ``step``: uniform on r_min..r_max, a function of the step alone
        (so a resumed run draws the same ranks)."""
        g = torch.Generator().manual_seed(0xD1 * 1_000_003 + step)
        return int(torch.randint(self.cfg.r_min, self.cfg.r_max + 1, (1,), generator=g))

    def on_step_begin(self, model: nn.Module, step: int) -> None:
        set_rank(model, self.sample_rank(step))

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        set_rank(model, self.cfg.r_max)  # evaluation and saving between steps see the full rank

    def peft_config(self, model: nn.Module, base_name: str) -> dict:
        cfg = self.cfg
        targets = cfg.target_modules
        if targets is None or targets == "all-linear":
            targets = sorted({n.rsplit(".", 1)[-1] for n in self.targets})
        return {
            "peft_type": "LORA", "task_type": peft_format.task_type(model),
            "base_model_name_or_path": base_name, "r": cfg.r_max, "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout, "target_modules": targets, "bias": "none", "use_rslora": False,
            "modules_to_save": self.modules_to_save(model) or None, "init_lora_weights": True,
            "fan_in_fan_out": fan_in_fan_out(model), "inference_mode": True, "use_dora": False, "rank_pattern": {},
            "alpha_pattern": {}, "layers_to_transform": None,
        }

    @classmethod
    def config_from_peft(cls, peft_cfg: dict) -> MethodConfig:
        r = peft_cfg["r"]
        return cls.Config(name=cls.name, r_min=r, r_max=r, alpha=peft_cfg.get("lora_alpha", 8),
                          dropout=peft_cfg.get("lora_dropout", 0.0), target_modules=peft_cfg.get("target_modules"),
                          modules_to_save=peft_cfg.get("modules_to_save"))

    @classmethod
    def export_rank(cls, adapter_dir: Path, b: int, out_dir: Path) -> Path:
        """Write the adapter in ``adapter_dir`` cut to rank ``b`` as a plain LoRA (method lora) to ``out_dir``."""
        peft_cfg, state = peft_format.read_adapter(adapter_dir)
        meta = peft_format.read_meta(adapter_dir) or {"base": peft_cfg.get("base_model_name_or_path")}
        if not 1 <= b <= peft_cfg["r"]:
            raise ConfigError(f"--rank {b}: outside 1..{peft_cfg['r']} (the adapter's r_max)")
        cut = {k: v[:b] if k.endswith("lora_A.weight") else v[:, :b] if k.endswith("lora_B.weight") else v
               for k, v in state.items()}
        peft_cfg = {**peft_cfg, "r": b}
        method = {"name": "lora", "r": b, "alpha": peft_cfg["lora_alpha"], "dropout": peft_cfg["lora_dropout"],
                  "target_modules": peft_cfg["target_modules"], "modules_to_save": peft_cfg.get("modules_to_save")}
        if out_dir.exists() and any(out_dir.iterdir()):
            raise ConfigError(f"export: output directory {out_dir} exists and is not empty")
        return peft_format.write_adapter(out_dir, peft_cfg, cut,
                                         {"method": method, "base": meta["base"], "exported_from": "dylora", "rank": b})


def dylora_trainable_count(model: nn.Module, r_max: int, targets: list[str]) -> int:
    """Closed form: sum over targets of r_max·(d_in + d_out)."""
    return sum(r_max * (model.get_submodule(n).base_layer.in_features + model.get_submodule(n).base_layer.out_features)
               for n in targets)
