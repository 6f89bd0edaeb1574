"""GPU training throughput and memory: tunesmith against HF transformers+peft (and +Liger), one call.

    python bench/gpu_train.py --out $OUT/gpu_train.json [--only 8b-lora-b2] [--profile 8b-lora-b2/ts]

Every configuration of the performance issue runs for each side listed in CONFIGS, in worker
processes grouped by what they patch globally (Liger patches transformers' classes, so its
configurations get their own process). Random-weight Llama-3-8B / Llama-3.2-1B architectures,
bf16, SDPA, random tokens (Dolly rows: real SFT data), fused AdamW, seq 2048, median of 12 steps
after 3 warm-up, Python's collector paused inside the loop for both sides. Prints one line per run
as it finishes and a table last; writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

# key: (arch, method, batch, gradient checkpointing, data); sides: impl -> worker group. Flags after the
# side: liger, compile, kdora (fused DoRA), ckN (checkpoint only N blocks), off (offload block inputs),
# cg (compiled with CUDA graphs: torch.compile's reduce-overhead mode), combo (inductor's combo kernels),
# offall (with off: the last block outside ckN offloads too), keepN (with off: the last N blocks outside
# ckN keep their products on the GPU; 1 by default), cpp (inductor's C++ wrapper), ceN (2**N logits a chunk of
# the chunked loss)
CONFIGS = {
    "8b-lora-b2": (("8b", "lora", 2, True, "random"), {"hf": "plain", "ts": "plain", "ts+compile": "compile",
                                                         "ts+compile+ck31": "compile", "ts+compile+cg": "compile",
                                                         "ts+compile+combo": "compile", "ts+compile+cg+combo": "compile",
                                                         "hf+liger": "liger", "ts+liger": "liger",
                                                         "ts+liger+off+ck29": "liger", "ts+compile+off": "compile",
                                                         "ts+compile+off+ck16": "compile", "ts+compile+off+ck20": "compile",
                                                         "ts+compile+off+ck24": "compile", "ts+compile+off+ck18": "compile",
                                                         "ts+compile+off+ck22": "compile",
                                                         "ts+compile+off+ck20+offall": "compile", "ts+compile+ck18": "compile",
                                                         "ts+compile+cpp": "compile", "ts+compile+off+ck18+cpp": "compile",
                                                         "ts+compile+off+ck16+cpp": "compile",
                                                         "ts+compile+off+ck20+cpp": "compile",
                                                         "ts+compile+off+ck18+combo": "compile",
                                                         "ts+compile+off+ck18+cg": "compile",
                                                         "ts+compile+off+ck18+keep2": "compile",
                                                         "ts+compile+off+ck18+keep3": "compile",
                                                         "ts+compile+off+ck17+keep3": "compile",
                                                         "ts+compile+off+ck16+keep3": "compile",
                                                         "ts+compile+off+ck16+keep4": "compile",
                                                         "ts+compile+off+ck16+keep2": "compile",
                                                         "ts+compile+off+ck17+keep2": "compile",
                                                         "ts+compile+off+ck14+keep4": "compile",
                                                         "ts+compile+off+ck14+keep3": "compile",
                                                         "ts+compile+off+ck13+keep4": "compile",
                                                         "ts+compile+off+ck12+keep4": "compile",
                                                         "ts+compile+off+ck10+keep4": "compile",
                                                         "ts+compile+off+ck11+keep4": "compile",
                                                         "ts+compile+off+ck12+keep3": "compile",
                                                         "ts+compile+off+ck12+keep5": "compile",
                                                         "ts+compile+off+ck8+keep4": "compile",
                                                         "ts+compile+off+ck12+keep4+cpp": "compile",
                                                         "ts+compile+off+ck10+keep4+cpp": "compile",
                                                         "ts+compile+off+ck8+keep4+cpp": "compile",
                                                         "ts+compile+off+ck12+keep4+cpp+ce26": "compile",
                                                         "ts+compile+off+ck12+keep4+cpp+ce27": "compile",
                                                         "ts+compile+off+ck11+keep5": "compile",
                                                         "ts+compile+off+ck12+keep4+ce26": "compile",
                                                         "ts+compile+off+ck11+keep4+ce26": "compile"}),
    "8b-lora-b2-nogc": (("8b", "lora", 2, False, "random"), {"hf": "plain", "ts+compile": "compile"}),
    "auto-8b-lora-b2": (("8b", "lora", 2, True, "random"), {"hf": "plain", "ts+auto+lim0.8": "auto",
                                                              "ts+auto": "auto"}),
    "auto-8b-qlora-b2": (("8b", "qlora", 2, True, "random"), {"hf": "plain", "ts+auto+lim1.0": "auto"}),
    "auto-8b-dora-b2": (("8b", "dora", 2, True, "random"), {"hf": "plain", "ts+auto+lim0.8": "auto"}),
    "auto-1b-full-b4": (("1b", "full", 4, False, "random"), {"hf+liger": "liger", "ts+auto+lim1.0": "auto",
                                                           "ts+auto": "auto"}),
    "auto-1b-lora-b4": (("1b", "lora", 4, False, "random"), {"hf": "plain", "ts+auto": "auto"}),
    "8b-lora-b4": (("8b", "lora", 4, True, "random"), {"hf": "plain", "ts+liger": "liger", "ts+compile": "compile"}),
    "8b-dora-b2": (("8b", "dora", 2, True, "random"), {"hf": "plain", "ts+liger": "liger", "ts+compile": "compile",
                                                         "ts+compile+cg": "compile", "ts+compile+combo": "compile",
                                                         "ts+compile+cg+combo": "compile", "ts+compile+off+ck18": "compile",
                                                         "ts+compile+cpp": "compile", "ts+compile+off+ck18+cpp": "compile",
                                                         "ts+compile+off+ck14+keep4": "compile",
                                                         "ts+compile+off+ck12+keep4": "compile",
                                                         "ts+compile+off+ck16+keep4": "compile",
                                                         "ts+compile+off+ck14+keep3": "compile"}),
    "8b-qlora-b2": (("8b", "qlora", 2, True, "random"), {"hf": "plain", "ts+liger": "liger", "ts+compile": "compile",
                                                           "ts+compile+ck13": "compile", "ts+compile+ck10": "compile",
                                                           "ts+compile+off+ck6": "compile", "ts+compile+ck10+cpp": "compile"}),
    "1b-full-b4": (("1b", "full", 4, False, "random"), {"hf": "plain", "ts": "plain", "ts+compile": "compile",
                                                          "hf+liger": "liger", "ts+liger": "liger"}),
    "1b-lora-b4": (("1b", "lora", 4, False, "random"), {"hf": "plain", "ts": "plain", "ts+compile": "compile",
                                                          "ts+liger": "liger", "ts+compile+cpp": "compile",
                                                          "ts+compile+cg": "compile", "ts+compile+ce27": "compile",
                                                          "ts+compile+cpp+ce27": "compile"}),
    "8b-dolly-b4": (("8b", "lora", 4, True, "padded"), {"hf": "plain", "ts": "plain"}),
    "8b-dolly-packed": (("8b", "lora", 8192, True, "packed"), {"ts": "plain", "ts+liger": "liger"}),
}
BASELINE = {"1b-full-b4": "hf+liger", "auto-1b-full-b4": "hf+liger"}  # ratios are to "hf" unless named here
SEQ = int(os.environ.get("BENCH_SEQ", 2048))


def select(only: str | None, exact: bool = False) -> list[tuple[str, str, str]]:
    runs = []
    for key, (_, sides) in CONFIGS.items():
        for impl, group in sides.items():
            name = f"{key}/{impl}"
            if not only or any((o == name) if exact else (o in name) for o in only.split(",")):
                runs.append((key, impl, group))
    return runs


# -- worker ------------------------------------------------------------------------------------
def run_one(key: str, impl: str, profile: bool, outdir: Path, limits: dict | None = None) -> dict:
    import torch
    import gpu_common as G
    (arch, method, batch, gc_on, data), _ = CONFIGS[key]
    G.free()
    if "compile" in impl or "auto" in impl:
        torch._dynamo.reset()  # each configuration compiles its own model from scratch (and a process that
        # compiled several models' blocks would reach dynamo's recompile limit and run later ones eagerly)
    model = G.build_model(arch)
    vocab = model.config.vocab_size
    side, flags = impl.split("+")[0], set(impl.split("+")[1:])
    chosen = None
    if side == "hf":
        model, loss_fn = G.setup_hf(model, method, gc_on)
    elif "auto" in flags:
        model, loss_fn, chosen = G.setup_tunesmith_auto(model, method, batch * SEQ, (limits or {}).get(f"{key}/{impl}"))
    else:
        ck = [int(f[2:]) for f in flags if f.startswith("ck")]
        model, loss_fn = G.setup_tunesmith(model, method, gc_on, liger="liger" in flags, packed=(data == "packed"),
                                           compile_layers="compile" in flags, fused_dora="kdora" in flags,
                                           ckpt_layers=ck[0] if ck else None, offload="off" in flags,
                                           compile_flags=frozenset(flags))
    if data == "random":
        batches = G.random_batches(vocab, batch, SEQ)
    else:
        import gpu_dolly
        batches = gpu_dolly.batches(data, batch, SEQ, vocab)
    if data == "random":
        res = G.train(model, loss_fn, batches)
    else:  # one untimed pass over the batches (each new shape autotunes once), then the same pass timed
        res = G.train(model, loss_fn, batches, steps=2 * len(batches), warmup=len(batches), total_based=True)
    res["mfu"] = res["tokens_per_s"] * G.flops_per_token(arch, SEQ, method == "full") / (G.PEAK_TFLOPS * 1e12)
    res.update(key=key, impl=impl, arch=arch, method=method, batch=batch, gc=gc_on, data=data, seq=SEQ)
    if chosen is not None:
        res["speed"] = chosen
    if data == "packed" and side == "ts":
        import gpu_dolly
        res["packed_vs_padded_rel_diff"] = gpu_dolly.packing_check(model, batches[0])
    if profile:
        import gpu_profile
        res["profile"] = gpu_profile.profile(model, loss_fn, batches,
                                             outdir / f"profile_{key}_{impl.replace('+', '_')}.txt")
    del model, loss_fn, batches
    G.free()
    return res


def worker(group: str, runs: list[str], profile: str | None, json_path: Path, profile_dir: Path,
           limits: dict | None = None) -> None:
    if group == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama()  # rope, rms_norm, swiglu, fused linear cross-entropy (HF side)
    results = []
    for name in runs:
        key, impl = name.split("/")
        t0 = time.time()
        try:
            res = run_one(key, impl, name in (profile or "").split(","), profile_dir, limits)
        except Exception as e:  # noqa: BLE001 - a failed configuration is reported, the rest still run
            import gpu_common as G
            res = {"key": key, "impl": impl, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            traceback.print_exc()
            G.free()
        res["wall_s"] = time.time() - t0
        results.append(res)
        print("RESULT", json.dumps({k: v for k, v in res.items() if k not in ("losses", "step_times", "profile")}),
              flush=True)
        json_path.write_text(json.dumps(results))


# -- driver ------------------------------------------------------------------------------------
def table(results: list[dict]) -> str:
    by = {(r["key"], r["impl"]): r for r in results}
    lines = ["| config | side | tokens/s | peak GiB | train peak GiB | MFU | × base tok/s | × base mem | "
             "× base train mem | 1st loss | base 1st loss |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['key']} | {r['impl']} | error: {r['error'][:80]} | | | | | | | | |")
            continue
        base = by.get((r["key"], BASELINE.get(r["key"], "hf")))
        ok = base and "error" not in base

        def rel(field, fmt=".2f"):
            return f"{r[field] / base[field]:{fmt}}" if ok and base.get(field) and r.get(field) else "-"
        bl = f"{base['first_loss']:.4f}" if ok else "-"
        lines.append(f"| {r['key']} | {r['impl']} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.1f} | "
                     f"{r.get('train_peak_gib', float('nan')):.1f} | {100 * r['mfu']:.1f}% | {rel('tokens_per_s')} | "
                     f"{rel('peak_gib')} | {rel('train_peak_gib')} | {r['first_loss']:.4f} | {bl} |")
    return "\n".join(lines)


def limits(results: list[dict], runs: list[str]) -> dict:
    """{key/impl: GiB} for the ts+auto+limX runs: X × the baseline side's measured train peak."""
    peaks = {(r["key"], r["impl"]): r.get("train_peak_gib") for r in results if "key" in r}
    out = {}
    for name in runs:
        key, impl = name.split("/")
        lim = [f[3:] for f in impl.split("+") if f.startswith("lim")]
        base = peaks.get((key, BASELINE.get(key, "hf")))
        if lim and base:
            out[name] = float(lim[0]) * base
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_train.json")
    ap.add_argument("--only", default=None, help="comma-separated substrings of key/impl to run")
    ap.add_argument("--exact", action="store_true", help="--only names whole key/impl names")
    ap.add_argument("--profile", default=None, help="key/impl to profile after timing")
    ap.add_argument("--long", default="", help="long-context searches to run: long-hf,long-ts,long-tsoff")
    ap.add_argument("--long-cap", type=int, default=65536)
    ap.add_argument("--deadline", type=float, default=560, help="seconds; workers still running then are stopped")
    ap.add_argument("--worker", default=None)
    ap.add_argument("--profile-dir", default=".")
    ap.add_argument("--runs", default="")
    ap.add_argument("--limits", default="{}", help="(worker) JSON {key/impl: GiB} for ts+auto+limX sides")
    args = ap.parse_args()
    out = Path(args.out)
    if args.worker:
        if args.worker.startswith("long"):
            import gpu_long
            gpu_long.worker(args.worker, args.long_cap, out)
        else:
            worker(args.worker, args.runs.split(","), args.profile, out, Path(args.profile_dir),
                   json.loads(args.limits))
        return
    import gpu_common as G
    results, groups = [], {}
    for key, impl, group in select(args.only, args.exact):
        groups.setdefault(group, []).append(f"{key}/{impl}")
    order = ["plain", "liger", "compile", "auto"]   # auto last: its limits come from the baselines' peaks
    jobs = [(g, ["--runs", ",".join(groups[g])]) for g in order if g in groups]
    if args.long:
        jobs += [(g, []) for g in args.long.split(",")]
    start = time.time()
    for group, extra in jobs:
        part = Path("/tmp") / f"gpu_train_part_{group}.json"
        part.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--worker", group, "--out", str(part), "--long-cap", str(args.long_cap),
               "--profile-dir", str(out.parent), "--limits", json.dumps(limits(results, groups.get(group, []))),
               *extra] + (["--profile", args.profile] if args.profile else [])
        print(f"== {group}: {' '.join(extra[1:])}", flush=True)
        left = args.deadline - (time.time() - start)
        if left < 20:
            print(f"== {group}: skipped, deadline reached", flush=True)
            continue
        try:
            subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, check=False, timeout=left)
        except subprocess.TimeoutExpired:
            print(f"== {group}: stopped at the deadline", flush=True)
        if part.exists():
            results += json.loads(part.read_text())
    ver = G.versions() if not args.worker else {}
    out.write_text(json.dumps({"versions": ver, "command": " ".join(sys.argv), "results": results}, indent=1))
    print(json.dumps(ver))
    print(table([r for r in results if "key" in r and not r["key"].startswith("long")]))
    for r in results:
        if r.get("key", "").startswith("long"):
            print("LONG", json.dumps(r))


if __name__ == "__main__":
    main()
