"""`tunesmith env`: what a bug report needs — versions, the accelerator and the platform."""
from __future__ import annotations

import platform
import sys
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("tunesmith", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "pydantic",
            "bitsandbytes", "liger-kernel", "triton", "trl")


def add(subparsers) -> None:
    p = subparsers.add_parser("env", help="print versions, GPU and platform for a bug report")
    p.set_defaults(fn=_run)


def report() -> list[tuple[str, str]]:
    """(name, value) rows: Python, the platform, each package's version (or 'not installed'), the accelerator."""
    rows = [("python", sys.version.split()[0]), ("platform", platform.platform())]
    for name in PACKAGES:
        try:
            rows.append((name, version(name)))
        except PackageNotFoundError:
            rows.append((name, "not installed"))
    import torch
    rows.append(("torch cuda", torch.version.cuda or "none (CPU build)"))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            rows.append((f"gpu {i}", f"{props.name}, {props.total_memory / 2**30:.1f} GiB, "
                                     f"compute capability {props.major}.{props.minor}"))
    else:
        rows.append(("gpu", "none"))
    rows.append(("cpu threads", str(torch.get_num_threads())))
    return rows


def _run(args) -> None:
    rows = report()
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
