"""LoRA's rank products that write a (tokens × width) output, on the GPU: u Bᵀ in forward (K = r) and
gu A in backward (K = Σr of the projections summed in one buffer), at 4,096 tokens and an 8B Llama's
widths. Times cuBLAS (torch.mm, B as the transposed view the layer passes, and B stored transposed)
against a one-pass Triton kernel (one tile of the output per program, the whole K in one dot), and
checks the Triton output against torch.mm. Events over 50 calls after 10 warm-up calls.

    python bench/gpu_lora_products.py --out bench/results/gpu_lora_products.json

These products are bound by writing their output (33.5 MB at width 4,096): the question is which
implementation comes closest to the copy bandwidth (about 3 TB/s on an H100).
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import triton
import triton.language as tl

from gpu_common import event_us


@triton.jit
def _narrow_k(x_ptr, y_ptr, c_ptr, M, N, K, sxm, sxk, syk, syn, scm, scn,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BN)
    pm, pn = pid // num_n, pid % num_n
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk, mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
    y = tl.load(y_ptr + rk[:, None] * syk + rn[None, :] * syn, mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
    c = tl.dot(x, y)
    tl.store(c_ptr + rm[:, None] * scm + rn[None, :] * scn, c.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def narrow_k_mm(x: torch.Tensor, y: torch.Tensor, bm: int, bn: int, warps: int, stages: int = 1) -> torch.Tensor:
    m, k = x.shape
    n = y.shape[1]
    c = torch.empty(m, n, device=x.device, dtype=x.dtype)
    bk = max(16, triton.next_power_of_2(k))
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _narrow_k[grid](x, y, c, m, n, k, x.stride(0), x.stride(1), y.stride(0), y.stride(1), c.stride(0), c.stride(1),
                    BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages)
    return c


def timeit(fn) -> float:
    return event_us(fn, n=50, warmup=10)


CONFIGS = [(64, 128, 4), (64, 256, 4), (128, 128, 4), (128, 128, 8), (128, 256, 8), (256, 128, 8), (64, 512, 8)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev, bf, t = "cuda", torch.bfloat16, 4096
    rows = []
    # (what, K, N): forward u Bᵀ per projection; backward gu A summed over the projections sharing an input
    shapes = [("fwd u B^T k/v", 16, 1024), ("fwd u B^T q/o/down", 16, 4096), ("fwd u B^T gate/up", 16, 14336),
              ("bwd gu A o", 16, 4096), ("bwd gu A gate+up", 32, 4096), ("bwd gu A q+k+v", 48, 4096),
              ("bwd gu A down", 16, 14336)]
    for what, k, n in shapes:
        x = torch.randn(t, k, device=dev, dtype=bf)
        if what.startswith("fwd"):
            b = torch.randn(n, k, device=dev, dtype=bf)       # B as the layer stores it: (d_out, r)
            y, y_contig = b.t(), b.t().contiguous()
        else:
            y = y_contig = torch.randn(k, n, device=dev, dtype=bf)   # stacked A: (Σr, d_in)
        ref = torch.mm(x, y)
        row = {"what": what, "K": k, "N": n, "MB_written": t * n * 2 / 1e6,
               "cublas_us": timeit(lambda: torch.mm(x, y)),
               "cublas_contiguous_us": timeit(lambda: torch.mm(x, y_contig))}
        best = None
        for bm, bn, w in CONFIGS:
            out = narrow_k_mm(x, y, bm, bn, w)
            torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)   # bf16 output of an fp32 sum
            us = timeit(lambda: narrow_k_mm(x, y, bm, bn, w))
            row[f"triton_{bm}x{bn}_w{w}_us"] = us
            if best is None or us < best[0]:
                best = (us, f"{bm}x{bn}_w{w}")
        row["triton_best_us"], row["triton_best"] = best
        row["cublas_GBps"] = row["MB_written"] / row["cublas_us"] * 1e3
        row["triton_GBps"] = row["MB_written"] / best[0] * 1e3
        print(json.dumps({k2: (round(v, 2) if isinstance(v, float) else v) for k2, v in row.items()}), flush=True)
        rows.append(row)
    # the backward's summed product at each K (Σr of 1 to 4 projections): cuBLAS as called, with K padded
    # with zero columns to the next multiple of 48, as two products of K/2 (the second accumulating),
    # and with cuBLASLt preferred
    ks = {}
    for k in (16, 32, 48, 64):
        x = torch.randn(t, k, device=dev, dtype=bf)
        y = torch.randn(k, 4096, device=dev, dtype=bf)
        pad = -k % 48
        xp = torch.cat([x, x.new_zeros(t, pad)], 1)
        yp = torch.cat([y, y.new_zeros(pad, 4096)], 0)
        h = k // 2
        row = {"mm_us": timeit(lambda: torch.mm(x, y)),
               f"padded_to_{k + pad}_us": timeit(lambda: torch.mm(xp, yp)),
               "two_halves_us": timeit(lambda: torch.mm(x[:, :h], y[:h]).addmm_(x[:, h:], y[h:]))}
        prev = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library("cublaslt")
        row["cublaslt_us"] = timeit(lambda: torch.mm(x, y))
        torch.backends.cuda.preferred_blas_library(prev)
        ks[k] = row
        print("K", k, {a: round(b, 2) for a, b in row.items()}, flush=True)
    # a copy of the same size: the bandwidth these products could reach
    src = torch.randn(t, 4096, device=dev, dtype=bf)
    dst = torch.empty_like(src)
    copy_us = timeit(lambda: dst.copy_(src))
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "date": time.strftime("%Y-%m-%d"), "host": platform.node(),
              "command": "python bench/gpu_lora_products.py", "tokens": t,
              "copy_4096x4096_us": copy_us, "rows": rows, "summed_by_k": ks}
    print("copy (4096 x 4096 bf16, read + write)", round(copy_us, 2), "µs")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
