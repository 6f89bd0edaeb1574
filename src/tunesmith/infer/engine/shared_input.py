"""Projections that read one input, computed as one matmul when decoding.

A Llama-style block projects the same hidden states three times for attention (q, k, v) and twice
for the MLP (gate, up). In a one-token decode step each projection is a matrix-vector product that
reads its whole weight, and the small ones (k and v of grouped-query attention) cannot keep the
GPU's memory system busy on their own. :func:`share_inputs` lays the weights of such a group out as
row blocks of one buffer, ``[W_q; W_k; W_v]``: every layer's weight becomes a view of its block
(no memory is added), and the first projection called computes ``x [W_q; W_k; W_v]ᵀ`` once; the
others return their columns of it when they are called with the same input tensor.

The group's product is used only with gradients off (decoding). With gradients on (training the
same model between rollouts), and for a projection whose input is not the one the first was called
with, each layer computes its own ``F.linear``, so the result is the same in every case. The layers'
parameters stay what they were (the same objects, names and values; only their storage is shared),
so an optimizer updating them in place updates the group's buffer too. :func:`unshare` gives each
layer its own storage again. Only plain ``nn.Linear`` layers with plain-tensor weights of one dtype
and device, with biases on all or none, are grouped.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Sibling layers that a block calls on one input, in the order the block calls them.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _Share:
    """One group: its layers' row bounds in the shared buffer, and the input and product of the
    current call (kept only until the group's last layer has taken its columns)."""

    def __init__(self, n: int):
        self.n = n
        self.x: torch.Tensor | None = None
        self.out: torch.Tensor | None = None


class SharedInputLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is a row block of its group's buffer (see the module doc).
    The group's first layer holds the buffer (and the biases side by side) as non-persistent
    buffers, so the state dict is the layer's own weight and bias, unchanged."""

    _share: _Share
    _index: int
    _cols: tuple[int, int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        share = self._share
        if torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        lo, hi = self._cols
        if self._index == 0:
            out = F.linear(x, self.shared_weight, self.shared_bias)
            share.x, share.out = x, out
            return out[..., lo:hi]
        if share.x is not x:
            return F.linear(x, self.weight, self.bias)
        out = share.out[..., lo:hi]
        if self._index == share.n - 1:
            share.x = share.out = None
        return out


def _groupable(layers: list) -> bool:
    if not all(type(m) is nn.Linear for m in layers):
        return False
    w0 = layers[0].weight
    return (all(m.in_features == layers[0].in_features and m.weight.dtype == w0.dtype
                and m.weight.device == w0.device and type(m.weight.data) is torch.Tensor for m in layers)
            and len({m.bias is None for m in layers}) == 1)


def share_inputs(model: nn.Module) -> int:
    """Group every set of :data:`GROUPS` layers found under one module of ``model``; returns how many
    groups were made (0 when nothing qualifies)."""
    made = 0
    for parent in list(model.modules()):
        for names in GROUPS:
            layers = [getattr(parent, n, None) for n in names]
            if any(m is None for m in layers) or not _groupable(layers):
                continue
            _group(layers)
            made += 1
    return made


@torch.no_grad()
def _group(layers: list[nn.Linear]) -> None:
    weight = torch.cat([m.weight.detach() for m in layers], dim=0)                 # (Σ d_out, d_in)
    bias = None if layers[0].bias is None else torch.cat([m.bias.detach() for m in layers])
    share, lo = _Share(len(layers)), 0
    for i, m in enumerate(layers):
        hi = lo + m.out_features
        m.weight.data = weight[lo:hi]                                               # a view: no copy kept
        if bias is not None:
            m.bias.data = bias[lo:hi]
        m.__class__ = SharedInputLinear
        m._share, m._index, m._cols = share, i, (lo, hi)
        lo = hi
    layers[0].register_buffer("shared_weight", weight, persistent=False)
    layers[0].register_buffer("shared_bias", bias, persistent=False)
    share.layers = layers


@torch.no_grad()
def unshare(layer: nn.Module) -> None:
    """Undo the group ``layer`` belongs to (nothing if it belongs to none): every layer of it becomes a
    plain ``nn.Linear`` with its weight and bias in storage of their own."""
    if not isinstance(layer, SharedInputLinear):
        return
    layers = layer._share.layers
    for m in layers:
        m.weight.data = m.weight.data.clone()
        if m.bias is not None:
            m.bias.data = m.bias.data.clone()
        for name in ("shared_weight", "shared_bias"):
            m._buffers.pop(name, None)
        for name in ("_share", "_index", "_cols"):
            m.__dict__.pop(name, None)
        m.__class__ = nn.Linear
