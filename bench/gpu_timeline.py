"""Analysis of what bench/gpu_host.py records: a profiled step's kernel timeline (chrome trace) and
the CUDA allocator's history of a step. Pure functions over the recorded data, except
``memory_peak``, which runs the step it measures."""
from __future__ import annotations

import bisect
from pathlib import Path


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
