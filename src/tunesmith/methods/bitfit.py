"""BitFit: train only the bias terms (Ben Zaken, Ravfogel & Goldberg 2022, "BitFit: Simple
Parameter-efficient Fine-tuning for Transformer-based Masked Language-models", ACL).

Every affine map keeps its weights and trains its bias: y = W x + b with only b (and the task head
of a classifier) trainable — the query/key/value/output, MLP and LayerNorm biases (§2).

Llama-style models have no biases. ``add_missing_biases`` then adds zero-initialised biases to
linear layers (so the model is unchanged at init) and trains those:

* ``auto`` (default): to the attention and MLP projections, only when the model has no bias
  parameter of its own (Llama, Mistral, SmolLM); models with biases (BERT, Qwen2) are left as is;
* ``true``: to every attention and MLP projection that lacks one (Qwen2: o_proj and the MLP too);
* ``false``: never (a model without biases is then an error);
* a list of module names (peft-style suffixes, e.g. ``[q_proj, v_proj]``): to those modules.

Added biases load back through the method. ``merge`` stores them in a plain transformers model
when the architecture has a config switch for them (Llama's ``attention_bias``/``mlp_bias``;
sibling projections of the switched group get zero biases, which change nothing); otherwise
merging says so and the run still loads with ``tunesmith.load``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..models.targets import arch
from . import delta
from ._sparse import head_prefixes
from .inject import LINEAR_KINDS, freeze_all, matches, resolve_targets
from .registry import Method, attach, register
from .configs.bitfit import BitFitConfig

#: transformers config switches that give a group of projections biases (data, not code).
BIAS_SWITCHES = {"attention_bias": "attention", "mlp_bias": "mlp"}


def _has_bias(model: nn.Module, heads: tuple[str, ...]) -> bool:
    return any(n.endswith(".bias") and not n.startswith(heads) for n, _ in model.named_parameters())


def add_bias(layer: nn.Linear) -> None:
    w = layer.weight
    layer.bias = nn.Parameter(torch.zeros(layer.out_features, dtype=w.dtype, device=w.device))


@register
class BitFit(Method):
    Config = BitFitConfig
    artifact = "delta"
    identity_at_init = True
    mergeable = True
    invariant_cases = [
        {},
        {"arch": "qwen2"},
        {"options": {"add_missing_biases": ["q_proj", "v_proj", "down_proj"]}},
        {"arch": "bert", "task": "classification"},
    ]

    def bias_targets(self, model: nn.Module) -> list[str]:
        """Linear layers that get a new zero bias."""
        spec = self.cfg.add_missing_biases
        if spec is False or (spec == "auto" and _has_bias(model, head_prefixes(model))):
            return []
        names = resolve_targets(model, None if spec in ("auto", True) else spec,
                                field="method.add_missing_biases")
        return [n for n in names if model.get_submodule(n).bias is None]

    def apply(self, model: nn.Module) -> nn.Module:
        freeze_all(model)
        self.added = self.bias_targets(model)
        for n in self.added:
            add_bias(model.get_submodule(n))
        heads = head_prefixes(model)
        biases = 0
        for n, p in model.named_parameters():
            is_bias = n.endswith(".bias") and not n.startswith(heads)
            biases += is_bias
            p.requires_grad_(is_bias or n.startswith(heads))
        if not biases:
            raise ConfigError(f"method bitfit: {type(model).__name__} has no bias parameters and "
                              f"method.add_missing_biases is {self.cfg.add_missing_biases!r}; set it to auto, "
                              "true or a list of linear modules")
        return model

    def save(self, model: nn.Module, out_dir: Path, base_name: str) -> Path:
        return delta.write_delta(out_dir / "delta", self.trainable_state(model), base=base_name,
                                 method=self.cfg.model_dump(mode="json"))

    @classmethod
    def load_artifact(cls, model: nn.Module, path: Path) -> nn.Module:
        method = cls(cls.Config.model_validate(delta.read_config(path)["method"]))
        method.apply(model)  # re-adds the same biases, then the delta fills them
        delta.apply_delta(model, path)
        attach(model, method)
        return model

    def merge_refusal(self, model: nn.Module) -> str | None:
        added = getattr(self, "added", None)
        left = _unswitched(model, set(self.bias_targets(model) if added is None else added))
        if not left:
            return None
        groups = arch(model)
        kinds = [k for k, label in (("attention", "attention"), ("mlp", "feed-forward"))
                 if groups and any(matches(n, groups[k]) for n in left)]
        named = " and ".join({"attention": "attention", "mlp": "feed-forward"}[k] for k in kinds) or "linear"
        return f"the biases it adds to {named} projections have no config switch in a plain model of this type"

    def merge(self, model: nn.Module) -> nn.Module:
        """Turn on the config switches that make the added biases part of a plain model."""
        reason = self.merge_refusal(model)
        if reason:
            left = sorted(_unswitched(model, set(getattr(self, "added", []))))
            raise ConfigError(f"method bitfit: {reason} ({model.config.model_type}: {', '.join(left[:3])} …); load "
                              "the run with tunesmith.load instead of merging")
        for switch, members in _switches(model, set(getattr(self, "added", []))):
            for n in members:
                if model.get_submodule(n).bias is None:
                    add_bias(model.get_submodule(n))
            setattr(model.config, switch, True)
        return model


def _switches(model: nn.Module, added: set[str]) -> list[tuple[str, list[str]]]:
    """The config switches (and the projections each covers) needed for biases added to ``added``."""
    groups, out = arch(model), []
    for switch, group in BIAS_SWITCHES.items():
        if not added or not groups or not hasattr(model.config, switch):
            continue
        members = [n for n, m in model.named_modules() if isinstance(m, LINEAR_KINDS) and matches(n, groups[group])]
        if added & set(members):
            out.append((switch, members))
    return out


def _unswitched(model: nn.Module, added: set[str]) -> set[str]:
    """Added biases that no config switch covers."""
    left = set(added)
    for _, members in _switches(model, added):
        left -= set(members)
    return left
