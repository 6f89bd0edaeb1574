"""Layer freezing: train chosen transformer blocks (and optionally embeddings/heads), freeze the rest.

Policies, combined as a union of selections minus ``exclude``:

* ``layers``: blocks by index, range, ``first k``/``last k``, ``all``/``none``; with
  ``layer_types`` only those parameter types inside the chosen blocks (e.g. their attention);
* ``types``: parameter types trained everywhere — ``norms`` (LayerNorm/RMSNorm), ``biases``,
  ``attention`` and ``mlp`` (the projections named by ``models/targets.py``, with the fused expert and
  router weights of mixture-of-experts blocks counted as ``mlp``; other
  architectures fall back to module names containing attn/attention resp. mlp/ffn/intermediate);
* ``embeddings`` (the input embeddings), ``head`` (the task head), ``include`` regexes;
* ``exclude`` regexes remove parameters from all of the above.

Blocks are found without per-architecture code: the model's largest ``nn.ModuleList`` (by
parameter count) is taken as its stack of layers. Only the trained tensors are saved, as a delta
against the base model.
"""
from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from ..errors import ConfigError
from ..models.targets import arch, find_blocks, task_heads
from . import delta
from .inject import LINEAR_KINDS, matches
from .registry import Method, register
from .configs.freeze import FreezeConfig, LayerSpec

_FALLBACK = {"attention": r"(^|\.)[^.]*(attn|attention)[^.]*(\.|$)",
             "mlp": r"(^|\.)[^.]*(mlp|ffn|feed_forward|intermediate)[^.]*(\.|$)"}


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "Norm" in type(module).__name__


def param_types(model: nn.Module) -> dict[str, set[str]]:
    """The :data:`ParamType` s of every parameter, by name (attention wins over mlp for BERT's
    ``attention.output.dense``, which both suffix lists match)."""
    a = arch(model)
    moe = (a.get("experts") or []) + (a.get("router") or [])  # fused expert and router weights: feed-forward
    modules = dict(model.named_modules())
    out: dict[str, set[str]] = {}
    for n, _ in model.named_parameters():
        mod_name, _, leaf = n.rpartition(".")
        module = modules.get(mod_name)
        kinds: set[str] = set()
        if leaf == "bias":
            kinds.add("biases")
        if module is not None and _is_norm(module):
            kinds.add("norms")
        elif moe and matches(n, moe):
            kinds.add("mlp")
        elif isinstance(module, LINEAR_KINDS):
            for kind in ("attention", "mlp"):
                hit = matches(mod_name, a[kind]) if a else re.search(_FALLBACK[kind], mod_name)
                if hit:
                    kinds.add(kind)
                    break
        out[n] = kinds
    return out


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
    Config = FreezeConfig
    artifact = "delta"
    upcast_trainable = False
    identity_at_init = True
    mergeable = True
    invariant_cases = [
        {},
        {"options": {"layers": [0], "embeddings": True, "exclude": ["norm"]}},
        {"arch": "bert", "task": "classification", "options": {"layers": "first 1"}},
        {"options": {"layers": "last 1", "layer_types": ["attention"], "types": ["norms"]}},
        {"arch": "bert", "task": "classification", "options": {"layers": "none", "types": ["biases", "mlp"]}},
    ]

    def trainable_names(self, model: nn.Module) -> list[str]:
        cfg = self.cfg
        prefix, blocks = find_blocks(model)
        chosen = parse_layers(cfg.layers, len(blocks))
        layer_prefixes = tuple(f"{prefix}.{i}." for i in chosen)
        heads = tuple(f"{h}." for h in task_heads(model)) if cfg.head is not False else ()
        emb = model.get_input_embeddings() if cfg.embeddings else None
        emb_ids = {id(p) for p in emb.parameters()} if emb is not None else set()
        kinds = param_types(model)
        in_layer = set(cfg.layer_types) if cfg.layer_types is not None else None
        names = []
        for n, p in model.named_parameters():
            layer_ok = n.startswith(layer_prefixes) and (in_layer is None or bool(kinds[n] & in_layer))
            keep = layer_ok or bool(kinds[n] & set(cfg.types)) or id(p) in emb_ids
            keep = keep or bool(heads and n.startswith(heads)) or any(re.search(r, n) for r in cfg.include)
            if keep and not any(re.search(r, n) for r in cfg.exclude):
                names.append(n)
        if not names:
            raise ConfigError(f"method freeze: the selection (layers={cfg.layers!r}, layer_types={cfg.layer_types}, "
                              f"types={cfg.types}, include={cfg.include}) leaves no parameter to train")
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
