"""Child process of bench/cpu_estimate_peaks.py: the resident-memory peak a short training run adds, beside the estimate.

    python rss_child.py CONFIG.json  →  prints one JSON line {"measured": bytes, "estimated": bytes, ...}

A first run of a tiny model loads every library the run needs; the measured run's peak (ru_maxrss)
is then compared with the resident memory just before it.
"""
import copy
import json
import resource
import sys

import torch

torch.set_num_threads(1)

from tunesmith import config as config_mod  # noqa: E402
from tunesmith.planning.estimate import estimate  # noqa: E402
from tunesmith.train import runner  # noqa: E402


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main(path: str) -> None:
    data = json.loads(open(path).read())
    warm = copy.deepcopy(data)
    warm["model"]["random_overrides"] = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                         "num_attention_heads": 2, "num_key_value_heads": 1}
    warm["output"]["dir"] += "-warm"
    runner.run(config_mod.validate(warm))
    cfg = config_mod.validate(data)
    est = estimate(cfg, device="cpu")
    before = rss()
    runner.run(cfg)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"measured": peak - before, "estimated": est.peak, "trainable": est.trainable_params,
                      "parts": est.parts, "prepare": est.prepare_bytes}))


if __name__ == "__main__":
    main(sys.argv[1])
