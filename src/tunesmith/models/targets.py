"""Default target modules per architecture family: data, not code.

Keys are transformers ``config.model_type`` values; every name is a module-name suffix (peft's
rule: ``q_proj`` matches ``model.layers.0.self_attn.q_proj``). Per family:

* ``attention``, ``mlp``: the linear layers (``nn.Linear`` or GPT-2's ``Conv1D``) of the attention and
  feed-forward sublayers — the LoRA family's default targets;
* ``keys``, ``values``, ``ff_out``: what (IA)³ rescales (the key and value projections' outputs, the
  feed-forward output projection's input); a fused query-key-value projection stands for keys;
* ``attn_out``, ``ff_in``, ``ff_out``: where bottleneck adapters sit (after the attention output
  projection; beside or after the feed-forward sublayer), with ``ffn`` naming the whole
  feed-forward module instead where its output is no single linear layer (mixture-of-experts blocks);
* ``experts``, ``router``: parameter names (not modules) of mixture-of-experts weights, which
  transformers 5 stores fused as 3-D tensors; methods target them by choice (``target_parameters``).

A suffix on BERT's ``output.dense`` also matches ``attention.output.dense``; subtract ``attn_out`` to
mean the feed-forward output only. :func:`unknown_architecture` is the message for a model type
that is not here.
"""
from __future__ import annotations

from collections import Counter

from torch import nn

from ..errors import ConfigError


def _family(attention, mlp, *, keys, values, ff_in, ff_out, attn_out, ffn=None, experts=None, router=None):
    a = {"attention": attention, "mlp": mlp, "keys": keys, "values": values, "ff_in": ff_in, "ff_out": ff_out,
         "attn_out": attn_out}
    a.update({k: v for k, v in (("ffn", ffn), ("experts", experts), ("router", router)) if v})
    return a


_LLAMA = _family(["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"],
                 keys=["k_proj"], values=["v_proj"], ff_in=["up_proj"], ff_out=["down_proj"], attn_out=["o_proj"])
_MOE = _family(_LLAMA["attention"], _LLAMA["mlp"],   # mlp: shared experts and dense layers, where there are any
               keys=["k_proj"], values=["v_proj"], ff_in=[], ff_out=[], attn_out=["o_proj"], ffn=["mlp"],
               experts=["experts.gate_up_proj", "experts.down_proj"], router=["mlp.gate.weight"])
_PHI3 = _family(["qkv_proj", "o_proj"], ["gate_up_proj", "down_proj"],
                keys=["qkv_proj"], values=[], ff_in=["gate_up_proj"], ff_out=["down_proj"], attn_out=["o_proj"])
_PHI = _family(["q_proj", "k_proj", "v_proj", "self_attn.dense"], ["fc1", "fc2"],
               keys=["k_proj"], values=["v_proj"], ff_in=["fc1"], ff_out=["fc2"], attn_out=["self_attn.dense"])
_GPT2 = _family(["attn.c_attn", "attn.c_proj"], ["mlp.c_fc", "mlp.c_proj"],
                keys=["attn.c_attn"], values=[], ff_in=["mlp.c_fc"], ff_out=["mlp.c_proj"], attn_out=["attn.c_proj"])
_BLOOM = _family(["self_attention.query_key_value", "self_attention.dense"], ["dense_h_to_4h", "dense_4h_to_h"],
                 keys=["query_key_value"], values=[], ff_in=["dense_h_to_4h"], ff_out=["dense_4h_to_h"],
                 attn_out=["self_attention.dense"])
_NEOX = _family(["attention.query_key_value", "attention.dense"], ["dense_h_to_4h", "dense_4h_to_h"],
                keys=["query_key_value"], values=[], ff_in=["dense_h_to_4h"], ff_out=["dense_4h_to_h"],
                attn_out=["attention.dense"])
_BERT = _family(["query", "key", "value", "attention.output.dense"], ["intermediate.dense", "output.dense"],
                keys=["key"], values=["value"], ff_in=["intermediate.dense"], ff_out=["output.dense"],
                attn_out=["attention.output.dense"])
_DEBERTA = _family(["query_proj", "key_proj", "value_proj", "attention.output.dense"],
                   ["intermediate.dense", "output.dense"], keys=["key_proj"], values=["value_proj"],
                   ff_in=["intermediate.dense"], ff_out=["output.dense"], attn_out=["attention.output.dense"])
_MODERNBERT = _family(["attn.Wqkv", "attn.Wo"], ["mlp.Wi", "mlp.Wo"], keys=["attn.Wqkv"], values=[],
                      ff_in=["mlp.Wi"], ff_out=["mlp.Wo"], attn_out=["attn.Wo"])
# T5 v1.0 has wi; T5 v1.1, Flan-T5 and mT5 have the gated wi_0, wi_1. (IA)³ rescales wo's input, the
# intermediate activation, as in the paper (on T0, a T5 v1.1).
_T5 = _family(["q", "k", "v", "o"], ["wi", "wi_0", "wi_1", "wo"], keys=["k"], values=["v"], ff_in=["wi", "wi_0"],
              ff_out=["wo"], attn_out=["SelfAttention.o", "EncDecAttention.o"])
_BART = _family(["q_proj", "k_proj", "v_proj", "out_proj"], ["fc1", "fc2"], keys=["k_proj"], values=["v_proj"],
                ff_in=["fc1"], ff_out=["fc2"], attn_out=["self_attn.out_proj", "encoder_attn.out_proj"])

ARCHITECTURES: dict[str, dict] = {
    **{t: _LLAMA for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                           "olmo", "olmo2", "granite", "smollm3")},
    **{t: _MOE for t in ("mixtral", "qwen2_moe", "qwen3_moe")},
    "phi3": _PHI3, "phi": _PHI, "gpt2": _GPT2, "bloom": _BLOOM, "falcon": _BLOOM, "gpt_neox": _NEOX,
    **{t: _BERT for t in ("bert", "roberta", "xlm-roberta", "electra", "camembert")},
    "deberta-v2": _DEBERTA, "modernbert": _MODERNBERT,
    **{t: _T5 for t in ("t5", "mt5", "umt5")},
    **{t: _BART for t in ("bart", "mbart")},
}

#: Task-head module names (trainable alongside any method for classification).
HEADS = ["score", "classifier", "classification_head", "pooler.dense"]


def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def arch(model: nn.Module) -> dict:
    return ARCHITECTURES.get(model_type(model), {})


def default_targets(model: nn.Module, field: str = "method.target_modules") -> list[str]:
    """The attention and feed-forward linear layers of a known architecture; for any other, a
    ConfigError that lists the model's linear layers (:func:`unknown_architecture`)."""
    a = arch(model)
    if not a:
        raise unknown_architecture(model, field)
    return a["attention"] + a["mlp"]


def head_names() -> list[str]:
    return ["score", "classifier", "classification_head", "lm_head"]


def task_heads(model: nn.Module) -> list[str]:
    """Names of the classification head modules present in ``model``."""
    names = {n for n, _ in model.named_modules()}
    return [h for h in ("score", "classifier", "classification_head") if h in names]


def linear_layers(model: nn.Module) -> Counter:
    """The linear layers (``nn.Linear``, ``Conv1D``) of the blocks — never the output head — by the suffix
    that names them (the parent's name too, unless that is a layer index), with counts."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = Counter()
    for name, module in model.named_modules():
        if module is head or not (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"):
            continue
        parts = name.split(".")
        found[".".join(parts[-2:]) if len(parts) > 1 and not parts[-2].isdigit() else parts[-1]] += 1
    return found


def unknown_architecture(model: nn.Module, field: str = "method.target_modules") -> ConfigError:
    """The error for a model type without defaults: its linear layers and how to name targets."""
    layers = ", ".join(f"{n} (×{c})" for n, c in sorted(linear_layers(model).items()))
    return ConfigError(
        f"{field}: tunesmith has no default targets for model type {model_type(model)!r} "
        f"({type(model).__name__}). Its linear layers are: {layers}. Name the ones to adapt as module-name "
        f"suffixes (e.g. {field}: [{', '.join(sorted({n.rsplit('.', 1)[-1] for n in linear_layers(model)})[:2])}]), "
        "a full-match regular expression, or 'all-linear' (every linear layer of the blocks); "
        "known families are listed in docs/models.md.")


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
