"""How long the command line takes to answer when it has nothing heavy to do.

    python bench/cli_latency.py [--repeats 5] [--out bench/results/cli_latency.json]

Times, each in a fresh subprocess (``python -m tunesmith.cli ...`` with this checkout's sources
first on the path): ``--help``, ``methods``, and ``train bad.yaml`` where bad.yaml has a misspelled
key (``trian:``), one where a method field is misspelled (``method.rank=16`` on the command line), a
staged config with a misspelled key in its second stage, and ``estimate bad.yaml``.
Each case also records which heavy modules (torch, transformers, matplotlib) the command imported,
and the interpreter's bare start-up (``python -c pass``) is measured as the floor. Medians and all
samples go to the JSON file.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "matplotlib")
# Runs the CLI, then reports which heavy modules got imported (on stderr, after the command's own output).
PROBE = ("import sys\nfrom tunesmith.cli import main\ntry:\n    code = main(sys.argv[1:])\n"
         "except SystemExit as e:\n    code = e.code\n"
         "print('HEAVY=' + ','.join(m for m in %r if m in sys.modules), file=sys.stderr)\n"
         "sys.exit(code)\n" % (HEAVY,))


def bad_config(tmp: Path) -> Path:
    data = tmp / "train.jsonl"
    data.write_text('{"instruction": "Add 2 and 3.", "output": "5"}\n')
    path = tmp / "bad.yaml"
    path.write_text(f"model: {{name_or_path: smollm2-135m}}\nmethod: {{name: lora, r: 8}}\n"
                    f"data: {{train: {data}}}\ntrian: {{lr: 1.0e-4}}\n")
    good = tmp / "good.yaml"
    good.write_text(f"model: {{name_or_path: smollm2-135m}}\nmethod: {{name: lora, r: 8}}\ndata: {{train: {data}}}\n")
    (tmp / "staged.yaml").write_text(good.read_text() + "stages: [{name: one}, {name: two, train: {lrr: 1.0}}]\n")
    return path


def time_once(args: list[str], env: dict) -> tuple[float, int, str, list[str]]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    heavy = next((l.split("=", 1)[1] for l in proc.stderr.splitlines() if l.startswith("HEAVY=")), "")
    first = next((l for l in (proc.stderr + proc.stdout).splitlines() if l and not l.startswith("HEAVY=")), "")
    return wall, proc.returncode, first, [m for m in heavy.split(",") if m]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "cli_latency.json"))
    args = p.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with tempfile.TemporaryDirectory() as tmp:
        bad = bad_config(Path(tmp))
        cases = {
            "python -c pass": None,
            "tunesmith --help": ["--help"],
            "tunesmith methods": ["methods"],
            "tunesmith train bad.yaml (misspelled key)": ["train", str(bad)],
            "tunesmith train good.yaml method.rank=16": ["train", str(bad.with_name("good.yaml")), "method.rank=16"],
            "tunesmith train staged.yaml (typo in stage 2)": ["train", str(bad.with_name("staged.yaml"))],
            "tunesmith estimate bad.yaml (misspelled key)": ["estimate", str(bad)],
        }
        results = {}
        for name, cli_args in cases.items():
            samples, rc, first, heavy = [], 0, "", []
            for _ in range(args.repeats):
                if cli_args is None:
                    t0 = time.perf_counter()
                    subprocess.run([sys.executable, "-c", "pass"], check=True)
                    samples.append(time.perf_counter() - t0)
                    continue
                wall, rc, first, heavy = time_once(cli_args, env)
                samples.append(wall)
            results[name] = {"median_s": statistics.median(samples), "min_s": min(samples),
                             "samples_s": samples, "rc": rc, "first_line": first[:200], "heavy_imports": heavy}
            print(f"{name:<45} median {results[name]['median_s']:.3f} s  rc {rc}  heavy imports: "
                  f"{', '.join(heavy) or 'none'}")
    out = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
           "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
           "repeats": args.repeats, "cases": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
