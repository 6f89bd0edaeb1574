"""Where a training step's wall time goes beyond its GPU work: host issue time, sync points, GPU gaps.

    python bench/gpu_host.py --out $OUT --runs 8b-lora-b2/ts+compile,8b-dora-b2/ts+compile

For each configuration of bench/gpu_train.py named in --runs (one process each, as there):

* host issue time: the seconds the Python side takes to return from forward, backward and the
  optimizer step without waiting for the GPU, against the synchronized step time;
* sync points: the operations that make the host wait for the GPU inside a step
  (``torch.cuda.set_sync_debug_mode``), with the line of the caller;
* the GPU-bound floor: the step again with a GPU sleep queued as the rotary embedding starts (after
  the step's first synchronizations, before the first block), so that the host issues ahead of the
  GPU until the next one, and again with a second sleep before backward; the step's wall time less
  the sleeps' is what it would take if the host never made the GPU wait from there on;
* GPU gaps: one profiled step's kernel timeline; the idle time between kernels, in total and
  by the host operation whose launch ended each gap (a gap that ends with a late launch is time
  the GPU waited for the host).

Writes one JSON per configuration to --out.
"""
from __future__ import annotations

import argparse
import bisect
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _step(model, loss_fn, batch, params, opt, marks: list | None = None, before_backward=None):
    import torch
    from torch.profiler import record_function
    t0 = time.perf_counter()
    torch.compiler.cudagraph_mark_step_begin()
    with record_function("step.fwd"), torch.autocast("cuda", dtype=torch.bfloat16):
        loss = loss_fn(model, batch)
    t1 = time.perf_counter()
    if before_backward is not None:
        before_backward()
    with record_function("step.bwd"):
        loss.backward()
    t2 = time.perf_counter()
    with record_function("step.opt"):
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    if marks is not None:
        marks.append((t1 - t0, t2 - t1, t3 - t2))
    return loss


def gaps(trace: dict, min_us: float = 5.0) -> dict:
    """Idle intervals between consecutive kernels of a profiled step (a chrome trace). Each gap is
    attributed to the host operation that launched the kernel ending it (the innermost operator
    around the launch call), and to the step's phase (fwd, bwd, opt) in which that launch happened;
    a gap whose kernel started within 20 µs of its launch call returning is counted as host-bound
    (the GPU waited for the launch)."""
    ev = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    kernels = sorted((e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    launch = {e["args"]["correlation"]: e for e in ev if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    ops = sorted((e for e in ev if e.get("cat") == "cpu_op"), key=lambda e: e["ts"])
    phases = [e for e in ev if e.get("cat") == "user_annotation" and e["name"].startswith("step.")]
    by_tid: dict = {}
    for o in ops:
        by_tid.setdefault(o["tid"], []).append(o)

    starts = {tid: [o["ts"] for o in lst] for tid, lst in by_tid.items()}

    def innermost(r):  # the latest-starting operator on the launching thread that encloses the call
        lst = by_tid.get(r["tid"], [])
        i = bisect.bisect_right(starts.get(r["tid"], []), r["ts"]) - 1
        for o in lst[max(0, i - 5000):i + 1][::-1]:
            if o["ts"] + o["dur"] >= r["ts"] + r["dur"]:
                return o["name"]
        return r["name"]

    def phase(t):
        for p in phases:
            if p["ts"] <= t <= p["ts"] + p["dur"]:
                return p["name"]
        return "other"
    total = host = 0.0
    by_op, by_phase, n, end = {}, {}, 0, None
    for k in kernels:
        s = k["ts"]
        if end is not None and s - end > min_us:
            g = s - end
            r = launch.get(k.get("args", {}).get("correlation"))
            total += g
            n += 1
            if r is not None and s - (r["ts"] + r["dur"]) < 20:
                host += g
            key = innermost(r)[:80] if r is not None else "?"
            by_op[key] = by_op.get(key, 0.0) + g
            ph = phase(r["ts"]) if r is not None else "?"
            by_phase[ph] = by_phase.get(ph, 0.0) + g
        end = s + k["dur"] if end is None else max(end, s + k["dur"])
    busy = sum(k["dur"] for k in kernels)
    span = (end - kernels[0]["ts"]) if kernels else 0
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:30]
    return {"span_ms": span / 1e3, "busy_ms": busy / 1e3, "gap_ms": total / 1e3, "host_bound_gap_ms": host / 1e3,
            "gaps": n, "kernels": len(kernels), "gap_by_phase_ms": {k: v / 1e3 for k, v in by_phase.items()},
            "gap_by_next_launcher_ms": [(k, round(v / 1e3, 3)) for k, v in top]}


def floor(model, loss_fn, batches, params, opt, sleep_ms: float = 200.0) -> dict:
    """GPU-bound floors of the step: its median wall time with a ``sleep_ms`` GPU sleep queued by a
    pre-hook of the rotary embedding (longer than the forward's issue time), less the sleep's own
    median time (``floor_ms``); and with a second sleep queued before backward as well, less both
    (``floor_bwd_ms``: neither forward nor backward waits for the host, after the step's first syncs)."""
    import torch
    rotary = next(m for n, m in model.named_modules() if n.endswith("rotary_emb"))
    cycles = int(sleep_ms * 1e-3 * torch.cuda.clock_rate() * 1e6)

    def sleep_alone():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.cuda._sleep(cycles)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def walls(before_backward):
        out = []
        for i in range(6):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            float(_step(model, loss_fn, batches[i % 2], params, opt, before_backward=before_backward))
            torch.cuda.synchronize()
            out.append(time.perf_counter() - t0)
        return statistics.median(out[1:])
    alone = statistics.median(sleep_alone() for _ in range(5))
    handle = rotary.register_forward_pre_hook(lambda *_: torch.cuda._sleep(cycles))
    try:
        fwd = walls(None)
        both = walls(lambda: torch.cuda._sleep(cycles))
    finally:
        handle.remove()
    return {"sleep_ms": 1e3 * alone, "floor_ms": 1e3 * (fwd - alone), "floor_bwd_ms": 1e3 * (both - 2 * alone)}


def run(name: str, out: Path, trace: bool = True) -> dict:
    import torch
    import gpu_common as G
    import gpu_train as T
    key, impl = name.split("/")
    (arch, method, batch, gc_on, data), _ = T.CONFIGS[key]
    side, flags = impl.split("+")[0], set(impl.split("+")[1:])
    model = G.build_model(arch)
    if side == "hf":
        model, loss_fn = G.setup_hf(model, method, gc_on)
    else:
        ck = [int(f[2:]) for f in flags if f.startswith("ck")]
        model, loss_fn = G.setup_tunesmith(model, method, gc_on, liger="liger" in flags,
                                           compile_layers="compile" in flags, ckpt_layers=ck[0] if ck else None,
                                           offload="off" in flags,
                                           compile_flags=frozenset(flags))
    batches = G.random_batches(model.config.vocab_size, batch, T.SEQ)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    for i in range(3):
        _step(model, loss_fn, batches[i % 2], params, opt)
    torch.cuda.synchronize()
    import gc
    gc.collect()
    gc.disable()
    marks, walls = [], []
    for i in range(8):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = _step(model, loss_fn, batches[i % 2], params, opt, marks)
        t_issue = time.perf_counter() - t0
        float(loss)
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0, t_issue))
    res = {"name": name, "wall_ms": 1e3 * statistics.median(w for w, _ in walls),
           "issue_ms": 1e3 * statistics.median(i for _, i in walls),
           "issue_fwd_bwd_opt_ms": [1e3 * statistics.median(m[j] for m in marks) for j in range(3)],
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    # sync points inside one step
    syncs = {}
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _step(model, loss_fn, batches[0], params, opt)
    torch.cuda.set_sync_debug_mode(0)
    for w in caught:
        where = f"{Path(w.filename).name}:{w.lineno}"
        syncs[where] = syncs.get(where, 0) + 1
    res["sync_points"] = syncs
    res.update(floor(model, loss_fn, batches, params, opt))
    stem = name.replace('/', '_').replace('+', '_')
    (out / f"host_{stem}.json").write_text(json.dumps(res, indent=1))
    print("HOST", json.dumps(res), flush=True)
    if not trace:
        return res
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _step(model, loss_fn, batches[1], params, opt)
        torch.cuda.synchronize()
    gc.enable()
    path = Path("/tmp") / f"trace_{stem}.json"
    prof.export_chrome_trace(str(path))
    trace = json.loads(path.read_text())
    import gzip
    with gzip.open(out / f"trace_{stem}.json.gz", "wt") as f:
        json.dump(trace, f)
    res["profile"] = gaps(trace)
    (out / f"host_{stem}.json").write_text(json.dumps(res, indent=1))
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--runs", default="")
    ap.add_argument("--worker", default=None)
    ap.add_argument("--deadline", type=float, default=540)
    ap.add_argument("--no-trace", action="store_true", help="skip the profiled step and its trace")
    args = ap.parse_args()
    out = Path(args.out)
    if args.worker:
        try:
            res = run(args.worker, out, trace=not args.no_trace)
            if "profile" in res:
                print("GAPS", json.dumps(res["profile"]), flush=True)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
        return
    start = time.time()
    for name in args.runs.split(","):
        left = args.deadline - (time.time() - start)
        if left < 30:
            print(f"== {name}: skipped, deadline", flush=True)
            continue
        print(f"== {name}", flush=True)
        try:
            subprocess.run([sys.executable, __file__, "--worker", name, "--out", str(out)]
                           + (["--no-trace"] if args.no_trace else []),
                           env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=left, check=False)
        except subprocess.TimeoutExpired:
            print(f"== {name}: stopped at the deadline", flush=True)


if __name__ == "__main__":
    main()
