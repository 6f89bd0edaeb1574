"""Projections that read one input, computed as one matmul when decoding.

A Llama-style block projects the same hidden states three times for attention (q, k, v) and twice
for the MLP (gate, up). In a one-token decode step each projection is a matrix-vector product that
reads its whole weight, and the small ones (k and v of grouped-query attention) cannot keep the
GPU's memory system busy on their own. :func:`share_inputs` lays the weights of such a group out as
row blocks of one buffer, ``[W_q; W_k; W_v]``: every layer's weight becomes a view of its block
(no memory is added), and the first projection called computes ``x [W_q; W_k; W_v]ᵀ`` once; the
others return their columns of it when they are called with the same input tensor.

Per-row LoRA adapters (:class:`.adapters.AdapterTable`) join the group instead of wrapping its
layers: the group's A_cat (C, d_in) stacks every layer's adapters' A, and its B_cat (Σ d_out, C)
holds each layer's adapters' B in that layer's rows and its own columns (zeros elsewhere). The
group's buffer becomes ``[W0; A_cat]`` as a single layer's weight does (:mod:`.joined`), which gives
each layer of the group W0 x + s_a B_a A_a x of each row's own adapter: one pair of matmuls per
group, as :class:`.adapters.MultiLoraLinear` has per layer.

Without adapters and with gradients on (training the same model between rollouts), and for a
projection whose input is not the one the first was called with, each layer computes its own
``F.linear``, so the result is the same in every case. The layers' parameters stay what they were
(the same objects, names and values; only their storage is shared), so an optimizer updating them
in place updates the group's buffer too. :func:`unshare` gives each layer its own storage again.
Only plain ``nn.Linear`` layers with plain-tensor weights of one dtype and device, with biases on
all or none, are grouped.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import joined

#: Sibling layers that a block calls on one input, in the order the block calls them.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_BUFFERS = ("shared_weight", "shared_bias", "shared_B", "shared_slot", "shared_scale")


class _Share:
    """One group: its layers, their adapters' factors, and the input and product of the current call
    (kept only until the group's last layer has taken its columns). ``B``, ``W``, ``col_slot`` and
    ``col_scale`` are the group's tensors as an adapter table lists them (their addresses are fixed
    for CUDA graphs)."""

    def __init__(self, layers: list[nn.Linear]):
        self.layers, self.n = layers, len(layers)
        self.parts: list[dict[int, tuple[torch.Tensor, torch.Tensor, float]]] = [{} for _ in layers]
        self.table = None
        self.x: torch.Tensor | None = None
        self.out: torch.Tensor | None = None

    B = property(lambda self: self.layers[0].shared_B)
    W = property(lambda self: self.layers[0].shared_weight)
    col_slot = property(lambda self: self.layers[0].shared_slot)
    col_scale = property(lambda self: self.layers[0].shared_scale)

    def set(self, index: int, slot: int, factors, table) -> None:
        """Add (or with None remove) adapter ``slot``'s (A, B, scale) on the group's layer ``index``."""
        first = self.layers[0]
        self.table = table
        if factors is None:
            self.parts[index].pop(slot, None)
        else:
            a, b, s = factors
            w = first.shared_weight
            self.parts[index][slot] = (a.to(w.device, w.dtype), b.to(w.device, w.dtype), float(s))
        _lay_out(self)


class SharedInputLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is a row block of its group's buffer (see the module doc).
    The group's first layer holds the buffer (and the biases, the adapters' A and B and their
    columns' slots and scales) as non-persistent buffers, so the state dict is the layer's own weight and
    bias, unchanged."""

    _share: _Share
    _index: int
    _cols: tuple[int, int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        share = self._share
        first = share.layers[0] if self._index else self
        if torch.is_grad_enabled() and first.shared_B is None:
            return F.linear(x, self.weight, self.bias)
        lo, hi = self._cols
        if self._index == 0 or share.x is not x:
            share.x, share.out = x, _product(first, share, x)
        out = share.out[..., lo:hi]
        if self._index == share.n - 1:
            share.x = share.out = None
        return out


def _product(first: SharedInputLinear, share: _Share, x: torch.Tensor) -> torch.Tensor:
    """The whole group's output for ``x``, with each row's adapter when rows are bound."""
    w, b_cat = first.shared_weight, first.shared_B
    rows = None if share.table is None else share.table.rows
    if b_cat is None:
        return F.linear(x, w, first.shared_bias)
    if rows is None:
        return F.linear(x, w[: b_cat.shape[0]], first.shared_bias)
    m = joined.mask(rows, first.shared_slot, first.shared_scale, x.dtype)
    return joined.product(x, w, b_cat, m, first.shared_bias)


def _groupable(layers: list) -> bool:
    if not all(type(m) is nn.Linear for m in layers):
        return False
    w0 = layers[0].weight
    return (all(m.in_features == layers[0].in_features and m.weight.dtype == w0.dtype
                and m.weight.device == w0.device and type(m.weight.data) is torch.Tensor for m in layers)
            and len({m.bias is None for m in layers}) == 1)


def share_inputs(model: nn.Module) -> int:
    """Group every set of :data:`GROUPS` layers found under one module of ``model``; returns how many
    groups were made (0 when nothing qualifies). Groups made before and since broken are laid out
    again (:func:`refresh`)."""
    refresh(model)
    made = 0
    for parent in list(model.modules()):
        for names in GROUPS:
            layers = [getattr(parent, n, None) for n in names]
            if any(m is None for m in layers) or not _groupable(layers):
                continue
            share, lo = _Share(layers), 0
            for i, m in enumerate(layers):
                m.__class__ = SharedInputLinear
                m._share, m._index, m._cols = share, i, (lo, lo + m.out_features)
                lo += m.out_features
            for name in _BUFFERS:
                layers[0].register_buffer(name, None, persistent=False)
            _lay_out(share)
            made += 1
    return made


@torch.no_grad()
def _lay_out(share: _Share) -> None:
    """(Re)build the group's buffer from its layers' current weights and adapters, and point every
    layer's weight (and bias) at its rows."""
    layers, first = share.layers, share.layers[0]
    w0 = torch.cat([m.weight.detach() for m in layers], dim=0)                    # (Σ d_out, d_in)
    if first.shared_bias is None and first.bias is not None:
        first.shared_bias = torch.cat([m.bias.detach() for m in layers])
        for m in layers:
            lo, hi = m._cols
            m.bias.data = first.shared_bias[lo:hi]
    items = [(m, slot, f) for i, m in enumerate(layers) for slot, f in sorted(share.parts[i].items())]
    if not items:
        first.shared_weight, first.shared_B = w0, None
        first.shared_slot = first.shared_scale = None
    else:
        width = sum(a.shape[0] for _, _, (a, _, _) in items)
        b_cat = w0.new_zeros(w0.shape[0], width)                                    # (Σ d_out, C)
        c = 0
        for m, _, (a, b, _) in items:
            lo, hi = m._cols
            b_cat[lo:hi, c:c + a.shape[0]] = b
            c += a.shape[0]
        dev = w0.device
        first.shared_weight = joined.join(w0, torch.cat([a for _, _, (a, _, _) in items], dim=0))
        first.shared_B = b_cat
        first.shared_slot = torch.cat([torch.full((a.shape[0],), slot, dtype=torch.long, device=dev)
                                       for _, slot, (a, _, _) in items])
        first.shared_scale = torch.cat([torch.full((a.shape[0],), s, dtype=w0.dtype, device=dev)
                                        for _, _, (a, _, s) in items])
    for m in layers:
        lo, hi = m._cols
        m.weight.data = first.shared_weight[lo:hi]                                                # a view: no copy kept


def _intact(share: _Share) -> bool:
    """Whether every layer's weight (and bias) is still its rows of the group's buffer. Moving or
    casting the model (``model.to(...)``) gives each parameter storage of its own; the group's
    buffer would then miss later in-place updates of the layers."""
    first = share.layers[0]
    for name, buf in (("weight", first.shared_weight), ("bias", first.shared_bias)):
        if buf is None:
            continue
        base, step = buf.data_ptr(), buf.stride(0) * buf.element_size()
        if any(getattr(m, name).data_ptr() != base + m._cols[0] * step for m in share.layers):
            return False
    return True


def refresh(model: nn.Module) -> int:
    """Lay out again every group of ``model`` whose layers no longer share its buffer (see
    :func:`_intact`), from the layers' current weights; returns how many were. The fast path calls
    this before each prefill, a host-side check of a few pointers a group."""
    broken = [m._share for m in model.modules()
              if isinstance(m, SharedInputLinear) and m._index == 0 and not _intact(m._share)]
    for share in broken:
        first = share.layers[0]
        if first.bias is not None:
            first.shared_bias = None      # rebuilt from the layers' biases
        share.parts = [{k: (a.to(first.weight.device, first.weight.dtype), b.to(first.weight.device, first.weight.dtype), s)
                        for k, (a, b, s) in p.items()} for p in share.parts]
        _lay_out(share)
    return len(broken)


@torch.no_grad()
def unshare(layer: nn.Module) -> None:
    """Undo the group ``layer`` belongs to (nothing if it belongs to none): every layer of it becomes a
    plain ``nn.Linear`` with its weight and bias in storage of their own, its adapters dropped."""
    if not isinstance(layer, SharedInputLinear):
        return
    for m in layer._share.layers:
        m.weight.data = m.weight.data.contiguous().clone()
        if m.bias is not None:
            m.bias.data = m.bias.data.clone()
        for name in _BUFFERS:
            m._buffers.pop(name, None)
        for name in ("_share", "_index", "_cols"):
            m.__dict__.pop(name, None)
        m.__class__ = nn.Linear
