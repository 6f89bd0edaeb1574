"""Checkpoints of runs of more than one process, through ``torch.distributed.checkpoint`` (DCP).

``step-N/`` holds ``dcp/`` (the trainable weights and the optimizer states, each process writing its
own shards; under ddp the replicated tensors are written once), ``scheduler.pt`` and ``rng.pt``
(rank 0's; every process draws the same numbers) and ``state.json`` (the data position, the world
size and the global micro-batch). It is written to ``step-N.tmp`` and renamed by rank 0 once every
process has finished, as ``checkpoint.save`` does.

DCP re-shards on load, so a run resumes on the same or another number of processes, one included,
as long as the global micro-batch (``train.batch_size`` × processes) is the same: micro-batch k is
then the same examples. Under fsdp the weights are the model's own (FQN-keyed, sharded) state;
under ddp and in one process they are what ``method.trainable_state`` returns, loaded back by
``method.load_trainable_state``.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from ..errors import ConfigError, FileError
from ..files import DAMAGED, read_json, torch_load
from . import checkpoint, distributed

_OPTIONS = StateDictOptions(ignore_frozen_params=True)
_LOAD = StateDictOptions(ignore_frozen_params=True, strict=False)   # the frozen weights come from the model


def is_sharded(path: Path) -> bool:
    return (Path(path) / "dcp").is_dir()


def _weights(method, model, run_mode: str) -> dict:
    if run_mode == "fsdp":
        return get_model_state_dict(model, options=_OPTIONS)
    return {k: v.detach() for k, v in method.trainable_state(model).items()}


def save(ckpt_root: Path, step: int, *, method, model, optimizer, scheduler, position: dict, keep: int,
         run_mode: str, global_batch: int) -> Path:
    """Every process calls this (a collective)."""
    ctx = distributed.context()
    final, tmp = ckpt_root / f"step-{step}", ckpt_root / f"step-{step}.tmp"
    if ctx.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    state = {"weights": _weights(method, model, run_mode),
             "optimizer": get_optimizer_state_dict(model, optimizer, options=_OPTIONS)}
    dcp.save(state, checkpoint_id=str(tmp / "dcp"))
    if ctx.main:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(checkpoint.rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(
            {"step": step, **position, "world": ctx.world, "global_batch": global_batch, "weights": run_mode}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint.list_checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def load(path: Path, *, method, model, optimizer, scheduler, run_mode: str, global_batch: int) -> dict:
    """Restore the checkpoint at ``path`` into this run (every process calls it); returns its position."""
    pos = read_json(path / "state.json")
    if pos.get("global_batch") != global_batch:
        raise ConfigError(f"--resume: {path} was written with a global micro-batch of {pos.get('global_batch')} "
                          f"examples ({pos.get('world')} processes); this run has {global_batch} "
                          f"(train.batch_size × processes); set train.batch_size so that they match")
    saved_fsdp = pos.get("weights") == "fsdp"
    if (run_mode == "ddp" and saved_fsdp) or (run_mode == "fsdp" and not saved_fsdp):
        raise ConfigError(f"--resume: {path} holds {'sharded model' if saved_fsdp else 'method'} weights "
                          f"(written with train.parallel {pos.get('weights')}); resume with train.parallel: "
                          f"{pos.get('weights')}, or on one process")
    if saved_fsdp:
        weights = get_model_state_dict(model, options=_OPTIONS)
    else:
        weights = {k: v.detach().clone() for k, v in method.trainable_state(model).items()}
    state = {"weights": weights, "optimizer": get_optimizer_state_dict(model, optimizer, options=_OPTIONS)}
    with warnings.catch_warnings():   # one process reading a sharded checkpoint is what is meant
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.load(state, checkpoint_id=str(path / "dcp"), no_dist=not distributed.context().joined)
        except (Exception, CheckpointException) as e:   # a shard or the metadata missing or cut short
            first = _first_failure(e)                       # (DCP raises on every process alike)
            raise FileError(f"{path / 'dcp'}: cannot be read by torch.distributed.checkpoint ({first}); "
                            f"{DAMAGED}") from None
    if saved_fsdp:
        set_model_state_dict(model, state["weights"], options=_LOAD)
    else:
        method.load_trainable_state(model, state["weights"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=_OPTIONS)
    scheduler.load_state_dict(torch_load(path / "scheduler.pt", weights_only=False))
    checkpoint.set_rng_state(torch_load(path / "rng.pt", weights_only=False))
    return pos


def _first_failure(e: BaseException) -> str:
    """What went wrong, in one line: a CheckpointException's first process's own exception."""
    failures = getattr(e, "failures", None)
    if failures:
        e = next(iter(failures.values()))[0]
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def restore(run_dir: Path, *, method, model, optimizer, scheduler, run_mode: str, global_batch: int) -> dict | None:
    """The position restored from the newest checkpoint of ``run_dir`` when it is sharded or this run has
    several processes; None for a one-process run resuming a one-process checkpoint (``checkpoint.load``)."""
    ckpts = checkpoint.list_checkpoints(Path(run_dir) / "checkpoints")
    sharded = bool(ckpts) and is_sharded(ckpts[-1])
    if not sharded and not distributed.context().joined:
        return None
    if not sharded:
        where = ckpts[-1] if ckpts else Path(run_dir) / "checkpoints"
        raise ConfigError(f"--resume {run_dir}: {where} is not a sharded checkpoint (a one-process run writes "
                          "whole tensors); resume it with one process")
    errors, skipped = [], []
    for path in reversed([c for c in ckpts if is_sharded(c)]):   # the newest that reads back, as checkpoint.read_latest
        try:
            pos = load(path, method=method, model=model, optimizer=optimizer, scheduler=scheduler,
                       run_mode=run_mode, global_batch=global_batch)
        except FileError as e:
            errors.append(str(e))
            skipped.append(path.name)
            continue
        if errors and distributed.context().main:
            print(f"warning: checkpoint {', '.join(skipped)} unreadable ({errors[0]}); resuming from {path.name}, "
                  "the newest readable checkpoint", file=sys.stderr, flush=True)
        return pos
    raise ConfigError(f"--resume {run_dir}: no checkpoint can be read back ({'; '.join(errors)})")
