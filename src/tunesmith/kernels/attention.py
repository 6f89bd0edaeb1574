"""Document-masked (variable-length) causal attention for padding-free packed batches.

A packed batch is one row of several documents; ``cu_seq_lens_q`` holds the cumulative document
lengths ([0, n1, n1 + n2, ...]). Each token attends causally within its own document only, so the
packed row computes exactly what the documents would compute one by one, with no padding.

On CUDA this calls PyTorch's flash-attention varlen kernel (``torch.nn.attention.varlen``), which
skips the blocks across documents; elsewhere, and as the reference, it runs SDPA per document.
``enable(model)`` registers the function with transformers' attention interface under
``tunesmith_varlen``; batches without ``cu_seq_lens_q`` (padded batches) fall back to SDPA.

A packed batch carries no attention mask, and transformers would derive one from its restarting
``position_ids``: a host sync to find the documents, then a (T, T) boolean mask (T² bytes: 1 GiB at
32k tokens) that :func:`attention_forward` never reads. ``enable`` therefore also hands such
batches a 4-D placeholder mask (:data:`PACKED`), which transformers passes through as prepared.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

NAME = "tunesmith_varlen"


def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                               scale: float | None = None) -> torch.Tensor:
    """q (N, H, D), k/v (N, Hkv, D), cu_seqlens (docs + 1,) -> (N, H, D): causal SDPA per document."""
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        qd = q[s:e].transpose(0, 1)                                     # (H, n, D)
        kd = k[s:e].transpose(0, 1).repeat_interleave(groups, dim=0)    # (H, n, D)
        vd = v[s:e].transpose(0, 1).repeat_interleave(groups, dim=0)
        out[s:e] = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale).transpose(0, 1)
    return out


def _flash_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.9
        return None
    params = inspect.signature(varlen_attn).parameters
    kw = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if "enable_gqa" in params:
        kw["enable_gqa"] = True
    return varlen_attn, kw


_VARLEN = _flash_varlen()


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_len: int, scale: float | None = None) -> torch.Tensor:
    """Causal attention within documents; q (N, H, D), k/v (N, Hkv, D) -> (N, H, D)."""
    if q.is_cuda and _VARLEN is not None and q.dtype in (torch.float16, torch.bfloat16):
        fn, kw = _VARLEN
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        return fn(q, k, v, cu, cu, max_len, max_len, scale=scale, **kw)
    return varlen_attention_reference(q, k, v, cu_seqlens, scale)


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-interface function: query (B, H, T, D) -> ((B, T, H, D), None)."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    b, h, t, d = query.shape                                            # packed: b == 1
    q = query.transpose(1, 2).reshape(b * t, h, d)                      # (N, H, D)
    k = key.transpose(1, 2).reshape(b * t, key.shape[1], d)             # (N, Hkv, D)
    v = value.transpose(1, 2).reshape(b * t, value.shape[1], d)
    out = varlen_attention(q, k, v, cu, int(kwargs.get("max_length_q") or t), scaling)
    return out.view(b, t, h, d), None


PACKED = (1, 1, 1, 1)   # the placeholder mask's shape: 4-D, so transformers builds no mask of its own


def _placeholder_for_packed(module, args, kwargs):
    """Forward pre-hook of the decoder: a packed batch (``cu_seq_lens_q``, no mask) gets the placeholder."""
    if kwargs.get("cu_seq_lens_q") is None or kwargs.get("attention_mask") is not None or args:
        return None
    ref = kwargs.get("input_ids")
    ref = kwargs.get("inputs_embeds") if ref is None else ref
    return args, {**kwargs, "attention_mask": torch.ones(PACKED, dtype=torch.bool, device=ref.device)}


def enable(model) -> None:
    """Route ``model``'s attention through ``attention_forward`` (padded batches still use SDPA)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    AttentionInterface.register(NAME, attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    for cfg in {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values():
        cfg._attn_implementation = NAME
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    if not getattr(decoder, "_tunesmith_packed_hook", False):
        decoder.register_forward_pre_hook(_placeholder_for_packed, with_kwargs=True)
        decoder._tunesmith_packed_hook = True
