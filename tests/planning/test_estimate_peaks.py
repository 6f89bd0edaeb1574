"""`tunesmith estimate` within 15% of the resident-memory peak that short CPU runs of full, LoRA, prefix
tuning and FishMask add (bench/cpu_estimate_child.py measures; bench/cpu_estimate_peaks.py is the larger
table of docs/estimate.md).

The child runs with a minimal environment, never pytest's: what the suite's process sets (thread
counts, its imports) must not reach the measured process. Full, LoRA and prefix share one process, one
after the other; FishMask, whose Fisher pass leaves the allocator's heap in a state that changes the next
run's figure, has its own.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from cpu_estimate_child import clean_env  # noqa: E402

GROUPS = ["full,lora,prefix", "fishmask"]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    rows = {}
    for i, methods in enumerate(GROUPS):
        tmp = tmp_path_factory.mktemp(f"peaks{i}")
        out = subprocess.run([sys.executable, str(ROOT / "bench" / "cpu_estimate_child.py"), str(tmp), methods,
                              "--size", "test"], capture_output=True, text=True, env=clean_env(str(ROOT / "src")),
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        for line in out.stdout.strip().splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                rows[r["method"]] = r
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora", "prefix", "fishmask"])
def test_estimate_within_15_percent_of_measured_cpu_peak(measured, method):
    r = measured[method]
    assert r["measured"] > 100 * 2**20, r    # the run itself was measured, not only the libraries
    assert abs(r["estimated"] - r["measured"]) <= 0.15 * r["measured"], (
        f"{method}: estimated {r['estimated'] / 2**20:.1f} MiB, measured {r['measured'] / 2**20:.1f} MiB, "
        f"ratio {r['ratio']:.3f}; parts {r['parts']}")
