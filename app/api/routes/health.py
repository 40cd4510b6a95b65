"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from app.api.errors import error_responses
from app.api.routes.deps import DefaultEngineDep, MetricsDep
from app.api.schemas import Health, ModelRef, Readiness

router = APIRouter(tags=["health"])


@router.get(
    "/healthz",
    operation_id="get_health",
    summary="Liveness: the process answers",
    response_model=Health,
    responses=error_responses(),
)
async def get_health() -> Health:
    return Health()


@router.get(
    "/readyz",
    operation_id="get_readiness",
    summary="Readiness: the model is loaded and warmed up",
    response_model=Readiness,
    responses=error_responses(503),
)
async def get_readiness(engine: DefaultEngineDep) -> Readiness:
    bundle = engine.bundle
    return Readiness(model=ModelRef(name=bundle.name, version=bundle.version))


@router.get(
    "/metrics",
    operation_id="get_metrics",
    summary="Prometheus metrics",
    description="Request counts by route and status, latency histograms, queue and inference time, "
    "batch sizes, images captioned and decode errors, in the Prometheus text format.",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format.",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        **error_responses(),
    },
)
async def get_metrics_text(metrics: MetricsDep) -> Response:
    body, content_type = metrics.render()
    return Response(content=body, media_type=content_type)
