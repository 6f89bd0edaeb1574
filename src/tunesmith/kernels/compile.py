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

Checkpointed blocks checkpoint inside the compiled graph: transformers' own checkpointing would wrap
the compiled block from outside and rerun its whole forward in backward, while inside the graph the
compiler's partitioner recomputes only what backward reads (the last projection's product, which
feeds nothing in backward, is not recomputed: 27% of a Llama block's recomputed GEMM FLOPs).
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..models.targets import find_blocks
from .lora import Dequantized, frozen_weight, lora_output

#: Operator namespaces whose outputs are dequantized weights (recomputed, never saved).
DEQUANT_NAMESPACES = {"bitsandbytes"}


_aten = torch.ops.aten
#: Kept for backward in blocks that are not checkpointed: the expensive ops' outputs.
SAVED_OPS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, lora_output._opoverload}
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


def _recompute_all(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    # spelled out: some torch versions keep opaque operators' outputs under a plain checkpoint
    return CheckpointPolicy.MUST_RECOMPUTE


def _has_quantized_base(layer: nn.Module) -> bool:
    return any(isinstance(frozen_weight(m), Dequantized) for m in layer.modules() if hasattr(m, "weight"))


def _checkpoint_inside(layer: nn.Module, checkpointed: bool) -> None:
    """Run ``layer``'s training forward under non-reentrant checkpointing inside its compiled graph:
    all of it recomputed (``checkpointed``; transformers' flag is turned off so it does not wrap the
    block a second time), or, for a block over a 4-bit base, the dequantizations only (``_policy``)."""
    forward = layer.forward
    if checkpointed:
        layer.gradient_checkpointing = False
    policy = _recompute_all if checkpointed else _policy
    kwargs_fn = {"context_fn": functools.partial(create_selective_checkpoint_contexts, policy)}

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not (layer.training and torch.is_grad_enabled()) or not (checkpointed or torch.compiler.is_compiling()):
            return forward(*args, **kwargs)  # (uncompiled, the fused op keeps no dequantized weight anyway)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs_fn, **kwargs)
    layer.forward = run


def compile_decoder_layers(model: nn.Module, keep_products_only: bool = False) -> int:
    """Compile every transformer block of a transformers model in place; returns how many.

    ``keep_products_only``: blocks that are not checkpointed keep only the outputs of matrix products
    and attention for backward (``_policy``) even over a float base; by default only 4-bit bases do."""
    _, layers = find_blocks(model)
    for layer in layers:
        for module in layer.modules():  # caches filled outside the graph (a side effect inside it breaks it)
            if hasattr(module, "before_compile"):
                module.before_compile()
        if getattr(layer, "gradient_checkpointing", False):
            _checkpoint_inside(layer, checkpointed=True)
        elif keep_products_only or _has_quantized_base(layer):
            _checkpoint_inside(layer, checkpointed=False)
        layer.compile()
    return len(layers)
