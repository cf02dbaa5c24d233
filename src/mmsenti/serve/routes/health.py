"""Liveness and readiness (no API key: for load balancers and orchestrators)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from mmsenti.serve.dependencies import loaded_service

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="the process is up")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="the model is loaded and answering")
async def readyz(request: Request):
    service = loaded_service(request)
    if service is None or not service.ready or not service.batcher.running:
        return JSONResponse({"status": "not ready"}, status_code=503)
    return {"status": "ready", "model": service.model_ref()}
