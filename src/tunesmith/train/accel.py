"""The speed paths a run turns on from ``train.*``: Liger kernels, padding-free packing with
document-masked attention, gradient checkpointing and compiled decoder layers.

Each is checked before the model is touched, so a run that cannot use one stops with an error naming
the field, before any weights load. ``before_method`` runs on the loaded model (Liger patches the
model's own RMSNorm/MLP/RoPE modules, which the method then wraps); ``after_method`` runs on the
tuned model (checkpointing wraps whole layers, and the compiled layers must already contain the
method's modules).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..kernels import attention, liger
from ..kernels.compile import compile_decoder_layers

CAUSAL = ("sft", "pt")


def check(tc, objective: str, method_cls, device: torch.device) -> None:
    """Refuse combinations that cannot work, naming the ``train.*`` field."""
    if tc.liger:
        if not liger.available():
            raise ConfigError("train.liger: liger-kernel is not installed; `pip install liger-kernel`, "
                              "or set train.liger: false")
        if device.type != "cuda":
            raise ConfigError(f"train.liger: Liger's Triton kernels need a CUDA device, the model is on {device}; "
                              "set train.liger: false")
    if tc.padding_free:
        if objective not in CAUSAL:
            raise ConfigError(f"train.padding_free: works with the causal LM objectives ({', '.join(CAUSAL)}), "
                              f"not {objective!r}; set train.padding_free: false")
        if not method_cls.supports_packing:
            raise ConfigError(f"train.padding_free: method {method_cls.name!r} adds virtual tokens to every "
                              "sequence and cannot run on packed rows; set train.padding_free: false")
    elif tc.max_tokens_per_batch is not None:
        raise ConfigError("train.max_tokens_per_batch: only used with train.padding_free: true")
    if tc.chunked_ce is True and objective not in CAUSAL:
        raise ConfigError(f"train.chunked_ce: applies to the causal LM objectives ({', '.join(CAUSAL)}), "
                          f"not {objective!r}; leave it at auto")


def packed_tokens(tc) -> int | None:
    """Tokens per packed micro-batch, or None for padded batches."""
    if not tc.padding_free:
        return None
    return tc.max_tokens_per_batch or tc.batch_size * tc.max_seq_len


def before_method(model: nn.Module, tc) -> None:
    if tc.liger and not liger.apply(model):
        raise ConfigError(f"train.liger: liger-kernel has no kernels for model type "
                          f"{getattr(model.config, 'model_type', '?')!r}; set train.liger: false")
    if tc.padding_free:
        if not getattr(model, "_supports_attention_backend", False):
            raise ConfigError(f"train.padding_free: {type(model).__name__} does not route attention through "
                              "transformers' attention interface, so documents cannot be masked apart; "
                              "set train.padding_free: false")
        attention.enable(model)


def after_method(model: nn.Module, tc) -> None:
    if tc.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if tc.compile:
        compile_decoder_layers(model)
