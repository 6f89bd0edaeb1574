"""`tunesmith estimate` against the measured CPU peak of short training runs, one process a method.

    python bench/cpu_estimate_peaks.py [--out bench/results/cpu_estimate_peaks.json]

Each method trains a random Llama (hidden 256, 4 layers, the 30,522-token vocabulary of the random
families, batch 8 x 128, fp32) for two steps in a fresh process (bench/cpu_estimate_child.py); the
measured figure is the resident-memory peak the run adds (``ru_maxrss`` less the RSS just before it,
after a warm-up run has loaded every library). Prints a table of estimate / measured.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS = ["full", "lora", "prefix", "fishmask"]


def measure(method: str, tmp: Path) -> dict:
    words = " ".join(f"word{i % 97} and more text" for i in range(400))
    (tmp / "train.jsonl").write_text("".join(json.dumps({"text": words}) + "\n" for _ in range(32)))
    opts = {"name": method, **({"fisher_samples": 8} if method == "fishmask" else {})}
    cfg = {"model": {"name_or_path": "random:llama", "device": "cpu",
                     "random_overrides": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
                                          "num_attention_heads": 4, "num_key_value_heads": 2}},
           "method": opts, "data": {"train": str(tmp / "train.jsonl"), "format": "text"},
           "train": {"max_steps": 2, "batch_size": 8, "max_seq_len": 128, "progress": False, "objective": "pt",
                     "lr": 1e-4},
           "output": {"dir": str(tmp / "run"), "plot": False}}
    (tmp / "cfg.json").write_text(json.dumps(cfg))
    src = str(HERE.parent / "src")
    out = subprocess.run([sys.executable, str(HERE / "cpu_estimate_child.py"), str(tmp / "cfg.json")],
                         capture_output=True, text=True, check=True, env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin",
                                                                          "HF_HUB_OFFLINE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/cpu_estimate_peaks.json")
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args()
    rows = []
    for m in args.methods.split(","):
        with tempfile.TemporaryDirectory() as d:
            r = measure(m, Path(d))
        r["method"], r["ratio"] = m, r["estimated"] / r["measured"]
        rows.append(r)
        print(f"{m:10} measured {r['measured'] / 2**20:8.1f} MiB  estimated {r['estimated'] / 2**20:8.1f} MiB  "
              f"estimate/measured {r['ratio']:.3f}", flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
