"""Checkpoints: trainable weights, optimizer, scheduler, RNG states and data position.

Each is written to ``step-N.tmp`` and renamed to ``step-N`` only when complete, so a run stopped
mid-write never leaves a checkpoint that looks whole. A checkpoint whose files cannot be read back
(truncated or damaged since) is reported by name, and resuming falls back to the one before it.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..errors import ConfigError, FileError
from ..files import load_safetensors, read_json, torch_load


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(ckpt_root: Path, step: int, *, trainable: dict[str, torch.Tensor], optimizer, scheduler,
         position: dict, keep: int, extra: dict[str, torch.Tensor] | None = None) -> Path:
    final = ckpt_root / f"step-{step}"
    tmp = ckpt_root / f"step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    if extra:   # the strategies' own tensors (a DANN discriminator)
        save_file({k: v.detach().contiguous().cpu() for k, v in extra.items()}, str(tmp / "strategies.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **position}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    done = [p for p in ckpt_root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")
            and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def complete(run_dir: Path) -> list[Path]:
    """The complete checkpoints of ``run_dir``, oldest first; ConfigError (what to do instead) when none."""
    ckpts = list_checkpoints(run_dir / "checkpoints")
    if not ckpts:
        raise ConfigError(f"--resume {run_dir}: no complete checkpoint under {run_dir / 'checkpoints'}"
                          f"{_failed_note(run_dir)}; start the run again: tunesmith train {run_dir / 'config.yaml'}")
    return ckpts


def latest(run_dir: Path) -> Path:
    return complete(run_dir)[-1]


def _failed_note(run_dir: Path) -> str:
    """'' or '; the run is marked failed: REASON' from its summary.json."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return ""
    return f"; the run is marked failed: {summary.get('reason')}" if summary.get("status") == "failed" else ""


def read(path: Path) -> dict:
    """Every file of the checkpoint at ``path``, read and checked; FileError naming the first bad one."""
    state = read_json(path / "state.json")
    for key in ("step", "micro", "tokens"):
        if not isinstance(state.get(key), int):
            raise FileError(f"{path / 'state.json'}: field '{key}' is {state.get(key)!r}, expected an integer")
    return {
        "trainable": load_safetensors(path / "trainable.safetensors"),
        "optimizer": torch_load(path / "optimizer.pt", map_location="cpu", weights_only=False),
        "scheduler": torch_load(path / "scheduler.pt", weights_only=False),
        "rng": torch_load(path / "rng.pt", weights_only=False),
        "state": state,
        "strategies": load_safetensors(path / "strategies.safetensors")
        if (path / "strategies.safetensors").exists() else {},
    }


def read_latest(run_dir: Path, say) -> tuple[Path, dict]:
    """The newest checkpoint of ``run_dir`` whose files all read back; each unreadable newer one is
    reported (one line through ``say``) and skipped. ConfigError when none is readable."""
    ckpts = complete(run_dir)
    errors, skipped = [], []
    for path in reversed(ckpts):
        try:
            data = read(path)
        except FileError as e:
            errors.append(str(e))
            skipped.append(path.name)
            continue
        if errors:
            say(f"warning: checkpoint {', '.join(skipped)} unreadable ({errors[0]}); resuming from {path.name}, "
                "the newest readable checkpoint")
        return path, data
    raise ConfigError(f"--resume {run_dir}: no checkpoint can be read back ({'; '.join(errors)})")


def load(path: Path, *, method, model, optimizer, scheduler, data: dict | None = None) -> dict:
    """Restore everything saved at ``path`` (or already ``read`` into ``data``); returns the saved position
    (step, micro-batch count …)."""
    data = data or read(path)
    method.load_trainable_state(model, data["trainable"])
    optimizer.load_state_dict(data["optimizer"])
    scheduler.load_state_dict(data["scheduler"])
    set_rng_state(data["rng"])
    return data["state"]
