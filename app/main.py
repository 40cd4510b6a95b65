"""The HTTP service: `create_app(settings)` builds a FastAPI app around one model bundle.

    uvicorn --factory app.main:create_app      # settings from CAPTIONER_* environment variables
    captioner serve                            # the same, with command-line overrides

Start-up (the lifespan) loads and checks the bundle, builds the onnxruntime engine and warms it up;
only then does uvicorn accept connections and `/readyz` answer 200. A bad bundle stops start-up with
one clear log line and a non-zero exit. No torch anywhere.

How a request flows: app/middleware.py (request id, access log, overload, body limit; app/auth.py for
API keys) -> a route in app/routes/ -> app/pipeline.py (read and decode the upload, submit it) ->
app/batcher.py (dynamic batching) -> app/engine.py (the ONNX graphs) -> app/decoding.py (the search).
The other parts have their own modules: app/logs.py, app/metrics.py, app/openapi.py.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.concurrency import run_in_threadpool

from app.auth import EXPOSED_AUTH_HEADERS, install_auth
from app.errors import REQUEST_ID_HEADER, install_error_handlers
from app.logs import configure_logging, service_log
from app.metrics import Metrics
from app.middleware import BodyLimitMiddleware, OverloadMiddleware, RequestContextMiddleware
from app.openapi import API_DESCRIPTION, API_TITLE, API_VERSION, OPENAPI_TAGS, build_openapi
from app.settings import Settings, SettingsError, load_settings


def _lifespan(settings: Settings) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from app.batcher import DynamicBatcher
        from app.bundle import BundleError, load_bundle
        from app.engine import Engine, EngineError

        state = app.state
        metrics: Metrics = state.metrics
        started = time.perf_counter()
        try:
            bundle = await run_in_threadpool(load_bundle, settings.bundle)
            engine = await run_in_threadpool(Engine, bundle, settings.device, settings.threads)
            await run_in_threadpool(engine.warmup)
        except (BundleError, EngineError) as exc:
            kind = "model bundle" if isinstance(exc, BundleError) else "inference engine"
            message = f"cannot start: {kind} error: {exc}"
            state.startup_error = message
            service_log.error(message, extra={"fields": {"bundle": str(settings.bundle), "device": settings.device}})
            raise RuntimeError(message) from None
        state.bundle = bundle
        state.engine = engine
        state.inference_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="captioner-inference")
        state.preprocess_executor = ThreadPoolExecutor(max_workers=settings.preprocess_workers(),
                                                       thread_name_prefix="captioner-preprocess")
        state.batcher = DynamicBatcher(
            engine, state.inference_executor, enabled=settings.batching, max_batch_images=settings.max_batch_images,
            max_queue_delay_s=settings.max_queue_delay_ms / 1000.0, max_queue_images=settings.max_queue_images,
            metrics=metrics,
        )
        state.batcher.start()
        keys = getattr(state, "api_keys", None)
        if keys is not None:  # re-read the API keys file when it changes (app/auth.py)
            keys.start()
        state.ready = True
        metrics.ready.set(1)
        metrics.model.info({"name": bundle.name, "version": bundle.version, "provider": engine.provider,
                            "device": engine.device})
        service_log.info(
            "ready",
            extra={"fields": {"model": bundle.name, "version": bundle.version, "provider": engine.provider,
                              "device": engine.device, "bundle": str(settings.bundle),
                              "startup_ms": round((time.perf_counter() - started) * 1000.0, 1)}},
        )
        try:
            yield
        finally:
            state.ready = False
            metrics.ready.set(0)
            if keys is not None:
                await keys.stop()
            batcher = getattr(state, "batcher", None)
            if batcher is not None:  # uvicorn has finished the in-flight requests; this is a backstop
                await batcher.close(timeout=settings.request_timeout_s)
            for name in ("inference_executor", "preprocess_executor"):
                executor = getattr(state, name, None)
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
    configure_logging(settings.log_level)

    from PIL import Image

    # Pillow's own decompression-bomb guard must not be stricter than ours.
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < settings.max_image_pixels:
        Image.MAX_IMAGE_PIXELS = settings.max_image_pixels

    app = FastAPI(
        title=API_TITLE,
        version=API_VERSION,
        description=API_DESCRIPTION,
        lifespan=_lifespan(settings),
        openapi_tags=OPENAPI_TAGS,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.ready = False
    app.state.engine = None
    app.state.startup_error = None
    app.state.api_keys = None  # app/auth.py's KeyStore when API keys are configured

    install_error_handlers(app)

    from app.routes import attention, captions, demo, health, model

    app.include_router(attention.router)  # before captions: /v1/captions/attention.png stays its own route
    app.include_router(captions.router)
    app.include_router(model.router)
    app.include_router(health.router)
    app.include_router(demo.router)

    # Added innermost first: RequestContext -> CORS -> APIKey -> Overload -> BodyLimit -> routes.
    app.add_middleware(BodyLimitMiddleware, settings=settings)
    app.add_middleware(OverloadMiddleware, state=app.state)
    install_auth(app, settings)  # API keys, when configured: before the body is read
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
        str(getattr(route, "path", "")) for router in (attention.router, captions.router, model.router, health.router,
                                                       demo.router)
        for route in router.routes
    )
    app.add_middleware(RequestContextMiddleware, metrics=app.state.metrics, state=app.state, known_paths=known_paths)

    app.openapi = lambda: build_openapi(app)  # type: ignore[method-assign]
    return app


# `uvicorn --factory app.main:app` works too.
app = create_app
