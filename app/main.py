"""The HTTP service: `create_app(settings)` builds a FastAPI app around one model bundle.

    uvicorn --factory app.main:create_app      # settings from CAPTIONER_* environment variables
    captioner serve                            # the same, with command-line overrides

Start-up (the lifespan) loads and checks the bundle, builds the onnxruntime engine and warms it up;
only then does uvicorn accept connections and `/readyz` answer 200. A bad bundle stops start-up with
one clear log line and a non-zero exit. No torch anywhere.

How a request flows: app/api/middleware.py (request id, access log, overload, body limit; app/api/auth.py for
API keys) -> a route in app/api/routes/ -> app/api/pipeline.py (read and decode the upload, submit it) ->
app/serving/batcher.py (dynamic batching) -> app/inference/engine.py (the ONNX graphs) ->
app/inference/decoding.py (the search). What the service holds while it runs (settings, metrics, keys, the
model registry, readiness) is one typed `ServiceState` (app/api/state.py), stored once as
`app.state.service`. The other parts have their own modules: app/observability/ (logs, metrics, tracing),
app/api/openapi.py.

With `captioner serve --workers N` each of the N worker processes builds its own app here, from the
environment; the supervisor's control folder (CAPTIONER_CONTROL_DIR, app/serving/control.py) is how
their model registries agree on the versions served: start-up loads the versions it names, and a task
of the lifespan follows the swaps other workers make (docs/scale.md).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from app.api.auth import EXPOSED_AUTH_HEADERS, admin_keys, install_auth
from app.api.bodies import BodyBudgetMiddleware
from app.api.errors import REQUEST_ID_HEADER, install_error_handlers
from app.api.middleware import BodyLimitMiddleware, OverloadMiddleware, RequestContextMiddleware
from app.api.openapi import API_DESCRIPTION, API_TITLE, API_VERSION, OPENAPI_TAGS, build_openapi
from app.api.state import ServiceState
from app.api.v2_protocol import V2ErrorMiddleware
from app.observability import tracing
from app.observability.logs import configure_logging, service_log
from app.observability.metrics import Metrics
from app.observability.threads import INFERENCE_THREAD, PREPROCESS_THREAD, os_thread_namer
from app.settings import CONTROL_DIR_ENV, Settings, SettingsError, load_settings


def _lifespan(service: ServiceState) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from app.serving.registry import BundleRefused, ModelRegistry, ServedModel

        settings, metrics = service.settings, service.metrics
        started = time.perf_counter()
        inference = ThreadPoolExecutor(max_workers=1, thread_name_prefix="captioner-inference",
                                       initializer=os_thread_namer(INFERENCE_THREAD))
        service.inference_executor = inference

        def default_changed(served: ServedModel) -> None:  # the default model's info in /metrics
            metrics.set_model(served.name, served.version, served.engine.provider, served.engine.device)

        registry = ModelRegistry(settings, metrics, inference, on_default=default_changed)
        control = None
        desired = None
        if service.control_dir is not None:  # one of several workers (app/serving/control.py)
            from app.serving.control import WorkerControl

            control = WorkerControl(service.control_dir, registry)
            desired = control.snapshot()  # the versions the other workers serve
        try:
            # CAPTIONER_BUNDLE, or each repository name's newest version (app/serving/registry.py)
            await registry.start(desired)
        except BundleRefused as exc:
            kind = "inference engine" if exc.check in ("engine", "warmup") else "model bundle"
            message = f"cannot start: {kind} error: {exc.message}"
            service.startup_error = message
            where = str(settings.model_repository or settings.bundle)
            service_log.error(message, extra={"fields": {"bundle": where, "device": settings.device}})
            await registry.close(timeout=1.0)
            inference.shutdown()
            raise RuntimeError(message) from None
        service.models = registry
        default = registry.resolve(None)
        bundle, engine = default.bundle, default.engine
        service.preprocess_executor = ThreadPoolExecutor(max_workers=settings.preprocess_workers(),
                                                         thread_name_prefix="captioner-preprocess",
                                                         initializer=os_thread_namer(PREPROCESS_THREAD))
        keys = service.api_keys
        if keys is not None:  # re-read the API keys file when it changes (app/api/auth.py)
            keys.start()
        if control is not None:  # follow the swaps the other workers make
            await control.start()
            service.control = control
        service.ready = True
        metrics.ready.set(1)
        service_log.info(
            "ready",
            extra={"fields": {"model": bundle.name, "version": bundle.version, "provider": engine.provider,
                              "device": engine.device, "bundle": str(settings.model_repository or settings.bundle),
                              "models": registry.loaded(),
                              "startup_ms": round((time.perf_counter() - started) * 1000.0, 1)}},
        )
        try:
            yield
        finally:
            service.ready = False
            metrics.ready.set(0)
            if keys is not None:
                await keys.stop()
            if control is not None:
                await control.stop()
            # uvicorn has finished the in-flight requests; this is a backstop
            await registry.close(timeout=settings.request_timeout_s)
            tracing.shutdown()  # flush the spans still buffered (only when exporting)
            for executor in (service.inference_executor, service.preprocess_executor):
                if executor is not None:
                    await asyncio.get_running_loop().run_in_executor(None, executor.shutdown)

    return lifespan


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service. Without `settings`, they are read from the environment; invalid settings
    print a clear message and exit with status 2 (this is what `uvicorn --factory` calls)."""
    if settings is None:
        try:
            settings = load_settings()
        except SettingsError as exc:
            print(f"captioner: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    configure_logging(settings.log_level, pid=settings.workers > 1)
    tracing.configure_from_env()  # OTEL_* (app/observability/tracing.py): off, at no cost, unless an exporter is asked for

    from PIL import Image

    # Pillow's own decompression-bomb guard must not be stricter than ours.
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < settings.max_image_pixels:
        Image.MAX_IMAGE_PIXELS = settings.max_image_pixels

    # the one typed state (app/api/state.py): read through service_state(app), never app.state's attributes
    service = ServiceState(settings, Metrics(), admin_keys=admin_keys(settings))
    control_dir = os.environ.get(CONTROL_DIR_ENV)  # set by the supervisor of several workers
    service.control_dir = Path(control_dir) if control_dir else None
    app = FastAPI(
        title=API_TITLE,
        version=API_VERSION,
        description=API_DESCRIPTION,
        lifespan=_lifespan(service),
        docs_url=None, redoc_url=None,  # served by app/api/routes/docs.py, from local files (no CDN)
        openapi_tags=OPENAPI_TAGS,
    )
    app.state.service = service

    install_error_handlers(app)

    from app.api.routes import attention, captions, demo, docs, health, models, v2

    app.include_router(attention.router)  # before captions: /v1/captions/attention.png stays its own route
    app.include_router(captions.router)
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(demo.router)
    app.include_router(docs.router)  # /docs, /redoc and their assets
    app.include_router(v2.router)  # the Open Inference Protocol (app/api/routes/v2.py)

    # Added innermost first: RequestContext -> V2Error -> CORS -> APIKey -> Overload -> BodyLimit -> BodyBudget -> routes.
    app.add_middleware(BodyBudgetMiddleware, service=service)  # the bytes of bodies in flight (app/api/bodies.py)
    app.add_middleware(BodyLimitMiddleware, settings=settings)
    app.add_middleware(OverloadMiddleware, service=service)
    service.api_keys = install_auth(app, settings, service.metrics)  # API keys, when configured: before the body is read
    if settings.cors_origins:
        wildcard = "*" in settings.cors_origins
        app.add_middleware(
            CORSMiddleware,
            allow_origins=["*"] if wildcard else settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=[REQUEST_ID_HEADER, *EXPOSED_AUTH_HEADERS],
            allow_credentials=not wildcard,
        )
    known_paths = frozenset(
        str(getattr(route, "path", "")) for router in (attention.router, captions.router, models.router, health.router,
                                                       demo.router, v2.router, docs.router)
        for route in router.routes
    )
    app.add_middleware(V2ErrorMiddleware)  # under /v2: the protocol's error shape, whoever answered
    app.add_middleware(RequestContextMiddleware, service=service, known_paths=known_paths)

    app.openapi = lambda: build_openapi(app)  # type: ignore[method-assign]
    return app


# `uvicorn --factory app.main:app` works too.
app = create_app
