"""The one training loop: any method, any objective, through hooks and never by name."""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import collate, batch_indices


@dataclass
class LoopState:
    step: int = 0            # optimizer steps done
    micro: int = 0           # micro-batches consumed (data position)
    tokens: int = 0          # non-padding tokens seen
    train_time: float = 0.0  # seconds spent in training steps


@dataclass
class Batches:
    """Deterministic micro-batches over epochs: epoch e uses the order drawn from (seed, e)."""

    dataset: object
    batch_size: int
    seed: int
    pad_id: int
    device: torch.device
    shuffle: bool = True
    _cache: dict = field(default_factory=dict)

    def per_epoch(self) -> int:
        return len(batch_indices(len(self.dataset), self.batch_size, seed=self.seed, epoch=0, shuffle=False))

    def order(self, epoch: int) -> list[list[int]]:
        if epoch not in self._cache:
            self._cache = {epoch: batch_indices(len(self.dataset), self.batch_size, seed=self.seed,
                                                epoch=epoch, shuffle=self.shuffle)}
        return self._cache[epoch]

    def get(self, micro: int) -> dict[str, torch.Tensor]:
        n = self.per_epoch()
        idx = self.order(micro // n)[micro % n]
        return to_device(collate([self.dataset[i] for i in idx], self.pad_id), self.device)

    def iterate(self, limit: int | None = None):
        """Unshuffled pass (for evaluation), at most ``limit`` batches."""
        order = batch_indices(len(self.dataset), self.batch_size, seed=self.seed, epoch=0, shuffle=False)
        for idx in order[:limit]:
            yield to_device(collate([self.dataset[i] for i in idx], self.pad_id), self.device)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, objective, batches, precision: str, device: torch.device) -> dict:
    """Mean loss (and accuracy when the objective counts correct items) over ``batches``."""
    was_training = model.training
    model.eval()
    total, count, correct, counted = 0.0, 0, 0, False
    for batch in batches:
        with autocast(device, precision):
            loss, n, extra = objective.loss(model, batch)
        total += float(loss)
        count += n
        correct += extra.get("correct", 0)
        counted = counted or "correct" in extra
    model.train(was_training)
    if count == 0:
        return {}
    out = {"loss": total / count}
    if counted:
        out["accuracy"] = correct / count
    return out


class Loop:
    """Runs optimizer steps with gradient accumulation, clipping, hooks, eval and checkpoints."""

    def __init__(self, *, model, method, objective, optimizer, scheduler, batches: Batches, cfg, device,
                 precision: str, total_steps: int, on_eval, on_checkpoint, log):
        self.model, self.method, self.objective = model, method, objective
        self.optimizer, self.scheduler, self.batches = optimizer, scheduler, batches
        self.cfg, self.device, self.precision = cfg, device, precision
        self.total_steps = total_steps
        self.on_eval, self.on_checkpoint, self.log = on_eval, on_checkpoint, log
        self.params = [p for p in model.parameters() if p.requires_grad]

    def step(self, state: LoopState) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; returns its log record."""
        cfg, model = self.cfg, self.model
        micro_batches = [self.batches.get(state.micro + i) for i in range(cfg.grad_accum)]
        denom = max(1, sum(self.objective.count(b) for b in micro_batches))
        self.method.on_step_begin(model, state.step)
        total = 0.0
        for batch in micro_batches:
            with autocast(self.device, self.precision):
                loss_sum, _, _ = self.objective.loss(model, batch)
                loss = loss_sum / denom
                reg = self.method.regularization(model)
                if reg is not None:
                    loss = loss + reg / len(micro_batches)
            loss.backward()
            total += float(loss_sum.detach())
            state.tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
        grad_norm = None
        if cfg.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
        self.method.before_optimizer_step(model, state.step)
        self.optimizer.step()
        self.method.after_optimizer_step(model, state.step)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.micro += cfg.grad_accum
        return {"step": state.step, "split": "train", "loss": total / denom,
                "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm}

    def run(self, state: LoopState) -> LoopState:
        cfg = self.cfg
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=state.step, desc="train", unit="step",
                   disable=not cfg.progress, dynamic_ncols=True)
        ema = None
        while state.step < self.total_steps:
            t0 = time.perf_counter()
            tokens0 = state.tokens
            record = self.step(state)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t0
            state.train_time += dt
            record["tokens_per_s"] = (state.tokens - tokens0) / max(dt, 1e-9)
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(f"loss became {record['loss']} at step {state.step}; "
                                         "lower train.lr or check the data")
            ema = record["loss"] if ema is None else 0.9 * ema + 0.1 * record["loss"]
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            if state.step % cfg.log_every == 0 or state.step == self.total_steps:
                self.log(record)
            done = state.step == self.total_steps
            if done or (cfg.eval_every and state.step % cfg.eval_every == 0):
                self.on_eval(state)
            save_every = cfg.save_every or cfg.eval_every
            if done or (save_every and state.step % save_every == 0):
                self.on_checkpoint(state)
        bar.close()
        return state
