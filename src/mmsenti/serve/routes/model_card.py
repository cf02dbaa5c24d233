"""``GET /v1/model``: what the served model is and what it accepts."""

from __future__ import annotations

from fastapi import APIRouter

from mmsenti.serve.dependencies import ServiceDep
from mmsenti.serve.schemas import ERROR_RESPONSES, ModelInfo

router = APIRouter(tags=["model"])


@router.get("/model", response_model=ModelInfo, responses=ERROR_RESPONSES,
            summary="task, labels, modalities, backbones, training dataset, the run's metrics and the limits")
async def model_info(service: ServiceDep) -> dict:
    return service.card()
