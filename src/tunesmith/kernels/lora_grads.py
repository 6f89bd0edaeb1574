"""LoRA's two backward products over the output gradient, in one pass: gu = g B and gB = gᵀ u.

For a LoRA layer y = x W0ᵀ + u Bᵀ with u = x (s A)ᵀ (kernels/lora.py), backward needs, from the
output gradient g (N × d_out):

* gu = g B (N × r), from which A's gradient and x's LoRA share follow;
* B's gradient, gᵀ u (d_out × r).

As two matrix products each reads all of g (N × d_out, 117 MB for an 8B Llama's gate projection at
4,096 tokens) for a rank-16 result, so each is bound by memory, not arithmetic. ``lora_grads`` reads
g once: a Triton kernel walks g in tiles of (rows × columns), and each tile feeds both products, a
tile's g B summed over its columns and its gᵀ u over its rows. Partial sums of one program (a block
of rows × a share of the columns) go to fp32 buffers that a last sum reduces: 16 row blocks × d_out × r
for B's gradient and 16 column shares × N × r for gu, some 15 MB at 8B against the 117 MB read saved.

Used on CUDA for ranks that are multiples of 16 (the kernel's smallest product tile) by the fused
LoRA layer's compiled form; elsewhere, and as the reference the tests compare with,
``lora_grads_reference`` computes the two products with ``torch.mm``.
"""
from __future__ import annotations

import torch

from .ops import define

ROWS, COLS, SPLITS = 256, 64, 16   # a program's row block, its column tile, column shares
MAX_ROWS = 64 * ROWS                # longer inputs (long context) take the reference: the partial sums
                                    # of B's gradient grow with the row blocks


def lora_grads_reference(g: torch.Tensor, b: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(g B, gᵀ u): g (N, d_out), b (d_out, r), u (N, r), one dtype."""
    return torch.mm(g, b), torch.mm(g.t(), u)


def usable(g: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the one-pass kernel takes this call: CUDA, 16-bit floats, rank 16, 32 or 64 (the kernel's
    product tiles), at most ``MAX_ROWS`` rows."""
    return (g.is_cuda and g.dtype in (torch.bfloat16, torch.float16) and b.shape[1] in (16, 32, 64)
            and g.shape[0] <= MAX_ROWS and _triton() is not None)


_KERNEL = None


def _triton():
    """The Triton kernel, compiled on first use (None where Triton is not installed)."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def kernel(g_ptr, b_ptr, u_ptr, gu_part, gb_part, n_rows, n_cols, share, stride_g,
               R: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr):
        pid_t, pid_s = tl.program_id(0), tl.program_id(1)
        rows = pid_t * BT + tl.arange(0, BT).to(tl.int64)
        ranks = tl.arange(0, R)
        row_ok = rows < n_rows
        u = tl.load(u_ptr + rows[:, None] * R + ranks[None, :], mask=row_ok[:, None], other=0.0)   # (BT, R)
        acc = tl.zeros((BT, R), dtype=tl.float32)
        start = pid_s * share
        for c0 in range(start, tl.minimum(start + share, n_cols), BN):
            cols = c0 + tl.arange(0, BN)
            col_ok = cols < n_cols
            g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)                           # (BT, BN)
            b = tl.load(b_ptr + cols[:, None] * R + ranks[None, :], mask=col_ok[:, None], other=0.0)  # (BN, R)
            acc += tl.dot(g, b)                                                                      # g B
            gb = tl.dot(tl.trans(g), u)                                                              # gᵀ u, (BN, R)
            tl.store(gb_part + (pid_t * n_cols + cols[:, None]) * R + ranks[None, :], gb, mask=col_ok[:, None])
        tl.store(gu_part + (pid_s * n_rows + rows[:, None]) * R + ranks[None, :], acc, mask=row_ok[:, None])

    _KERNEL = kernel
    return kernel


def _lora_grads(g: torch.Tensor, b: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not usable(g, b):
        return lora_grads_reference(g, b, u)
    import triton
    g = g if g.stride(-1) == 1 else g.contiguous()     # rows may have any stride
    b, u = b.contiguous(), u.contiguous()
    n, d = g.shape
    r = b.shape[1]
    blocks = triton.cdiv(n, ROWS)
    share = triton.cdiv(triton.cdiv(d, SPLITS), COLS) * COLS   # columns a program takes, whole tiles
    splits = triton.cdiv(d, share)
    gu_part = torch.empty((splits, n, r), device=g.device, dtype=torch.float32)
    gb_part = torch.empty((blocks, d, r), device=g.device, dtype=torch.float32)
    _triton()[(blocks, splits)](g, b, u, gu_part, gb_part, n, d, share, g.stride(0),
                                R=r, BT=ROWS, BN=COLS, num_warps=8, num_stages=3)
    return gu_part.sum(0).to(g.dtype), gb_part.sum(0).to(g.dtype)


lora_grads = define("lora_grads(Tensor g, Tensor b, Tensor u) -> (Tensor, Tensor)", _lora_grads,
                    lambda g, b, u: (g.new_empty((g.shape[0], b.shape[1])), g.new_empty((g.shape[1], b.shape[1]))))
