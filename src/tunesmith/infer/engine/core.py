"""The engine: named models on lanes, requests batched continuously, one decode step at a time.

A *lane* is one runner (a model and its KV cache, or proxy-tuning's three) with the rows decoding
on it. The base model's lane also serves every per-row LoRA adapter (:mod:`.adapters`): requests
for the base and for those adapters share its forward passes. Any other model (a run with
virtual tokens, IA3, DoRA …, a proxy-tuned combination) has a lane of its own.

Each :meth:`Engine.step` admits waiting requests into free rows of their lane (a prefill of the
newcomers, merged into the running batch: continuous batching), then runs one decode step for
every lane with rows, samples each row's token with its own parameters (:mod:`.sampling`),
streams deltas and drops finished rows (:mod:`.lane`; on the fast path a lane's step is queued
before the host reads the previous step's tokens). :meth:`Engine.start` runs the steps on a
background thread for servers; :meth:`Engine.generate` runs them in the caller's thread.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable

from torch import nn

from ...errors import ConfigError, TunesmithError
from .adapters import AdapterTable, Factors
from .lane import Lane
from .runner import ProxyRunner, device_of
from .sampling import SamplingParams
from .sequence import Completion, Handle, Output, Request, Sequence
from .text import Prompter, stop_token_ids

log = logging.getLogger(__name__)


DEFAULT_LEN = 4096   # max_len unless given (the model's context when shorter)


class EngineBusy(TunesmithError):
    """The queue of waiting requests is full."""


class EngineStopped(TunesmithError):
    """The engine is shutting down (or was shut down) and takes no new requests."""


class UnknownModel(TunesmithError):
    """A request named a model the engine does not serve."""


class RequestError(ConfigError):
    """A request the engine cannot run as given (too long, empty …)."""


@dataclass
class Route:
    """What a served model name maps to."""

    lane: Lane
    slot: int                 # per-row adapter slot on the lane's model (-1: none)
    prompter: Prompter
    stop_ids: set[int]
    tokenizer: object
    kind: str = "model"       # model | adapter | proxy
    vocab: int = 0            # token ids must be below this


class Engine:
    """Generation for one base model plus named adapters and models. See docs/serving.md.

    ``model`` is used in place (per-row adapters wrap its linear layers); without a ``tokenizer``
    requests give token ids and get token ids back (text is empty).

    ``max_batch``: rows decoded together on a lane; ``max_queue``: requests waiting beyond those
    (more raise :class:`EngineBusy`); ``max_len``: prompt + completion tokens at most (default the
    model's ``max_position_embeddings``); ``fast``: "auto" (on CUDA: static cache and a compiled
    decode step where the model allows it, see :mod:`.fast`), True or False (the plain path).
    """

    def __init__(self, model: nn.Module, tokenizer=None, *, name: str = "base", max_batch: int = 32,
                 max_queue: int = 1024, max_len: int | None = None, system_prompt: str | None = None,
                 layout: str = "auto", fast: bool | str = "auto"):
        if max_batch < 1:
            raise ConfigError(f"engine: max_batch must be >= 1, got {max_batch}")
        self.tokenizer, self.max_batch, self.max_queue, self.fast = tokenizer, max_batch, max_queue, fast
        cfg = getattr(model, "config", None)
        self.max_len = int(max_len or min(getattr(cfg, "max_position_embeddings", None) or DEFAULT_LEN, DEFAULT_LEN))
        self.pad_id = _pad_id(tokenizer)
        self.base_name = name
        self.table = AdapterTable(model) if getattr(model, "_tunesmith_method", None) is None else None
        self.lanes: dict[str, Lane] = {}
        self.routes: dict[str, Route] = {}
        self._base_lane = self._new_lane(name, self._runner(model, self.table))
        self._add_route(name, self._base_lane, -1, model, tokenizer, system_prompt, layout)
        self._lock = threading.RLock()          # held by a step and by adapter / model changes
        self._inbox_lock = threading.Lock()     # held briefly by submit: it never waits for a step
        self._inbox: collections.deque[Sequence] = collections.deque()
        self._cancels: collections.deque[Sequence] = collections.deque()
        self._pending = 0
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._accepting = True

    # -- models --------------------------------------------------------------------------
    def _runner(self, model: nn.Module, table=None):
        from .fast import make_runner
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            from .seq2seq import Seq2SeqRunner
            return Seq2SeqRunner(model, self.pad_id, table)
        if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
            raise ConfigError(f"engine: {type(model).__name__} has no language-model head to generate with "
                              "(a classifier? serve it with --score)")
        return make_runner(model, self.pad_id, table, fast=self.fast, max_batch=self.max_batch, max_len=self.max_len)

    def _new_lane(self, key: str, runner) -> Lane:
        lane = Lane(runner, self.max_batch, self.max_len)
        self.lanes[key] = lane
        return lane

    def _add_route(self, name, lane, slot, model, tokenizer, system_prompt, layout, kind="model") -> None:
        if name in self.routes:
            raise ConfigError(f"engine: a model named {name!r} is already served")
        vocab = model.get_input_embeddings().weight.shape[0]
        self.routes[name] = Route(lane, slot, Prompter(tokenizer, system_prompt, layout),
                                  stop_token_ids(tokenizer, model), tokenizer, kind, vocab)

    def models(self) -> list[str]:
        """Every name a request may give as ``model``."""
        return list(self.routes)

    @property
    def base_model(self) -> nn.Module:
        return self._base_lane.runner.model

    def add_lora(self, name: str, factors: Factors, *, system_prompt: str | None = None, layout: str = "auto") -> None:
        """Serve the LoRA ``factors`` ({module: (A, B, scale)}) per row on the base model as ``name``."""
        if self.table is None:
            raise ConfigError("engine: the base model carries a tunesmith method already; per-row adapters need "
                              "a plain base model (serve the adapter with add_model instead)")
        with self._lock:
            if name in self.routes:
                raise ConfigError(f"engine: a model named {name!r} is already served")
            slot = self.table.add(name, factors)
            self._add_route(name, self._base_lane, slot, self.base_model, self.tokenizer, system_prompt, layout,
                            "adapter")

    def add_adapter(self, name: str, path, *, system_prompt: str | None = None, layout: str | None = None) -> str:
        """Serve the run or adapter directory ``path`` as ``name``: per row on the base model when it
        is a plain LoRA, else as a model of its own (``tunesmith.load``). Returns "per-row" or "own".
        The prompt defaults (system prompt, layout) are those the run trained with."""
        from pathlib import Path
        from .adapters import adapter_dir, per_row_reasons, read_factors
        from .text import run_defaults
        defaults = run_defaults(path)
        system_prompt = system_prompt if system_prompt is not None else defaults["system_prompt"]
        layout = layout or defaults["layout"]
        art = adapter_dir(path)
        reasons = per_row_reasons(art) if art is not None else ["it is not a LoRA adapter"]
        if self.table is None:
            reasons.append("the base model carries a tunesmith method itself")
        if not reasons:
            self.add_lora(name, read_factors(art), system_prompt=system_prompt, layout=layout)
            return "per-row"
        log.info("serving %s (%s) on its own copy of the model: %s", name, path, "; ".join(reasons))
        from ...api import load
        dev = device_of(self.base_model)
        model, tokenizer = load(Path(path), device=str(dev), dtype=str(next(self.base_model.parameters()).dtype)
                                .replace("torch.", ""))
        self.add_model(name, model, tokenizer, system_prompt=system_prompt, layout=layout)
        return "own"

    def add_model(self, name: str, model: nn.Module, tokenizer=None, *, system_prompt: str | None = None,
                  layout: str = "auto") -> None:
        """Serve ``model`` (anything ``tunesmith.load`` returns) on a lane of its own as ``name``."""
        with self._lock:
            lane = self._new_lane(name, self._runner(model))
            self._add_route(name, lane, -1, model, tokenizer or self.tokenizer, system_prompt, layout)

    def add_proxy(self, name: str, expert: nn.Module, anti_expert: nn.Module, alpha: float = 1.0, *,
                  system_prompt: str | None = None, layout: str = "auto") -> None:
        """Serve proxy-tuning (base + alpha · (expert − anti_expert)) as ``name``."""
        from ..proxy import ProxyTuned
        with self._lock:
            proxy = ProxyTuned(self.base_model, expert, anti_expert, alpha)
            lane = self._new_lane(name, ProxyRunner(proxy, self.pad_id, self.table))
            self._add_route(name, lane, -1, self.base_model, self.tokenizer, system_prompt, layout, "proxy")

    def remove(self, name: str) -> None:
        """Stop serving ``name`` (not the base). Waiting and running requests for it are cancelled."""
        with self._lock:
            route = self.routes.get(name)
            if route is None or name == self.base_name:
                raise UnknownModel(f"engine: cannot remove {name!r}; removable: "
                                   f"{', '.join(n for n in self.routes if n != self.base_name) or 'none'}")
            lane = route.lane
            with self._inbox_lock:
                queued = [s for s in self._inbox if s.lane is lane]
            doomed = [s for s in [*queued, *lane.waiting, *lane.running]
                      if s.slot == route.slot or lane is not self._base_lane]
            for s in doomed:
                s.cancelled = True
            self._drop_cancelled(lane)
            del self.routes[name]
            if route.kind == "adapter":
                self.table.remove(name)
            else:
                del self.lanes[name]

    # -- requests ------------------------------------------------------------------------
    def prepare(self, request: Request) -> tuple[Route, list[int]]:
        """The route and prompt ids of ``request``; RequestError / UnknownModel if it cannot run."""
        name = request.model or self.base_name
        route = self.routes.get(name)
        if route is None:
            raise UnknownModel(f"model {name!r} is not served here; available: {', '.join(self.routes)}")
        if (request.prompt is None) == (request.messages is None):
            raise RequestError("give exactly one of prompt and messages")
        try:
            ids = route.prompter.chat(request.messages) if request.messages is not None \
                else route.prompter.completion(request.prompt)
        except (ValueError, KeyError, TypeError) as e:
            raise RequestError(f"cannot render the request: {e}") from None
        if not ids:
            raise RequestError("the prompt is empty")
        bad = next((i for i in ids if not 0 <= i < route.vocab), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside this model's vocabulary (0..{route.vocab - 1})")
        if len(ids) + request.params.max_tokens > self.max_len:
            raise RequestError(f"the prompt ({len(ids)} tokens) plus max_tokens ({request.params.max_tokens}) "
                               f"exceeds this engine's max_len of {self.max_len} tokens")
        return route, ids

    def submit(self, request: Request, sink: Callable[[Output], None] | None = None) -> Handle:
        """Queue ``request``; its outputs go to ``sink`` (called from the engine's thread) or to the handle."""
        route, ids = self.prepare(request)
        outputs = None
        if sink is None:
            outputs = queue.Queue()
            sink = outputs.put
        seq = Sequence(ids, request.params, route.slot, route.stop_ids, route.tokenizer, sink, request.stream)
        seq.lane = route.lane
        with self._inbox_lock:
            if not self._accepting:
                raise EngineStopped("the engine is shutting down")
            if self._pending >= self.max_queue:
                raise EngineBusy(f"{self._pending} requests are waiting already (max_queue={self.max_queue})")
            self._pending += 1
            self._inbox.append(seq)
        self._wake.set()
        return Handle(seq, outputs, self)

    def cancel(self, handle: Handle) -> None:
        handle.seq.cancelled = True
        self._cancels.append(handle.seq)
        self._wake.set()

    @property
    def load(self) -> dict[str, int]:
        """Requests running and waiting now."""
        return {"running": sum(len(lane.running) for lane in self.lanes.values()), "waiting": self._pending}

    def generate(self, prompts: list[str | list[int]] | None = None, *, messages: list[list[dict]] | None = None,
                 params: SamplingParams | None = None, model: str | None = None) -> list[Completion]:
        """Complete every prompt (or conversation) and return their completions, in order."""
        params = params or SamplingParams()
        reqs = [Request(prompt=p, model=model, params=params) for p in prompts or []]
        reqs += [Request(messages=m, model=model, params=params) for m in messages or []]
        handles = [self.submit(r, sink=lambda out: None) for r in reqs]
        if self._thread is None:
            self.run_until_done()
        return [h.result() for h in handles]

    # -- the loop ------------------------------------------------------------------------
    def run_until_done(self) -> None:
        """Step until no request is waiting or running (for callers without the thread)."""
        while self.step():
            pass

    def step(self) -> bool:
        """Admit, decode and retire once on every lane; False when there was nothing to do."""
        with self._lock:
            with self._inbox_lock:
                while self._inbox:
                    seq = self._inbox.popleft()
                    seq.lane.waiting.append(seq)
            while self._cancels:
                self._drop_cancelled(self._cancels.popleft().lane)
            busy = False
            for lane in list(self.lanes.values()):
                busy |= self._step_lane(lane)
            return busy

    def _step_lane(self, lane: Lane) -> bool:
        new: list[Sequence] = []
        try:
            if lane.waiting and lane.can_admit():
                lane.settle()          # rows join once the step in flight is read
                if lane.can_admit():
                    room = lane.max_batch - len(lane.running)
                    new = [lane.waiting.popleft() for _ in range(min(room, len(lane.waiting)))]
                    with self._inbox_lock:
                        self._pending -= len(new)
                    lane.admit(new)
            if not lane.running:
                return bool(lane.waiting)
            lane.decode()
            return True
        except Exception as e:  # one failing batch fails its rows, never the engine
            log.exception("engine: a step failed")
            lane.fail(f"{type(e).__name__}: {e}", new)
            return bool(lane.waiting)

    def _drop_cancelled(self, lane: Lane) -> None:
        for s in [s for s in lane.waiting if s.cancelled]:
            lane.waiting.remove(s)
            with self._inbox_lock:
                self._pending -= 1
            s.finish("cancelled")
        lane.drop(lambda s: s.cancelled, "cancelled")
        with self._inbox_lock:
            gone = [s for s in self._inbox if s.cancelled and s.lane is lane]
            for s in gone:
                self._inbox.remove(s)
                self._pending -= 1
        for s in gone:
            s.finish("cancelled")

    # -- background thread ---------------------------------------------------------------
    def start(self) -> "Engine":
        """Run the steps on a background thread (what a server does)."""
        self._accepting = True
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="tunesmith-engine", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stopping:
            if not self.step():
                self._wake.wait(0.05)
                self._wake.clear()

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop taking requests, let the running and waiting ones finish (up to ``timeout`` s), cancel
        the rest and stop the thread."""
        import time
        self._accepting = False
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._thread is not None and (self.load["running"] or self.load["waiting"]):
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(0.02)
        with self._lock:
            with self._inbox_lock:
                for s in self._inbox:
                    s.cancelled = True
            for lane in self.lanes.values():
                for s in [*lane.waiting, *lane.running]:
                    s.cancelled = True
                self._drop_cancelled(lane)
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "sep_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0


__all__ = ["Engine", "EngineBusy", "EngineStopped", "UnknownModel", "RequestError", "Request", "SamplingParams", "device_of"]
