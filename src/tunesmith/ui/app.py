"""The UI's FastAPI app: the page, its JSON API under /api, and the engines' OpenAI routes.

One process serves all of it. ``/`` is ``static/index.html``; the page calls ``/api/...`` and, for
chat, ``/engines/<id>/v1/chat/completions`` (the `tunesmith serve` app of that engine). With an
API key every /api and /engines route needs 'Authorization: Bearer KEY' (the page asks for it);
``/api/info`` answers without one, so the page can tell that it must ask.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import tempfile
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from ..errors import TunesmithError
from . import runs as runs_mod, schema as schema_mod, tools
from .chat import Pool
from .jobs import Jobs

STATIC = Path(__file__).parent / "static"


def create_app(runs_dir: str | Path = "runs", api_key: str | None = None, device: str = "auto",
               dtype: str = "auto"):
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    jobs, pool = Jobs(runs_dir), Pool(device, dtype)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            await asyncio.to_thread(pool.shutdown)

    app = FastAPI(title="tunesmith ui", lifespan=lifespan)
    app.state.jobs, app.state.pool = jobs, pool
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(TunesmithError)
    async def _user_error(request, exc):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(ValueError)      # DataError is a ValueError: user input, as cli.main treats it
    async def _value_error(request, exc):
        user = type(exc).__module__.startswith("tunesmith")
        return JSONResponse({"error": str(exc) if user else f"internal error: {type(exc).__name__}: {exc}"},
                            status_code=400 if user else 500)

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/api/info")
    async def info():
        from .. import __version__
        cmds = {n: tools.command_available(n) for n in tools.ISSUE}
        return {"version": __version__, "auth": bool(api_key), "runs_dir": str(runs_dir), "commands": cmds}

    @app.get("/api/schema")
    async def schema():
        return await asyncio.to_thread(schema_mod.schema, runs_dir)

    @app.post("/api/preview")
    async def preview(request: Request):
        body = await request.json()
        return await asyncio.to_thread(_preview, body.get("path", ""), body.get("field_map") or {},
                                       int(body.get("rows", 5)))

    @app.post("/api/validate")
    async def validate(request: Request):
        _, answer = _check(await request.json())
        return answer

    @app.post("/api/estimate")
    async def estimate(request: Request):
        cfg, answer = _check(await request.json())
        if cfg is None:
            return JSONResponse(answer, status_code=400)
        if not tools.command_available("estimate"):
            return JSONResponse(tools.unavailable("estimate"), status_code=501)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(answer["yaml"])
        return await asyncio.to_thread(tools.run_command, "estimate", [f.name], 600)

    @app.get("/api/runs")
    async def list_runs():
        return await asyncio.to_thread(runs_mod.listing, jobs)

    @app.post("/api/runs")
    async def start(request: Request):
        body = await request.json()
        cfg, answer = _check(body)
        if cfg is None:
            return JSONResponse(answer, status_code=400)
        from ..data.readers import resolve_path
        for train in [cfg.data.train] if cfg.data.train else [e.train for e in cfg.data.mixture]:
            resolve_path(train, dirs=True)       # the runner's DataError, before any directory is made
        run_dir = jobs.reserve(cfg.output.dir)
        data = schema_mod.to_config(*_form(body))
        data.setdefault("output", {})["dir"] = str(run_dir)
        job = jobs.start(schema_mod.dump(data), run_dir)
        return {"name": job.name, "dir": str(run_dir), "yaml": schema_mod.dump(data), "command": " ".join(job.cmd)}

    @app.get("/api/runs/{name:path}")
    async def run(name: str, since: int | None = None):
        _known(jobs, name)
        return await asyncio.to_thread(runs_mod.describe, jobs, name, since)

    @app.post("/api/runs/{name:path}/stop")
    async def stop(name: str):
        _known(jobs, name)
        return {"stopping": jobs.stop(name)}

    @app.post("/api/runs/{name:path}/resume")
    async def resume(name: str, request: Request):
        _known(jobs, name)
        raw = await request.body()
        overrides = (json.loads(raw) if raw else {}).get("overrides") or []
        job = jobs.resume(name, runs_dir / name, [str(o) for o in overrides])
        return {"name": name, "command": " ".join(job.cmd)}

    @app.post("/api/compare")
    async def compare(request: Request):
        names = (await request.json()).get("runs") or []
        for n in names:
            _known(jobs, n)
        out = [dict(runs_mod.describe(jobs, n), metrics=runs_mod.metrics(runs_dir / n)) for n in names]
        return {"runs": out, "table": tools.compare_runs([runs_dir / n for n in names])}

    @app.post("/api/eval")
    async def evaluate(request: Request):
        body = await request.json()
        target = _target(jobs, body)
        if not tools.command_available("eval"):
            return JSONResponse(tools.unavailable("eval"), status_code=501)
        return await asyncio.to_thread(tools.evaluate, target, body.get("data", ""), body.get("max_samples"),
                                       [str(a) for a in body.get("args", [])])

    @app.post("/api/export")
    async def export(request: Request):
        body = await request.json()
        rank = body.get("rank")
        return await asyncio.to_thread(tools.export, _target(jobs, body), body.get("target", ""),
                                       int(rank) if rank not in (None, "") else None, bool(body.get("fold_rslora")),
                                       body.get("out"))

    @app.post("/api/merge")
    async def merge(request: Request):
        body = await request.json()
        return await asyncio.to_thread(tools.merge, _target(jobs, body), body.get("out"))

    @app.post("/api/chat/open")
    async def chat_open(request: Request):
        body = await request.json()
        if body.get("run"):
            _known(jobs, body["run"])
            return await asyncio.to_thread(pool.open, None, runs_dir / body["run"], body["run"])
        return await asyncio.to_thread(pool.open, body.get("base"))

    return Gate(app, pool, api_key)


def _form(body: dict) -> tuple[dict, dict]:
    return body.get("fields") or {}, body.get("typed") or {}


def _check(body: dict):
    try:
        data = schema_mod.to_config(*_form(body))
    except TunesmithError as e:
        return None, {"yaml": "", "error": str(e), "field": None}
    return schema_mod.check(data)


def _known(jobs: Jobs, name: str) -> None:
    if name not in runs_mod.names(jobs):
        raise TunesmithError(f"no run named {name!r} under {jobs.runs_dir}")


def _target(jobs: Jobs, body: dict) -> Path:
    name = body.get("run") or ""
    _known(jobs, name)
    return jobs.runs_dir / name


def _preview(path: str, field_map: dict, n: int) -> dict:
    from ..data.formats import apply_field_map, detect_format
    from ..data.readers import first_readable, read_rows
    rows = read_rows(path, max_rows=n, on_error="skip")
    errors = [r.error for r in rows if r.error]
    try:
        fmt, why = detect_format(apply_field_map(first_readable(rows), field_map)), None
    except ValueError as e:
        fmt, why = None, str(e)
    shown = [{k: (v[:300] + "…" if isinstance(v, str) and len(v) > 300 else v) for k, v in r.data.items()}
             for r in rows if not r.error]
    return {"format": fmt, "format_error": why, "rows": shown, "locs": [r.loc for r in rows if not r.error],
            "errors": errors}


class Gate:
    """ASGI: the API key on /api (but /api/info) and /engines, and /engines/<id>/... to that engine's app."""

    def __init__(self, app, pool: Pool, api_key: str | None):
        self.app, self.pool, self.api_key = app, pool, api_key
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.api_key and (path.startswith("/engines/") or (path.startswith("/api/") and path != "/api/info")):
            given = dict(scope.get("headers", [])).get(b"authorization", b"").decode("latin-1")
            if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].strip().encode(),
                                                                        self.api_key.encode())):
                return await _send(send, 401, "missing or incorrect API key: send 'Authorization: Bearer KEY'")
        if path.startswith("/engines/"):
            key, _, rest = path[len("/engines/"):].partition("/")
            sub = self.pool.apps.get(key)
            if sub is None:
                return await _send(send, 404, f"no engine {key!r} is loaded; open a model in the Chat tab first")
            inner = dict(scope, path="/" + rest, raw_path=("/" + rest).encode())
            return await sub(inner, receive, send)
        return await self.app(scope, receive, send)


async def _send(send, status: int, message: str) -> None:
    payload = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
