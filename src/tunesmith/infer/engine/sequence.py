"""Requests, their in-flight state and what comes back (deltas while streaming, a final result)."""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable

from .sampling import SamplingParams
from .text import TextStream

log = logging.getLogger(__name__)


@dataclass
class Request:
    """One completion to produce. Give ``prompt`` (text, or token ids) or ``messages`` (chat turns).

    ``model``: a name the engine serves (None: the base model); ``stream``: deliver text deltas as
    they are decoded (otherwise only the final :class:`Output`)."""

    prompt: str | list[int] | None = None
    messages: list[dict] | None = None
    model: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    stream: bool = False


@dataclass
class Output:
    """A delta (``finished`` False: the new text and tokens since the last one) or the end of a
    request (``finished`` True: the rest of the text, ``finish_reason`` and the token counts).

    ``finish_reason``: "stop" (EOS, end of turn, a stop string or stop token), "length"
    (max_tokens or the engine's max_len), "cancelled", or "error" (then ``error`` says why)."""

    text: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Completion:
    """The whole result of one request."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    error: str | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class Sequence:
    """A request being decoded: its prompt ids, output so far and where its outputs go."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, slot: int, stop_ids: set[int],
                 tokenizer, sink: Callable[[Output], None], stream: bool):
        self.prompt_ids, self.params, self.slot = prompt_ids, params, slot
        self.stop_ids = stop_ids | set(params.stop_token_ids) if not params.ignore_eos else set(params.stop_token_ids)
        self.tokenizer, self.sink, self.stream = tokenizer, sink, stream
        self.out_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top: list = []
        self.text = TextStream(tokenizer, params.stop) if (stream or params.stop) and tokenizer is not None else None
        self.finish_reason: str | None = None
        self.unsent = ""
        self.error: str | None = None
        self.cancelled = False
        self.done = threading.Event()
        self.result: Completion | None = None

    def add(self, token: int, logprob: float | None, top, max_len: int) -> Output | None:
        """Record one sampled token; returns the delta to stream (None when there is nothing to send)."""
        self.out_ids.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
            self.top.append(top)
        delta = ""
        if token in self.stop_ids:
            self.finish_reason = "stop"
        elif self.text is not None:
            delta, hit = self.text.push(self.out_ids)
            if hit:
                self.finish_reason = "stop"
        if self.finish_reason is None and (len(self.out_ids) >= self.params.max_tokens
                                           or len(self.prompt_ids) + len(self.out_ids) >= max_len):
            self.finish_reason = "length"
        if self.stream and self.finish_reason is None:
            return Output(delta, [token], [logprob] if logprob is not None else None, [top] if top else None)
        self.unsent = delta    # the last token's text goes out with the final output
        return None

    def final_text(self) -> str:
        """The completion's text: without a final stop token, cut before a stop string."""
        if self.text is not None:   # the stop token was never pushed into it
            return self.text.finish()
        ids = self.out_ids
        if self.finish_reason == "stop" and ids and ids[-1] in self.stop_ids:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    def finish(self, reason: str | None = None, error: str | None = None) -> None:
        """End the request: send the last output and wake whoever waits for the result."""
        if self.done.is_set():
            return
        self.finish_reason = reason or self.finish_reason or "stop"
        self.error = error
        text = self.final_text()
        lps = self.logprobs if self.params.logprobs or self.params.top_logprobs else None
        tops = self.top if self.params.top_logprobs else None
        self.result = Completion(text, list(self.out_ids), self.finish_reason, self.prompt_ids, lps, tops, error)
        if self.stream:
            rest = self.unsent + (self.text.flush() if self.text is not None else "")
            last = self.out_ids[-1:] if self.out_ids and not self._sent_last() else []
            out = Output(rest, last, lps[-1:] if lps and last else None, tops[-1:] if tops and last else None,
                         True, self.finish_reason, len(self.prompt_ids), len(self.out_ids), error)
        else:
            out = Output(text, list(self.out_ids), lps, tops, True, self.finish_reason, len(self.prompt_ids),
                         len(self.out_ids), error)
        self.done.set()
        self.emit(out)

    def emit(self, out: Output) -> None:
        """Hand ``out`` to the sink; a sink that fails (a closed event loop …) never stops the engine."""
        try:
            self.sink(out)
        except Exception:
            log.warning("engine: could not deliver an output (the caller went away?)", exc_info=True)

    def _sent_last(self) -> bool:
        """Whether the last token already went out in a delta (it did unless it ended the request)."""
        return self.finish_reason in ("cancelled", "error") or not self.out_ids


class Handle:
    """What :meth:`Engine.submit` returns: iterate it for outputs, or wait for ``result()``."""

    def __init__(self, seq: Sequence, outputs: "queue.Queue[Output] | None", engine):
        self.seq, self._outputs, self._engine = seq, outputs, engine

    def __iter__(self):
        if self._outputs is None:
            raise RuntimeError("this request delivers its outputs to the sink it was submitted with")
        while True:
            out = self._outputs.get()
            yield out
            if out.finished:
                return

    def result(self, timeout: float | None = None) -> Completion:
        """The completion (the engine's thread must be running, or call ``engine.run_until_done``)."""
        if not self.seq.done.wait(timeout):
            raise TimeoutError("the request did not finish in time")
        return self.seq.result

    def cancel(self) -> None:
        self._engine.cancel(self)

    @property
    def done(self) -> bool:
        return self.seq.done.is_set()
