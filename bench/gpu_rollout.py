"""Where a rollout's decode step goes: the engine's ms per decode step at GRPO's rollout shape under
variants that each remove one cost, and a profile of the rollout as GRPO runs it.

    export PYTHONPATH=$PWD/.whl/site:$PWD/src
    python3 bench/gpu_rollout.py --out bench/results/gpu_rollout.json          # 1b
    python3 bench/gpu_rollout.py --only 8b --new 256
    python3 bench/gpu_rollout.py --tiny                                        # CPU smoke test

The shape is bench/gpu_grpo.py's: 16 rows (2 prompts x G 8) of 256 random prompt ids, ``--new`` new
tokens each (EOS ignored, so every row runs to the end), random-weight Llama-3.2-1B / Llama-3-8B in bf16.
Variants (each a fresh engine over the same model, one untimed run first so that compilation is not
timed):

- ``base_greedy``: no adapter, argmax;
- ``base_sampled``: no adapter, temperature 1, no seeds (one multinomial over the batch);
- ``base_seeded``: no adapter, temperature 1, a seed per row (what a rollout asks for: the hashed
  exponential race of engine/sampling.py);
- ``lora_seeded``: LoRA r16 on the 7 projections with fp32 adapter weights (the GRPO benchmark's model),
  each step reading the parameters (casts to bf16 inside the decode graph);
- ``lora_frozen_seeded``: the same under ``frozen_adapters`` (s·A and B copied to bf16 once, as a
  rollout decodes);
- ``lora_greedy``: the same model as ``lora_seeded``, argmax.

Reported per variant: decode ms per step (generation time over the steps, the prefill included) and
generated tokens/s. Then a torch.profiler table of a ``lora_frozen_seeded`` run: GPU busy time against wall
time and the top host-side operators, to say whether a step waits on the GPU or on the host.
"""
from __future__ import annotations

import argparse
import contextlib
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

import gpu_common as gc_  # noqa: E402

ROWS = 16


def run(model, prompts, new: int, temperature: float, seeded: bool) -> float:
    """Seconds for one rollout-shaped generate on a fresh engine (after one untimed run)."""
    from tunesmith.infer.engine import Engine, Request, SamplingParams
    engine = Engine(model, None, max_batch=ROWS, max_queue=1 << 16, max_len=len(prompts[0]) + new)

    def once(base_seed: int) -> float:
        handles = []
        for i, p in enumerate(prompts):
            params = SamplingParams(max_tokens=new, temperature=temperature, ignore_eos=True,
                                    seed=(base_seed + i) if seeded else None)
            handles.append(engine.submit(Request(prompt=list(p), params=params), sink=lambda out: None))
        gc_.sync()
        t0 = time.perf_counter()
        engine.run_until_done()
        gc_.sync()
        dt = time.perf_counter() - t0
        outs = [h.result() for h in handles]
        bad = [o.error for o in outs if o.finish_reason == "error"]
        if bad:
            raise RuntimeError(bad[0])
        assert all(len(o.token_ids) == new for o in outs), [len(o.token_ids) for o in outs]
        return dt

    once(0)
    return min(once(100 * k) for k in range(1, 3)), engine


def profile_table(model, prompts, new: int, path: Path) -> dict:
    from torch.profiler import ProfilerActivity, profile
    _, engine = run(model, prompts, new, 1.0, True)   # compiled at this shape already (frozen by the caller)
    from tunesmith.infer.engine import Request, SamplingParams
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gc_.DEV == "cuda" else [])
    handles = [engine.submit(Request(prompt=list(p), params=SamplingParams(max_tokens=new, temperature=1.0,
                                                                          ignore_eos=True, seed=i)),
                             sink=lambda out: None) for i, p in enumerate(prompts)]
    gc_.sync()
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        engine.run_until_done()
        gc_.sync()
    wall = time.perf_counter() - t0
    [h.result() for h in handles]
    gpu = 0.0
    for e in prof.key_averages():
        if e.device_type.name == "CUDA":
            gpu += getattr(e, "self_device_time_total", 0) or 0
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    path.write_text(f"wall {wall * 1e3:.1f} ms for {new} steps; GPU busy {gpu / 1e3:.1f} ms\n\n{table}\n")
    return {"wall_ms_per_step": wall * 1e3 / new, "gpu_busy_ms_per_step": gpu / 1e3 / new}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--only", default="1b")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--variants",
                    default="base_greedy,base_sampled,base_seeded,lora_seeded,lora_frozen_seeded,lora_greedy")
    ap.add_argument("--out", default=str(ROOT / "results" / "gpu_rollout.json"))
    a = ap.parse_args()
    if a.tiny:
        a.prompt, a.new = 8, 4
    import tunesmith
    from gpu_grpo import prompt_ids
    from tunesmith.methods.inject import frozen_adapters
    result = {"versions": gc_.versions(), "rows": ROWS, "prompt_tokens": a.prompt, "new_tokens": a.new, "runs": {}}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for arch in a.only.split(","):
        model = gc_.build_model(arch).eval()
        prompts = prompt_ids(gc_.ARCHS[arch]["vocab_size"], ROWS, a.prompt)
        runs = result["runs"].setdefault(arch, {})
        lora = False
        for name in a.variants.split(","):
            if name.startswith("lora") and not lora:
                model = tunesmith.apply(model, "lora", target_modules=gc_.TARGETS, **gc_.LORA)
                gc_.upcast_trainable(model)
                model.eval()
                lora = True
            temperature = 0.0 if name.endswith("greedy") else 1.0
            frozen = frozen_adapters(model) if "frozen" in name else contextlib.nullcontext()
            with torch.no_grad(), frozen:
                dt, _ = run(model, prompts, a.new, temperature, name.endswith("seeded"))
            runs[name] = {"ms_per_step": dt * 1e3 / a.new, "tokens_per_s": ROWS * a.new / dt}
            print(arch, name, json.dumps(runs[name]), flush=True)
            out.write_text(json.dumps(result, indent=2))
        if lora:
            with torch.no_grad(), frozen_adapters(model):
                runs["profile_lora_frozen_seeded"] = profile_table(model, prompts, min(a.new, 64),
                                                                   out.with_name(out.stem + f"_{arch}_profile.txt"))
            print(arch, "profile", json.dumps(runs["profile_lora_frozen_seeded"]), flush=True)
        out.write_text(json.dumps(result, indent=2))
        del model
        gc_.free()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
