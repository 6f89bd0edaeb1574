"""Default target modules per architecture family: data, not code.

Keys are transformers ``config.model_type`` values. ``attention`` and ``mlp`` list the leaf names
of the linear layers; ``head`` lists task-head module names that stay trainable for
classification (peft's ``modules_to_save``). ``attn_out``, ``ff_in`` and ``ff_out`` name the
attention output projection and the feed-forward input/output projections (suffix match: on
BERT ``output.dense`` also matches ``attention.output.dense``; subtract ``attn_out`` to mean the
feed-forward output only).
"""
from __future__ import annotations

from torch import nn

from ..errors import ConfigError

_LLAMA = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
    "keys": ["k_proj"], "values": ["v_proj"], "ff_out": ["down_proj"],
    "attn_out": ["o_proj"], "ff_in": ["up_proj"],
    "layers": r"model\.layers\.(\d+)\.",
}
_BERT = {
    "attention": ["query", "key", "value", "attention.output.dense"],
    "mlp": ["intermediate.dense", "output.dense"],
    "keys": ["key"], "values": ["value"], "ff_out": ["output.dense"],
    "attn_out": ["attention.output.dense"], "ff_in": ["intermediate.dense"],
    "layers": r"(?:bert|roberta|model)?\.?encoder\.layer\.(\d+)\.",
}

ARCHITECTURES: dict[str, dict] = {
    **{t: _LLAMA for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                           "phi3", "olmo", "olmo2", "granite", "smollm3")},
    **{t: _BERT for t in ("bert", "roberta", "xlm-roberta", "electra", "camembert")},
}

#: Task-head module names (trainable alongside any method for classification).
HEADS = ["score", "classifier", "pooler.dense"]


def arch(model: nn.Module) -> dict:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        return {}
    return ARCHITECTURES[model_type]


def default_targets(model: nn.Module) -> list[str] | str:
    """All linear layers of the blocks for known architectures; ``all-linear`` otherwise."""
    a = arch(model)
    return a["attention"] + a["mlp"] if a else "all-linear"


def head_names() -> list[str]:
    return ["score", "classifier", "lm_head"]


def task_heads(model: nn.Module) -> list[str]:
    """Names of the classification head modules present in ``model``."""
    names = {n for n, _ in model.named_modules()}
    return [h for h in ("score", "classifier") if h in names]


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The dotted name and module of the model's stack of transformer blocks: its largest
    ``nn.ModuleList`` by parameter count (no per-architecture code)."""
    best, best_n = None, -1
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0:
            n = sum(p.numel() for p in m.parameters())
            if n > best_n:
                best, best_n = (name, m), n
    if best is None:
        raise ConfigError(f"{type(model).__name__} has no ModuleList of transformer blocks")
    return best
