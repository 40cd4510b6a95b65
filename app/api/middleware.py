"""The service's ASGI middleware, outermost first (`create_app` adds them in the reverse order):

RequestContextMiddleware -> CORS -> APIKeyMiddleware (app/api/auth.py) -> OverloadMiddleware ->
BodyLimitMiddleware -> the routes.

Each is plain ASGI: it reads only the request line and headers (never the body, except
BodyLimitMiddleware counting it as it streams), so a refusal costs next to nothing. They reach the
service's state (app/api/state.py's `ServiceState`) through the object `create_app` hands them.

When tracing is on (app/observability/tracing.py: OTEL_* variables), RequestContextMiddleware also opens the
request's SERVER span, parented to the caller's W3C `traceparent`, and times the `receive` (the body
read from the socket) and `respond` (the answer sent) child spans by wrapping `receive` and `send`
(probes and scrapes, UNTRACED_PATHS, make no traces).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from starlette.datastructures import QueryParams
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import BODY_METHODS, REQUEST_ID_HEADER, PayloadTooLarge, TrackedSend, error_json, new_request_id
from app.api.state import ServiceState
from app.api.v2_protocol import body_limit as v2_body_limit
from app.api.v2_protocol import infer_model as v2_infer_model
from app.observability import tracing
from app.observability.logs import access_log, service_log
from app.settings import Settings

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:@+=-]{1,128}$")
# Probes and scrapes make no traces (they would drown the requests' traces, every few seconds).
UNTRACED_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class RequestContextMiddleware:
    """Request id (accepted if safe, else generated), echoed on every response; one JSON access-log
    line and the request metrics per request; unexpected exceptions become a bare 500; the request's
    trace spans when tracing is on."""

    def __init__(self, app: ASGIApp, service: ServiceState, known_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.service = service
        self.metrics = service.metrics
        self.known_paths = known_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._lifespan_send(send))
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        start = time.perf_counter()
        incoming = header(scope, b"x-request-id")
        rid = incoming.strip() if incoming and REQUEST_ID_RE.match(incoming.strip()) else new_request_id()
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        state["start_time"] = start
        status = 500
        started = False
        rid_header = (REQUEST_ID_HEADER.lower().encode(), rid.encode())
        tracer = tracing.tracer()
        end_trace: Callable[[str, str, int], dict[str, str]] | None = None
        if tracer is not None and scope.get("path", "") not in UNTRACED_PATHS:
            receive, send, end_trace = self._trace(tracer, scope, rid, receive, send)

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
            service_log.error("unhandled %s while serving %s %s", type(exc).__name__, scope.get("method"),
                      scope.get("path"), exc_info=exc, extra={"fields": {"request_id": rid}})
            if not started:
                response = error_json(500, "internal_error", "internal server error", rid)
                await response(scope, receive, send_with_id)
        finally:
            duration = time.perf_counter() - start
            route_label = self._route_label(scope)
            method = scope.get("method", "")
            self.metrics.observe_request(route_label, method, status, duration)
            trace_fields = end_trace(method, route_label, status) if end_trace is not None else {}
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
                    **trace_fields,  # trace_id, when tracing
                }},
            )

    @staticmethod
    def _trace(tracer: Any, scope: Scope, rid: str, receive: Receive,
               send: Send) -> tuple[Receive, Send, Callable[[str, str, int], dict[str, str]]]:
        """Open the SERVER span (the caller's `traceparent` its parent), make it current, and wrap
        `receive` and `send` to time the body's arrival and the answer's departure. Returns them and
        `end(method, route, status)`, which closes the spans (named "METHOD route") and gives the
        access log its trace id."""
        parent = tracing.extract(scope.get("headers", ()))
        method = scope.get("method", "")
        server_span = tracer.start_span(
            method or "HTTP", context=parent, kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope.get("path", ""),
                        "captioner.request_id": rid})
        request_context = trace.set_span_in_context(server_span, parent)
        token = otel_context.attach(request_context)
        body_started: int | None = None
        body_bytes = 0
        received = False
        respond_span: Any = None

        async def traced_receive() -> Message:
            nonlocal body_started, body_bytes, received
            if body_started is None:
                body_started = time.time_ns()
            message = await receive()
            if message["type"] == "http.request" and not received:
                body_bytes += len(message.get("body", b""))
                if not message.get("more_body", False):
                    received = True
                    tracing.record_span("receive", request_context, body_started, **{"http.request.body.size": body_bytes})
            return message

        async def traced_send(message: Message) -> None:
            nonlocal respond_span
            if message["type"] == "http.response.start" and respond_span is None:
                respond_span = tracer.start_span("respond", context=request_context,
                                                 attributes={"http.response.status_code": int(message["status"])})
            await send(message)
            if (message["type"] == "http.response.body" and not message.get("more_body", False)
                    and respond_span is not None and respond_span.is_recording()):
                respond_span.end()

        def end(method: str, route: str, status: int) -> dict[str, str]:
            if respond_span is not None and respond_span.is_recording():  # the client left mid-answer
                respond_span.end()
            return RequestContextMiddleware._end_trace(server_span, token, method, route, status)

        return traced_receive, traced_send, end

    @staticmethod
    def _end_trace(server_span: Any, token: Any, method: str, route: str, status: int) -> dict[str, str]:
        if route != "unmatched":
            server_span.update_name(f"{method} {route}")
            server_span.set_attribute("http.route", route)
        server_span.set_attribute("http.response.status_code", status)
        if status >= 500:
            server_span.set_status(trace.Status(trace.StatusCode.ERROR))
        span_context = server_span.get_span_context()
        server_span.end()
        try:
            otel_context.detach(token)
        except Exception:  # the context of a finished request: nothing to restore
            pass
        return {"trace_id": format(span_context.trace_id, "032x")} if span_context.is_valid else {}

    def _route_label(self, scope: Scope) -> str:
        """The route template (bounded label values); 'unmatched' for unknown paths."""
        template = getattr(scope.get("route"), "path", None)
        if template:
            return str(template)
        path = scope.get("path", "")
        return path if path in self.known_paths else "unmatched"  # e.g. a 413 sent before routing

    def _lifespan_send(self, send: Send) -> Send:
        async def lifespan_send(message: Message) -> None:
            # Starlette puts a traceback in the failure message; say what failed instead.
            if message["type"] == "lifespan.startup.failed" and self.service.startup_error:
                message = {**message, "message": self.service.startup_error}
            await send(message)

        return lifespan_send


class OverloadMiddleware:
    """503 + Retry-After for a captioning request while the queue of the model it asks for is full
    (``?model=``, read as the routes read it: app/api/routes/deps.py `get_served`; none: the default
    model), answered before the upload is read (so refusing costs next to nothing). A request for a
    model that is not loaded passes on: its route answers 404 model_not_found (422 for an invalid
    name). The batcher checks again when the job is submitted, with its real size."""

    def __init__(self, app: ASGIApp, service: ServiceState) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and scope.get("method") == "POST" and (
                path.startswith("/v1/captions") or v2_infer_model(path) is not None):
            served = self.service.find_model(requested_model(scope))
            batcher = served.batcher if served is not None else None
            if batcher is not None and batcher.is_full():
                batcher.count_rejection("queue_full")
                rid = scope.get("state", {}).get("request_id") or new_request_id()
                response = error_json(503, "overloaded", "the queue is full; retry later", rid,
                                      headers={"Retry-After": str(batcher.retry_after()), "Connection": "close"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def requested_model(scope: Scope) -> str | None:
    """The request's ``?model=`` as the routes get it (the last one if repeated), None when not given; for
    /v2 infer, the model its path names (app/api/routes/v2.py)."""
    return v2_infer_model(scope.get("path", "")) or QueryParams(scope.get("query_string", b"")).get("model")


class BodyLimitMiddleware:
    """413 for request bodies over the limit: from Content-Length before reading anything, or while
    the body streams in (a chunked upload) as soon as the count passes the limit."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def limit_for(self, path: str) -> int:
        if v2_infer_model(path) is not None:  # up to max_batch_files images, base64 in JSON (app/api/v2_protocol.py)
            return v2_body_limit(self.settings)
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
        if scope["type"] != "http" or scope.get("method") not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope.get("path", ""))
        declared = header(scope, b"content-length")
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

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(limit)
            return message

        tracked = TrackedSend(send)
        try:
            await self.app(scope, limited_receive, tracked)
        except PayloadTooLarge:
            if tracked.started:
                raise
            await self._refuse(scope, receive, send, limit, close=True)
