"""Integration: the README's quickstart on the embedded SmolLM2-135M-Instruct, as a user runs it (6 of its 16
steps, to keep the suite short: the eval loss already falls from 2.06 to about 0.70)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs") / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", "examples/quickstart.yaml",
                           f"output.dir={out}", "train.max_steps=6", "train.eval_every=3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"\nquickstart wall time: {elapsed:.0f} s")
    return out, proc, elapsed


def test_quickstart_learns_and_reports(quickstart_run):
    run_dir, proc, elapsed = quickstart_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert summary["train_loss_after"] < summary["train_loss_before"]
    for line in ("parameters", "train loss", "eval loss", "peak memory", "time"):
        assert line in proc.stdout
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "adapter/adapter_model.safetensors"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "checkpoints").glob("step-*"))
    assert "step" in proc.stderr and "loss=" in proc.stderr and "tok_s=" in proc.stderr  # the progress bar


def test_peft_loads_the_quickstart_adapter_with_the_same_logits(quickstart_run):
    from peft import PeftModel

    import tunesmith
    from tunesmith.models.loader import ModelConfig, load_model
    run_dir, _, _ = quickstart_run
    ours, tok = tunesmith.load(run_dir, device="cpu")
    theirs = PeftModel.from_pretrained(load_model(ModelConfig(name_or_path="smollm2-135m", device="cpu")),
                                       run_dir / "adapter").eval()
    x = tok("What is the capital of Peru?", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = ours(input_ids=x).logits, theirs(input_ids=x).logits
    assert float((a - b).norm() / b.norm()) <= 1e-5
