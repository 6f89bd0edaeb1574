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


def _step(model, loss_fn, batch, params, opt, marks: list | None = None, before_backward=None, after_backward=None):
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
    if after_backward is not None:
        after_backward()
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
    (``floor_bwd_ms``: neither forward nor backward waits for the host, after the step's first syncs).
    ``gpu_floor_ms``: the same two-sleep step timed on the GPU by CUDA events, from the end of the
    first sleep to the end of the optimizer step, less the second sleep's own event-timed span (clock
    changes under load cannot stretch a sleep into the figure)."""
    import torch
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
    with _sleeps(model, cycles):
        fwd = walls(None)
    with _sleeps(model, cycles) as marks:
        both = walls(marks.before_backward)
        gpu = []
        for i in range(6):
            _step(model, loss_fn, batches[i % 2], params, opt, before_backward=marks.before_backward)
            marks.end.record()
            torch.cuda.synchronize()
            gpu.append(marks.elapsed_ms())
    return {"sleep_ms": 1e3 * alone, "floor_ms": 1e3 * (fwd - alone), "floor_bwd_ms": 1e3 * (both - 2 * alone),
            "gpu_floor_ms": statistics.median(gpu[1:])}


class _Marks:
    """CUDA events around the GPU sleeps of one step: after the first sleep, around the second, at
    the step's end."""

    def __init__(self, cycles: int):
        import torch
        self.cycles = cycles
        self.after_first, self.before_second, self.after_second, self.end = (
            torch.cuda.Event(enable_timing=True) for _ in range(4))

    def first(self, *_):
        import torch
        torch.cuda._sleep(self.cycles)
        self.after_first.record()

    def before_backward(self):
        import torch
        self.before_second.record()
        torch.cuda._sleep(self.cycles)
        self.after_second.record()

    def elapsed_ms(self) -> float:
        return self.after_first.elapsed_time(self.end) - self.before_second.elapsed_time(self.after_second)


class _sleeps:
    """Queue a GPU sleep as the rotary embedding starts (after the step's first synchronizations,
    before the first block); the marks it returns also hold the hook that queues one before backward."""

    def __init__(self, model, cycles: int):
        self.rotary = next(m for n, m in model.named_modules() if n.endswith("rotary_emb"))
        self.marks = _Marks(cycles)

    def __enter__(self):
        self.handle = self.rotary.register_forward_pre_hook(self.marks.first)
        return self.marks

    def __exit__(self, *exc):
        self.handle.remove()


def stream_gaps(trace: dict, min_us: float = 1.0) -> dict:
    """Idle time of the compute stream (the stream with the most kernel time) in a profiled step
    whose host ran ahead of the GPU (GPU sleeps queued, ``_sleeps``): the gaps left when the GPU
    never waits for a launch. Sleep kernels are left out. Gaps are summed by size, and by the
    kernel that ends them; a gap whose ending kernel was queued behind a wait on another stream's
    event (``cudaStreamWaitEvent`` between the two launches) is counted as ``event_wait_ms``."""
    ev = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    kern = [e for e in ev if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")]
    by_stream: dict = {}
    for k in kern:
        by_stream.setdefault(k.get("args", {}).get("stream"), []).append(k)
    sid = max(by_stream, key=lambda s: sum(k["dur"] for k in by_stream[s] if k.get("cat") == "kernel"))
    ks = sorted((k for k in by_stream[sid] if "sleep" not in k["name"].lower()), key=lambda e: e["ts"])
    runtime = sorted((e for e in ev if e.get("cat") == "cuda_runtime"), key=lambda e: e["ts"])
    launch = {e["args"]["correlation"]: e for e in runtime if "correlation" in e.get("args", {})}
    waits = [e["ts"] for e in runtime if "WaitEvent" in e["name"]]
    sleeps = sorted((k["ts"], k["ts"] + k["dur"]) for k in by_stream[sid] if "sleep" in k["name"].lower())
    buckets = {"<5us": 0.0, "5-20us": 0.0, "20-100us": 0.0, ">100us": 0.0}
    by_next: dict = {}
    total = waited = 0.0
    for prev, k in zip(ks, ks[1:]):
        g = k["ts"] - (prev["ts"] + prev["dur"])
        if g < min_us or any(a >= prev["ts"] and b <= k["ts"] + 1 for a, b in sleeps):
            continue
        total += g
        buckets["<5us" if g < 5 else "5-20us" if g < 20 else "20-100us" if g < 100 else ">100us"] += g
        key = k["name"][:70]
        by_next[key] = by_next.get(key, 0.0) + g
        a, b = launch.get(prev.get("args", {}).get("correlation")), launch.get(k.get("args", {}).get("correlation"))
        if a is not None and b is not None:
            i = bisect.bisect_left(waits, a["ts"])
            if i < len(waits) and waits[i] <= b["ts"]:
                waited += g
    busy = sum(k["dur"] for k in ks)
    top = sorted(by_next.items(), key=lambda kv: -kv[1])[:25]
    return {"kernels": len(ks), "busy_ms": busy / 1e3, "gap_ms": total / 1e3, "event_wait_ms": waited / 1e3,
            "gap_by_size_ms": {k: round(v / 1e3, 3) for k, v in buckets.items()},
            "gap_by_next_kernel_ms": [(k, round(v / 1e3, 3)) for k, v in top]}


def _site(frames) -> str:
    """Where an allocation was made: the innermost frames in tunesmith, transformers, peft, torch's
    autograd and checkpoint code, inductor's generated code, the optimizer or the benchmark."""
    keep = [f for f in frames if any(k in f["filename"] for k in ("tunesmith", "transformers", "peft", "checkpoint",
                                                                     "autograd", "offload", "inductor", "optim",
                                                                     "bench"))]
    f = (keep or frames or [{"filename": "?", "line": 0, "name": "?"}])[:3]
    return " < ".join(f"{Path(x['filename']).name}:{x['line']}:{x['name']}" for x in f)


def _live_by_site(snap: dict, top: int) -> list:
    """The allocated blocks of a memory snapshot, summed by allocation site (frames are there for
    what was allocated while the history was recorded)."""
    groups: dict = {}
    for seg in snap["segments"]:
        for b in seg["blocks"]:
            if b["state"] != "active_allocated":
                continue
            k = _site(b.get("frames", []))
            n, size = groups.get(k, (0, 0))
            groups[k] = (n + 1, size + b["size"])
    rows = sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]
    return [(k, n, round(b / 2**20, 1)) for k, (n, b) in rows]


def memory_peak(step, top: int = 25) -> dict:
    """Peak memory of the forward (with the loss), of backward and of the optimizer step
    (``step(forward_done, backward_done)`` runs one step and calls each hook at the end of its
    phase);
    and the step's peak of memory allocated during it (weights and optimizer state excluded: they
    were allocated before), and what is live at that moment, summed by where it was allocated
    (``torch.cuda.memory`` history, the innermost frame in tunesmith, transformers or torch's
    autograd and checkpoint code, with the frame below it)."""
    import torch
    gib = lambda b: round(b / 2**30, 3)  # noqa: E731
    phases = {}

    def mark(name):   # the peak since the last mark, and what is allocated now
        def done():
            torch.cuda.synchronize()
            phases[f"{name}_peak_gib"] = gib(torch.cuda.max_memory_allocated())
            phases[f"{name}_end_gib"] = gib(torch.cuda.memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        return done
    torch.cuda.synchronize()
    phases["start_gib"] = gib(torch.cuda.memory_allocated())
    phases["live_at_start"] = _live_by_site(torch.cuda.memory._snapshot(), top)
    torch.cuda.reset_peak_memory_stats()
    step(mark("forward"), mark("backward"))   # without the history, which holds frees back
    mark("optimizer")()
    torch.cuda.memory._record_memory_history(max_entries=400000)
    try:
        step(None, None)
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    # a tensor's memory counts from its allocation to its release by the program ("free_requested"),
    # not to the allocator's reuse of it, which waits for the streams that used it
    events = [e for e in snap["device_traces"][torch.cuda.current_device()] if e["action"] in ("alloc", "free_requested")]
    cur = peak = at = 0
    for i, e in enumerate(events):
        cur += e["size"] if e["action"] == "alloc" else -e["size"]
        if cur > peak:
            peak, at = cur, i
    live: dict = {}
    for e in events[:at + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        else:
            live.pop(e["addr"], None)

    groups: dict = {}
    for e in live.values():
        k = _site(e.get("frames", []))
        n, b = groups.get(k, (0, 0))
        groups[k] = (n + 1, b + e["size"])
    rows = sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]
    return {**phases, "step_peak_gib": peak / 2**30, "events_to_peak": at, "events": len(events),
            "live_at_peak": [(k, n, round(b / 2**20, 1)) for k, (n, b) in rows]}


def run(name: str, out: Path, trace: bool = True, memory: bool = False) -> dict:
    import torch
    import gpu_common as G
    import gpu_train as T
    key, impl = name.split("/")
    (arch, method, batch, gc_on, data), _ = T.CONFIGS[key]
    side, flags = impl.split("+")[0], set(impl.split("+")[1:])
    if memory:   # from the model's build on: what the step starts with is attributed too
        torch.cuda.memory._record_memory_history(max_entries=2_000_000)
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
    if memory:   # before the floors: their sleeps let the host queue a step's worth of work ahead
        gc.collect()   # the timed steps ran with the collector off: their cycles are not the step's memory
        res["memory"] = memory_peak(lambda fwd, bwd: _step(model, loss_fn, batches[1], params, opt,
                                                           before_backward=fwd, after_backward=bwd))
        print("MEMORY", json.dumps(res["memory"], indent=0), flush=True)
    res.update(floor(model, loss_fn, batches, params, opt))
    stem = name.replace('/', '_').replace('+', '_')
    (out / f"host_{stem}.json").write_text(json.dumps(res, indent=1))
    print("HOST", json.dumps(res), flush=True)
    if not trace:
        return res
    res["profile"] = gaps(_trace(out, f"trace_{stem}", lambda: _step(model, loss_fn, batches[1], params, opt)))
    # the same step with the host ahead of the GPU: what the GPU itself leaves idle
    cycles = int(0.5 * torch.cuda.clock_rate() * 1e6)
    with _sleeps(model, cycles) as marks:
        res["gpu_bound_profile"] = stream_gaps(_trace(
            out, f"trace_gpu_bound_{stem}",
            lambda: _step(model, loss_fn, batches[1], params, opt, before_backward=marks.before_backward)))
    gc.enable()
    (out / f"host_{stem}.json").write_text(json.dumps(res, indent=1))
    return res


def _trace(out: Path, stem: str, step) -> dict:
    """One profiled call of ``step``: its chrome trace, also written gzipped to ``out``."""
    import gzip
    import torch
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    path = Path("/tmp") / f"{stem}.json"
    prof.export_chrome_trace(str(path))
    trace = json.loads(path.read_text())
    with gzip.open(out / f"{stem}.json.gz", "wt") as f:
        json.dump(trace, f)
    return trace


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--runs", default="")
    ap.add_argument("--worker", default=None)
    ap.add_argument("--deadline", type=float, default=540)
    ap.add_argument("--no-trace", action="store_true", help="skip the profiled step and its trace")
    ap.add_argument("--memory", action="store_true",
                    help="memory by phase, and what is live at a step's start and at its peak (records the allocator's "
                         "history from the model's build on, which slows that run's timed steps)")
    args = ap.parse_args()
    out = Path(args.out)
    if args.worker:
        try:
            res = run(args.worker, out, trace=not args.no_trace, memory=args.memory)
            for key in ("profile", "gpu_bound_profile"):
                if key in res:
                    print("GAPS", key, json.dumps(res[key]), flush=True)
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
                           + (["--no-trace"] if args.no_trace else []) + (["--memory"] if args.memory else []),
                           env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=left, check=False)
        except subprocess.TimeoutExpired:
            print(f"== {name}: stopped at the deadline", flush=True)


if __name__ == "__main__":
    main()
