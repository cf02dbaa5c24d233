"""Errors as JSON naming the field: ``{"error": {"status": 422, "field": "posts[0].image", "message": "..."}}``.

Bad input is always a 4xx: validation errors, bodies over the limit (checked while the body streams in, by
:class:`BodyLimit`, for every route), unknown routes, and every :class:`~mmsenti.errors.UserError` (a
:class:`~mmsenti.errors.ServeError` with its own status and field; any other, such as a ``DataError``, a 422).
Only a bug in the service itself (or a model call that failed) is a 500; its message gives the request id
(:class:`RequestId`) under which the log has the traceback.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmsenti.errors import ServeError, UserError

log = logging.getLogger(__name__)


def error_body(status: int, field: str | None, message: str) -> dict:
    return {"error": {"status": status, "field": field, "message": message}}


def field_path(loc: Sequence[str | int], prefix: str = "") -> str:
    """``("posts", 1, "text")`` → ``posts[1].text``."""
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def validation_message(err: dict) -> str:
    msg = err.get("msg", "invalid value")
    return "field required" if err.get("type") == "missing" else msg


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError) -> JSONResponse:
        # The one place a user's error becomes an answer: a ServeError says its status; any other is a 422.
        status, field = (exc.status, exc.field) if isinstance(exc, ServeError) else (422, None)
        return JSONResponse(error_body(status, field, str(exc)), status_code=status,
                            headers={"WWW-Authenticate": "ApiKey"} if status == 401 else None)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {}
        loc = [p for p in err.get("loc", ()) if p not in ("body", "query", "header", "path")]
        return JSONResponse(error_body(422, field_path(loc), validation_message(err)), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's headers kept: a 405 carries ``Allow`` (RFC 9110 15.5.6).
        return JSONResponse(error_body(exc.status_code, None, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        rid = request_id(request)
        log.error("internal error on %s %s (request %s)", request.method, request.url.path, rid, exc_info=exc)
        return JSONResponse(error_body(500, None, f"internal error (request {rid}; the server's log has the details)"),
                            status_code=500, headers={REQUEST_ID_HEADER: rid})


REQUEST_ID_HEADER = "X-Request-ID"
_GIVEN_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")  # a proxy's id is kept only if it is safe to log as is


def request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "-")


class RequestId:
    """ASGI middleware: every request gets an id (the client's ``X-Request-ID`` when it is a plain token, else a
    new one), answered in the ``X-Request-ID`` header and named by the log line of a 500."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or ()).get(REQUEST_ID_HEADER.lower().encode(), b"").decode("latin-1")
        rid = given if _GIVEN_ID.fullmatch(given) else uuid.uuid4().hex[:16]
        # scope["state"] is what Request.state reads; the error handlers see the same scope.
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_id)


class BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` is a 413, by its Content-Length or while it streams in."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            status, msg = (413, f"request body over the limit of {self.max_bytes} bytes") if length.isdigit() \
                else (400, "invalid Content-Length header")
            body = json.dumps(error_body(status, "body", msg)).encode()
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise ServeError(413, "body", f"request body over the limit of {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)
