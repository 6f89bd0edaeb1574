"""The speed paths a run turns on from ``train.*``: Liger kernels, padding-free packing with
document-masked attention, (selective, offloaded) activation checkpointing and compiled decoder layers.

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
from ..kernels.offload import ActivationOffload, offloading
from ..models import compat
from ..models.targets import find_blocks
from . import speed

def _allowing(flag: str) -> str:
    from .objectives import all_configs
    return ", ".join(n for n, c in all_configs().items() if getattr(c, flag))


def check(tc, objective, method_cls, device: torch.device) -> None:
    """Refuse combinations that cannot work, naming the ``train.*`` field (fields left to train.speed
    count as off, and what the set ones imply counts as set: speed.fixed_fields). ``objective``: the
    objective's config, which declares whether packing and the chunked loss apply to it."""
    tc = tc.model_copy(update=speed.fixed_fields(tc))
    if tc.liger:
        if not liger.available():
            raise ConfigError("train.liger: liger-kernel is not installed; `pip install liger-kernel`, "
                              "or set train.liger: false")
        if device.type != "cuda":
            raise ConfigError(f"train.liger: Liger's Triton kernels need a CUDA device, the model is on {device}; "
                              "set train.liger: false")
    if tc.padding_free:
        if not objective.packing:
            raise ConfigError(f"train.padding_free: works with the objectives that train on packed rows "
                              f"({_allowing('packing')}), not {objective.name!r}; set train.padding_free: false")
        if not method_cls.supports_packing:
            raise ConfigError(f"train.padding_free: method {method_cls.name!r} adds virtual tokens to every "
                              "sequence and cannot run on packed rows; set train.padding_free: false")
    elif tc.max_tokens_per_batch is not None:
        raise ConfigError("train.max_tokens_per_batch: only used with train.padding_free: true")
    if tc.offload_kept_layers is not None and tc.offload_activations is False:
        raise ConfigError("train.offload_kept_layers: applies to offloaded activations; set "
                          "train.offload_activations: true as well, or remove train.offload_kept_layers")
    if tc.gradient_checkpointing is False:
        for field in ("checkpoint_layers", "offload_activations"):
            if getattr(tc, field) not in (None, False):
                raise ConfigError(f"train.{field}: applies to checkpointed layers; set train.gradient_checkpointing: "
                                  f"true as well, or remove train.{field}")
    if tc.checkpoint_layers == 0 and (not tc.offload_activations or tc.compile is False):
        raise ConfigError("train.checkpoint_layers: 0 recomputes no block, which only moves activations to host "
                          "memory with train.offload_activations: true and compiled blocks (train.compile not "
                          "false); set those, or set train.checkpoint_layers to at least 1")
    if tc.offload_activations:
        if device.type != "cuda":
            raise ConfigError(f"train.offload_activations: moves saved activations from GPU to host memory, and the "
                              f"model is on {device}; set train.offload_activations: false")
    if tc.chunked_ce is True and not objective.chunked_ce:
        raise ConfigError(f"train.chunked_ce: applies to the objectives with a language-model head "
                          f"({_allowing('chunked_ce')}), not {objective.name!r}; leave it at auto")
    if tc.loss_chunk_logits is not None:
        if not objective.loss_chunks:
            raise ConfigError(f"train.loss_chunk_logits: sizes the chunked loss of {_allowing('loss_chunks')}, "
                              f"not of {objective.name!r}; remove it")
        if tc.chunked_ce is False:
            raise ConfigError("train.loss_chunk_logits: sizes the chunked loss, which train.chunked_ce: false turns "
                              "off; remove one of them")


def packed_tokens(tc) -> int | None:
    """Tokens per packed micro-batch, or None for padded batches."""
    if not tc.padding_free:
        return None
    return tc.max_tokens_per_batch or tc.batch_size * tc.max_seq_len


def step_tokens(tc, objective) -> int:
    """Tokens one training forward holds, what ``train.speed`` plans for: for online RL, one update
    pass of ``micro_batch`` completions (prompt of up to ``max_seq_len`` plus ``max_tokens``); else the
    packed micro-batch, or ``batch_size`` rows of ``max_seq_len``, twice as many rows for pair
    objectives (a chosen and a rejected row per example)."""
    cfg = objective.cfg
    if cfg.tokenized == "rollout":
        rows = tc.batch_size * cfg.num_generations
        return min(cfg.micro_batch or rows, rows) * (tc.max_seq_len + cfg.max_tokens)
    rows = tc.batch_size * (2 if cfg.tokenized == "pair" else 1)
    return packed_tokens(tc) or rows * tc.max_seq_len


def held_bytes(tc, objective, model: nn.Module, device: torch.device) -> int:
    """GPU memory a run holds through every training step besides the model and its optimizer, which
    ``train.speed`` adds to a plan's peak: for online RL on CUDA, the rollout engine's KV buffers
    (one rollout batch's slots of prompt plus completion, kept between rollouts so that the compiled
    decode step's CUDA graphs stay valid); else nothing."""
    cfg = objective.cfg
    if cfg.tokenized != "rollout" or device.type != "cuda":
        return 0
    from ..infer.engine.fast import fast_path_refusal, kv_buffer_bytes
    from .rl.rollout import Sampler
    if fast_path_refusal(model) is not None:
        return 0
    return kv_buffer_bytes(model, Sampler.slots(tc, cfg), Sampler.max_len(model, cfg, tc.max_seq_len))


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


def enable_checkpointing(model: nn.Module, layers: int | None = None, offload: bool = False,
                         kept_on_gpu: int = 1) -> list[bool]:
    """Non-reentrant activation checkpointing of the model's transformer blocks.

    ``layers``: how many blocks recompute in backward, spread evenly over the stack (None: all); the
    others keep their activations, which costs memory and saves their recomputation. ``offload``:
    the checkpointed blocks' inputs wait in pinned host memory (``kernels/offload.py``); each block
    carries the offload as ``activation_offload``, and blocks compiled later offload everything they
    keep (kernels/compile.py), except the last ``kept_on_gpu`` blocks that are not checkpointed:
    backward reaches them first, before their products could make the round trip. With such blocks
    the spread ends on one of them rather than on a checkpointed block: backward's memory peak is at
    its first block, where all kept blocks are still held, and a checkpointed block there would add
    its recomputed products to them.
    Returns which blocks are checkpointed."""
    _, blocks = find_blocks(model)
    n = len(blocks)
    if layers is not None and not (0 if offload else 1) <= layers <= n:
        raise ConfigError(f"train.checkpoint_layers: {layers} is not between {0 if offload else 1} and the {n} "
                          f"transformer blocks of {type(model).__name__}; use null to checkpoint all of them")
    k = n if layers is None else layers
    if offload and kept_on_gpu > 0:   # spread so that the last block is one kept on the GPU (see below)
        chosen = [(n - i) * k // n > (n - i - 1) * k // n for i in range(n)]
    else:
        chosen = [(i + 1) * k // n > i * k // n for i in range(n)]
    per_block = layers is not None or offload
    if per_block and not all(hasattr(b, "gradient_checkpointing") for b in blocks):
        field = "train.offload_activations" if offload else "train.checkpoint_layers"
        raise ConfigError(f"{field}: {type(blocks[0]).__name__} blocks are not checkpointed one by one in this "
                          f"transformers version; remove {field} (plain gradient_checkpointing works)")
    compat.enable_checkpointing(model)
    # transformers also makes the embeddings' output require grad, which only reentrant checkpointing
    # needs: the trained weights give the checkpointed blocks their gradient path. With it, every step
    # computed the first block's input gradient for nothing, into a leaf tensor's .grad.
    disable = getattr(model, "disable_input_require_grads", None)
    if disable is not None:
        disable()
    if not per_block:
        return chosen
    off = None
    if offload:
        off = ActivationOffload(params=model.parameters)
        model.register_forward_pre_hook(lambda *_: off.new_step())
    unchecked = [i for i, on in enumerate(chosen) if not on]
    kept = set(unchecked[max(0, len(unchecked) - kept_on_gpu):]) if kept_on_gpu > 0 else set()
    for i, (block, on) in enumerate(zip(blocks, chosen)):
        block.gradient_checkpointing = on
        if off is not None:
            block._gradient_checkpointing_func = offloading(block._gradient_checkpointing_func, off)
            if i not in kept:
                block.activation_offload = off
    return chosen


def after_method(model: nn.Module, tc) -> None:
    """Apply the speed paths of ``tc`` (unset fields, None, mean off: train.speed resolves them first)."""
    if tc.gradient_checkpointing:
        kept = 1 if tc.offload_kept_layers is None else tc.offload_kept_layers
        enable_checkpointing(model, tc.checkpoint_layers, tc.offload_activations, kept_on_gpu=kept)
    if tc.compile:
        compile_decoder_layers(model)
