"""Experiment tracking beside metrics.jsonl and loss.png: ``train.report_to: [tensorboard, wandb]``.

Every record the run writes to metrics.jsonl (train steps, evaluations, train probes) also goes to each
tracker, as ``<split>/<metric>`` scalars at the record's step. The trackers' packages are optional:
``check`` names the missing one and its pip line before anything loads. ``TRACKERS`` is the only list.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..errors import ConfigError


class TensorBoard:
    """Event files in ``RUN_DIR/tensorboard`` (torch.utils.tensorboard's SummaryWriter)."""

    package, pip = "tensorboard", "pip install tensorboard"

    def __init__(self, run_dir: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        self.writer.add_text("config", "```\n" + _yaml(config) + "\n```", 0)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A Weights & Biases run named after the run directory (project: ``$WANDB_PROJECT``, else tunesmith;
    ``WANDB_MODE=offline`` keeps it on disk, in ``RUN_DIR/wandb``)."""

    package, pip = "wandb", "pip install wandb"

    def __init__(self, run_dir: Path, config: dict):
        import wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "tunesmith"), name=Path(run_dir).name,
                              dir=str(run_dir), config=config)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


TRACKERS = {"tensorboard": TensorBoard, "wandb": WandB}


def check(names: list[str]) -> None:
    """ConfigError naming ``train.report_to`` and the pip line of each tracker whose package is missing."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"train.report_to: unknown tracker {name!r}; valid: {', '.join(TRACKERS)}")
        cls = TRACKERS[name]
        if importlib.util.find_spec(cls.package) is None:
            raise ConfigError(f"train.report_to: {name} needs the {cls.package} package, which is not installed "
                              f"({cls.pip}), or remove it from train.report_to")


def scalars(record: dict) -> dict[str, float]:
    split = record.get("split", "train")
    return {f"{split}/{k}": float(v) for k, v in record.items()
            if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracked:
    """A MetricsLog whose writes also go to the trackers of ``names``."""

    def __init__(self, log, names: list[str], run_dir: Path, config: dict):
        check(names)
        self.log = log
        self.trackers = [TRACKERS[n](run_dir, config) for n in names]

    def write(self, record: dict) -> None:
        self.log.write(record)
        values = scalars(record)
        for t in self.trackers:
            t.log(int(record.get("step", 0)), values)

    def read(self) -> list[dict]:
        return self.log.read()

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def _yaml(config: dict) -> str:
    import yaml
    return yaml.safe_dump(config, sort_keys=False)
