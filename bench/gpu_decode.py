"""Where a decode step's time goes: one-token attention over long KV caches, and a profile of the
engine's compiled step at batch 1.

    export PYTHONPATH=$PWD/.whl/site:$PWD/src
    python3 bench/gpu_decode.py --out bench/results/h200/gpu_decode.json            # both parts
    python3 bench/gpu_decode.py --parts attention                                   # the kernels only
    python3 bench/gpu_decode.py --tiny                                              # CPU smoke test

``attention``: Llama-3-8B's attention shape (8 key/value heads of 128, 4 query heads each), bf16, rows
of random lengths in [W/2, W], one query token. Each variant's µs per layer call (a CUDA graph's
replays, timed with CUDA events) and the
KV bytes it reads per second:

- ``sdpa``: the engine's ``decode_attention`` (SDPA with the additive mask, query heads grouped);
- ``split``: ``split_decode_attention`` (scores, softmax, then the value sum in column chunks);
- ``mm``: scores as one batched matmul, their softmax in fp32, the value sum as one batched matmul
  (the split variant without column chunks; compiled);
- ``flex``: ``torch.nn.attention.flex_attention`` with the valid columns as a score modification
  (compiled: its decoding kernel);
- ``sdpa_eff``: SDPA with the additive mask, held to the memory-efficient backend;
- ``flash_nomask``: SDPA without a mask (flash, every row the full width): a floor the masked variants
  cannot beat, shown for scale.

``engine``: random-weight Llama-3-8B in bf16, ``--rows`` rows of ``--prompt`` random ids and ``--new``
new tokens (EOS ignored), the engine's fast path. Wall ms per decode step against the GPU's busy ms per
step under torch.profiler, by kernel class, and the top kernels; ``--variants default,cdt`` runs it
again with inductor's coordinate-descent tuning of its generated kernels.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if "--tiny" in sys.argv:
    os.environ.setdefault("BENCH_DEVICE", "cpu")
    os.environ.setdefault("BENCH_TINY", "1")
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import gpu_common as gc_  # noqa: E402
from gpu_profile import _class  # noqa: E402


def _time_us(fn) -> float:
    """µs per call of ``fn`` replayed as a CUDA graph (as inside the engine's compiled step, so that
    launch overhead is not timed); on the CPU, wall time."""
    if gc_.DEV == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return gc_.event_us(graph.replay, n=50, warmup=5)
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - t0) / 3 * 1e6


def mm_attention(q, k, v, mask, scale):
    """One-token attention as two batched matmuls around an fp32 softmax, query heads grouped."""
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, d)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale + mask.float()
    p = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(p, v).reshape(b, hq, 1, d)


def flex_attention_fn():
    from torch.nn.attention.flex_attention import flex_attention

    def run(q, k, v, valid, scale):
        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where(valid[b, kv_idx], score, -float("inf"))
        return flex_attention(q, k, v, score_mod=score_mod, scale=scale, enable_gqa=True)
    return torch.compile(run, dynamic=False) if gc_.DEV == "cuda" else run


def sdpa_efficient(q, k, v, mask, scale):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        return F.scaled_dot_product_attention(q.reshape(b, hkv, hq // hkv, d), k, v, attn_mask=mask, scale=scale)


def attention(widths: list[int], batches: list[int]) -> dict:
    from tunesmith.infer.engine.fast import SPLIT_CHUNK, decode_attention, split_decode_attention
    hkv, g, d = (2, 2, 16) if os.environ.get("BENCH_TINY") else (8, 4, 128)
    dt = torch.bfloat16
    out = {}
    split = torch.compile(split_decode_attention, dynamic=False) if gc_.DEV == "cuda" else split_decode_attention
    mm = torch.compile(mm_attention, dynamic=False) if gc_.DEV == "cuda" else mm_attention
    flex = flex_attention_fn()
    for b in batches:
        for w in widths:
            gen = torch.Generator(device=gc_.DEV).manual_seed(0)
            q = torch.randn(b, hkv * g, 1, d, dtype=dt, device=gc_.DEV, generator=gen)
            k = torch.randn(b, hkv, w, d, dtype=dt, device=gc_.DEV, generator=gen)
            v = torch.randn(b, hkv, w, d, dtype=dt, device=gc_.DEV, generator=gen)
            lengths = torch.randint(w // 2, w + 1, (b,), device=gc_.DEV, generator=gen)
            cols = torch.arange(w, device=gc_.DEV)
            valid = cols[None, :] >= (w - lengths)[:, None]          # left-padded rows, as the engine keeps them
            mask = torch.where(valid, 0.0, torch.finfo(dt).min).to(dt)[:, None, None, :]
            scale = d ** -0.5
            ref, _ = decode_attention(None, q, k, v, mask, scaling=scale)
            kv_bytes = 2 * b * hkv * w * d * 2
            row = {}
            variants = {"sdpa": lambda: decode_attention(None, q, k, v, mask, scaling=scale),
                        "mm": lambda: mm(q, k, v, mask, scale),
                        "flex": lambda: flex(q, k, v, valid, scale),
                        "sdpa_eff": lambda: sdpa_efficient(q, k, v, mask, scale),
                        "flash_nomask": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)}
            if w % SPLIT_CHUNK == 0:
                variants["split"] = lambda: split(None, q, k, v, mask, scaling=scale)
            for name, fn in list(variants.items()):
                try:
                    got = fn()
                    got = got[0] if isinstance(got, tuple) else got
                    us = _time_us(fn)
                except Exception as e:  # a variant this torch cannot run is reported, not fatal
                    row[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                    del variants[name]
                    continue
                err = (got.reshape(ref.shape).float() - ref.float()).abs().max().item() if name != "flash_nomask" else None
                row[name] = {"us": us, "kv_gb_per_s": kv_bytes / us / 1e3, "max_abs_diff_vs_sdpa": err}
            out[f"b{b}-w{w}"] = row
            print(f"b{b} w{w}: " + "  ".join(f"{n} {row[n]['us']:.1f} us ({row[n]['kv_gb_per_s']:.0f} GB/s)"
                                            for n in variants), flush=True)
    return out


def engine_profile(model, arch: str, rows: int, prompt: int, new: int, variant: str) -> dict:
    from torch.profiler import ProfilerActivity, profile
    from tunesmith.infer.engine import Engine, Request, SamplingParams
    if variant == "cdt":
        import torch._inductor.config as ic
        ic.coordinate_descent_tuning = True
    engine = Engine(model, None, max_batch=rows, max_len=prompt + new, fast=True)
    g = torch.Generator().manual_seed(7)
    prompts = torch.randint(3, model.config.vocab_size, (rows, prompt), generator=g).tolist()

    def once():
        hs = [engine.submit(Request(prompt=p, params=SamplingParams(max_tokens=new, ignore_eos=True)),
                            sink=lambda out: None) for p in prompts]
        gc_.sync()
        t0 = time.perf_counter()
        engine.run_until_done()
        gc_.sync()
        [h.result() for h in hs]
        return time.perf_counter() - t0

    t_compile = once()
    wall = min(once(), once())
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gc_.DEV == "cuda" else [])
    with profile(activities=acts) as prof:
        prof_wall = once()
    kernels, by_class = {}, {}
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", 0) or 0
        if t > 0 and e.device_type.name == "CUDA":
            kernels[e.key] = (t / new / 1e3, e.count / new)
            by_class[_class(e.key)] = by_class.get(_class(e.key), 0.0) + t / new / 1e3
    busy = sum(t for t, _ in kernels.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:20]
    res = {"rows": rows, "prompt": prompt, "new": new, "first_run_s": t_compile,
           "wall_ms_per_step": wall * 1e3 / new, "tokens_per_s": rows * new / wall,
           "profiled_wall_ms_per_step": prof_wall * 1e3 / new, "gpu_busy_ms_per_step": busy,
           "kernels_per_step": sum(c for _, c in kernels.values()), "by_class_ms_per_step": by_class,
           "top": [(n[:120], round(t, 4), c) for n, (t, c) in top],
           "host_top": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)}
    print(f"{arch} b{rows} {variant}: {res['wall_ms_per_step']:.3f} ms/step wall ({res['tokens_per_s']:.1f} tok/s), "
          f"GPU busy {busy:.3f} ms/step, {res['kernels_per_step']:.0f} kernels/step", flush=True)
    for n, t, c in res["top"]:
        print(f"  {t:7.4f} ms x{c:5.1f}  {n}", flush=True)
    print(res["host_top"], flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--parts", default="attention,engine")
    ap.add_argument("--widths", default="1024,4096,16384,32768")
    ap.add_argument("--batches", default="8,16")
    ap.add_argument("--arch", default="8b")
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--variants", default="default,cdt",
                    help="engine variants: default; cdt (inductor's coordinate-descent tuning on)")
    ap.add_argument("--out", default=str(ROOT / "results" / "gpu_decode.json"))
    a = ap.parse_args()
    if a.tiny:
        a.widths, a.batches, a.prompt, a.new = "512,1024", "2", 8, 4
    result = {"versions": gc_.versions(), "command": " ".join(sys.argv)}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if "attention" in a.parts:
        result["attention"] = attention([int(x) for x in a.widths.split(",")], [int(x) for x in a.batches.split(",")])
        out.write_text(json.dumps(result, indent=1))
    if "engine" in a.parts:
        model = gc_.build_model(a.arch).eval()
        model.config.use_cache = True
        for variant in a.variants.split(","):
            result.setdefault("engine", {})[variant] = engine_profile(model, a.arch, a.rows, a.prompt, a.new, variant)
            out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
