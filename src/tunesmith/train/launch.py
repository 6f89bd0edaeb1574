"""`tunesmith train CONFIG --nproc N`: starts torchrun for the user (imports no torch).

It runs ``python -m torch.distributed.run --standalone --nproc_per_node N -m tunesmith train ...``,
the same as typing ``torchrun --nproc_per_node N -m tunesmith train ...`` on one machine; each of the
N processes then runs the training as train/distributed.py describes.
"""
from __future__ import annotations

import os
import subprocess
import sys


def command(nproc: int, train_args: list[str]) -> list[str]:
    """The torchrun command line for ``tunesmith train`` with ``train_args`` on ``nproc`` processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "tunesmith", "train", *train_args]


def inside_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch(nproc: int, train_args: list[str]) -> int:
    """Run the training on ``nproc`` processes; returns torchrun's exit status."""
    return subprocess.call(command(nproc, train_args))
