"""Every route and every dependency of the API is a coroutine (app/api/routes/deps.py).

FastAPI runs a plain `def` endpoint or dependency in a worker thread: a thread hop per dependency per
request, which was most of the front end's cost under load before they were all made `async def`
(docs/performance.md, "The front end"). A new plain-def dependency would bring that back silently.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from fastapi.routing import APIRoute

from app.main import create_app
from app.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def _api_routes(app) -> list[APIRoute]:
    """The app's routes, through the routers it includes (FastAPI keeps an included router whole)."""
    found, todo = [], list(app.routes)
    while todo:
        route = todo.pop()
        if isinstance(route, APIRoute):
            found.append(route)
        todo.extend(getattr(getattr(route, "original_router", None), "routes", []))
    return found


def _calls(dependant):
    yield dependant.call
    for sub in dependant.dependencies:
        yield from _calls(sub)


def test_every_endpoint_and_dependency_runs_on_the_event_loop():
    app = create_app(Settings(bundle=REPO / "models" / "default"))
    routes = _api_routes(app)
    assert len(routes) > 15  # /v1, /v2, health, docs, demo
    sync = sorted({f"{route.path}: {getattr(call, '__qualname__', call)}"
                   for route in routes for call in _calls(route.dependant)
                   if call is not None and not (inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call))})
    assert sync == [], "plain-def endpoints or dependencies (FastAPI runs each in a worker thread): " + "; ".join(sync)


def test_the_captioning_routes_solve_one_dependency_for_their_query():
    """/v1/captions' query (the decoding settings, labels, min_confidence) is one dependency, with the
    model's (`get_served`) under it: FastAPI's dependency solving costs per dependency per request."""
    app = create_app(Settings(bundle=REPO / "models" / "default"))
    route = next(r for r in _api_routes(app) if r.path == "/v1/captions")
    names = [getattr(call, "__name__", "") for call in _calls(route.dependant)]
    assert names == ["create_caption", "options", "get_served"]
    query = {param.name for dependant in route.dependant.dependencies for param in dependant.query_params}
    assert {"beam_size", "guide", "include", "labels", "min_confidence"} <= query
