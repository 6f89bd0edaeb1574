"""`tunesmith estimate` against the measured CPU peak of short training runs, one fresh process a method.

    python bench/cpu_estimate_peaks.py [--size bench|test] [--out bench/results/cpu_estimate_peaks.json]

Each method trains a random Llama (bench size: hidden 256, 4 layers, the 30,522-token vocabulary of the
random families, batch 8 x 128, fp32) for two steps in bench/cpu_estimate_child.py, run with a minimal
environment; the measured figure is the resident-memory peak the run adds, after a warm-up run has loaded
every library. Prints a table of estimate / measured. tests/planning/test_estimate_peaks.py checks the
test size in the suite.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cpu_estimate_child import clean_env  # noqa: E402

METHODS = ["full", "lora", "prefix", "fishmask"]


def measure(method: str, tmp: Path, size: str) -> dict:
    out = subprocess.run([sys.executable, str(HERE / "cpu_estimate_child.py"), str(tmp), method, "--size", size],
                         capture_output=True, text=True, check=True, env=clean_env(str(HERE.parent / "src")))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/cpu_estimate_peaks.json")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--size", default="bench", choices=["bench", "test"])
    args = ap.parse_args()
    rows = []
    for m in args.methods.split(","):
        with tempfile.TemporaryDirectory() as d:
            r = measure(m, Path(d), args.size)
        rows.append(r)
        print(f"{m:10} measured {r['measured'] / 2**20:8.1f} MiB  estimated {r['estimated'] / 2**20:8.1f} MiB  "
              f"estimate/measured {r['ratio']:.3f}", flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
