"""Single GEMMs of an 8B Llama block at 4,096 tokens on the GPU: each projection apart and fused (q, k
and v as one product; gate and up as one), the backward's input-gradient products, LoRA's rank-16
products and the loss's head chunks. Prints TFLOP/s (events over 30 calls, after 5 warm-up calls).

    python bench/gpu_gemm_shapes.py

Answers whether storing the base weights fused would pay (bench/results/gpu_gemm_shapes.json).
"""
import torch, json, sys
torch.backends.cuda.matmul.allow_tf32 = False
dev = "cuda"; bf = torch.bfloat16
T = 4096
def timeit(fn, n=30):
    for _ in range(5): fn()
    torch.cuda.synchronize()
    s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n): fn()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / n
res = {}
x = torch.randn(T, 4096, device=dev, dtype=bf)
for name, outs in [("q", [4096]), ("k", [1024]), ("qkv_sep", [4096, 1024, 1024]), ("qkv_fused", [6144]),
                   ("gate", [14336]), ("gateup_sep", [14336, 14336]), ("gateup_fused", [28672])]:
    ws = [torch.randn(o, 4096, device=dev, dtype=bf) for o in outs]
    cs = [torch.randn(T, o, device=dev, dtype=bf) for o in outs]
    ms = timeit(lambda: [torch.mm(x, w.t()) for w in ws])
    ms_add = timeit(lambda: [c.addmm_(x, w.t()) for c, w in zip(cs, ws)])
    fl = sum(2 * T * 4096 * o for o in outs)
    res[name] = {"ms": ms, "tflops": fl / ms / 1e9, "addmm_ms": ms_add, "addmm_tflops": fl / ms_add / 1e9}
# backward input grads: g (T, out) @ W (out, in)
for name, outs in [("bwd_qkv_sep", [4096, 1024, 1024]), ("bwd_gateup_sep", [14336, 14336]), ("bwd_down", [4096])]:
    din = 14336 if name == "bwd_down" else 4096
    ws = [torch.randn(o, din, device=dev, dtype=bf) for o in outs]
    gs = [torch.randn(T, o, device=dev, dtype=bf) for o in outs]
    ms = timeit(lambda: [torch.mm(g, w) for g, w in zip(gs, ws)])
    fl = sum(2 * T * din * o for o in outs)
    res[name] = {"ms": ms, "tflops": fl / ms / 1e9}
W = torch.randn(sum([14336, 14336]), 4096, device=dev, dtype=bf); G = torch.randn(T, 28672, device=dev, dtype=bf)
ms = timeit(lambda: torch.mm(G, W)); res["bwd_gateup_fused_K"] = {"ms": ms, "tflops": 2 * T * 4096 * 28672 / ms / 1e9}
W = torch.randn(6144, 4096, device=dev, dtype=bf); G = torch.randn(T, 6144, device=dev, dtype=bf)
ms = timeit(lambda: torch.mm(G, W)); res["bwd_qkv_fused_K"] = {"ms": ms, "tflops": 2 * T * 4096 * 6144 / ms / 1e9}
# LoRA backward: gu = g B, gb = g^T u
for out in (4096, 14336):
    g = torch.randn(T, out, device=dev, dtype=bf); b = torch.randn(out, 16, device=dev, dtype=bf); u = torch.randn(T, 16, device=dev, dtype=bf)
    res[f"lora_gB_{out}"] = {"ms": timeit(lambda: torch.mm(g, b))}
    res[f"lora_gTu_{out}"] = {"ms": timeit(lambda: torch.mm(g.t(), u))}
    res[f"lora_uBT_{out}"] = {"ms": timeit(lambda: torch.mm(u, b.t()))}
# CE head chunks
Wh = torch.randn(128256, 4096, device=dev, dtype=bf)
for rows in (261, 522, 1044):
    h = torch.randn(rows, 4096, device=dev, dtype=bf)
    ms = timeit(lambda: torch.mm(h, Wh.t()), n=10)
    gr = torch.randn(rows, 128256, device=dev, dtype=bf)
    ms2 = timeit(lambda: torch.mm(gr, Wh), n=10)
    fl = 2 * rows * 4096 * 128256
    res[f"ce_{rows}"] = {"fwd_ms_per_4096_rows": ms / rows * 4096, "fwd_tflops": fl / ms / 1e9, "bwd_tflops": fl / ms2 / 1e9}
for k, v in res.items(): print(k, {a: round(b, 4) for a, b in v.items()})
