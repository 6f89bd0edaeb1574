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

from gpu_timeline import gaps, memory_peak, stream_gaps  # noqa: E402


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
