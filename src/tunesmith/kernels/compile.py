"""torch.compile of a model's transformer blocks (decoder or encoder layers), one block at a time.

Each layer compiles to one graph (the fused LoRA op switches to its traceable form while being
compiled, see kernels/lora.py); identical layers share the compiled code, so an 8B model compiles
once, in seconds. Inductor fuses RMSNorm, RoPE, SwiGLU and the residual adds around the GEMMs and
removes most kernel launches. Reference: the same layers uncompiled.
"""
from __future__ import annotations

from torch import nn

from ..models.targets import find_blocks


def compile_decoder_layers(model: nn.Module) -> int:
    """Compile every transformer block of a transformers model in place; returns how many."""
    _, layers = find_blocks(model)
    for layer in layers:
        layer.compile()
    return len(layers)
