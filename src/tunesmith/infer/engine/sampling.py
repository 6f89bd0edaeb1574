"""Sampling parameters and the next-token choice for a batch whose rows each have their own.

Rows are grouped by their processing parameters and each group goes through transformers' own
logits processors, in the order ``generate`` applies them: repetition penalty, then temperature,
top-k, top-p and min-p. ``temperature == 0`` is greedy (argmax after the repetition penalty). A row
with a ``seed`` draws by an exponential race (the argmax of p / E, E ~ Exp(1), is a draw from p) whose
noise is a counter-based hash of (seed, position, token id): its tokens do not depend on the other
requests it shares a batch with, and a whole batch of seeded rows is drawn in a few elementwise
kernels with no per-row loop and no host round trip.

Log-probabilities are those of the model's raw distribution (log-softmax of the logits before any
processor, as vLLM reports by default), or of the processed one with ``processed_logprobs``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, fields

import torch

from ...errors import ConfigError
from .runner import to_device


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. Every field is validated on construction."""

    max_tokens: int = 128               #: new tokens at most (the stop token included)
    temperature: float = 0.0            #: 0 = greedy; otherwise logits / temperature
    top_p: float = 1.0                  #: nucleus sampling: the smallest set of tokens with this mass
    top_k: int = 0                      #: keep the k most likely tokens (0 = all)
    min_p: float = 0.0                  #: drop tokens below min_p × the top token's probability
    repetition_penalty: float = 1.0     #: CTRL's penalty on tokens already in the prompt or output
    seed: int | None = None             #: a per-request noise stream (reproducible in any batch)
    stop: tuple[str, ...] = ()          #: strings that end the completion (not included in the text)
    stop_token_ids: tuple[int, ...] = ()  #: extra token ids that end it (besides EOS / end of turn)
    ignore_eos: bool = False            #: keep going past EOS and end-of-turn tokens
    logprobs: bool = False              #: return the log-probability of every sampled token
    top_logprobs: int = 0               #: and of the k most likely alternatives
    processed_logprobs: bool = False    #: log-probs after the processors instead of the raw model's

    def __post_init__(self):
        _check(self.max_tokens >= 1, "max_tokens", self.max_tokens, "an integer >= 1")
        _check(math.isfinite(self.temperature) and self.temperature >= 0, "temperature", self.temperature,
               "a number >= 0 (0 = greedy)")
        _check(0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")
        _check(self.top_k >= 0, "top_k", self.top_k, "an integer >= 0 (0 = off)")
        _check(0 <= self.min_p <= 1, "min_p", self.min_p, "a number in [0, 1]")
        _check(math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
               self.repetition_penalty, "a number > 0 (1 = off)")
        _check(0 <= self.top_logprobs <= 20, "top_logprobs", self.top_logprobs, "an integer in [0, 20]")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def group_key(self) -> tuple:
        """Rows with the same key go through the same processors."""
        if self.greedy:
            return (True, self.repetition_penalty)
        return (False, self.repetition_penalty, self.temperature, self.top_k, self.top_p, self.min_p)

    def replace(self, **changes) -> "SamplingParams":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return SamplingParams(**values)


def _check(ok: bool, name: str, value, valid: str) -> None:
    if not ok:
        raise ConfigError(f"sampling: {name}={value!r} is not valid; expected {valid}")


def processors(params: SamplingParams):
    """transformers' LogitsProcessorList for ``params`` (empty for plain greedy)."""
    from transformers.generation import logits_process as lp
    out = lp.LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        out.append(lp.RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.greedy:
        return out
    if params.temperature != 1.0:
        out.append(lp.TemperatureLogitsWarper(params.temperature))
    if params.top_k > 0:
        out.append(lp.TopKLogitsWarper(top_k=params.top_k))
    if params.top_p < 1.0:
        out.append(lp.TopPLogitsWarper(top_p=params.top_p))
    if params.min_p > 0.0:
        out.append(lp.MinPLogitsWarper(min_p=params.min_p))
    return out


@dataclass
class Choice:
    """What the sampler picked for each row of a step (host lists, one entry per row)."""

    ids: list[int]
    logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None] = field(default_factory=list)


def history(rows, device) -> torch.Tensor:
    """(n, T) prompt + output ids of ``rows``, right-padded with each row's first id (no extra penalty)."""
    seqs = [r.prompt_ids + r.out_ids for r in rows]
    width = max(len(s) for s in seqs)
    out = torch.empty((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        out[i, len(s):] = s[0]
    return out.to(device)


def choose(logits: torch.Tensor, rows) -> Choice:
    """Next token of every row; ``logits`` (B, V) float, ``rows`` objects with ``params``,
    ``prompt_ids`` and ``out_ids``. A row whose probabilities are NaN raises ``RuntimeError``."""
    return sample(logits, rows).result()


def sample(logits: torch.Tensor, rows, ahead: int = 0) -> "Pending":
    """:func:`choose`'s picks, left on the device: the host reads them with ``result()``, and the next
    decode step can take ``next_ids`` before it does. ``ahead``: tokens each row has been given on
    the device but not yet on the host (its position in the seeded race is len(out_ids) + ahead)."""
    params = [r.params for r in rows]
    want_lp = any(p.logprobs or p.top_logprobs for p in params)
    if all(p.greedy and p.repetition_penalty == 1.0 for p in params) and not any(p.processed_logprobs for p in params):
        ids = logits.argmax(-1)
        return Pending(ids, logits if want_lp else None, None, params)
    ids = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    processed = torch.empty_like(logits) if any(p.processed_logprobs for p in params) else None
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(p.group_key(), []).append(i)
    for idx in groups.values():
        sub_rows = [rows[i] for i in idx]
        procs = processors(params[idx[0]])
        index = to_device(idx, logits.device)
        sub = logits.index_select(0, index)
        if procs:   # only the repetition penalty reads the ids; the warpers get a placeholder
            seen = history(sub_rows, logits.device) if params[idx[0]].repetition_penalty != 1.0 else _NO_IDS
            sub = procs(seen, sub)
        if processed is not None:
            processed[index] = sub
        ids[index] = sub.argmax(-1) if params[idx[0]].greedy else _draw(sub, sub_rows, ahead)
    return Pending(ids, logits if want_lp else None, processed, params)


_NO_IDS = torch.empty((0, 0), dtype=torch.long)
_M32, _WEYL = 0xFFFFFFFF, 0x9E3779B9


def _draw(scores: torch.Tensor, rows, ahead: int = 0) -> torch.Tensor:
    """Draws from softmax(scores): seeded rows by the hashed exponential race, the others by
    ``torch.multinomial`` on the global generator. A row with NaN probabilities comes back as -1."""
    probs = torch.softmax(scores.float(), dim=-1)
    seeded = [i for i, r in enumerate(rows) if r.params.seed is not None]
    keys = [(rows[i].params.seed, len(rows[i].out_ids) + ahead) for i in seeded]
    if len(seeded) == len(rows):            # a rollout: every row seeded
        out = race(probs, keys)
    else:
        out = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
        free = to_device([i for i, r in enumerate(rows) if r.params.seed is None], scores.device)
        out[free] = torch.multinomial(probs.index_select(0, free), 1).squeeze(-1)
        if seeded:
            idx = to_device(seeded, scores.device)
            out[idx] = race(probs.index_select(0, idx), keys)
    return torch.where(probs.isnan().any(-1), -1, out)


def race(probs: torch.Tensor, keys: list[tuple[int, int]]) -> torch.Tensor:
    """argmax(p / E) per row, E = -log(u) with u the hash of (seed, position, token id) in (0, 1).

    ``probs`` (n, V) float, ``keys`` one (seed, position) per row. The same key and probabilities
    give the same token on any device and in any batch."""
    words = to_device([[s & _M32, (s >> 32) & _M32, t & _M32] for s, t in keys], probs.device)
    weyl = _token_weyl(probs.shape[-1], probs.device)
    return (_compiled_race() if probs.is_cuda else _race)(probs, words, weyl)


def _race(probs: torch.Tensor, words: torch.Tensor, weyl: torch.Tensor) -> torch.Tensor:
    """The race itself: ``words`` (n, 3) the low and high halves of each seed and its position."""
    k = _mix32((words[:, 0] + _WEYL) & _M32)
    k = _mix32(k ^ words[:, 1])
    k = _mix32(k ^ words[:, 2])
    h = _mix32((k[:, None] + weyl[None, :]) & _M32)
    u = ((h >> 8).float() + 0.5) * 2.0 ** -24            # 24 random bits: exactly representable, never 0 or 1
    return (probs / -torch.log(u)).argmax(-1)


@functools.lru_cache(maxsize=1)
def _compiled_race():
    """``_race`` compiled (on CUDA): its ~40 elementwise operations become one kernel and a reduction
    instead of one launch each, which at a decode step's scale cost more than they compute."""
    return torch.compile(_race, dynamic=True)


@functools.lru_cache(maxsize=8)
def _token_weyl(vocab: int, device: torch.device) -> torch.Tensor:
    """(V,) int64: token id × the golden-ratio constant, mod 2**32 (the hash's per-token offset)."""
    return _mul32(torch.arange(vocab, dtype=torch.long, device=device), _WEYL)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 tensors holding 32-bit values, in 16-bit halves so nothing overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser: a bijection of [0, 2**32) in which every input bit moves every output bit."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


class Pending:
    """One step's picks on the device, on their way to the host.

    ``next_ids`` (n,) is what the next decode step is fed (a NaN row's -1 replaced by 0, so that the
    step never indexes out of the embedding; the row fails when the host reads it). The log-probs the
    rows asked for are computed here, and every tensor the host reads is copied into pinned memory
    behind one event: ``result()`` waits for this step only, not for work queued after it."""

    def __init__(self, ids: torch.Tensor, raw: torch.Tensor | None, processed: torch.Tensor | None, params):
        self.params, self.order = params, list(range(len(params)))
        self.next_ids = ids.clamp(min=0)
        chosen = top_v = top_i = None
        k = max((p.top_logprobs for p in params), default=0)
        if raw is not None:
            logp = raw.float().log_softmax(-1)
            if processed is not None:
                use = to_device([p.processed_logprobs for p in params], raw.device, torch.bool)[:, None]
                logp = torch.where(use, processed.float().log_softmax(-1), logp)
            chosen = logp.gather(-1, self.next_ids[:, None]).squeeze(-1)
            if k:
                top_v, top_i = logp.topk(k, dim=-1)
        self._host = [ids, chosen, top_v, top_i]   # what result() reads: on CUDA, pinned copies
        self._event = None
        if ids.is_cuda:
            self._host = [None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(
                t, non_blocking=True) for t in self._host]
            self._event = torch.cuda.Event()
            self._event.record()

    def keep(self, idx: list[int]) -> None:
        """Rows ``idx`` (of the current order) stay; the others' picks are dropped."""
        self.order = [self.order[i] for i in idx]
        self.next_ids = self.next_ids.index_select(0, to_device(idx, self.next_ids.device))

    def result(self) -> Choice:
        if self._event is not None:
            self._event.synchronize()
        ids, chosen, top_v, top_i = (None if t is None else t.tolist() for t in self._host)
        ids = [ids[i] for i in self.order]
        params = [self.params[i] for i in self.order]
        if min(ids, default=0) < 0:
            raise RuntimeError("sampling: a row's next-token probabilities are not a distribution (inf or nan "
                               "in the model's logits)")
        if chosen is None:
            return Choice(ids, [None] * len(ids), [None] * len(ids))
        chosen = [chosen[i] for i in self.order]
        tops: list = [None] * len(ids)
        if top_v is not None:
            tops = [list(zip(top_i[o][:p.top_logprobs], top_v[o][:p.top_logprobs])) if p.top_logprobs else None
                    for o, p in zip(self.order, params)]
        lps = [c if (p.logprobs or p.top_logprobs) else None for c, p in zip(chosen, params)]
        return Choice(ids, lps, tops)
