"""torch.compile of a model's transformer blocks (decoder or encoder layers), one block at a time.

Each layer compiles to one graph (the fused LoRA op switches to its traceable form while being
compiled, see kernels/lora.py); identical layers share the compiled code, so an 8B model compiles
once, in seconds. Inductor fuses RMSNorm, RoPE, SwiGLU and the residual adds around the GEMMs and
removes most kernel launches. Reference: the same layers uncompiled.

Quantized bases (QLoRA): inside one graph the compiler would keep each dequantized weight from the
forward for the backward (the dequantization is opaque to it, so it saves the output rather than
recompute it): 0.4 GiB a layer at 8B, close to the layer's activations. A block that keeps its
activations (not checkpointed) therefore runs under a selective-checkpoint policy: the outputs of
matrix products and attention are kept, the dequantized weights are recomputed from the 4-bit
weight in backward (as the eager fused op does), and the compiler may recompute the elementwise
rest (norms, SwiGLU) where that saves memory.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..models.targets import find_blocks

#: Operator namespaces whose outputs are dequantized weights (recomputed, never saved).
DEQUANT_NAMESPACES = {"bitsandbytes"}


_aten = torch.ops.aten
#: Kept for backward in blocks that are not checkpointed: the expensive ops' outputs.
SAVED_OPS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default}
for _name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
              "_scaled_dot_product_efficient_attention", "_flash_attention_forward", "_efficient_attention_forward"):
    if hasattr(_aten, _name):
        SAVED_OPS.add(getattr(_aten, _name).default)


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if getattr(op, "namespace", None) in DEQUANT_NAMESPACES:
        return CheckpointPolicy.MUST_RECOMPUTE
    if op in SAVED_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _has_quantized_base(layer: nn.Module) -> bool:
    from .lora import Dequantized, frozen_weight
    return any(isinstance(frozen_weight(m), Dequantized) for m in layer.modules() if hasattr(m, "weight"))


def _recompute_dequantization(layer: nn.Module) -> None:
    forward = layer.forward
    context = functools.partial(create_selective_checkpoint_contexts, _policy)

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if (not torch.compiler.is_compiling()  # run eagerly, the fused op keeps no weight anyway
                or not (layer.training and torch.is_grad_enabled()) or getattr(layer, "gradient_checkpointing", False)):
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, context_fn=context, **kwargs)
    layer.forward = run


def compile_decoder_layers(model: nn.Module) -> int:
    """Compile every transformer block of a transformers model in place; returns how many."""
    _, layers = find_blocks(model)
    for layer in layers:
        if _has_quantized_base(layer):
            _recompute_dequantization(layer)
        layer.compile()
    return len(layers)
