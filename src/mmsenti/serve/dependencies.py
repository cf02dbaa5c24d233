"""What the routes depend on (FastAPI ``Depends``): the service once it is ready, and the API key."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from mmsenti.serve.errors import ServeError
from mmsenti.serve.service import Service


def loaded_service(request: Request) -> Service | None:
    """The app's service, once the model is loaded (None while it starts)."""
    return getattr(request.app.state, "service", None)


def get_service(request: Request) -> Service:
    """The service, ready to answer; a 503 while it starts or stops."""
    service = loaded_service(request)
    if service is None or not service.ready:
        raise ServeError(503, None, "the model is not ready")
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


def require_api_key(request: Request) -> None:
    """Every /v1 route: ``X-API-Key: KEY`` or ``Authorization: Bearer KEY`` when the server has a key."""
    service = loaded_service(request)
    key = service.settings.api_key if service is not None else request.app.state.settings.api_key
    if not key:
        return
    given = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if given is None and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if given is None or not hmac.compare_digest(given.encode(), key.encode()):
        raise ServeError(401, "X-API-Key", "missing or wrong API key" if given is not None else "API key required")
