"""The fast decoding path: fixed KV buffers (a static cache of ``max_batch`` slots × ``max_len``
columns) and a decode step compiled once per batch bucket, with CUDA graphs on CUDA.

Every running row owns a slot (a row of the buffers). All rows write their next key/value at the
same column ``t`` (a device scalar, so the step's graph never changes); a row's own tokens sit in
columns [start, t) and a boolean ``valid`` (slots, W) says which columns each slot attends to, so
rows of any length decode together and a newcomer joins without moving anyone: its prompt is
prefilled on the plain path (a ``DynamicCache``) and its keys/values copied into its slot at
columns [t − L, t). When ``t`` reaches the end, the columns no row uses are cut from the front.

The step runs slots [0, bucket) (buckets are powers of two up to ``max_batch``, new rows take the
lowest free slot), so batch 1 computes one row however large the buffers are; and it attends over
columns [0, c) only, c the smallest power of two (at least ``MIN_COLUMNS``) past ``t``, so a short
generation in long buffers never reads their unused columns. The compiled step takes c as a dynamic
size (one compilation per batch bucket, the whole width included: a spare column past the last keeps
every step's columns a non-contiguous slice of the buffers; CUDA graphs recorded once per column
bucket). Projections that read one input (q/k/v, gate/up) run as one matmul each
(:mod:`.shared_input`). Attention for the one-token step goes through :func:`decode_attention`:
batched matmuls around an fp32 softmax, query heads grouped under their shared key/value head
without copying keys and values per query head, and from ``SPLIT_FROM`` columns on the value sum
split over the columns, so that a few rows with long caches still use the whole GPU.

Models with virtual-token hooks (prompt, prefix, P-tuning), sliding-window attention or attention
outside transformers' attention interface (BLOOM, Falcon), and proxy-tuning keep to the plain path
(:mod:`.runner`), the reference this path is tested against (:func:`fast_path_refusal` says why).
"""
from __future__ import annotations

import torch
from torch import nn

from ...models.compat import cache_kwargs
from .runner import ModelRunner, device_of, to_device, virtual_head
from .shared_input import refresh, share_inputs

ATTENTION = "tunesmith_decode"
MIN_COLUMNS = 256   # the smallest column bucket of a decode step
SPLIT_FROM = 4096   # column counts from which one-token attention is split over the columns
SPLIT_CHUNK = 512   # columns per partial sum of the split attention
SPARE = 1           # buffer columns past the last usable one (StaticRunner)


def decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-interface function. One-token queries with a 4-D mask go through
    :func:`split_decode_attention` over the step's column bucket (the mask's width), split into
    ``SPLIT_CHUNK``-column chunks from ``SPLIT_FROM`` columns on and in one piece below. Anything
    else: transformers' SDPA function."""
    b, hq, t, d = query.shape
    hkv = key.shape[1]
    if t != 1 or attention_mask is None or attention_mask.dim() != 4 or hq % hkv:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    w = attention_mask.shape[-1]
    chunk = SPLIT_CHUNK if w >= SPLIT_FROM and w % SPLIT_CHUNK == 0 else w
    return split_decode_attention(module, query, key, value, attention_mask, scaling=scaling, chunk=chunk)


def split_decode_attention(module, query, key, value, attention_mask, scaling=None, chunk=None, **kwargs):
    """One-token attention as batched matmuls, query heads grouped under their key/value head
    ((B, Hq, 1, D) -> (B, Hkv, G, D): keys and values are never repeated per query head, which
    transformers' SDPA path does whenever there is a mask).

    The scores q·Kᵀ (B, Hkv, G, W) are one batched matmul, parallel over the columns; their softmax
    is taken in fp32; and the value sum runs in chunks of ``chunk`` columns (default
    ``SPLIT_CHUNK``), one matmul per chunk in one batched call, whose partial sums are added in fp32
    (flash-decoding's split-K: a few rows with long caches still use the whole GPU, where a fused
    kernel walks a row's keys in one thread block per row and head). ``W`` (the mask's width) must
    be a multiple of the chunk; a chunk of W is one matmul."""
    b, hq, _, d = query.shape
    hkv, w = key.shape[1], attention_mask.shape[-1]
    chunk = chunk or SPLIT_CHUNK
    g, c = hq // hkv, w // chunk
    key, value = key[:, :, :w], value[:, :, :w]
    scale = d ** -0.5 if scaling is None else scaling
    q = query.reshape(b, hkv, g, d)
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scale + attention_mask.float()   # (B, Hkv, G, W)
    p = torch.softmax(scores, dim=-1).to(value.dtype)
    p = p.reshape(b, hkv, g, c, chunk).transpose(2, 3)                                          # (B, Hkv, C, G, K)
    parts = torch.matmul(p, value.reshape(b, hkv, c, chunk, d))                                 # (B, Hkv, C, G, D)
    out = parts.float().sum(2).to(query.dtype)                                                   # (B, Hkv, G, D)
    return out.reshape(b, hq, 1, d).transpose(1, 2), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    AttentionInterface.register(ATTENTION, decode_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


class SlotCache:
    """The KV cache object a model's layers write to during a step: ``update`` writes the new
    key/value of slots [0, n) at column ``write`` and returns those slots' whole buffers."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], write: torch.Tensor):
        self.keys, self.values, self.write = keys, values, write

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        n = key_states.shape[0]
        k, v = self.keys[layer_idx][:n], self.values[layer_idx][:n]
        k.index_copy_(2, self.write, key_states)
        v.index_copy_(2, self.write, value_states)
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise RuntimeError("SlotCache: pass position_ids; a slot's length is its own")


def _kv_shape(model: nn.Module) -> tuple[int, int, int]:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv, head_dim


class StaticRunner(ModelRunner):
    """A model's batch in fixed buffers, decoded by a (compiled) step; same interface as ModelRunner."""

    def __init__(self, model: nn.Module, pad_id: int = 0, table=None, *, max_batch: int = 32,
                 max_len: int = 2048, compile_mode: str | None = None):
        super().__init__(model, pad_id, table)
        _register_attention()
        share_inputs(model)   # q/k/v and gate/up as one matmul each (shared_input.py)
        layers, kv, hd = _kv_shape(model)
        dtype = model.get_input_embeddings().weight.dtype
        max_len = buffer_columns(max_len)
        dev, self.S, self.W = self.device, max_batch, max_len
        # SPARE columns past W, never written or attended: a step's columns [0, c) of the buffers are
        # never contiguous, so one compiled graph serves every column count up to W, c == W included
        self.k = [torch.zeros(self.S, kv, self.W + SPARE, hd, dtype=dtype, device=dev) for _ in range(layers)]
        self.v = [torch.zeros_like(x) for x in self.k]
        self.valid = torch.zeros(self.S, self.W + SPARE, dtype=torch.bool, device=dev)
        self.write = torch.zeros(1, dtype=torch.long, device=dev)
        self.ids = torch.full((self.S, 1), pad_id, dtype=torch.long, device=dev)
        self.posb = torch.zeros(self.S, 1, dtype=torch.long, device=dev)
        self.slotb = torch.full((self.S,), -1, dtype=torch.long, device=dev)
        self.t = 0
        self.phys: list[int] = []          # logical row -> slot
        self.start = [0] * self.S          # first column of each slot's tokens
        self.slot_cache = SlotCache(self.k, self.v, self.write)
        self.cache_kw = cache_kwargs(model, self.slot_cache)
        self.neg = torch.finfo(dtype).min
        self.configs = list({id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values())
        step = self._step
        self.compiled = compile_mode is not None
        self.marked = -1    # the adapter table version whose tensors are marked static
        if self.compiled:
            from torch import _dynamo
            _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)
            for t in (*self.k, *self.v, self.valid, self.write, self.ids, self.posb, self.slotb):
                _dynamo.mark_static_address(t)   # mutated or read in place by every replay of a CUDA graph
            step = torch.compile(step, mode=compile_mode, dynamic=None)   # dynamic: the column count only
        self.step_fn = step
        self.can_merge = True
        self.overlaps = True       # decode takes the last picks as a device tensor

    @property
    def rows(self) -> int:
        return len(self.phys)

    def _step(self, ids, pos, valid):
        """One decode step of slots [0, n): logits (n, V). The adapter rows are bound by the caller."""
        mask = torch.where(valid, 0.0, self.neg).to(self.k[0].dtype)[:, None, None, :]   # (n, 1, 1, W)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **self.cache_kw)
        return out.logits[:, -1].float()

    # -- rows ----------------------------------------------------------------------------
    def _shift(self, d: int) -> None:
        """Move every slot's columns by ``d`` (right if > 0, left if < 0)."""
        w = self.W - abs(d)
        src, dst = (slice(0, w), slice(d, d + w)) if d > 0 else (slice(-d, -d + w), slice(0, w))
        for buf in (*self.k, *self.v):
            buf[:, :, dst] = buf[:, :, src].clone()
        self.valid[:, dst] = self.valid[:, src].clone()
        if d > 0:
            self.valid[:, :d] = False
        else:
            self.valid[:, w:] = False
        self.t += d
        self.start = [max(0, s + d) for s in self.start]

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        from transformers import DynamicCache
        from ..generate import left_pad
        from ..proxy import positions
        refresh(self.model)   # a model moved or cast since: its decode groups laid out again
        ids, mask = left_pad(prompts, self.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        slot_t = torch.tensor(slots, dtype=torch.long, device=self.device)
        cache = DynamicCache(config=self.model.config)
        out, logits = self._forward(ids, mask, positions(mask), cache, slot_t, slots)
        n, L = mask.shape
        if L > self.t:
            self._shift(L - self.t)
        free = [s for s in range(self.S) if s not in set(self.phys)][:n]
        if len(free) < n:
            raise RuntimeError(f"StaticRunner: {n} new rows but only {len(free)} free slots")
        idx = torch.tensor(free, device=self.device)
        cols = slice(self.t - L, self.t)
        for layer, mine_k, mine_v in zip(cache.layers, self.k, self.v):
            mine_k[idx, :, cols] = layer.keys
            mine_v[idx, :, cols] = layer.values
        self.valid[idx] = False
        self.valid[idx, cols] = mask.bool()
        self.posb[idx, 0] = mask.sum(-1)
        self.slotb[idx] = slot_t
        for f, length in zip(free, mask.sum(-1).tolist()):
            self.start[f] = self.t - length
        self.phys += free
        self.slot_list += list(slots)
        return logits

    @torch.no_grad()
    def decode(self, last: list[int] | torch.Tensor) -> torch.Tensor:
        if self.t >= self.W:
            cut = min(self.start[p] for p in self.phys)
            if cut == 0:
                raise RuntimeError(f"StaticRunner: a row fills all {self.W} columns; admit at most max_len tokens")
            self._shift(-cut)
        if self.compiled and self.table is not None and self.marked != self.table.version:
            from torch import _dynamo
            for layer in self.table.layers():
                for t in (layer.B, layer.W, layer.col_slot, layer.col_scale):
                    _dynamo.mark_static_address(t)
            self.marked = self.table.version
        top = max(self.phys) + 1
        n = min(self.S, 1 << (top - 1).bit_length())
        idx = to_device(self.phys, self.device)
        self.ids[idx, 0] = last if torch.is_tensor(last) else to_device(last, self.device)
        self.valid[:n, self.t] = True
        self.write.fill_(self.t)
        for cfg in self.configs:
            cfg._attn_implementation, saved = ATTENTION, cfg._attn_implementation
        try:
            if self.compiled and self.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()   # the last step's outputs are consumed
            ids, pos, valid = self.ids[:n], self.posb[:n], self.valid[:n, : self.columns()]
            if self.compiled:
                from torch import _dynamo
                for x in (ids, pos, valid):
                    _dynamo.mark_static(x, 0)     # batch buckets compile apart, as they always have
                _dynamo.mark_dynamic(valid, 1)
            with self._bind(self.slotb[:n], self.slot_list):
                logits = self.step_fn(ids, pos, valid)
        finally:
            for cfg in self.configs:
                cfg._attn_implementation = saved
        self.t += 1
        self.posb.add_(1).clamp_(max=self.W - 1)
        return logits.index_select(0, idx)

    def columns(self) -> int:
        """The columns this step attends over, within the buffers: a power of two past the write column,
        and from ``SPLIT_FROM`` columns on the next multiple of ``SPLIT_FROM // 2`` (a step over a long
        cache reads at most half again the columns it uses, and less the longer the cache)."""
        if self.t >= SPLIT_FROM:
            step = SPLIT_FROM // 2
            return min(self.W, (self.t // step + 1) * step)
        return min(self.W, max(MIN_COLUMNS, 1 << self.t.bit_length()))

    def keep(self, idx: list[int]) -> None:
        gone = set(self.phys) - {self.phys[i] for i in idx}
        self.phys = [self.phys[i] for i in idx]
        self.slot_list = [self.slot_list[i] for i in idx]
        for s in gone:
            self.slotb[s] = -1
            self.posb[s] = 0
        if not self.phys:
            self.t = 0
            self.valid.zero_()


def make_runner(model: nn.Module, pad_id: int, table=None, *, fast: bool | str = "auto", max_batch: int = 32,
                max_len: int = 2048):
    """The runner for ``model``: the fast path on CUDA for models without virtual tokens ("auto"),
    or as asked (True: the fast path, compiled only on CUDA; False: the plain path)."""
    cuda = device_of(model).type == "cuda"
    why = fast_path_refusal(model)
    usable = why is None
    if fast is True and not usable:
        raise ValueError(f"the fast path does not take this model: {why}; use fast=False")
    if fast == "auto" and cuda and usable and not _fits(model, max_batch, max_len):
        usable = False
    if fast is True or (fast == "auto" and cuda and usable):
        return StaticRunner(model, pad_id, table, max_batch=max_batch, max_len=max_len,
                            compile_mode="reduce-overhead" if cuda else None)
    return ModelRunner(model, pad_id, table)


def fast_path_refusal(model: nn.Module) -> str | None:
    """Why ``model`` must decode on the plain path (None: the fast path takes it)."""
    if virtual_head(model) or getattr(model, "prompt_encoder", None) is not None:
        return "it adds virtual tokens through hooks"
    if not getattr(type(model), "_supports_attention_backend", False):
        return f"{type(model).__name__} does not route attention through transformers' attention interface"
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if "sliding_attention" in (getattr(cfg, "layer_types", None) or []) or (
            getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) is not False):
        return "it has sliding-window attention layers"
    return None


def buffer_columns(max_len: int) -> int:
    """The columns of the KV buffers for ``max_len`` tokens: from ``SPLIT_FROM`` on, whole chunks of
    the split attention in every column bucket."""
    return -(-max_len // SPLIT_CHUNK) * SPLIT_CHUNK if max_len >= SPLIT_FROM else max_len


def kv_buffer_bytes(model: nn.Module, max_batch: int, max_len: int) -> int:
    """Bytes of the fast path's KV buffers: keys and values of ``max_batch`` slots × the buffer columns
    for ``max_len`` tokens in every layer."""
    layers, kv, hd = _kv_shape(model)
    return 2 * layers * max_batch * kv * (buffer_columns(max_len) + SPARE) * hd * model.get_input_embeddings().weight.element_size()


def _fits(model: nn.Module, max_batch: int, max_len: int) -> bool:
    """Whether the static buffers take at most half the free GPU memory (else: the plain path, said once)."""
    import logging
    size = kv_buffer_bytes(model, max_batch, max_len)
    free, _ = torch.cuda.mem_get_info(device_of(model))
    if size <= free // 2:
        return True
    logging.getLogger(__name__).warning(
        "the fast path's KV buffers (%d slots x %d tokens: %.1f GiB) exceed half the free GPU memory (%.1f GiB); "
        "decoding on the plain path. Lower max_batch / max_len (--max-batch / --max-len) for the fast path.",
        max_batch, max_len, size / 2**30, free / 2**30)
    return False
