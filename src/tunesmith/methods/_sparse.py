"""Training a fixed sparse subset of a model's entries, with k-sized optimizer state.

Each selected base tensor W gets a parametrization (``torch.nn.utils.parametrize``) holding its
flat ``indices`` (a buffer) and a trainable ``values`` vector of the same length. The base tensor
itself stays frozen and is updated in place, only at ``indices``, after every optimizer step
(``after_optimizer_step``; CUDA's fused AdamW does not bump version counters) and whenever
``values`` changed otherwise (tracked by its version counter), so the forward pass sees

    W' = W with W'.flatten()[indices] = values

without a dense copy; the backward pass gathers the dense gradient of W at ``indices`` into
``values.grad`` (:class:`_Route`). AdamW therefore holds 2·k moments instead of 2·numel(W), weight
decay touches only selected entries, and entries outside the mask stay bit-identical to the base.
The task head of a classifier trains in full (it is new). Saves a sparse delta.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..models.targets import task_heads
from . import delta
from ._fisher import random_scores, release_freed, top_k
from .inject import freeze_all
from .registry import Method, attach


class _Route(torch.autograd.Function):
    """Identity on the base tensor; its gradient at ``indices`` flows to ``values``.

    When the base tensor itself requires grad (Fisher estimation) it receives the dense gradient.
    """

    @staticmethod
    def forward(ctx, values, base, indices):
        ctx.save_for_backward(indices)
        ctx.values_dtype = values.dtype
        return base.view_as(base)

    @staticmethod
    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        g_values = grad.reshape(-1).index_select(0, indices).to(ctx.values_dtype)
        return g_values, (grad if ctx.needs_input_grad[1] else None), None


class MaskedValues(nn.Module):
    """Parametrization: the base tensor with its entries at ``indices`` replaced by ``values``."""

    def __init__(self, base: torch.Tensor, indices: torch.Tensor):
        super().__init__()
        self.values = nn.Parameter(torch.empty(0, dtype=base.dtype, device=base.device))
        self.register_buffer("indices", torch.empty(0, dtype=torch.long, device=base.device))
        self.reset(base, indices)

    def reset(self, base: torch.Tensor, indices: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Select ``indices`` (values default to the base's entries); the Parameter object is kept."""
        idx = indices.to(base.device, delta.index_dtype(base.numel()))
        self.indices = idx
        with torch.no_grad():
            v = base.detach().reshape(-1)[idx.long()] if values is None else values
            self.values.data = v.to(self.values.device, self.values.dtype).clone()
        self._synced = -1

    @torch.no_grad()
    def write(self, base: torch.Tensor) -> None:
        """Copy ``values`` into the base tensor at ``indices``."""
        if self.indices.numel():
            base.view(-1)[self.indices] = self.values.to(base.dtype)
        self._synced = self.values._version

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        if self.values._version != self._synced:
            self.write(base)
        if not self.indices.numel():
            return base
        return _Route.apply(self.values, base, self.indices)


def _holders(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Every (module, attribute) through which each parameter is reached (tied weights: several)."""
    out: dict[int, list[tuple[nn.Module, str]]] = {}
    for m in model.modules():
        for attr, p in m._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append((m, attr))
    return out


def head_prefixes(model: nn.Module) -> tuple[str, ...]:
    return tuple(f"{h}." for h in task_heads(model))


def fisher_bytes(model: nn.Module, act, device: torch.device | None = None) -> float:
    """What estimating the diagonal Fisher holds beside the weights (``_fisher.empirical_fisher``): an
    fp32 accumulator of every candidate tensor, and one example's transients: a dense gradient of every
    candidate, its activations and, for a language model, its logits (their fp32 copies as the training
    step's loss keeps them). On the CPU the transients count twice: glibc raises its mmap threshold when
    the first example's large blocks are freed, so the second example's come from new heap while the
    first's stay resident. Selecting the top k afterwards (``_fisher.top_k``: the scores and one flat
    fp32 copy) stays below it."""
    from ..planning.estimate import LOGIT_COPIES
    heads = head_prefixes(model)
    cand = [p for n, p in model.named_parameters() if not n.startswith(heads) and p.is_floating_point()]
    transients = (sum(p.numel() * p.element_size() for p in cand) + act.keep(act.seq)
                  + act.seq * act.vocab * 4.0 * LOGIT_COPIES)
    on_cpu = device is None or torch.device(device).type == "cpu"
    return sum(p.numel() * 4.0 for p in cand) + transients * (2 if on_cpu else 1)


class SparseMaskMethod(Method):
    """Base of methods that train a fixed set of k entries chosen by a score (Fisher, random).

    Subclasses set ``budget_of(total)`` and ``scores(model, batches, objective, tensors)``;
    ``apply`` installs a uniformly random mask of the same size until ``prepare`` replaces it.
    """

    artifact = "delta"
    identity_at_init = True
    mergeable = True

    def budget_of(self, total: int) -> int:
        """Number of entries to train among ``total`` candidates."""
        raise NotImplementedError

    def scores(self, model: nn.Module, batches, objective, tensors: dict[str, torch.Tensor]):
        return random_scores(tensors)

    # -- building -------------------------------------------------------------------------
    def apply(self, model: nn.Module) -> nn.Module:
        freeze_all(model)
        heads = head_prefixes(model)
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith(heads))
        holders = _holders(model)
        self.slots: dict[str, tuple[MaskedValues, list[tuple[nn.Module, str]]]] = {}
        for n, p in list(model.named_parameters()):
            if n.startswith(heads) or not p.is_floating_point():
                continue
            mv = MaskedValues(p, torch.empty(0, dtype=torch.long))
            for module, attr in holders[id(p)]:
                parametrize.register_parametrization(module, attr, mv, unsafe=True)
            self.slots[n] = (mv, holders[id(p)])
        self.set_masks(top_k(random_scores(self.base_tensors()), self.budget_of(self.candidate_count())))
        return model

    def trainable_count(self, model: nn.Module) -> int:
        """Closed form: the budget over the candidate entries (every floating-point weight outside the
        task head), plus the head, which trains in full."""
        heads = head_prefixes(model)
        cand = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(heads) and p.is_floating_point())
        return self.budget_of(cand) + sum(p.numel() for n, p in model.named_parameters() if n.startswith(heads))

    def memory_extras(self, model: nn.Module, act) -> dict[str, float]:
        """The mask's indices, and the dense gradient of a base tensor that backward makes before
        :class:`_Route` gathers it (the largest one's: the output embedding's, at the loss's peak; twice
        on the CPU, where glibc does not reuse the first step's freed block for the second's)."""
        heads = head_prefixes(model)
        cand = [p for n, p in model.named_parameters() if not n.startswith(heads) and p.is_floating_point()]
        dense = max((p.numel() * p.element_size() for p in cand), default=0)
        on_cpu = self.device is None or self.device.type == "cpu"
        return {"mask indices": 4.0 * self.budget_of(sum(p.numel() for p in cand)),
                "dense gradient in backward": float(dense * (2 if on_cpu else 1))}

    def base_tensors(self) -> dict[str, torch.Tensor]:
        """The frozen base tensor behind each parametrized parameter, by its original name."""
        return {n: _original(holders[0]) for n, (_, holders) in self.slots.items()}

    def candidate_count(self) -> int:
        return sum(t.numel() for t in self.base_tensors().values())

    def set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        for n, t in self.base_tensors().items():
            self.slots[n][0].reset(t, masks.get(n, torch.empty(0, dtype=torch.long)))

    def prepare(self, model: nn.Module, batches, objective) -> None:
        tensors = self.base_tensors()
        self.set_masks(top_k(self.scores(model, batches, objective, tensors), self.budget_of(self.candidate_count())))
        if any(t.device.type == "cpu" for t in tensors.values()):
            release_freed()

    def masks(self) -> dict[str, torch.Tensor]:
        """Flat int64 positions of the trained entries, by parameter name (empty ones left out)."""
        return {n: mv.indices.long() for n, (mv, _) in self.slots.items() if mv.indices.numel()}

    # -- training -------------------------------------------------------------------------
    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        base = self.base_tensors()
        decay = [mv.values for n, (mv, _) in self.slots.items() if base[n].ndim >= 2]
        no_decay = [mv.values for n, (mv, _) in self.slots.items() if base[n].ndim < 2]
        for n, p in model.named_parameters():
            if p.requires_grad and ".parametrizations." not in n:
                (decay if p.ndim >= 2 else no_decay).append(p)
        return [{"params": decay, "lr": lr, "weight_decay": weight_decay},
                {"params": no_decay, "lr": lr, "weight_decay": 0.0}]

    def param_counts(self, model: nn.Module) -> tuple[int, int]:
        values = {id(mv.values) for mv, _ in self.slots.values()}
        seen, trainable, total = set(), 0, 0
        for p in model.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            trainable += p.numel() if p.requires_grad else 0
            total += 0 if id(p) in values else p.numel()
        return trainable, total

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        for n, t in self.base_tensors().items():
            self.slots[n][0].write(t)

    # -- state ----------------------------------------------------------------------------
    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = {n: p.detach() for n, p in model.named_parameters()
                 if p.requires_grad and ".parametrizations." not in n}
        for n, (mv, _) in self.slots.items():
            state[f"{n}@indices"] = mv.indices
            state[f"{n}@values"] = mv.values.detach()
        return state

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        base = self.base_tensors()
        plain = {k: v for k, v in state.items() if "@" not in k}
        for n, t in base.items():
            if f"{n}@indices" in state:
                self.slots[n][0].reset(t, state[f"{n}@indices"], state[f"{n}@values"])
        super().load_trainable_state(model, plain)

    def save(self, model: nn.Module, out_dir: Path, base_name: str) -> Path:
        entries: dict[str, delta.Entry] = {}
        heads = head_prefixes(model)
        for n, p in model.named_parameters():
            if n.startswith(heads):
                entries[n] = p.detach()
        for n, t in self.base_tensors().items():
            mv = self.slots[n][0]
            mv.write(t)
            if mv.indices.numel():
                entries[n] = delta.pack(t.detach(), mv.indices)
        return delta.write_delta(out_dir / "delta", entries, base=base_name, method=self.cfg.model_dump(mode="json"))

    @classmethod
    def load_artifact(cls, model: nn.Module, path: Path) -> nn.Module:
        return load_delta_method(cls, model, path)

    def merge(self, model: nn.Module) -> nn.Module:
        """Write the values into the base tensors and remove the parametrizations."""
        for n, (mv, holders) in getattr(self, "slots", {}).items():
            mv.write(_original(holders[0]))
            for module, attr in holders:
                parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
        self.slots = {}
        return model


def _original(holder: tuple[nn.Module, str]) -> torch.Tensor:
    module, attr = holder
    return module.parametrizations[attr].original


def load_delta_method(cls: type[Method], model: nn.Module, path: Path) -> nn.Module:
    """Apply a delta written by method ``cls`` onto a base model; the result is a plain model."""
    cfg = delta.read_config(path)
    method = cls(cls.Config.model_validate(cfg["method"]))
    delta.apply_delta(model, path)
    attach(model, method)
    return model
