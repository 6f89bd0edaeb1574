"""The chunked loss's per-chunk softmax, loss and logit gradient (kernels/cross_entropy.py,
``chunk_loss_and_grad``, compiled as ``train.compile`` runs it) on the GPU, at a Llama-3 vocabulary
and the chunk heights the loss uses (2²⁵ and 2²⁶ fp32 logits a chunk), against formulations of the
same values. Each is checked against the eager reference and timed with events (30 calls after 5).

    python bench/gpu_loss_chunk.py --out bench/results/gpu_loss_chunk.json

A chunk's pass is bound by memory: at 261 rows it reads 67 MB of logits and writes 67 MB of gradient.
``current_static_vocab`` compiles the same function with the vocabulary static and only the rows
dynamic; ``triton_rows_*`` is kernels/row_ce.py's row-wise two-pass Triton kernel, which writes the
gradient over the logits in place, at three block sizes (the kernel runs at 8,192).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from gpu_common import event_us  # noqa: E402
from tunesmith.kernels.cross_entropy import chunk_loss_and_grad  # noqa: E402


def one_hot_compare(logits, labels):
    """The label's -1 as a comparison with the column index instead of a scatter."""
    lf = logits.float()
    lse = torch.logsumexp(lf, dim=-1)
    loss = (lse - lf.gather(1, labels[:, None]).squeeze(1)).sum()
    cols = torch.arange(lf.shape[1], device=lf.device)
    grad = torch.exp(lf - lse[:, None]) - (cols[None, :] == labels[:, None]).float()
    return loss, grad.to(logits.dtype)


def softmax_form(logits, labels):
    """softmax() for the gradient (inductor's online softmax: one pass for max and sum), the loss
    from the label's probability."""
    lf = logits.float()
    p = torch.softmax(lf, dim=-1)
    picked = p.gather(1, labels[:, None]).squeeze(1)
    loss = -torch.log(picked).sum()
    cols = torch.arange(lf.shape[1], device=lf.device)
    grad = p - (cols[None, :] == labels[:, None]).float()
    return loss, grad.to(logits.dtype)


def explicit_lse(logits, labels):
    """The softmax's own pieces (max, then the sum of exponentials: the pattern inductor computes in
    one online pass) give both the gradient and lse = max + log(sum); the loss stays lse − logit."""
    lf = logits.float()
    m = lf.amax(dim=-1, keepdim=True)
    e = torch.exp(lf - m)
    s = e.sum(dim=-1, keepdim=True)
    lse = (m + torch.log(s)).squeeze(1)
    loss = (lse - lf.gather(1, labels[:, None]).squeeze(1)).sum()
    cols = torch.arange(lf.shape[1], device=lf.device)
    grad = e / s - (cols[None, :] == labels[:, None]).float()
    return loss, grad.to(logits.dtype)


def triton_row_kernel():
    """kernels/row_ce.py's Triton kernel at a given block size and warp count: fn(logits, labels, block,
    warps) -> (loss, grad), the gradient written over the logits."""
    from tunesmith.kernels import row_ce

    def fn(logits, labels, block=row_ce.BLOCK, warps=row_ce.WARPS):
        loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        row_ce._row_ce_kernel[(logits.shape[0],)](logits, logits.stride(0), labels, loss, logits.shape[1],
                                                  BLOCK=block, num_warps=warps)
        return loss.sum(), logits
    return fn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    vocab = 128256
    variants = {"current": chunk_loss_and_grad, "one_hot_compare": one_hot_compare, "softmax_form": softmax_form,
                "explicit_lse": explicit_lse}
    compiled = {k: torch.compile(f, dynamic=True) for k, f in variants.items()}
    static = torch.compile(chunk_loss_and_grad, dynamic=False)   # the vocabulary static, the rows marked dynamic

    def static_rows(logits, labels):
        torch._dynamo.mark_dynamic(logits, 0)
        torch._dynamo.mark_dynamic(labels, 0)
        return static(logits, labels)
    compiled["current_static_vocab"] = static_rows
    row_kernel = triton_row_kernel()
    for block, warps in ((32768, 32), (16384, 16), (8192, 8)):
        compiled[f"triton_rows_b{block}_w{warps}"] = lambda lg, lb, _b=block, _w=warps: row_kernel(lg, lb, _b, _w)
    rows_out = []
    for rows in ((1 << 25) // vocab, (1 << 26) // vocab, (1 << 27) // vocab):
        logits = (torch.randn(rows, vocab, device="cuda") * 3).to(torch.bfloat16)
        labels = torch.randint(0, vocab, (rows,), device="cuda")
        ref_loss, ref_grad = chunk_loss_and_grad(logits, labels)      # eager
        row = {"rows": rows, "MB_logits": logits.numel() * 2 / 1e6}
        for name, fn in compiled.items():
            try:
                loss, grad = fn(logits.clone(), labels)          # a copy: the triton kernels write in place
                torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-2)
                torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=2e-2, atol=1e-3)
                work = logits.clone()
                row[f"{name}_us"] = event_us(lambda: fn(work, labels))
            except Exception as e:  # noqa: BLE001 - a variant that fails leaves its reason in the row
                row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        rows_out.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                              "date": time.strftime("%Y-%m-%d"), "vocab": vocab,
                                              "command": "python bench/gpu_loss_chunk.py", "rows": rows_out}, indent=1))


if __name__ == "__main__":
    main()
