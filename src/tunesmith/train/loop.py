"""The one training loop: any method, any objective, through hooks and never by name."""
from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import batch_indices, collate
from ..data.collate import to_device
from ..data.packing import collate_packed, example_tokens, pack_groups
from ..errors import TrainingDiverged
from .divergence import Divergence


@dataclass
class LoopState:
    step: int = 0            # optimizer steps done
    micro: int = 0           # micro-batches consumed (data position)
    tokens: int = 0          # non-padding tokens seen
    train_time: float = 0.0  # seconds spent in training steps


@dataclass
class Batches:
    """Deterministic micro-batches over epochs: epoch e uses the order drawn from (seed, e).

    With ``packed_tokens`` set (padding-free training) a micro-batch is one row of whole examples
    laid end to end, up to that many tokens (``data.packing``); otherwise ``batch_size`` examples
    padded to the longest. Packed epochs can differ in their number of rows, so micro-batch ``k``
    is located by walking the epochs' row counts.
    """

    dataset: object
    batch_size: int
    seed: int
    pad_id: int
    device: torch.device
    shuffle: bool = True
    packed_tokens: int | None = None
    raw: bool = False   # the examples as they are ({"examples": [...]}), for online objectives' prompts
    _cache: dict = field(default_factory=dict)   # the two most recent epochs' orders
    _counts: list = field(default_factory=list)  # packed: rows in epochs 0, 1, ...
    _lengths: list | None = None

    def _groups(self, epoch: int, shuffle: bool) -> list[list[int]]:
        if self.packed_tokens:
            if self._lengths is None:
                self._lengths = [example_tokens(self.dataset[i]) for i in range(len(self.dataset))]
            return pack_groups(self._lengths, self.packed_tokens, seed=self.seed, epoch=epoch, shuffle=shuffle)
        return batch_indices(len(self.dataset), self.batch_size, seed=self.seed, epoch=epoch, shuffle=shuffle)

    def _collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        examples = [self.dataset[i] for i in idx]
        if self.raw:
            return {"examples": examples}
        batch = collate_packed(examples) if self.packed_tokens else collate(examples, self.pad_id)
        return to_device(batch, self.device)

    def per_epoch(self) -> int:
        """Micro-batches in one epoch (packed: in the first; later ones may differ by a row or so)."""
        if not self.packed_tokens:
            return math.ceil(len(self.dataset) / self.batch_size)
        return len(self.order(0))

    def order(self, epoch: int) -> list[list[int]]:
        if epoch not in self._cache:
            if len(self._cache) >= 2:
                del self._cache[next(iter(self._cache))]
            self._cache[epoch] = self._groups(epoch, self.shuffle)
        return self._cache[epoch]

    def locate(self, micro: int) -> tuple[int, int]:
        """(epoch, index within the epoch) of micro-batch ``micro``."""
        if not self.packed_tokens:
            n = self.per_epoch()
            return micro // n, micro % n
        epoch = 0
        while True:
            if epoch == len(self._counts):
                self._counts.append(len(self.order(epoch)))
            if micro < self._counts[epoch]:
                return epoch, micro
            micro -= self._counts[epoch]
            epoch += 1

    def get(self, micro: int) -> dict[str, torch.Tensor]:
        epoch, i = self.locate(micro)
        return self._collate(self.order(epoch)[i])

    def iterate(self, limit: int | None = None):
        """Unshuffled pass (for evaluation), at most ``limit`` batches."""
        for idx in self._groups(0, shuffle=False)[:limit]:
            yield self._collate(idx)


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, objective, batches, precision: str, device: torch.device,
             records: list | None = None) -> dict:
    """Mean loss and the means of the objective's extra sums over ``batches`` (``correct`` as ``accuracy``);
    the objective's per-item ``"records"`` extras are appended to ``records`` when it is given."""
    was_training = model.training
    model.eval()
    total, count, sums = 0.0, 0, {}
    for batch in batches:
        with autocast(device, precision):
            loss, n, extra = objective.loss(model, batch)
        total += float(loss)
        count += n
        if records is not None:
            records.extend(extra.get("records", ()))
        for k, v in extra.items():
            if k != "records":
                sums[k] = sums.get(k, 0.0) + float(v)
    model.train(was_training)
    if count == 0:
        return {}
    return {"loss": total / count, **metric_means(sums, count)}


def metric_means(sums: dict, count: int) -> dict:
    """An objective's extra sums as means over its items (``correct`` becomes ``accuracy``)."""
    return {("accuracy" if k == "correct" else k): float(v) / max(count, 1) for k, v in sums.items()}


@contextlib.contextmanager
def nonfinite_outputs(step: int, bar):
    """A FloatingPointError inside (the model's outputs went NaN or infinite: a rollout could not be
    sampled) is the run diverging at ``step`` (the progress bar closed first, as for any divergence)."""
    try:
        yield
    except FloatingPointError as e:
        bar.close()
        raise TrainingDiverged(f"{e} at step {step}", step) from None


class Loop:
    """The driver: runs ``train_step`` (train/step.py: the offline step over static micro-batches, or an
    objective's online step) until ``total_steps``, with the progress bar, logging, eval and checkpoint
    cadence, time and token accounting.

    Each step's loss and gradient norm go through ``divergence`` (train/divergence.py): when it says the
    run went bad the loop raises TrainingDiverged; while it is suspicious no checkpoint is saved.
    The progress bar shows the step's loss and the mean of the last 10 steps.
    """

    def __init__(self, *, model, method, objective, optimizer, scheduler, batches: Batches, cfg, device,
                 precision: str, total_steps: int, on_eval, on_checkpoint, log, divergence: Divergence | None = None,
                 train_step=None, strategies=(), parallel=None):
        self.model, self.method, self.objective = model, method, objective
        self.optimizer, self.scheduler, self.batches = optimizer, scheduler, batches
        self.cfg, self.device, self.precision = cfg, device, precision
        self.total_steps = total_steps
        self.on_eval, self.on_checkpoint, self.log = on_eval, on_checkpoint, log
        self.divergence = divergence or Divergence(uniform=None, patience=cfg.divergence_steps or 1 << 30)
        self.strategies = list(strategies)  # train/strategies: extra loss terms (EWC, L2, DANN)
        self.params = [p for p in model.parameters() if p.requires_grad] + [p for s in self.strategies
                                                                             for p in s.parameters()]
        self.first_step_peak_gib: float | None = None  # CUDA: the peak of this process's first step
        if parallel is None:
            from .distributed import Single
            parallel = Single()
        self.parallel = parallel  # train/distributed.py: the collectives of a run of several processes
        if train_step is None:
            from .step import OfflineStep
            train_step = OfflineStep()
        self.train_step = train_step   # (loop, state) -> the step's log record (train/step.py)

    def step(self, state: LoopState) -> dict:
        """One optimizer step (the pluggable ``train_step``: train/step.py); returns its log record."""
        return self.train_step(self, state)

    def run(self, state: LoopState) -> LoopState:
        cfg = self.cfg
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=state.step, desc="train", unit="step",
                   disable=not cfg.progress, dynamic_ncols=True)
        recent: deque[float] = deque(maxlen=10)
        while state.step < self.total_steps:
            t0 = time.perf_counter()
            tokens0 = state.tokens
            with nonfinite_outputs(state.step + 1, bar):
                record = self.step(state)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t0
            state.train_time += dt
            if self.first_step_peak_gib is None and self.device.type == "cuda":
                self.first_step_peak_gib = torch.cuda.max_memory_allocated(self.device) / 2**30
            record["tokens_per_s"] = (state.tokens - tokens0) / max(dt, 1e-9)
            done = state.step == self.total_steps
            reason = self.divergence.observe(state.step, record["loss"], record["grad_norm"], final=done)
            if state.step % cfg.log_every == 0 or done or reason:
                self.log(record)
            if reason is not None:
                bar.close()
                raise TrainingDiverged(reason, self.divergence.first_bad)
            recent.append(record["loss"])
            bar.set_postfix(loss=f"{record['loss']:.4f}", avg10=f"{sum(recent) / len(recent):.4f}",
                            tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)   # shown with this step's count
            bar.update(1)
            if done or (cfg.eval_every and state.step % cfg.eval_every == 0):
                with nonfinite_outputs(state.step, bar):
                    self.on_eval(state)
            save_every = cfg.save_every or cfg.eval_every
            if done or (save_every and state.step % save_every == 0 and not self.divergence.suspect):
                self.on_checkpoint(state)
        bar.close()
        return state
