"""Liger kernels (Hsu et al. 2024, "Liger Kernel: Efficient Triton Kernels for LLM Training") as an
optional dependency: Triton RMSNorm, SwiGLU and RoPE patched into a model instance.

The loss is not taken from Liger: tunesmith's objective computes it with its own chunked linear
cross-entropy (kernels/cross_entropy.py), so Liger's fused-linear-cross-entropy forward is never
installed. References: the model's own eager modules (what runs without this patch).
"""
from __future__ import annotations

import importlib.util

from torch import nn


def available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def apply(model: nn.Module) -> bool:
    """Patch Liger's RMSNorm, SwiGLU and RoPE into ``model``; returns False when Liger is missing
    or has no kernels for the model's architecture."""
    if not available():
        return False
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance
    if getattr(getattr(model, "config", None), "model_type", None) not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return False
    _apply_liger_kernel_to_instance(model, rope=True, rms_norm=True, swiglu=True,
                                    cross_entropy=False, fused_linear_cross_entropy=False)
    return True
