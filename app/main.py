"""The HTTP service: `create_app(settings)` builds a FastAPI app around one model bundle.

    uvicorn --factory app.main:create_app      # settings from CAPTIONER_* environment variables
    captioner serve                            # the same, with command-line overrides

Start-up (the lifespan) loads and checks the bundle, builds the onnxruntime engine and warms it up;
only then does uvicorn accept connections and `/readyz` answer 200. A bad bundle stops start-up with
one clear log line and a non-zero exit. No torch anywhere.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.auth import install_auth, security_openapi
from app.errors import (
    REQUEST_ID_HEADER,
    PayloadTooLarge,
    error_json,
    install_error_handlers,
    new_request_id,
)
from app.settings import Settings, SettingsError, load_settings

log = logging.getLogger("captioner.service")
access_log = logging.getLogger("captioner.access")

API_VERSION = "1.0.0"
API_TITLE = "Captioner"
API_DESCRIPTION = """\
Image captioning: a CNN encoder and an LSTM decoder (exported to ONNX, served by onnxruntime).

* `POST /v1/captions` captions one image (multipart field `image`).
* `POST /v1/captions/batch` captions up to `max_batch_files` images (repeated field `images`) in one
  model call; a file that fails gets its own error entry.
* Decoding settings (`strategy`, `beam_size`, `num_captions`, `max_length`, `length_penalty`,
  `no_repeat_ngram_size`) are query parameters.

Every error is `{"error": {"code", "message", "request_id"}}`. Send `X-Request-ID` to choose the
request id (up to 128 of `A-Z a-z 0-9 . _ : - @ + =`); otherwise one is generated. It is echoed on
every response and in the logs.
"""

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:@+=-]{1,128}$")
_BODY_METHODS = {"POST", "PUT", "PATCH"}


# ---- logging --------------------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line; `extra={"fields": {...}}` adds keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(level: str = "info") -> None:
    """JSON lines on stderr for the `captioner.*` loggers (idempotent)."""
    root = logging.getLogger("captioner")
    root.setLevel(level.upper())
    if not any(getattr(h, "_captioner_json", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        handler._captioner_json = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = False


# ---- metrics --------------------------------------------------------------------------------------


class Metrics:
    """The app's Prometheus metrics, in a registry of its own (several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("captioner_http_requests", "HTTP requests by route, method and status.",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("captioner_http_request_duration_seconds", "HTTP request latency by route.",
                                 ["route", "method"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.images = Counter("captioner_images_captioned", "Images captioned.", registry=r)
        self.batch_size = Histogram("captioner_batch_size", "Images per engine call.", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.queue_images = Gauge("captioner_queue_images", "Images waiting for the engine (dynamic batcher queue).",
                                  registry=r)
        self.rejected = Counter("captioner_rejected_requests", "Requests refused or dropped by the batcher, by reason "
                                "(queue_full, deadline, client_gone).", ["reason"], registry=r)
        self.queue = Histogram("captioner_queue_seconds", "Time a request waited in the batcher's queue.",
                               registry=r, buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.inference = Histogram("captioner_inference_seconds", "Engine time per call (encoder + search).",
                                   registry=r, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.image_errors = Counter("captioner_image_errors", "Uploads that could not be used, by error code.",
                                    ["code"], registry=r)
        self.ready = Gauge("captioner_ready", "1 when the model is loaded and warmed up.", registry=r)
        self.model = Info("captioner_model", "The model bundle served and the execution provider.", registry=r)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

    def observe_batch(self, images: int, inference_s: float) -> None:
        self.images.inc(images)
        self.batch_size.observe(images)
        self.inference.observe(inference_s)

    def image_error(self, code: str) -> None:
        self.image_errors.labels(code).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# ---- middleware -----------------------------------------------------------------------------------


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class RequestContextMiddleware:
    """Request id (accepted if safe, else generated), echoed on every response; one JSON access-log
    line and the request metrics per request; unexpected exceptions become a bare 500."""

    def __init__(self, app: ASGIApp, metrics: Metrics, state: Any, known_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.metrics = metrics
        self.state = state
        self.known_paths = known_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._lifespan_send(send))
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        start = time.perf_counter()
        incoming = _header(scope, b"x-request-id")
        rid = incoming.strip() if incoming and _REQUEST_ID_RE.match(incoming.strip()) else new_request_id()
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        state["start_time"] = start
        status = 500
        started = False
        rid_header = (REQUEST_ID_HEADER.lower().encode(), rid.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = int(message["status"])
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"]
                headers.append(rid_header)
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:  # a real server fault: log it here, answer a bare 500
            status = 500
            log.error("unhandled %s while serving %s %s", type(exc).__name__, scope.get("method"),
                      scope.get("path"), exc_info=exc, extra={"fields": {"request_id": rid}})
            if not started:
                response = error_json(500, "internal_error", "internal server error", rid)
                await response(scope, receive, send_with_id)
        finally:
            duration = time.perf_counter() - start
            route_label = self._route_label(scope)
            method = scope.get("method", "")
            self.metrics.observe_request(route_label, method, status, duration)
            access_log.info(
                "request",
                extra={"fields": {
                    "method": method,
                    "path": scope.get("path", ""),
                    "route": route_label,
                    "status": status,
                    "duration_ms": round(duration * 1000.0, 3),
                    "request_id": rid,
                    "client": (scope.get("client") or ("", 0))[0],
                }},
            )

    def _route_label(self, scope: Scope) -> str:
        """The route template (bounded label values); 'unmatched' for unknown paths."""
        route = scope.get("route")
        if getattr(route, "path", None):
            return route.path
        path = scope.get("path", "")
        return path if path in self.known_paths else "unmatched"  # e.g. a 413 sent before routing

    def _lifespan_send(self, send: Send) -> Send:
        async def lifespan_send(message: Message) -> None:
            # Starlette puts a traceback in the failure message; say what failed instead.
            if message["type"] == "lifespan.startup.failed" and getattr(self.state, "startup_error", None):
                message = {**message, "message": self.state.startup_error}
            await send(message)

        return lifespan_send


class OverloadMiddleware:
    """503 + Retry-After for a captioning request while the batcher's queue is full, answered before
    the upload is read (so refusing costs next to nothing). The batcher checks again when the job
    is submitted, with its real size."""

    def __init__(self, app: ASGIApp, state: Any) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        batcher = getattr(self.state, "batcher", None)
        if (scope["type"] == "http" and batcher is not None and scope.get("method") == "POST"
                and scope.get("path", "").startswith("/v1/captions") and batcher.is_full()):
            batcher.count_rejection("queue_full")
            rid = scope.get("state", {}).get("request_id") or new_request_id()
            response = error_json(503, "overloaded", "the queue is full; retry later", rid,
                                  headers={"Retry-After": str(batcher.retry_after()), "Connection": "close"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for request bodies over the limit: from Content-Length before reading anything, or while
    the body streams in (a chunked upload) as soon as the count passes the limit."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def limit_for(self, path: str) -> int:
        if path.rstrip("/").endswith("/captions/batch"):
            return self.settings.body_limit(self.settings.max_batch_files)
        return self.settings.body_limit(1)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, limit: int, close: bool) -> None:
        rid = scope.get("state", {}).get("request_id") or new_request_id()
        headers = {"Connection": "close"} if close else None
        response = error_json(413, "payload_too_large",
                              f"the request body exceeds the limit of {limit} bytes", rid, headers=headers)
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope.get("path", ""))
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                length = -1
            if length > limit:
                # Refuse before reading a byte; close the connection so the client stops sending.
                await self._refuse(scope, receive, send, limit, close=True)
                return

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except PayloadTooLarge:
            if started:
                raise
            await self._refuse(scope, receive, send, limit, close=True)


# ---- OpenAPI --------------------------------------------------------------------------------------

_BODY_SCHEMA_NAMES = {
    "Body_create_caption": "CaptionUpload",
    "Body_create_captions_batch": "BatchUpload",
    "Body_create_attention_png": "AttentionUpload",
}


def _fix_upload_schemas(node: Any) -> Any:
    """FastAPI emits `contentMediaType: application/octet-stream` for UploadFile; generators want
    `format: binary`. Also give the multipart body schemas readable names."""
    if isinstance(node, dict):
        if node.get("type") == "string" and node.get("contentMediaType") == "application/octet-stream":
            node = {k: v for k, v in node.items() if k != "contentMediaType"}
            node["format"] = "binary"
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                prefix, _, name = value.rpartition("/")
                value = f"{prefix}/{_BODY_SCHEMA_NAMES.get(name, name)}"
            out[key] = _fix_upload_schemas(value)
        return out
    if isinstance(node, list):
        return [_fix_upload_schemas(v) for v in node]
    return node


def build_openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
        tags=app.openapi_tags,
    )
    schemas = schema.get("components", {}).get("schemas", {})
    for old, new in _BODY_SCHEMA_NAMES.items():
        if old in schemas:
            body = schemas.pop(old)
            body["title"] = new
            schemas[new] = body
    schema = _fix_upload_schemas(copy.deepcopy(schema))
    settings = getattr(app.state, "settings", None)
    images = schema.get("components", {}).get("schemas", {}).get("BatchUpload", {}).get("properties", {}).get("images")
    if images is not None:  # a batch carries 1..max_batch_files files
        images["minItems"] = 1
        if settings is not None:
            images["maxItems"] = settings.max_batch_files
    if settings is not None and settings.all_api_keys():  # bearer scheme only when keys are configured
        security_openapi(schema, settings.metrics_public)
    # Every answer carries X-Request-ID; say so on every documented response.
    for item in schema.get("paths", {}).values():
        for operation in item.values():
            for response in operation.get("responses", {}).values():
                response.setdefault("headers", {})[REQUEST_ID_HEADER] = {
                    "description": "The request's id: the client's X-Request-ID if it was valid, else a generated one.",
                    "schema": {"type": "string", "maxLength": 128},
                }
    app.openapi_schema = schema
    return schema


# ---- the app ----------------------------------------------------------------------------------------


def _lifespan(settings: Settings):
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
            log.error(message, extra={"fields": {"bundle": str(settings.bundle), "device": settings.device}})
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
        state.ready = True
        metrics.ready.set(1)
        metrics.model.info({"name": bundle.name, "version": bundle.version, "provider": engine.provider,
                            "device": engine.device})
        log.info(
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
        openapi_tags=[
            {"name": "captions", "description": "Caption images."},
            {"name": "model", "description": "The model being served."},
            {"name": "health", "description": "Liveness, readiness and metrics."},
        ],
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.ready = False
    app.state.engine = None
    app.state.startup_error = None

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
            expose_headers=[REQUEST_ID_HEADER],
            allow_credentials=not wildcard,
        )
    known_paths = frozenset(
        route.path for router in (attention.router, captions.router, model.router, health.router, demo.router)
        for route in router.routes
    )
    app.add_middleware(RequestContextMiddleware, metrics=app.state.metrics, state=app.state, known_paths=known_paths)

    app.openapi = lambda: build_openapi(app)  # type: ignore[method-assign]
    return app


# `uvicorn --factory app.main:app` works too.
app = create_app
