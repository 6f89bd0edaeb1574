"""OpenAI-shaped errors and the checks in front of every request: the bearer key and the body size.

Every error the server returns has OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, with the status the OpenAI API uses:
400 invalid request (malformed JSON, a bad field, too many tokens), 401 missing or wrong key,
404 unknown model or route, 413 body too large, 429 the queue is full, 500 a failure inside the
server, 503 shutting down, 504 a request that ran past the timeout.
"""
from __future__ import annotations

import hmac
import json

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
         413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error",
         504: "timeout_error"}


#: A body declared up to this many times the limit is read (and dropped) before the 413, so that a client
#: still sending it gets the answer instead of a broken connection; larger ones are cut off at once.
DRAIN_FACTOR = 16


class ApiError(Exception):
    """Raised in a route: becomes an OpenAI-shaped error response."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def error_response(status: int, message: str, code: str | None = None, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=headers)


def install_handlers(app) -> None:
    """Every error path of the FastAPI app answers in OpenAI's shape."""

    @app.exception_handler(ApiError)
    async def _api(request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.code, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"malformed JSON body: {first.get('ctx', {}).get('error', 'cannot parse')}",
                                  "invalid_json")
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        field = ".".join(loc) or None
        msg = first.get("msg", "invalid request").removeprefix("Value error, ")
        more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
        return error_response(400, f"{field}: {msg}{more}" if field else f"{msg}{more}", "invalid_value", field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code)

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")


class Guard:
    """ASGI middleware: the bearer key on /v1 routes and the body-size limit, before any parsing."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key and scope["path"].startswith("/v1"):
            given = headers.get("authorization", "")
            if not given.startswith("Bearer "):
                return await self._send(send, 401, "missing API key: send the header 'Authorization: Bearer KEY'",
                                        "invalid_api_key")
            if not hmac.compare_digest(given[7:].strip().encode(), self.api_key.encode()):
                return await self._send(send, 401, "incorrect API key", "invalid_api_key")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            if int(length) <= DRAIN_FACTOR * self.max_body:   # read it first: a client still sending sees the 413
                await self._drain(receive)
            return await self._send(send, 413, f"request body of {length} bytes exceeds this server's limit of "
                                               f"{self.max_body} bytes", "request_too_large")
        body, more = [], True
        size = 0
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return await self._send(send, 413, f"request body exceeds this server's limit of {self.max_body} "
                                                   "bytes", "request_too_large")
            body.append(chunk)
            more = message.get("more_body", False)
        data = b"".join(body)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()
        return await self.app(scope, replay, send)

    @staticmethod
    async def _drain(receive) -> None:
        more = True
        while more:
            message = await receive()
            more = message["type"] == "http.request" and message.get("more_body", False)

    @staticmethod
    async def _send(send, status: int, message: str, code: str) -> None:
        payload = json.dumps(error_body(status, message, code)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})
