"""Full fine-tuning: every parameter trains; the result is a plain transformers model directory."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from .registry import Method, register
from .configs.full import FullConfig


@register
class Full(Method):
    Config = FullConfig
    artifact = "model"
    upcast_trainable = False
    auto_compile = True
    identity_at_init = True
    mergeable = True
    invariant_cases = [{}, {"arch": "bert", "task": "classification"}]

    def apply(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def trainable_count(self, model: nn.Module) -> int:
        return self.param_counts(model)[1]  # every weight, tied ones once

    def save(self, model: nn.Module, out_dir: Path, base_name: str) -> Path:
        path = out_dir / "model"
        model.save_pretrained(path)
        return path

    @classmethod
    def load_artifact(cls, model: nn.Module, path: Path) -> nn.Module:
        return model  # the artifact is itself a full model; the loader reads it directly
