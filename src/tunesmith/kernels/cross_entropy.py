"""Chunked linear + cross-entropy: the LM head and the loss without the (N, V) logits tensor.

A Llama-3 head at 4096 tokens makes 4096 × 128256 logits: 1 GiB in bf16 and 2 GiB more for each
fp32 copy the loss takes. Here the head runs on row chunks; each chunk's fp32 logits become the
softmax gradient in place and are folded at once into the gradients of the hidden states and (when
it trains) of the head weight, as in Liger's fused linear cross-entropy (Hsu et al. 2024, §3.3),
written in plain PyTorch. Rows whose label is ignored (prompt tokens in SFT) are dropped before the
head, so they cost no head FLOPs at all.

On CUDA the per-chunk softmax, loss and logit gradient are one Triton kernel that writes the gradient
over the chunk's logits (kernels/row_ce.py). Elsewhere, with ``compiled=True`` (``train.compile``),
they are one torch.compile'd function, where the eager form makes an fp32 copy of the chunk and
passes over it five more times.

Reference: ``linear_cross_entropy_reference`` (the head's full logits, then ``F.cross_entropy``).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from . import row_ce

IGNORE = -100
CHUNK_ELEMENTS = 1 << 25         # fp32 logits per chunk, frozen head: 128 MiB (peak memory stays low)
CHUNK_ELEMENTS_TRAINED = 1 << 27  # trained head: 512 MiB, fewer read-modify-writes of its (V, d) gradient


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over rows of CE(hidden Wᵀ + b, label); hidden (N, d), weight (V, d), labels (N,), -100 ignored."""
    logits = F.linear(hidden, weight, bias)  # (N, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")


def chunk_loss_and_grad(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed CE of a chunk's rows (fp32) and d loss / d logits in the logits' dtype; logits (c, V),
    labels (c,) all valid: ``row_ce.row_ce_reference`` summed, the form compiled off CUDA
    (``_compiled_chunk``). On an H100 (261 rows of 128,256 logits) that form compiled took 215 µs a
    chunk against 301 µs for logsumexp, exp and scatter_add (bench/gpu_loss_chunk.py)."""
    loss, grad = row_ce.row_ce_reference(logits, labels)
    return loss.sum(), grad


_compiled = None


def _compiled_chunk():
    global _compiled
    if _compiled is None:
        # inductor reduces a chunk with few rows (a ragged last chunk, a small vocabulary) in split
        # passes instead of one online pass, and says so in a warning a run would print; the values are
        # the same either way
        warnings.filterwarnings("ignore", message="\\s*Online softmax is disabled on the fly", category=UserWarning)
        _compiled = torch.compile(chunk_loss_and_grad, dynamic=True)
    return _compiled


class _LinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, bias, labels, chunk: int, compiled: bool = False):
        # h (N, d) only rows with a label; w (V, d); bias (V,) or None; labels (N,) all valid
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros_like(w) if need_w else None
        acc = torch.promote_types(h.dtype, torch.float32)              # fp32, or fp64 for fp64 inputs
        gb = torch.zeros_like(bias, dtype=acc) if need_b else None
        loss = torch.zeros((), dtype=acc, device=h.device)
        fused = gb is None and (gh is not None or gw is not None)
        for s in range(0, h.shape[0], chunk):
            hc, lc = h[s:s + chunk], labels[s:s + chunk]              # (c, d), (c,)
            logits = F.linear(hc, w, bias)                            # (c, V) in h's dtype
            if fused and row_ce.available(logits):
                rows, grad = row_ce.row_ce_(logits, lc)               # the gradient over the logits, in place
                loss += rows.sum()
            elif fused and compiled:
                part, grad = _compiled_chunk()(logits, lc)            # fp32 sum, (c, V) in h's dtype
                loss += part
            else:
                logits = logits.to(acc)
                lse = torch.logsumexp(logits, dim=-1)                 # (c,)
                loss += (lse - logits.gather(1, lc[:, None]).squeeze(1)).sum()
                if gh is None and gw is None and gb is None:
                    continue
                grad = logits.sub_(lse[:, None]).exp_()               # softmax, in place
                grad[torch.arange(lc.shape[0], device=lc.device), lc] -= 1.0  # d loss / d logits
                if gb is not None:
                    gb += grad.sum(0)
                grad = grad.to(h.dtype)                               # (c, V)
            if gh is not None:
                torch.mm(grad, w, out=gh[s:s + chunk])                # (c, d)
            if gw is not None:
                gw.addmm_(grad.t(), hc)                               # (V, d)
        ctx.save_for_backward(gh, gw, gb)
        return loss

    @staticmethod
    def backward(ctx, g):
        gh, gw, gb = ctx.saved_tensors
        scale = lambda t: None if t is None else t * g.to(t.dtype)  # noqa: E731
        return scale(gh), scale(gw), scale(gb), None, None, None


class _LinearLogps(torch.autograd.Function):
    """Per-row log p(y | h) through a frozen head, chunked. Each row's gradient d log p / d h = −g Wᵀ
    (g = softmax − one-hot) is computed in forward, so backward only scales it by the upstream
    gradient of that row: no chunk's logits are recomputed or kept."""

    @staticmethod
    def forward(ctx, h, w, bias, labels, chunk: int):
        out = torch.empty(h.shape[0], dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
        gh = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        for s in range(0, h.shape[0], chunk):
            rows, grad = row_ce.row_ce_(F.linear(h[s:s + chunk], w, bias), labels[s:s + chunk])
            out[s:s + chunk] = -rows
            if gh is not None:
                torch.mm(grad, w, out=gh[s:s + chunk])                # d loss / d h = −d log p / d h
        ctx.save_for_backward(gh)
        return out

    @staticmethod
    def backward(ctx, g):
        (gh,) = ctx.saved_tensors
        return -(gh.to(g.dtype) * g[:, None]).to(gh.dtype), None, None, None, None


def linear_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None,
                 chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """log softmax(hidden Wᵀ + b)[label] of every row (N,), in fp32; hidden (N, d), labels (N,) all valid.
    For a head that does not train (its weight and bias get no gradient); the head runs in autocast's
    dtype when autocast is on, as :func:`linear_cross_entropy`."""
    dt = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype
    chunk = max(1, chunk_elements // weight.shape[0])
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearLogps.apply(hidden.to(dt), weight.to(dt), None if bias is None else bias.to(dt), labels, chunk)


def labelled_rows(labels: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """The rows of ``labels`` (on the CPU) whose label is not ignored, as indices on ``device`` (None:
    every row). Found on the host and copied ahead of use, they spare the loss the device-to-host sync
    that finding them on the GPU costs: there the host would wait, in the middle of the step, for the
    whole forward pass (and, with ``train.offload_activations``, for the copies to host memory queued
    before it on the copy engine) before it could queue backward."""
    from ..data.collate import ahead
    keep = _kept(labels)
    return None if keep is None else ahead(keep, device)


def _kept(labels: torch.Tensor) -> torch.Tensor | None:
    """Indices of the rows whose label is not ignored, on the labels' device (None: every row)."""
    keep = (labels != IGNORE).nonzero().squeeze(1)                    # (n,)
    return None if keep.numel() == labels.numel() else keep


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         bias: torch.Tensor | None = None, chunk_elements: int | None = None,
                         compiled: bool = False, rows: torch.Tensor | None | str = "find") -> torch.Tensor:
    """Fused, chunked ``linear_cross_entropy_reference``: same value and gradients (to rounding).

    Computes the head in autocast's dtype when autocast is on, else in ``hidden``'s dtype.
    ``compiled``: off CUDA, the per-chunk loss and gradient run as one compiled function (on CUDA the
    Triton kernel of kernels/row_ce.py runs either way; a trained bias keeps the eager form).
    ``rows``: the indices of the rows whose label is not ignored, when the caller knows them (``labelled_rows``; None: all rows); by default they are found on the device,
    which waits for it.
    """
    dt = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype
    if isinstance(rows, str):
        rows = _kept(labels)
    if rows is not None:
        hidden, labels = hidden.index_select(0, rows), labels.index_select(0, rows)  # (n, d), (n,)
    if labels.numel() == 0:
        return hidden.sum() * 0.0
    if chunk_elements is None:
        chunk_elements = CHUNK_ELEMENTS_TRAINED if weight.requires_grad else CHUNK_ELEMENTS
    chunk = max(1, chunk_elements // weight.shape[0])
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCE.apply(hidden.to(dt), weight.to(dt), None if bias is None else bias.to(dt), labels, chunk,
                               compiled)
