"""HTTP routers, one module per resource, and the dependencies they share.

Everything a route needs (settings, the engine, metrics) lives on `app.state` and is handed in with
`Depends`, so tests can build an app with `create_app(settings)` and nothing is global.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request

from app.errors import APIError
from app.settings import Settings

if TYPE_CHECKING:  # pragma: no cover
    from app.engine import Engine


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> Any:
    return request.app.state.metrics


def get_engine(request: Request) -> "Engine":
    """The loaded, warmed-up engine; 503 `not_ready` before that."""
    state = request.app.state
    engine = getattr(state, "engine", None)
    if engine is None or not getattr(state, "ready", False):
        raise APIError(503, "not_ready", "the model is not loaded and warmed up yet; retry shortly",
                       headers={"Retry-After": "1"})
    return engine


# Annotated dependencies for route signatures.
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Any, Depends(get_metrics)]
EngineDep = Annotated[Any, Depends(get_engine)]
