"""Host <-> GPU copy bandwidth with pinned memory (what activation offload moves), one call:

    python bench/gpu_pcie.py --out $OUT/gpu_pcie.json

Copies a 32 MiB and a 256 MiB bf16 tensor (an 8B layer input at 4k and 32k tokens) each way, ten
times after two warm-ups, timed with CUDA events; also both directions at once on two streams.
"""
from __future__ import annotations

import argparse
import json

import torch


def bandwidth(mib: int, reps: int = 10) -> dict:
    n = mib * 2**20 // 2
    dev = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    host = torch.empty(n, dtype=torch.bfloat16, pin_memory=True)
    dev2, host2 = torch.empty_like(dev), torch.empty_like(host).pin_memory()
    out = {}
    for name, (dst, src) in {"d2h": (host, dev), "h2d": (dev2, host2)}.items():
        for _ in range(2):
            dst.copy_(src, non_blocking=True)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            dst.copy_(src, non_blocking=True)
        end.record()
        torch.cuda.synchronize()
        out[f"{name}_GBps"] = reps * n * 2 / (start.elapsed_time(end) / 1e3) / 1e9
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    s1.wait_stream(torch.cuda.current_stream())
    s2.wait_stream(torch.cuda.current_stream())
    for _ in range(reps):
        with torch.cuda.stream(s1):
            host.copy_(dev, non_blocking=True)
        with torch.cuda.stream(s2):
            dev2.copy_(host2, non_blocking=True)
    torch.cuda.current_stream().wait_stream(s1)
    torch.cuda.current_stream().wait_stream(s2)
    end.record()
    torch.cuda.synchronize()
    out["both_ways_GBps_each"] = reps * n * 2 / (start.elapsed_time(end) / 1e3) / 1e9
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_pcie.json")
    args = ap.parse_args()
    res = {f"{mib}MiB": bandwidth(mib) for mib in (32, 256)}
    print(json.dumps(res, indent=1))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
