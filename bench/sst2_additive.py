"""SST-2 with the embedded MiniLM encoder: every additive method beside full fine-tuning, LoRA, QLoRA,
BitFit and FishMask.

Each method trains through ``tunesmith.train`` (objective cls, the task head trainable) on the
first ``--train-rows`` rows of SST-2 train, and is scored on the whole validation set (872 rows).
Prints a table (method, trainable %, validation accuracy, time) and writes JSON under
bench/results/. Sized for a 2-core CPU: a few minutes per method.

    python bench/sst2_additive.py --data /work/shared/data/sst2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

#: method -> (method options, learning rate). Rates follow the usual ranges of each paper/peft
#: example for short runs: full FT small, PEFT larger, prompt methods largest.
METHODS = {
    "full": ({}, 5e-5),
    "lora": ({"r": 8}, 5e-4),
    "qlora": ({"r": 8}, 1e-3),   # needs bitsandbytes (its CPU backend on a CPU)
    "bitfit": ({}, 1e-2),
    "fishmask": ({"fisher_samples": 64}, 2e-3),
    "adapter": ({"reduction_factor": 16, "placement": "houlsby"}, 1e-3),
    "adapter-pfeiffer": ({"reduction_factor": 16, "placement": "pfeiffer"}, 1e-3),
    "adapter-parallel": ({"reduction_factor": 16, "placement": "parallel"}, 1e-3),
    "ia3": ({}, 3e-2),  # 5e-3: 0.747
    "prompt": ({"num_virtual_tokens": 20}, 3e-2),
    "ptuning": ({"num_virtual_tokens": 20, "encoder": "mlp"}, 3e-2),  # 3e-3: stayed at the majority class
    "ptuning-lstm": ({"num_virtual_tokens": 20, "encoder": "lstm"}, 1e-2),
    "prefix": ({"num_virtual_tokens": 20, "reparam_hidden": 256}, 3e-3),  # 1e-2: stayed at chance; 1e-3: 0.703
    "ptuning_v2": ({"num_virtual_tokens": 20}, 3e-2),
}
DEFAULT = ["full", "lora", "adapter", "ia3", "prompt", "ptuning", "ptuning-lstm", "prefix", "ptuning_v2"]


def run_one(label: str, args, workdir: Path) -> dict:
    from tunesmith import api
    options, lr = METHODS[label]
    lr = args.lr or lr
    name = label.split("-")[0]
    cfg = {
        "model": {"name_or_path": "minilm-l6", "device": "cpu", "dtype": "float32"},
        "method": {"name": name, **options},
        "data": {"train": str(Path(args.data) / "train.jsonl"), "validation": str(Path(args.data) / "validation.jsonl"),
                 "max_rows": args.train_rows},
        "train": {"objective": "cls", "max_steps": args.steps, "batch_size": args.batch_size, "lr": lr,
                  "head_lr": args.head_lr, "max_seq_len": 64, "scheduler": "linear", "warmup_steps": args.steps // 10, "seed": 0,
                  "log_every": 10, "progress": False},
        "output": {"dir": str(workdir / label), "plot": False},
    }
    t0 = time.perf_counter()
    _, s = api.train(cfg)
    return {"method": label, "lr": lr, "head_lr": s.get("head_lr"), "options": options, "trainable_params": s["trainable_params"],
            "total_params": s["total_params"], "trainable_pct": s["trainable_pct"],
            "accuracy": s["eval_accuracy_after"], "accuracy_before": s["eval_accuracy_before"],
            "train_time_s": s["train_time_s"], "time_s": time.perf_counter() - t0, "steps": s["steps"]}


def table(rows: list[dict]) -> str:
    lines = ["| method | trainable % | val. accuracy | train time (s) | total time (s) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['trainable_pct']:.3f} | {100 * r['accuracy']:.1f} | "
                     f"{r['train_time_s']:.0f} | {r['time_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="directory with SST-2 train.jsonl and validation.jsonl")
    p.add_argument("--methods", nargs="*", default=DEFAULT, choices=list(METHODS))
    p.add_argument("--train-rows", type=int, default=3840,
                   help="first N training rows (one epoch at the default steps and batch size)")
    p.add_argument("--steps", type=int, default=120, help="optimizer steps per method")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="learning rate for every method run (default: per method)")
    p.add_argument("--head-lr", type=float, default=None,
                   help="learning rate of the classification head (default: the method's head default, else lr)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: on a shared small CPU extra threads mostly spin)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "sst2_additive.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for label in args.methods:
            rows.append(run_one(label, args, Path(tmp)))
            r = rows[-1]
            print(f"{label}: acc {r['accuracy']:.4f}  trainable {r['trainable_pct']:.3f}%  "
                  f"{r['train_time_s']:.0f}s", flush=True)
            meta = {"benchmark": "sst2_additive", "model": "minilm-l6", "train_rows": args.train_rows,
                    "steps": args.steps, "batch_size": args.batch_size, "max_seq_len": 64,
                    "validation_rows": 872, "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpu_count": os.cpu_count(), "platform": platform.platform(), "results": rows}
            out.write_text(json.dumps(meta, indent=2))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
