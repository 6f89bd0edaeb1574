"""torch.profiler over two training steps: GPU time by kernel class and the top kernels."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile as tprofile

CLASSES = (("gemm", ("gemm", "nvjet", "sm90_xmma", "cutlass", "cublas")), ("attention", ("flash", "fmha", "attention")),
           ("triton", ("triton",)), ("copy/cast", ("copy", "cast", "to_copy")), ("reduce", ("reduce", "norm")),
           ("elementwise", ("elementwise", "vectorized", "unrolled")), ("adam", ("adam",)))


def _class(name: str) -> str:
    low = name.lower()
    for cls, keys in CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other"


def profile(model, loss_fn, batches, path: Path, steps: int = 2) -> dict:
    """(BENCH_DEVICE=cpu runs it on the CPU, as the benchmarks' smoke tests do: no CUDA rows then.)"""
    import time

    from gpu_common import DEV, sync
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=DEV == "cuda")
    sync()
    t0 = time.perf_counter()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
    with tprofile(activities=activities) as prof:
        for i in range(steps):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_fn(model, batches[i % len(batches)])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync()
    wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    kernels = {}
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
        if t > 0 and e.device_type.name == "CUDA" and not e.key.startswith(("Optimizer.", "ProfilerStep")):
            kernels[e.key] = (t / steps / 1e3, e.count // steps)
    total = sum(t for t, _ in kernels.values())
    by_class = {}
    for name, (t, _) in kernels.items():
        by_class[_class(name)] = by_class.get(_class(name), 0.0) + t
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:25]
    launches = sum(c for _, c in kernels.values())
    text = [f"GPU busy {total:.1f} ms of {wall_ms:.1f} ms per step (profiled), {launches} kernels"] + [f"  {c:12s} {t:8.1f} ms {100 * t / total:5.1f}%"
                                                for c, t in sorted(by_class.items(), key=lambda kv: -kv[1])]
    text += [f"{t:8.2f} ms x{n:5d}  {name[:110]}" for name, (t, n) in top]
    path.write_text("\n".join(text) + "\n\n" + prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=60)
                    + "\n\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    print("\n".join(text[:40]), flush=True)
    return {"gpu_ms_per_step": total, "wall_ms_per_step": wall_ms, "kernels_per_step": launches, "by_class_ms": by_class, "top": [(n, t, c) for n, (t, c) in top[:12]]}


def sync_sites(fn) -> list[dict]:
    """Run ``fn()`` with CUDA's sync debug mode on: every operation that made the host wait for the GPU,
    by the innermost frames outside torch that called it, most frequent first."""
    import collections
    import traceback
    import warnings
    seen = collections.Counter()

    def show(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1]
                  if "/torch/" not in f.filename and not f.filename.endswith(("warnings.py", "gpu_profile.py"))]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames[::-1][:4])
        seen[f"{where} ({str(message)[:50]})"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show            # restored when the block ends
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return [{"where": k, "count": v} for k, v in seen.most_common()]

