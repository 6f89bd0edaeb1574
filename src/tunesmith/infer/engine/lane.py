"""A lane: one runner (a model and its KV cache) and the rows decoding on it, stepped by the engine.

:meth:`Lane.admit` prefills newcomers into the running batch; :meth:`Lane.decode` runs one decode
step, samples each row's token, streams and drops finished rows. On a runner that ``overlaps`` (the
fast path) the step is queued before the host reads the previous step's tokens
(:meth:`Lane._decode_ahead`), so the host's share of a step runs while the device computes.
"""
from __future__ import annotations

import collections

from .sampling import Choice, Pending, choose, sample
from .sequence import Sequence


class Lane:
    """One runner and the sequences decoding on it (``running`` in the runner's row order)."""

    def __init__(self, runner, max_batch: int, max_len: int):
        self.runner, self.max_batch, self.max_len = runner, max_batch, max_len
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.steps = self.max_rows = 0   # decode steps run, most rows seen in one
        self.ahead: Pending | None = None  # the step in flight whose picks the host has not read yet

    def can_admit(self) -> bool:
        """Whether waiting rows may join the running batch now."""
        return len(self.running) < self.max_batch and (self.runner.can_merge or not self.running)

    def admit(self, new: list[Sequence]) -> None:
        """Prefill ``new`` into the batch (after reading the step in flight) and give them their first token."""
        logits = self.runner.prefill([s.prompt_ids for s in new], [s.slot for s in new])
        self.running += new
        self.advance(choose(logits, new), start=len(self.running) - len(new))

    def decode(self) -> None:
        """One decode step of every running row."""
        if getattr(self.runner, "overlaps", False) and all(s.params.repetition_penalty == 1.0 for s in self.running) \
                and (self.ahead is None or any(self.room(s) > 1 for s in self.running)):
            self._decode_ahead()    # (not when the step in flight gives every row its last token)
            return
        self.settle()
        if not self.running:
            return
        logits = self.runner.decode([s.out_ids[-1] for s in self.running])
        self._count()
        self.advance(choose(logits, self.running), start=0)

    def _decode_ahead(self) -> None:
        """Queue the next decode step on the device, fed the picks of the step still in flight, and
        only then read that step's picks on the host: the host's work (sampling bookkeeping, stop
        checks, streaming, the next step's launch) overlaps the device's. A row that finished in the
        step read here had one more token computed for it, which is dropped."""
        ahead = self.ahead
        last = ahead.next_ids if ahead is not None else [s.out_ids[-1] for s in self.running]
        logits = self.runner.decode(last)
        self._count()
        self.ahead = sample(logits, self.running, ahead=int(ahead is not None))
        if ahead is not None:
            self.advance(ahead.result(), start=0)

    def settle(self) -> None:
        """Read the step in flight (if any) into its rows."""
        ahead, self.ahead = self.ahead, None
        if ahead is not None:
            self.advance(ahead.result(), start=0)

    def room(self, s: Sequence) -> int:
        """Tokens row ``s`` may still be given (by its max_tokens and the engine's max_len)."""
        return min(s.params.max_tokens - len(s.out_ids), self.max_len - len(s.prompt_ids) - len(s.out_ids))

    def _count(self) -> None:
        self.steps += 1
        self.max_rows = max(self.max_rows, len(self.running))

    def advance(self, picked: Choice, start: int) -> None:
        """Give rows ``start..`` their ``picked`` tokens, stream, and drop finished rows."""
        for i, s in enumerate(self.running[start:]):
            if s.cancelled:
                s.finish_reason = "cancelled"
                continue
            delta = s.add(picked.ids[i], picked.logprobs[i], picked.top[i], self.max_len)
            if delta is not None:
                s.emit(delta)
        self.drop(lambda s: s.finish_reason is not None, None)

    def drop(self, gone, reason: str | None) -> None:
        """Finish (with ``reason``) and remove the running rows for which ``gone(row)`` holds: from the
        runner, from ``running`` and from the step in flight."""
        keep = [i for i, s in enumerate(self.running) if not gone(s)]
        if len(keep) == len(self.running):
            return
        for s in self.running:
            if gone(s):
                s.finish(reason)
        self.runner.keep(keep)
        self.running = [self.running[i] for i in keep]
        if self.ahead is not None:
            if self.running:
                self.ahead.keep(keep)
            else:
                self.ahead = None

    def fail(self, error: str, also: list[Sequence]) -> None:
        """End every running row (and ``also``) with ``error``; the lane is empty after."""
        for s in {id(s): s for s in [*self.running, *also]}.values():
            s.finish("error", error)
        self.running, self.ahead = [], None
        self.runner.keep([])
