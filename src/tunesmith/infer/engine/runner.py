"""The plain decoding path: any causal LM tunesmith loads, a transformers ``DynamicCache``, rows
that join and leave between steps. It is the reference the fast path (:mod:`.fast`) is tested against.

Layout of the batch: row ``b`` holds its tokens left-padded in the cache columns after the model's
``head`` (the virtual tokens of prompt / prefix methods, the same for every row and covered by
their hooks, see :mod:`tunesmith.methods._virtual`); ``mask`` (B, W) marks real columns, ``pos``
(B,) is the position of each row's next token. New rows are prefilled on their own (left-padded
among themselves) and then merged: the shorter side is padded with masked columns on the left,
after the head, and the caches are concatenated along the batch. Finished rows are dropped with
an index over the batch, and columns no row uses any more are cut off.

A row's positions count its own tokens only, so its keys and values are exactly those it would
have alone; padding changes only which columns are masked.
"""
from __future__ import annotations

import contextlib
import inspect

import torch
from torch import nn

from ...data.collate import ahead
from ...models.compat import cache_kwargs, output_cache
from ..generate import left_pad
from ..proxy import positions


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def to_device(values: list, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A host list as a tensor on ``device``, copied without waiting for a decode step in flight
    (``data.collate.ahead``)."""
    return ahead(torch.tensor(values, dtype=dtype), device)


def virtual_head(model: nn.Module) -> int:
    """Cache columns the model's virtual tokens take in front of every row (0 without)."""
    enc = getattr(model, "prompt_encoder", None)
    return 0 if enc is None or getattr(enc, "disabled", False) else int(enc.num_virtual_tokens)


def _takes(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):
        return False


def _pad_columns(t: torch.Tensor, head: int, p: int) -> torch.Tensor:
    """``p`` zero columns inserted after the first ``head`` of t (B, H, L, D)."""
    if p == 0:
        return t
    z = t.new_zeros(t.shape[0], t.shape[1], p, t.shape[3])
    return torch.cat([t[:, :, :head], z, t[:, :, head:]], dim=2)


def _plain_layers(cache) -> bool:
    from transformers.cache_utils import DynamicLayer
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(lay) is DynamicLayer and lay.is_initialized for lay in layers)


class ModelRunner:
    """One model's batch on the plain path: ``prefill`` new rows, ``decode`` one step, ``keep`` rows.

    ``table``: the :class:`~.adapters.AdapterTable` of per-row LoRA adapters installed on this model
    (None: the model has none); each forward binds the rows' adapter slots to it.
    """

    overlaps = False   # whether the engine may queue a step before reading the last one's picks

    def __init__(self, model: nn.Module, pad_id: int = 0, table=None):
        self.model = model.eval()
        self.device = device_of(model)
        self.pad_id = pad_id
        self.table = table
        self.cache = None
        self.mask = self.pos = self.slots = None
        self.slot_list: list[int] = []   # the rows' adapter slots on the host
        self.can_merge = True   # False once a cache has layers that cannot be re-laid out (sliding windows)
        self.extra = {"logits_to_keep": 1} if _takes(model, "logits_to_keep") else {}

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def _bind(self, slots: torch.Tensor, host: list[int]):
        if self.table is None:
            return contextlib.nullcontext()
        return self.table.bind(slots, any(s >= 0 for s in host))

    def _forward(self, ids, mask, pos, cache, slots, host) -> torch.Tensor:
        with torch.no_grad(), self._bind(slots, host):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                             **cache_kwargs(self.model, cache), **self.extra)
        return out, out.logits[:, -1].float()

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        """Add rows for ``prompts`` (their adapter ``slots``, -1 = none); logits (n, V) of their last tokens."""
        from transformers import DynamicCache
        ids, mask = left_pad(prompts, self.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        slot_t = torch.tensor(slots, dtype=torch.long, device=self.device)
        cache = DynamicCache(config=self.model.config)
        out, logits = self._forward(ids, mask, positions(mask), cache, slot_t, slots)
        cache = output_cache(out) or cache
        self._merge(cache, mask, mask.sum(-1), slot_t)
        self.slot_list += list(slots)
        return logits

    @torch.no_grad()
    def decode(self, last: list[int]) -> torch.Tensor:
        """One step: each row's last token in, logits (B, V) of the next one out."""
        ids = torch.tensor(last, dtype=torch.long, device=self.device)[:, None]
        mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        out, logits = self._forward(ids, mask, self.pos[:, None], self.cache, self.slots, self.slot_list)
        self.cache = output_cache(out) or self.cache
        self.mask, self.pos = mask, self.pos + 1
        return logits

    def keep(self, idx: list[int]) -> None:
        """Keep only rows ``idx`` (in that order)."""
        if len(idx) == self.rows:
            return
        self.slot_list = [self.slot_list[i] for i in idx]
        if not idx:
            self.cache = self.mask = self.pos = self.slots = None
            return
        index = torch.tensor(idx, dtype=torch.long, device=self.device)
        self.mask, self.pos, self.slots = self.mask[index], self.pos[index], self.slots[index]
        if not self.can_merge:   # sliding-window layers and the like: transformers' own row selection, no cut
            self.cache.batch_select_indices(index)
            return
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index], layer.values[index]
        used = self.mask.any(0).nonzero()
        cut = int(used[0]) if len(used) else 0
        if cut:
            head = virtual_head(self.model)
            for layer in self.cache.layers:
                layer.keys = torch.cat([layer.keys[:, :, :head], layer.keys[:, :, head + cut:]], dim=2)
                layer.values = torch.cat([layer.values[:, :, :head], layer.values[:, :, head + cut:]], dim=2)
            self.mask = self.mask[:, cut:]

    def _merge(self, cache, mask, pos, slots) -> None:
        if self.cache is None:
            self.cache, self.mask, self.pos, self.slots = cache, mask, pos, slots
            self.can_merge = _plain_layers(cache)
            return
        if not (self.can_merge and _plain_layers(cache)):
            raise RuntimeError("this model's KV cache cannot take rows mid-flight; admit rows only when empty")
        head = virtual_head(self.model)
        width = max(self.mask.shape[1], mask.shape[1])
        pa, pb = width - self.mask.shape[1], width - mask.shape[1]
        for mine, new in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_columns(mine.keys, head, pa), _pad_columns(new.keys, head, pb)], dim=0)
            mine.values = torch.cat([_pad_columns(mine.values, head, pa), _pad_columns(new.values, head, pb)], dim=0)
        pad = lambda m, p: torch.cat([m.new_zeros(m.shape[0], p), m], dim=1)  # noqa: E731
        self.mask = torch.cat([pad(self.mask, pa), pad(mask, pb)], dim=0)
        self.pos = torch.cat([self.pos, pos])
        self.slots = torch.cat([self.slots, slots])


class ProxyRunner:
    """Proxy-tuning's three models decoding the same rows (:class:`tunesmith.infer.ProxyTuned`):
    logits = base + alpha · (expert − anti-expert), each model with its own cache."""

    def __init__(self, proxy, pad_id: int = 0, table=None):
        self.proxy = proxy
        base, expert, anti = proxy.models
        self.runners = [ModelRunner(base, pad_id, table), ModelRunner(expert, pad_id), ModelRunner(anti, pad_id)]
        self.device = self.runners[0].device
        self.model = base

    @property
    def rows(self) -> int:
        return self.runners[0].rows

    @property
    def can_merge(self) -> bool:
        return all(r.can_merge for r in self.runners)

    def _combine(self, logits: list[torch.Tensor]) -> torch.Tensor:
        return self.proxy.combine(*(x.to(self.device) for x in logits))

    def prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        return self._combine([r.prefill(prompts, slots) for r in self.runners])

    def decode(self, last: list[int]) -> torch.Tensor:
        return self._combine([r.decode(last) for r in self.runners])

    def keep(self, idx: list[int]) -> None:
        for r in self.runners:
            r.keep(idx)
