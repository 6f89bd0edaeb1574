"""GPU generation throughput: tunesmith's engine against transformers' ``generate`` (dynamic and
static cache) in one process, and mixed-adapter batches against the base model.

    export PYTHONPATH=$PWD/.whl/site:$PWD/src          # pydantic from the carried wheels (import tunesmith)
    python3 bench/gpu_generate.py --out $OUT/gpu_generate.json --only 8b-b1,8b-b64
    python3 bench/gpu_generate.py --out $OUT/gpu_generate_lora.json --only 8b-lora4,1b-b1,1b-b64,1b-lora4
    python3 bench/gpu_generate.py --smoke               # CPU, tiny models, every code path in a few minutes

Random-weight Llama-3-8B / Llama-3.2-1B architectures (bench/gpu_common.py), bf16, SDPA, random
128-token prompts, 256 new tokens, greedy, EOS off, batch 1 and 64. Each side runs once to warm up
(compiling where it compiles) and is then timed ``--repeats`` times (median); tokens/s = batch ×
new tokens / wall time of the whole call, prefill included. Sides:

* ``hf-dynamic``: ``model.generate`` with the default DynamicCache;
* ``hf-static``: ``model.generate(cache_implementation="static")`` (transformers compiles the step);
* ``ts``: the engine's fast path (static slots, compiled decode step with CUDA graphs);
* ``ts-separate``: the fast path with q/k/v and gate/up as separate matmuls (no input sharing);
* ``ts-sync``: the fast path with overlapped steps off (each step's picks read before the next is queued);
* ``ts-plain``: the engine's plain path (DynamicCache, eager), the reference;
* lora4 configs: ``ts-base`` (no adapters), ``ts-base-rows`` (4 LoRA adapters r16 on all 7
  projections loaded, every row on the base), ``ts-mixed`` (rows cycling the 4 adapters), and
  ``peft-mixed`` (peft's mixed-adapter batch, ``generate(adapter_names=...)``, dynamic cache).

The engine's sides also time the prompts' prefill alone (``prefill_s``) and the decode step that
leaves (``step_ms``); ``--profile SIDES`` runs those sides once more under torch.profiler (the
kernels' device time, in all and the top 25).

With ``--isolate`` each side runs in a process of its own, so that no side runs after another's
compilations, CUDA graphs and Python objects; by default the sides of a config share one process.

The JSON holds every run; ``row0``: the first row's tokens; ``agree_row0``: how many leading tokens of the first row a side shares
with its reference (hf-dynamic; ts-base in lora4 configs; ts-mixed for peft-mixed): in bf16 on random
weights near-ties flip, so a shorter common prefix than the 256 tokens is no error. Then the targets.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("BENCH_DEVICE", "cpu")
    os.environ.setdefault("BENCH_TINY", "1")
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "src"))

import torch  # noqa: E402

import gpu_common as gc_  # noqa: E402

HBM_TBPS = 4.8          # H200 HBM3e, the weight-bandwidth floor's denominator
LORA_TARGETS = gc_.TARGETS
SIDES = {"plain": ("hf-dynamic", "hf-static", "ts-separate", "ts", "ts-sync", "ts-plain"),
         "lora4": ("ts-base", "ts-base-rows", "ts-mixed", "peft-mixed")}   # each kind's sides, in run order
REFS = {"plain": "hf-dynamic", "lora4": "ts-base", "ts-mixed": "ts-mixed", "peft-mixed": "ts-mixed"}   # whose tokens a
# side should repeat: by side, else by kind (ts-mixed: its own, none)
CONFIGS = {             # key: (arch, batch, kind)
    "1b-b1": ("1b", 1, "plain"), "1b-b64": ("1b", 64, "plain"), "8b-b1": ("8b", 1, "plain"),
    "8b-b64": ("8b", 64, "plain"), "1b-lora4": ("1b", 64, "lora4"), "8b-lora4": ("8b", 64, "lora4"),
}


def timed(fn, repeats: int) -> dict:
    fn()                                   # warm-up (compiles)
    times, out = [], None
    for _ in range(repeats):
        gc_.sync()
        t0 = time.perf_counter()
        out = fn()
        gc_.sync()
        times.append(time.perf_counter() - t0)
    return {"wall_s": statistics.median(times), "walls": times, "out": out}


def hf_side(model, prompts, new: int, static: bool):
    mask = torch.ones_like(prompts)
    # the benchmark's models are built with use_cache=False (a training config): generation asks for the cache
    kw = {"use_cache": True, **({"cache_implementation": "static"} if static else {})}

    def run():
        with torch.no_grad():
            out = model.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=0, **kw)
        return out[:, prompts.shape[1]:].tolist()
    return run


def profile(fn, top: int = 25) -> dict:
    """One more call of ``fn`` under torch.profiler: the device time of its kernels in all and the
    ``top`` kernels by their own device time (CUDA graph replays included)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        gc_.sync()
    rows = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    rows.sort(key=lambda e: e.self_device_time_total, reverse=True)
    total = sum(e.self_device_time_total for e in rows)
    return {"kernel_ms": total / 1e3,
            "top": [{"name": e.key[:120], "ms": e.self_device_time_total / 1e3, "calls": e.count} for e in rows[:top]]}


def ts_side(engine, prompts, new: int, models: list[str | None]):
    from tunesmith.infer.engine import Request, SamplingParams
    rows = prompts.tolist()
    params = SamplingParams(max_tokens=new, ignore_eos=True)

    def run(params=params):
        hs = [engine.submit(Request(prompt=p, model=m, params=params), sink=lambda out: None)
              for p, m in zip(rows, models)]
        engine.run_until_done()
        return [h.result().token_ids for h in hs]
    run.prefill = lambda: run(SamplingParams(max_tokens=1, ignore_eos=True))   # the prompts' prefill alone
    return run


def _no_overlap(engine):
    engine.routes["base"].lane.runner.overlaps = False
    return engine


def _separate(make):
    """An engine built while the fast path's input sharing is off: q/k/v and gate/up stay separate
    matmuls (the model must not have been shared before: run this side before ``ts``)."""
    from tunesmith.infer.engine import fast
    real, fast.share_inputs = fast.share_inputs, lambda model: 0
    try:
        return make()
    finally:
        fast.share_inputs = real


def random_lora(model, seed: int, r: int = 16) -> dict:
    """Factors of a LoRA adapter r16 on the 7 projections of every layer (random, scale alpha/r = 2)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = {}
    for name, m in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        base = getattr(m, "base_layer", m)
        if leaf in LORA_TARGETS and isinstance(base, torch.nn.Linear):
            a = torch.randn(r, base.in_features, generator=g) * (base.in_features ** -0.5)
            b = torch.randn(base.out_features, r, generator=g) * 0.01
            out[name] = (a.to(gc_.DEV, torch.bfloat16), b.to(gc_.DEV, torch.bfloat16), 2.0)
    return out


def peft_side(model, factors: list[dict], prompts, new: int):
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, lora_dropout=0.0)
    pm = get_peft_model(model, cfg, adapter_name="l0").eval()
    for i in range(1, len(factors)):
        pm.add_adapter(f"l{i}", cfg)
    with torch.no_grad():
        for i, f in enumerate(factors):
            for name, (a, b, _) in f.items():
                mod = pm.base_model.model.get_submodule(name)
                mod.lora_A[f"l{i}"].weight.copy_(a)
                mod.lora_B[f"l{i}"].weight.copy_(b)
    names = [f"l{i % len(factors)}" for i in range(prompts.shape[0])]
    mask = torch.ones_like(prompts)

    def run():
        with torch.no_grad():
            out = pm.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, use_cache=True,
                              do_sample=False, pad_token_id=0, adapter_names=names)
        return out[:, prompts.shape[1]:].tolist()
    return run, pm


def agree(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def run_config(key: str, args, record) -> None:
    from tunesmith.infer.engine import Engine
    arch, batch, kind = CONFIGS[key]
    if SMOKE:
        batch = min(batch, 4)
    model = gc_.build_model(arch).eval()
    model.config.use_cache = True
    model.generation_config.eos_token_id = None
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    record(key, "meta", {"arch": arch, "batch": batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                         "weight_gib": weights / 2**30,
                         "floor_tokens_per_s_b1": HBM_TBPS * 1e12 / weights})
    g = torch.Generator().manual_seed(7)
    prompts = torch.randint(3, model.config.vocab_size, (batch, args.prompt_len), generator=g).to(gc_.DEV)
    new, max_len = args.new_tokens, args.prompt_len + args.new_tokens
    sides = {}
    if kind == "plain":
        sides["hf-dynamic"] = lambda: hf_side(model, prompts, new, False)
        sides["hf-static"] = lambda: hf_side(model, prompts, new, True)
        sides["ts-separate"] = lambda: ts_side(_separate(lambda: Engine(model, fast=True, max_batch=batch,
                                                                         max_len=max_len)), prompts, new, [None] * batch)
        sides["ts"] = lambda: ts_side(Engine(model, fast=True, max_batch=batch, max_len=max_len), prompts, new,
                                      [None] * batch)
        sides["ts-sync"] = lambda: ts_side(_no_overlap(Engine(model, fast=True, max_batch=batch, max_len=max_len)),
                                           prompts, new, [None] * batch)
        sides["ts-plain"] = lambda: ts_side(Engine(model, fast=False, max_batch=batch, max_len=max_len), prompts,
                                            new, [None] * batch)
    else:
        factors = [random_lora(model, seed=i) for i in range(4)]
        holder = {}

        def with_adapters(rows):
            if "engine" not in holder:
                holder["engine"] = Engine(model, fast=True, max_batch=batch, max_len=max_len)
                for i, f in enumerate(factors):
                    holder["engine"].add_lora(f"l{i}", f)
            return ts_side(holder["engine"], prompts, new, rows)
        sides["ts-base"] = lambda: ts_side(Engine(model, fast=True, max_batch=batch, max_len=max_len), prompts, new,
                                           [None] * batch)
        sides["ts-base-rows"] = lambda: with_adapters([None] * batch)
        sides["ts-mixed"] = lambda: with_adapters([f"l{i % 4}" for i in range(batch)])
        if not args.no_peft:
            sides["peft-mixed"] = lambda: peft_side(_plain_copy(model, holder), factors, prompts, new)[0]
    assert tuple(sides) == tuple(s for s in SIDES[kind] if s in sides)
    for side, make in sides.items():
        if args.sides and side not in args.sides:
            continue
        try:
            gc_.free()
            fn = make()
            res = timed(fn, args.repeats)
            out = res.pop("out")
            res.update(tokens_per_s=batch * new / res["wall_s"], peak_gib=gc_.peak_gib(), row0=out[0])
            if hasattr(fn, "prefill"):   # the engine's sides: prefill alone, and the decode step it leaves
                res["prefill_s"] = timed(fn.prefill, args.repeats)["wall_s"]
                res["step_ms"] = (res["wall_s"] - res["prefill_s"]) / max(1, new - 1) * 1e3
            if args.profile and (args.profile == "all" or side in args.profile.split(",")):
                res["profile"] = profile(fn)
        except Exception as e:  # one failing side never loses the others
            res = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
        record(key, side, res)
    del model
    gc_.free()


def run_isolated(key: str, args, record) -> None:
    """Each side of ``key`` in a process of its own (``--isolate``): no side runs after another's
    compilations, CUDA graphs or Python heap. The children write JSON that is merged here."""
    import subprocess
    import tempfile
    kind = CONFIGS[key][2]
    for side in SIDES[kind]:
        if args.sides and side not in args.sides or (side == "peft-mixed" and args.no_peft):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "side.json"
            cmd = [sys.executable, __file__, "--only", key, "--sides", side, "--repeats", str(args.repeats),
                   "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--out", str(out)] \
            + (["--smoke"] if SMOKE else []) + (["--profile", args.profile] if args.profile else [])
            print(f"{key:9} {side:15} in its own process ...", flush=True)
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            print(f"{key:9} {side:15} process ended with status {done.returncode} after "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            child = json.loads(out.read_text())["results"].get(key, {}) if out.is_file() else {}
        if "meta" in child:
            record(key, "meta", child["meta"])
        record(key, side, child.get(side) or {"error": f"the side's process ended with status {done.returncode}",
                                              "trace": (done.stdout + done.stderr)[-3000:]})


def _plain_copy(model, holder):
    """peft needs plain nn.Linear projections: undo the engine's wrappers (its adapters are gone after)."""
    engine = holder.get("engine")
    if engine is not None:
        for name in list(engine.table.slots):
            engine.table.remove(name)
        holder.pop("engine")
    return model


def targets(results: dict) -> dict:
    def tps(key, side):
        return results.get(key, {}).get(side, {}).get("tokens_per_s")
    out = {}
    b1, floor = tps("8b-b1", "ts"), results.get("8b-b1", {}).get("meta", {}).get("floor_tokens_per_s_b1")
    if b1 and floor:
        out["8b_b1_ts_over_floor"] = {"value": b1 / floor, "target": 0.6}
    b64, hs = tps("8b-b64", "ts"), tps("8b-b64", "hf-static")
    if b64 and hs:
        out["8b_b64_ts_over_hf_static"] = {"value": b64 / hs, "target": 3.0}
    for arch in ("1b", "8b"):
        mixed, base = tps(f"{arch}-lora4", "ts-mixed"), tps(f"{arch}-lora4", "ts-base")
        if mixed and base:
            out[f"{arch}_mixed_lora4_over_base"] = {"value": mixed / base, "target": 0.85}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "results" / ("gpu_generate_smoke.json" if SMOKE else "gpu_generate.json")))
    ap.add_argument("--only", help="comma-separated configs: " + ", ".join(CONFIGS))
    ap.add_argument("--sides", help="comma-separated sides to run (default: all of each config)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=16 if SMOKE else 128)
    ap.add_argument("--new-tokens", type=int, default=16 if SMOKE else 256)
    ap.add_argument("--no-peft", action="store_true", help="skip peft's mixed-adapter batch")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny models (BENCH_DEVICE=cpu BENCH_TINY=1)")
    ap.add_argument("--profile", help="comma-separated sides (or 'all') to run once more under torch.profiler: "
                    "their kernels' device time, in all and the top 25")
    ap.add_argument("--isolate", action="store_true",
                    help="run each side in a process of its own (by default the sides of a config share one)")
    args = ap.parse_args()
    args.sides = set(args.sides.split(",")) if args.sides else None
    keys = args.only.split(",") if args.only else list(CONFIGS)
    unknown = [k for k in keys if k not in CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; valid: {', '.join(CONFIGS)}")
    results: dict = {}
    doc = {"command": " ".join(["python3", *sys.argv]), "versions": gc_.versions(), "smoke": SMOKE,
           "results": results, "targets": {}}

    def record(key, side, res):
        results.setdefault(key, {})[side] = res
        if side != "meta" and "row0" in res:   # the leading tokens shared with the reference side's first row
            ref = results[key].get(REFS.get(side, REFS[CONFIGS[key][2]]), {}).get("row0")
            res["agree_row0"] = agree(res["row0"], ref) if ref is not None and ref is not res["row0"] else None
        doc["targets"] = targets(results)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=2))
        if side != "meta":
            shown = f"{res['tokens_per_s']:9.1f} tok/s  wall {res['wall_s']:.2f}s  agree {res['agree_row0']}" \
                if "tokens_per_s" in res else res["error"]
            if "step_ms" in res:
                shown += f"  prefill {res['prefill_s'] * 1e3:.0f} ms  step {res['step_ms']:.2f} ms"
            if "profile" in res:
                shown += f"  kernels {res['profile']['kernel_ms']:.0f} ms"
            print(f"{key:9s} {side:13s} {shown}", flush=True)
    torch.manual_seed(0)
    for key in keys:
        (run_isolated if args.isolate else run_config)(key, args, record)
    print(json.dumps(doc["targets"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
