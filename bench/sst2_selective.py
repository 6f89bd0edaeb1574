"""SST-2 with the embedded MiniLM-L6 encoder: the selective methods beside full fine-tuning and LoRA.

    python bench/sst2_selective.py --data /work/shared/data/sst2 [--train-rows 2000] [--epochs 1]

Each method trains in its own process (so that peak memory, the process's max RSS on CPU or
``max_memory_allocated`` on CUDA, is its own) on the first ``--train-rows`` rows of
``train.jsonl`` and is evaluated on the whole ``validation.jsonl`` (872 rows). Reported per
method: validation accuracy, trainable %, checkpoint bytes (the saved artifact), peak memory,
optimizer-state bytes, total time (including Fisher estimation) and training-loop time. A table
is printed and everything is written to ``bench/results/sst2_selective.json``.

Learning rates follow each paper's practice (one value per method, no sweep): full fine-tuning,
freezing and Child-tuning use the fine-tuning rate; BitFit, LoRA and FishMask (Sung et al.'s SST-2
script uses 5e-4) use larger ones. Run directories go to a temporary folder, never the repo.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

#: name -> (method config, learning rate)
METHODS: dict[str, tuple[dict, float]] = {
    "full": ({"name": "full"}, 5e-5),
    "lora": ({"name": "lora", "r": 8, "alpha": 16}, 5e-4),
    "freeze": ({"name": "freeze", "layers": "last 2"}, 1e-4),
    "bitfit": ({"name": "bitfit"}, 1e-3),
    "child_tuning_d": ({"name": "child_tuning", "mode": "D", "p": 0.3}, 5e-5),
    "child_tuning_f": ({"name": "child_tuning", "mode": "F", "p": 0.3}, 5e-5),
    "fishmask": ({"name": "fishmask", "fraction": 0.005}, 5e-4),
}
COLUMNS = [("method", "method", "{}"), ("lr", "lr", "{:g}"), ("val acc", "eval_accuracy_after", "{:.4f}"),
           ("trainable %", "trainable_pct", "{:.3f}"), ("ckpt MiB", "artifact_mib", "{:.2f}"),
           ("peak GiB", "peak_memory_gib", "{:.2f}"), ("optim MiB", "optimizer_mib", "{:.2f}"),
           ("time s", "time_s", "{:.0f}"), ("train s", "train_time_s", "{:.0f}")]


def lr_of(args, name: str) -> float:
    return dict(args.lr or []).get(name, METHODS[name][1])


def run_config(args, name: str, out_dir: Path) -> dict:
    method, lr = dict(METHODS[name][0]), lr_of(args, name)
    if method["name"] in ("fishmask", "child_tuning") and method.get("mode", "D") == "D":
        method["fisher_samples"] = args.fisher_samples
    data = Path(args.data)
    return {
        "model": {"name_or_path": args.model, "device": args.device},
        "method": method,
        "data": {"train": str(data / "train.jsonl"), "validation": str(data / "validation.jsonl"),
                 "max_rows": args.train_rows},
        "train": {"objective": "cls", "epochs": args.epochs, "batch_size": args.batch_size, "lr": lr,
                  "max_seq_len": args.max_seq_len, "warmup_steps": args.warmup_steps, "scheduler": "linear",
                  "weight_decay": 0.01, "seed": args.seed, "progress": False, "log_every": 10},
        "output": {"dir": str(out_dir / name), "plot": False},
    }


def run_one(args) -> None:
    """Child process: train one method and print its summary as the last line."""
    import torch
    torch.set_num_threads(args.threads)
    from tunesmith.api import train
    with tempfile.TemporaryDirectory(prefix="sst2-") as tmp:
        _, summary = train(run_config(args, args.one, Path(tmp)))
    print("RESULT " + json.dumps(summary), flush=True)


def measure(args, name: str) -> dict:
    cmd = [sys.executable, __file__, "--one", name]
    for key, value in vars(args).items():
        if key == "lr":
            cmd += [f"--lr={n}={v}" for n, v in value or []]
        elif key not in ("one", "methods", "out"):
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    s = json.loads(lines[-1][len("RESULT "):])
    s.update(method=name, lr=lr_of(args, name), method_config=METHODS[name][0], wall_s=time.perf_counter() - t0,
             artifact_mib=s["artifact_bytes"] / 2**20, optimizer_mib=s["optimizer_state_bytes"] / 2**20)
    return s


def table(rows: list[dict]) -> str:
    cells = [[h for h, _, _ in COLUMNS]] + [[f.format(r[k]) if r.get(k) is not None else "-" for _, k, f in COLUMNS]
                                            for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["| " + " | ".join(c[i].ljust(widths[i]) for i in range(len(COLUMNS))) + " |" for c in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _lr_override(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    if name not in METHODS or not value:
        raise argparse.ArgumentTypeError(f"--lr {text!r}: expected METHOD=LR with METHOD in {', '.join(METHODS)}")
    return name, float(value)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder with SST-2 train.jsonl and validation.jsonl")
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--train-rows", type=int, default=2000)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=64)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--fisher-samples", type=int, default=1024, help="FishMask and Child-tuning D")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (1 is fastest on a shared CPU)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--lr", type=_lr_override, action="append", metavar="METHOD=LR",
                   help="override a method's learning rate (repeatable), e.g. --lr bitfit=1e-2")
    p.add_argument("--out", default=str(RESULTS / "sst2_selective.json"))
    p.add_argument("--one", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.one:
        run_one(args)
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    setup = {k: v for k, v in vars(args).items() if k not in ("one", "out")}
    for name in args.methods:
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        rows.append(measure(args, name))
        keep = ("method", "lr", "method_config", "eval_accuracy_after", "eval_accuracy_before", "eval_loss_after",
                "trainable_params", "total_params", "trainable_pct", "artifact_bytes", "peak_memory_gib",
                "optimizer_state_bytes", "time_s", "train_time_s", "steps", "train_rows", "validation_rows")
        out.write_text(json.dumps({"setup": setup, "results": [{k: r.get(k) for k in keep} for r in rows]}, indent=2))
        print(table(rows), flush=True)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
