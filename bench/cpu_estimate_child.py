"""The resident-memory peak short training runs add, beside `tunesmith estimate`, for several methods in one process.

    python bench/cpu_estimate_child.py DIR full,lora,prefix,fishmask [--size bench|test]
      →  one JSON line a method: {"method", "measured": bytes, "estimated": bytes, "trainable", "parts", ...}

Each method trains a random Llama (sizes in SIZES, fp32, the 30,522-token vocabulary of the random
families) for two steps on the CPU. A first run of a tiny model loads every library a run needs. Before
each measured run the freed heap goes back to the system (``malloc_trim``) and the kernel's peak
resident size is reset (``/proc/self/clear_refs``); the run's figure is that peak (``VmHWM``) less the
resident size just before it, so several methods measure one after another in one process. Run it
with a minimal environment (``clean_env``): the caller's thread and allocator settings change the
figure (tests/planning/test_estimate_peaks.py, bench/cpu_estimate_peaks.py).
"""
from __future__ import annotations

import copy
import ctypes
import gc
import json
import re
import sys
from pathlib import Path

SIZES = {   # the model, batch and length of a size: bench is docs/estimate.md's table, test the suite's check
    "bench": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, batch_size=8, max_seq_len=128),
    "test": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, batch_size=8, max_seq_len=96),
}
WARM = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)


def clean_env(src: str) -> dict:
    """The environment the child runs in: the source on the path, one thread, offline, nothing inherited."""
    return {"PYTHONPATH": src, "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "LANG": "C.UTF-8"}


def config(method: str, tmp: Path, size: str) -> dict:
    s = dict(SIZES[size])
    batch, seq = s.pop("batch_size"), s.pop("max_seq_len")
    opts = {"name": method, **({"fisher_samples": 8} if method == "fishmask" else {})}
    return {"model": {"name_or_path": "random:llama", "device": "cpu", "random_overrides": s},
            "method": opts, "data": {"train": str(tmp / "train.jsonl"), "format": "text"},
            "train": {"max_steps": 2, "batch_size": batch, "max_seq_len": seq, "progress": False,
                      "objective": "pt", "lr": 1e-4},
            "output": {"dir": str(tmp / f"run-{method}"), "plot": False}}


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def reset_peak() -> None:
    """Return freed heap to the system and start the kernel's peak resident size from now."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main(tmp: str, methods: str, size: str = "bench") -> None:
    import torch

    torch.set_num_threads(1)
    from tunesmith import config as config_mod
    from tunesmith.planning.estimate import estimate
    from tunesmith.train import runner

    tmp = Path(tmp)
    words = " ".join(f"word{i % 97} and more text" for i in range(400))
    (tmp / "train.jsonl").write_text("".join(json.dumps({"text": words}) + "\n" for _ in range(32)))
    for i, method in enumerate(methods.split(",")):
        data = config(method, tmp, size)
        if i == 0:   # loads every library the runs use
            warm = copy.deepcopy(data)
            warm["model"]["random_overrides"] = dict(WARM)
            warm["output"]["dir"] += "-warm"
            runner.run(config_mod.validate(warm))
        cfg = config_mod.validate(data)
        est = estimate(cfg, device="cpu")
        reset_peak()
        before = _status("VmRSS")
        runner.run(cfg)
        peak = _status("VmHWM")
        print(json.dumps({"method": method, "measured": peak - before, "estimated": est.peak,
                          "ratio": est.peak / (peak - before), "trainable": est.trainable_params,
                          "parts": est.parts, "prepare": est.prepare_bytes}), flush=True)
        del cfg
        gc.collect()


if __name__ == "__main__":
    args = sys.argv[1:]
    size = "bench"
    if "--size" in args:
        i = args.index("--size")
        size = args[i + 1]
        del args[i:i + 2]
    main(*args, size=size)
