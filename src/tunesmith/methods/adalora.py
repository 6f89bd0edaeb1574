"""AdaLoRA: adaptive budget allocation (Zhang et al. 2023, "AdaLoRA: Adaptive Budget Allocation for
Parameter-Efficient Fine-Tuning").

Each adapted layer holds an SVD-form update (eq. 3)

    h = W0 x + (alpha / init_r) · P Λ Q x,   P = lora_B (d_out, r), Λ = diag(lora_E) (r, 1), Q = lora_A (r, d_in)

trained with the orthogonality regulariser R(P, Q) = ||PᵀP - I||_F + ||QQᵀ - I||_F (eq. 4). Every
``deltaT`` steps the triplets with the lowest importance S = s(λ) + mean s(P_·i) + mean s(Q_i·)
(eq. 7) are masked (λ = 0) until the budget b(t) of the cubic schedule (eq. 12) is met; the
element score s = Ī · Ū combines the smoothed sensitivity Ī = β1 Ī + (1-β1)|w ∂L/∂w| (eq. 8)
and its uncertainty Ū = β2 Ū + (1-β2)|I - Ī| (eq. 9). Computations, names and the saved
format follow HF peft (``lora_E``, ``rank_pattern``), so peft loads the result and vice versa.
"""
from __future__ import annotations

from pathlib import Path

import torch
from pydantic import ValidationError
from torch import nn

from . import peft_format
from .inject import TunedLayer, fan_in_fan_out, tuned_layers
from .lora import LowRankMethod, _as_targets
from .registry import MethodConfig, attach, register
from ..errors import ConfigError
from .configs.adalora import AdaLoraConfig


class SvdLinear(TunedLayer):
    """nn.Linear plus P Λ Q; parameters named as peft's (lora_A = Q, lora_E = Λ, lora_B = P)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__(base)
        w = base.weight
        kw = {"device": w.device, "dtype": w.dtype}
        self.lora_A = nn.Parameter(torch.zeros(r, base.in_features, **kw))
        self.lora_E = nn.Parameter(torch.zeros(r, 1, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **kw))
        self.scaling = alpha / (r + 1e-5)  # alpha / ranknum; ranknum stays init_r after pruning (peft)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def reset(self) -> None:
        with torch.no_grad():
            nn.init.zeros_(self.lora_E)
            nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B, mean=0.0, std=0.02)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scaling · P diag(λ) Q, shape (d_out, d_in)."""
        return (self.lora_B @ (self.lora_A * self.lora_E)) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged or self.disabled:
            return y
        a = self.lora_A
        h = self.lora_dropout(x.to(a.dtype)) @ (a * self.lora_E).T   # (..., r)
        return y + (h @ self.lora_B.T).to(y.dtype) * self.scaling

    def keep(self, mask: torch.Tensor) -> None:
        """Drop the triplets where ``mask`` is False (loading a pruned adapter)."""
        with torch.no_grad():
            for n in ("lora_A", "lora_E"):
                setattr(self, n, nn.Parameter(getattr(self, n)[mask].clone()))
            self.lora_B = nn.Parameter(self.lora_B[:, mask].clone())

    def merge(self) -> None:
        if not self.merged:
            self.base_layer.weight.data += self.delta_weight().detach().to(self.base_layer.weight.dtype)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight.data -= self.delta_weight().detach().to(self.base_layer.weight.dtype)
            self.merged = False


_PARTS = ("lora_A", "lora_B", "lora_E")


class RankAllocator:
    """Importance scores, the cubic budget schedule and triplet masking, as peft's RankAllocator."""

    def __init__(self, cfg: AdaLoraConfig, layers: list[tuple[str, SvdLinear]]):
        self.cfg, self.layers = cfg, layers
        self.init_bgt = sum(layer.lora_A.shape[0] for _, layer in layers)
        self.target_bgt = cfg.target_r * len(layers)
        self.ema: dict[str, torch.Tensor] = {}          # "<layer>.<part>.ipt|unc" -> tensor
        self.rank_pattern: dict[str, torch.Tensor] | None = None

    def budget(self, step: int) -> tuple[int, bool]:
        """(budget, whether to mask now): eq. 12 with peft's integer rounding."""
        c = self.cfg
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_steps - c.tfinal:
            return self.target_bgt, True
        frac = 1 - (step - c.tinit) / (c.total_steps - c.tfinal - c.tinit)
        return int((self.init_bgt - self.target_bgt) * frac ** 3 + self.target_bgt), step % c.deltaT == 0

    @torch.no_grad()
    def update_importance(self) -> None:
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        for name, layer in self.layers:
            for part in _PARTS:
                p = getattr(layer, part)
                ipt = (p * p.grad).abs()
                key = f"{name}.{part}"
                avg = b1 * self.ema.get(key + ".ipt", torch.zeros_like(p)) + (1 - b1) * ipt
                unc = b2 * self.ema.get(key + ".unc", torch.zeros_like(p)) + (1 - b2) * (ipt - avg).abs()
                self.ema[key + ".ipt"], self.ema[key + ".unc"] = avg, unc

    def _score(self, name: str, part: str) -> torch.Tensor:
        return self.ema[f"{name}.{part}.ipt"] * self.ema[f"{name}.{part}.unc"]

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """S_i per layer (eq. 7): score of λ_i + mean score of Q's row i + mean score of P's column i."""
        out = {}
        for name, _ in self.layers:
            rows = torch.cat([self._score(name, "lora_A").mean(dim=1, keepdim=True),
                              self._score(name, "lora_B").mean(dim=0).view(-1, 1)], dim=1)   # (r, 2)
            out[name] = self._score(name, "lora_E").view(-1) + rows.sum(dim=1)
        return out

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> None:
        scores = self.triplet_scores()
        k = self.init_bgt - budget
        if k <= 0:
            return
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=k)[0].item()
        self.rank_pattern = {name: s > threshold for name, s in scores.items()}
        self.apply_pattern()

    @torch.no_grad()
    def apply_pattern(self) -> None:
        for name, layer in self.layers:
            layer.lora_E.masked_fill_(~self.rank_pattern[name].view(-1, 1), 0.0)

    def step(self, step: int) -> None:
        """After optimizer step ``step`` (peft's AdaLoraModel.update_and_allocate)."""
        final = self.cfg.total_steps - self.cfg.tfinal
        if step < final:
            self.update_importance()
            budget, now = self.budget(step)
            if now:
                self.mask_to_budget(budget)
        elif step == final:
            self.mask_to_budget(self.budget(step)[0])
            self.ema = {}
        elif self.rank_pattern is not None:
            self.apply_pattern()


@register
class AdaLora(LowRankMethod):
    peft_type = "ADALORA"
    loads_peft = True
    Config = AdaLoraConfig
    invariant_cases = [
        {"options": {"total_steps": 10, "init_r": 4, "target_r": 2}},
        {"arch": "qwen2", "options": {"total_steps": 10, "target_modules": ["q_proj", "v_proj"], "dropout": 0.1}},
        {"arch": "bert", "task": "classification", "options": {"total_steps": 10, "init_r": 2, "target_r": 1}},
    ]

    def make_layer(self, name: str, base: nn.Module) -> SvdLinear:
        layer = SvdLinear(base, self.cfg.init_r, self.cfg.alpha, self.cfg.dropout)
        layer.reset()
        return layer

    def rank_params(self, base: nn.Module) -> int:
        return self.cfg.init_r * (base.in_features + base.out_features + 1)  # P, Q and the singular values

    def apply(self, model: nn.Module) -> nn.Module:
        super().apply(model)
        self.allocator = RankAllocator(self.cfg, list(tuned_layers(model)))
        return model

    # -- training hooks -------------------------------------------------------------------
    def regularization(self, model: nn.Module) -> torch.Tensor | None:
        """orth_reg_weight × mean over P and Q matrices of ||PᵀP - I||_F, ||QQᵀ - I||_F (eq. 4)."""
        terms = []
        for _, layer in self.allocator.layers:
            for cov in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):
                eye = torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)
                terms.append(torch.linalg.matrix_norm(cov - eye))
        return self.cfg.orth_reg_weight * torch.stack(terms).mean() if terms else None

    def on_train_begin(self, model: nn.Module, total_steps: int) -> None:
        if self.cfg.total_steps is not None:
            return
        try:
            self.cfg = self.Config.model_validate({**self.cfg.model_dump(), "total_steps": total_steps})
        except ValidationError as e:
            raise ConfigError(f"method adalora with the run's {total_steps} steps as total_steps: "
                              f"{e.errors()[0]['msg']}") from None
        self.allocator.cfg = self.cfg

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        if self.cfg.total_steps is None:
            raise ConfigError("method adalora: total_steps is not set; pass total_steps=N (the optimizer steps "
                              "of the budget schedule). `tunesmith train` sets it to the run's steps.")
        self.allocator.step(step)

    # -- state ----------------------------------------------------------------------------
    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = super().trainable_state(model)
        state.update({f"adalora_state.{k}": v for k, v in self.allocator.ema.items()})
        for name, mask in (self.allocator.rank_pattern or {}).items():
            state[f"adalora_state.{name}.rank_mask"] = mask
        return state

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        own = {k[len("adalora_state."):]: v for k, v in state.items() if k.startswith("adalora_state.")}
        super().load_trainable_state(model, {k: v for k, v in state.items() if not k.startswith("adalora_state.")})
        masks = {k[: -len(".rank_mask")]: v.bool() for k, v in own.items() if k.endswith(".rank_mask")}
        self.allocator.ema = {k: v.clone() for k, v in own.items() if not k.endswith(".rank_mask")}
        self.allocator.rank_pattern = masks or None

    def peft_config(self, model: nn.Module, base_name: str) -> dict:
        cfg = self.cfg
        targets = cfg.target_modules
        if targets is None or targets == "all-linear":
            targets = sorted({n.rsplit(".", 1)[-1] for n in self.targets})
        pattern = self.allocator.rank_pattern
        return {
            "peft_type": self.peft_type, "task_type": peft_format.task_type(model),
            "base_model_name_or_path": base_name, "init_r": cfg.init_r, "target_r": cfg.target_r,
            "tinit": cfg.tinit, "tfinal": cfg.tfinal, "deltaT": cfg.deltaT,
            # never trained (total_steps unset): the shortest valid schedule, which peft requires
            "total_step": cfg.total_steps or cfg.tinit + cfg.tfinal + 1,
            "beta1": cfg.beta1, "beta2": cfg.beta2, "orth_reg_weight": cfg.orth_reg_weight,
            "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": targets, "bias": "none",
            "modules_to_save": self.modules_to_save(model) or None, "init_lora_weights": True,
            "fan_in_fan_out": fan_in_fan_out(model), "inference_mode": True,
            "rank_pattern": {f"{n}.lora_E": m.tolist() for n, m in pattern.items()} if pattern else None,
        }

    def to_portable(self, model: nn.Module, state: dict, peft_cfg: dict, meta: dict) -> None:
        """Store only the kept triplets, as peft does (``resize_state_dict_by_rank_pattern``)."""
        for name, mask in (self.allocator.rank_pattern or {}).items():
            if state[f"{name}.lora_A"].shape[0] == mask.numel():
                for part in ("lora_A", "lora_E"):
                    state[f"{name}.{part}"] = state[f"{name}.{part}"][mask]
                state[f"{name}.lora_B"] = state[f"{name}.lora_B"][:, mask]

    def save(self, model: nn.Module, out_dir: Path, base_name: str) -> Path:
        state = super().trainable_state(model)  # weights only: the allocator state is for checkpoints
        peft_cfg = self.peft_config(model, base_name)
        meta = {"method": self.cfg.model_dump(mode="json"), "base": base_name}
        self.to_portable(model, state, peft_cfg, meta)
        return peft_format.write_adapter(out_dir / "adapter", peft_cfg, state, meta)

    @classmethod
    def config_from_peft(cls, peft_cfg: dict) -> MethodConfig:
        return cls.Config(name=cls.name, init_r=peft_cfg.get("init_r", 12), target_r=peft_cfg.get("target_r", 8),
                          tinit=peft_cfg.get("tinit", 0), tfinal=peft_cfg.get("tfinal", 0),
                          deltaT=peft_cfg.get("deltaT", 1), total_steps=peft_cfg["total_step"],
                          beta1=peft_cfg.get("beta1", 0.85), beta2=peft_cfg.get("beta2", 0.85),
                          orth_reg_weight=peft_cfg.get("orth_reg_weight", 0.5),
                          alpha=peft_cfg.get("lora_alpha", 8), dropout=peft_cfg.get("lora_dropout", 0.0),
                          target_modules=_as_targets(peft_cfg.get("target_modules")),
                          modules_to_save=peft_cfg.get("modules_to_save"))

    @classmethod
    def load_artifact(cls, model: nn.Module, path: Path) -> nn.Module:
        peft_cfg, state = peft_format.read_adapter(path)
        method = cls.from_saved(peft_cfg, peft_format.read_meta(path))
        method.apply(model)
        pattern = {}
        for key, keep in (peft_cfg.get("rank_pattern") or {}).items():
            name = key.removesuffix(".default").removesuffix(".lora_E")
            layer = dict(method.allocator.layers).get(name)
            if layer is None:
                raise ConfigError(f"{path}: rank_pattern names {key!r}, which is not an adapted module here")
            pattern[name] = torch.tensor(keep, dtype=torch.bool)
            layer.keep(pattern[name].to(layer.lora_A.device))
        method.allocator.rank_pattern = pattern or None
        peft_format.load_into(model, state, path)
        attach(model, method)
        return model


def adalora_trainable_count(model: nn.Module, r: int, targets: list[str]) -> int:
    """Closed form: sum over targets of r·(d_in + d_out) + r."""
    total = 0
    for n in targets:
        base = model.get_submodule(n).base_layer
        total += r * (base.in_features + base.out_features + 1)
    return total
