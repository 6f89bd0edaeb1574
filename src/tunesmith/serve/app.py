"""The OpenAI-compatible HTTP server over one :class:`~tunesmith.infer.engine.Engine`.

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``
(both streaming by server-sent events when ``stream`` is true), ``POST /v1/score/evaluation``
for reward / classification models (:mod:`.score`) and, when allowed, vLLM's
``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter``. Each choice of a request is one engine
sequence; the engine's thread batches them with every other request in flight, and their outputs
come back to the event loop through ``call_soon_threadsafe``. A client that disconnects cancels
its sequences.
"""
from __future__ import annotations

import asyncio
import contextlib
import json

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from ..errors import TunesmithError
from ..infer.engine import Engine, EngineBusy, EngineStopped, Output, Request, RequestError, UnknownModel
from . import protocol as P
from .guard import ApiError, Guard, error_body, install_handlers
from .settings import Settings


def create_app(engine: Engine, settings: Settings | None = None, scorers: dict | None = None) -> FastAPI:
    """The FastAPI app; the engine's thread starts and stops with the app's lifespan."""
    settings = settings or Settings()
    scorers = scorers or {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.shutdown, settings.shutdown_timeout)

    app = FastAPI(title="tunesmith", lifespan=lifespan)
    app.state.engine, app.state.settings, app.state.scorers = engine, settings, scorers
    install_handlers(app)

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": engine.models(), "scorers": list(scorers), **engine.load}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(engine, n) for n in [*engine.models(), *scorers]]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name not in engine.routes and name not in scorers:
            raise ApiError(404, f"model {name!r} is not served here", "model_not_found", "model")
        return _model_card(engine, name)

    @app.post("/v1/chat/completions")
    async def chat(http: HttpRequest):
        body = await _parse(http, P.ChatRequest)
        turns = [m.as_turn() for m in body.messages]
        jobs = _jobs(engine, settings, body, [{"messages": turns}], "chat")
        return await _respond(engine, settings, body, jobs, "chat")

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        body = await _parse(http, P.CompletionRequest)
        jobs = _jobs(engine, settings, body, [{"prompt": p} for p in body.prompts()], "text")
        return await _respond(engine, settings, body, jobs, "text")

    @app.post("/v1/score/evaluation")
    async def score(http: HttpRequest):
        body = await _parse(http, P.ScoreRequest)
        scorer = scorers.get(body.model)
        if scorer is None:
            raise ApiError(404, f"no scoring model {body.model!r} is served here; scoring models: "
                                f"{', '.join(scorers) or 'none (start the server with --score NAME=RUN)'}",
                           "model_not_found", "model")
        result = await asyncio.to_thread(scorer.score, body.messages, body.max_length)
        return {"id": P.new_id("scoreval"), "object": "score.evaluation", "model": body.model, **result}

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(http: HttpRequest):
        body = await _parse(http, P.LoadAdapter)
        _adapter_loading(settings)
        if body.lora_name in engine.routes:
            raise ApiError(400, f"a model named {body.lora_name!r} is served already", "invalid_value", "lora_name")
        from pathlib import Path
        if not Path(body.lora_path).exists():
            raise ApiError(400, f"lora_path {body.lora_path!r} does not exist on the server", "invalid_value",
                           "lora_path")
        try:
            how = await asyncio.to_thread(engine.add_adapter, body.lora_name, body.lora_path)
        except (TunesmithError, ValueError) as e:
            raise ApiError(400, f"cannot load {body.lora_path}: {e}", "invalid_value", "lora_path") from None
        return {"object": "adapter", "id": body.lora_name, "shares_base": how == "per-row"}

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(http: HttpRequest):
        body = await _parse(http, P.UnloadAdapter)
        _adapter_loading(settings)
        try:
            await asyncio.to_thread(engine.remove, body.lora_name)
        except UnknownModel as e:
            raise ApiError(404, str(e), "model_not_found", "lora_name") from None
        return {"object": "adapter", "id": body.lora_name, "deleted": True}

    return Guard(app, settings.api_key, settings.max_body_bytes)


def _adapter_loading(settings: Settings) -> None:
    if not settings.allow_adapter_loading:
        raise ApiError(404, "loading adapters at run time is off; start the server with --allow-adapter-loading",
                       "not_found")


def _model_card(engine: Engine, name: str) -> dict:
    route = engine.routes.get(name)
    kind = route.kind if route is not None else "scorer"
    parent = engine.base_name if kind == "adapter" else None
    return {"id": name, "object": "model", "created": 0, "owned_by": "tunesmith", "kind": kind, "parent": parent}


async def _parse(http: HttpRequest, schema):
    raw = await http.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON body: {e}", "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(data).__name__}", "invalid_json")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or None
        msg = err["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"{field}: {msg}" if field else msg, "invalid_value", field) from None


def _max_tokens(engine: Engine, settings: Settings, body, prompt_len: int) -> int:
    wanted = body.wanted_tokens()
    if wanted is None:
        return max(1, min(settings.max_tokens, engine.max_len - prompt_len))
    if wanted < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {wanted}", "invalid_value", "max_tokens")
    if wanted > settings.max_tokens:
        raise ApiError(400, f"max_tokens={wanted} exceeds this server's limit of {settings.max_tokens}",
                       "invalid_value", "max_tokens")
    return wanted


def _jobs(engine: Engine, settings: Settings, body, inputs: list[dict], kind: str):
    """``(jobs, prompt_tokens)``: (choice index, prompt index, engine request) for every choice of every
    prompt, validated, and the prompts' total token count (counted once however large ``n`` is)."""
    if body.n > settings.max_n:
        raise ApiError(400, f"n={body.n} exceeds this server's limit of {settings.max_n}", "invalid_value", "n")
    if kind == "chat":
        logprobs, top = body.logprobs or bool(body.top_logprobs), body.top_logprobs or 0
    else:
        logprobs, top = body.logprobs is not None, body.logprobs or 0
    jobs, prompt_tokens = [], 0
    for pi, inp in enumerate(inputs):
        try:
            _, ids = engine.prepare(Request(model=body.model, params=P.SamplingParams(max_tokens=1), **inp))
            params = body.sampling(_max_tokens(engine, settings, body, len(ids)), logprobs, top)
            prompt_tokens += len(ids)
        except UnknownModel as e:
            raise ApiError(404, str(e), "model_not_found", "model") from None
        except (RequestError, ValueError) as e:
            raise ApiError(400, str(e), "invalid_value") from None
        for j in range(body.n):
            p = params if body.seed is None or j == 0 else params.replace(seed=body.seed + j)
            jobs.append((pi * body.n + j, pi, Request(model=body.model, params=p, stream=body.stream, **inp)))
    return jobs, prompt_tokens


class _Run:
    """The engine sequences of one HTTP request and the queue their outputs arrive on."""

    def __init__(self, engine: Engine, jobs, timeout: float):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.timeout, self.engine, self.handles = timeout, engine, []
        try:
            for index, _, req in jobs:
                self.handles.append(engine.submit(req, sink=self._sink(index)))
        except EngineStopped as e:
            self.cancel()
            raise ApiError(503, f"{e}; retry on another server", "shutting_down") from None
        except EngineBusy as e:
            self.cancel()
            raise ApiError(429, f"the server is busy: {e}; retry later", "server_busy",
                           headers={"Retry-After": "1"}) from None
        except (RequestError, UnknownModel) as e:
            self.cancel()
            raise ApiError(400, str(e), "invalid_value") from None
        self.left = len(self.handles)

    def _sink(self, index: int):
        return lambda out: self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, out))

    async def outputs(self):
        """(choice index, Output) until every sequence has finished; a 504 after the timeout."""
        deadline = self.loop.time() + self.timeout
        while self.left:
            try:
                index, out = await asyncio.wait_for(self.queue.get(), max(0.0, deadline - self.loop.time()))
            except asyncio.TimeoutError:
                self.cancel()
                raise ApiError(504, f"the request did not finish within {self.timeout:g} s", "timeout") from None
            self.left -= out.finished
            yield index, out

    def cancel(self) -> None:
        for h in self.handles:
            if not h.done:
                h.cancel()


async def _respond(engine: Engine, settings: Settings, body, prepared, kind: str):
    jobs, prompt_tokens = prepared
    run = _Run(engine, jobs, settings.request_timeout)
    rid = P.new_id("chatcmpl" if kind == "chat" else "cmpl")
    if body.stream:
        return StreamingResponse(_stream(engine, body, run, jobs, prompt_tokens, rid, kind), media_type="text/event-stream")
    finals: dict[int, Output] = {}
    try:
        async for index, out in run.outputs():
            if out.finished:
                finals[index] = out
    finally:
        run.cancel()
    errors = [o.error for o in finals.values() if o.finish_reason == "error"]
    if errors:
        raise ApiError(500, f"generation failed: {errors[0]}", "generation_error")
    tok = engine.routes[body.model].tokenizer
    choices = [_choice(tok, kind, i, finals[i]) for i in sorted(finals)]
    completion = sum(o.completion_tokens for o in finals.values())
    return JSONResponse(P.envelope(kind, rid, body.model, choices, P.usage(prompt_tokens, completion)))


def _choice(tok, kind: str, index: int, out: Output, delta: bool = False) -> dict:
    if kind == "chat":
        lp = P.chat_logprobs(tok, out.token_ids, out.logprobs, out.top_logprobs)
        msg = {"content": out.text} if delta else {"role": "assistant", "content": out.text}
        return {"index": index, ("delta" if delta else "message"): msg, "logprobs": lp,
                "finish_reason": out.finish_reason if out.finished else None}
    lp = P.completion_logprobs(tok, out.token_ids, out.logprobs, out.top_logprobs)
    return {"index": index, "text": out.text, "logprobs": lp, "finish_reason": out.finish_reason if out.finished else None}


async def _stream(engine: Engine, body, run: _Run, jobs, prompt_tokens: int, rid: str, kind: str):
    tok = engine.routes[body.model].tokenizer
    chunk = f"{kind}.chunk"
    sse = lambda obj: f"data: {json.dumps(obj)}\n\n"  # noqa: E731
    completion = 0
    try:
        if kind == "chat":
            for index, _, _ in jobs:
                yield sse(P.envelope(chunk, rid, body.model, [{"index": index, "delta": {"role": "assistant",
                                                                                         "content": ""},
                                                               "logprobs": None, "finish_reason": None}]))
        async for index, out in run.outputs():
            if out.finish_reason == "error":
                yield sse(error_body(500, f"generation failed: {out.error}", "generation_error"))
                continue
            completion += out.completion_tokens if out.finished else 0
            if out.text or out.logprobs or out.finished:
                yield sse(P.envelope(chunk, rid, body.model, [_choice(tok, kind, index, out, delta=True)]))
        if body.include_usage():
            yield sse(P.envelope(chunk, rid, body.model, [], P.usage(prompt_tokens, completion)))
    except ApiError as e:
        yield sse(error_body(e.status, e.message, e.code))
    finally:
        run.cancel()
    yield "data: [DONE]\n\n"
