"""Each row's cross-entropy and its gradient with respect to the logits, in one pass over a chunk.

For logits x (c, V) and labels y (c,), all valid: loss_i = lse(x_i) − x_{i, y_i} and
g_i = softmax(x_i) − onehot(y_i). The chunked cross-entropy (kernels/cross_entropy.py) sums the losses;
the per-sequence log-probabilities of the preference objectives (train/objectives/_logps.py) take
log p_i = −loss_i, whose gradient is −g_i.

On CUDA (fp32, bf16 and fp16 logits) a Triton kernel computes each row in two passes: an online maximum
and sum of exponentials, then the gradient written over the logits in place (the pattern of Liger's
cross-entropy kernel; the chunk's logits are not needed afterwards). At 1,046 rows of 128,256 bf16
logits on the H200 it takes 222 µs, against 414 µs for the PyTorch form compiled with a static vocabulary
and 787 µs with a dynamic one (bench/gpu_loss_chunk.py, bench/results/h200/gpu_loss_chunk.json).
Elsewhere, and as its reference, :func:`row_ce_reference` computes the same in PyTorch.
"""
from __future__ import annotations

import torch

BLOCK = 8192      # logits a program reads at a time (the fastest of 8k, 16k and 32k on the H200)
WARPS = 8

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (the CPU build of torch): the reference runs
    triton = None


def row_ce_reference(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss (c,) in fp32 or wider, gradient (c, V) in the logits' dtype); the logits are not changed.
    Written to compile well (kernels/cross_entropy.py compiles it off CUDA): the row maximum and the sum
    of exponentials are the softmax's pattern, which inductor reduces in one online pass, and give both
    lse = max + log(sum) (the loss stays lse − logit, finite however unlikely the label) and the
    softmax; the label's −1 is a comparison with the column index, not a scatter."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    m = x.amax(dim=-1, keepdim=True)                                              # (c, 1)
    e = torch.exp(x - m)
    s = e.sum(dim=-1, keepdim=True)
    loss = (m + torch.log(s)).squeeze(1) - x.gather(1, labels[:, None]).squeeze(1)  # (c,)
    cols = torch.arange(x.shape[1], device=x.device)
    grad = e / s - (cols[None, :] == labels[:, None]).to(x.dtype)                 # softmax − one-hot
    return loss, grad.to(logits.dtype)


if triton is not None:
    @triton.jit
    def _row_ce_kernel(x_ptr, stride, y_ptr, loss_ptr, V, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_ptr += row * stride
        y = tl.load(y_ptr + row)
        m = float("-inf")
        d = 0.0
        for off in range(0, V, BLOCK):                      # pass 1: online max and sum of exponentials
            cols = off + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            new = tl.maximum(m, tl.max(x, 0))
            d = d * tl.exp(m - new) + tl.sum(tl.exp(x - new), 0)
            m = new
        lse = m + tl.log(d)
        tl.store(loss_ptr + row, lse - tl.load(x_ptr + y).to(tl.float32))
        for off in range(0, V, BLOCK):                      # pass 2: softmax − one-hot over the logits
            cols = off + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(cols == y, 1.0, 0.0)
            tl.store(x_ptr + cols, g.to(x_ptr.dtype.element_ty), mask=cols < V)


def available(logits: torch.Tensor) -> bool:
    """Whether :func:`row_ce_` runs the Triton kernel for these logits."""
    return (triton is not None and logits.is_cuda and logits.dim() == 2 and logits.stride(1) == 1
            and logits.dtype in (torch.float32, torch.bfloat16, torch.float16))


def row_ce_(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`row_ce_reference`'s values; where :func:`available`, the gradient is ``logits`` itself,
    overwritten in place."""
    if not available(logits):
        return row_ce_reference(logits, labels)
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    if logits.shape[0]:
        v = logits.shape[1]
        _row_ce_kernel[(logits.shape[0],)](logits, logits.stride(0), labels, loss, v,
                                           BLOCK=min(BLOCK, triton.next_power_of_2(v)), num_warps=WARPS)
    return loss, logits
