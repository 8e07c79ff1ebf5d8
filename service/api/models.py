"""``/v1/models``: the models this server can run, with their cards."""

from __future__ import annotations

import json

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from service.deps import OwnerDep, ServicesDep
from service.schemas import ErrorBody, ModelInfo, ModelList

__all__ = ["router"]

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelList, responses={401: {"model": ErrorBody}},
            summary="Installed models")
async def list_models(services: ServicesDep, owner: OwnerDep) -> ModelList:
    """The bundled default model (when this build has one) and every ``*.onnx`` in the models
    folder, by file stem: pass the name as ``options.model`` when submitting."""
    cards = await run_in_threadpool(services.catalog.cards)
    default = services.catalog.default_name()
    return ModelList(models=[
        ModelInfo(name=name, default=name == default, card=json.loads(card.to_json()))
        for name, card in cards.items()
    ])
