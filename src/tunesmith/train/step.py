"""Training steps the loop's driver (train/loop.py) runs: one optimizer step each, returning its log record.

A step is a callable ``(loop, state) -> record``; it reads the model, method, objective, optimizer,
scheduler and config from the loop and advances ``state`` (steps done, data position, tokens).
:class:`OfflineStep` is the step over static micro-batches (supervised and preference objectives); an
objective may bring its own (``Objective.train_step``: the online RL step of train/rl/online.py,
rollout → rewards → advantages → updates). Both end in :func:`optimizer_step`. A step with state of its
own beyond the loop's (a KL controller) gives it through ``state_dict`` / ``load_state_dict``, and the
checkpoints carry it.
"""
from __future__ import annotations

import torch

from ..data.packing import real_tokens
from .loop import LoopState, autocast, metric_means


def optimizer_step(loop, state: LoopState) -> float | None:
    """Clip, the method's hooks around ``optimizer.step``, the scheduler, zero the gradients; the gradient
    norm before clipping (None without ``train.max_grad_norm``)."""
    cfg, model = loop.cfg, loop.model
    loop.parallel.sync_grads(loop.params)
    grad_norm = None
    if cfg.max_grad_norm is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(loop.params, cfg.max_grad_norm)
    loop.method.before_optimizer_step(model, state.step)
    loop.optimizer.step()
    loop.method.after_optimizer_step(model, state.step)
    loop.scheduler.step()
    loop.optimizer.zero_grad(set_to_none=True)
    return None if grad_norm is None else float(grad_norm)


class OfflineStep:
    """One optimizer step over ``grad_accum`` micro-batches of ``loop.batches``::

        denom = Σ objective.count(micro-batch)     # tokens or examples of the whole step, known up front
        for each micro-batch: (objective.loss / denom + method.regularization / micro-batches).backward()
        optimizer_step   (loop.parallel: the collectives of a run of several processes, train/distributed.py)
    """

    def bind(self, model, optimizer, scheduler) -> None:
        """Once the optimizer exists (before a resume restores it): a step may add parameters of its own."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __call__(self, loop, state: LoopState) -> dict:
        cfg, model = loop.cfg, loop.model
        micro_batches = [loop.batches.get(state.micro + i) for i in range(cfg.grad_accum)]
        denom = max(1, loop.parallel.total(sum(loop.objective.count(b) for b in micro_batches)))  # all processes
        loop.method.on_step_begin(model, state.step)
        total, sums = [], {}  # loss sums as tensors: read once the optimizer step is queued (no wait before it)
        for i, batch in enumerate(micro_batches):
            with autocast(loop.device, loop.precision):
                loss_sum, _, extra = loop.objective.loss(model, batch)
                loss = loss_sum / denom
                reg = loop.method.regularization(model)
                if reg is not None:
                    loss = loss + reg / len(micro_batches)
            loop.parallel.before_backward(model, last=i == len(micro_batches) - 1)  # sync on the last only
            loss.backward()
            for k, v in extra.items():
                if k != "records":
                    sums[k] = sums[k] + v if k in sums else v
            total.append(loss_sum.detach())
            state.tokens += real_tokens(batch)
        grad_norm = optimizer_step(loop, state)
        state.step += 1
        state.micro += cfg.grad_accum
        total, sums = loop.parallel.reduce(total, sums)
        return {"step": state.step, "split": "train", "loss": sum(float(t) for t in total) / denom,
                "lr": loop.scheduler.get_last_lr()[0], "grad_norm": grad_norm, **metric_means(sums, denom)}
