"""OpenTelemetry tracing: one trace per request, following the caller's W3C `traceparent`.

Configured from the OpenTelemetry SDK's own environment variables when the app is created
(`configure_from_env`), never from CAPTIONER_* settings:

- `OTEL_SDK_DISABLED=true`, or `OTEL_TRACES_EXPORTER=none`: no tracing at all;
- `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set, and
  `OTEL_TRACES_EXPORTER` unset or `otlp`: spans go over OTLP/HTTP (protobuf) through a
  BatchSpanProcessor (`OTEL_BSP_*`); the exporter reads its own `OTEL_EXPORTER_OTLP_*` variables
  (headers, timeout, compression, certificates). `OTEL_TRACES_EXPORTER=console` prints them instead;
- neither: no provider, no exporter, no processor. Every helper here returns at its first line
  (`_tracer is None`), the middleware does not even parse `traceparent`, and nothing ever opens a
  socket. Tracing costs nothing unless someone asks for it.

`OTEL_SERVICE_NAME` (default "captioner"), `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` (default
parentbased_always_on: a caller's "not sampled" is obeyed) and `OTEL_BSP_*` are read by the SDK.
The tracer provider is this module's own (not the process-wide global one), so several apps in one
process (the tests) and a test's in-memory exporter (`install`) do not fight over it.

The spans of one request, all in the caller's trace when it sent a valid `traceparent`:

    POST /v1/captions (SERVER; parent: the caller's span)   app/api/middleware.py
      receive      reading the request body from the socket  (app/api/middleware.py, wrapping `receive`)
      preprocess   decoding and resizing one upload           (app/api/pipeline.py; one per image)
      queue        waiting in the dynamic batcher's queue     (app/serving/batcher.py)
      encode       the encoder graph                          (app/inference/engine.py's times)
      decode       the beam search: captioner.decode.steps, captioner.decode.rows, batch sizes
      respond      sending the answer                         (app/api/middleware.py, wrapping `send`)

One engine call serves several requests at once. Each request gets its own `queue`, `encode` and
`decode` child spans, created after the call with the measured start and end times (so the spans of
requests batched together share their encode/decode times, and carry `captioner.batch.images` and
`captioner.batch.requests`) rather than one shared engine span linked from every request: a trace
then reads on its own, end to end, in any backend (links are shown poorly by most), each request's
`decode` says how its own search went (`captioner.cancelled` when its client hung up mid-run), and
the engine thread never touches the tracing API while it runs.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger("captioner.service")

TRACER_NAME = "captioner"
DEFAULT_SERVICE_NAME = "captioner"
_PROPAGATOR = TraceContextTextMapPropagator()

_tracer: trace.Tracer | None = None  # None: tracing is off
_provider: Any = None  # the provider configure_from_env made (shut down with the app), or None


# ---- configuration --------------------------------------------------------------------------------

def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def exporter_names(env: Mapping[str, str]) -> list[str]:
    """The span exporters the environment asks for (OTEL_TRACES_EXPORTER, otlp by default; an OTLP
    exporter only when an endpoint is set); empty when tracing is off."""
    if _flag(env.get("OTEL_SDK_DISABLED")):
        return []
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if n.strip()]
    if "none" in names:
        return []
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    chosen = []
    for name in names:
        if name == "otlp" and endpoint:
            chosen.append("otlp")
        elif name == "console":
            chosen.append("console")
        elif name != "otlp":
            log.warning("OTEL_TRACES_EXPORTER=%s is not supported here (otlp, console or none); ignored", name)
    return chosen


def configure_from_env(env: Mapping[str, str] | None = None) -> Any:
    """Set up tracing as the OTEL_* variables say (see the module docstring); returns the SDK's
    TracerProvider, or None when tracing is off (then nothing of the SDK is even imported)."""
    env = os.environ if env is None else env
    shutdown()
    names = exporter_names(env)
    if not names:
        install(None)
        return None
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    resource = Resource.create()  # OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME
    if str(resource.attributes.get(SERVICE_NAME, "unknown_service")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource)  # OTEL_TRACES_SAMPLER
    for name in names:
        exporter: SpanExporter
        if name == "otlp":
            protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            if protocol and protocol != "http/protobuf":
                log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s: this service exports over http/protobuf only", protocol)
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()  # reads OTEL_EXPORTER_OTLP_* itself
        else:
            exporter = ConsoleSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))  # OTEL_BSP_*
    install(provider)
    global _provider
    _provider = provider
    return provider


def install(provider: Any) -> None:
    """Trace with this TracerProvider (None: tracing off). The tests install one with an in-memory exporter."""
    global _tracer
    _tracer = provider.get_tracer(TRACER_NAME) if provider is not None else None


def shutdown() -> None:
    """Flush and stop the provider configure_from_env made (a provider `install`ed by hand is the caller's)."""
    global _provider, _tracer
    if _provider is not None:
        provider, _provider, _tracer = _provider, None, None
        try:
            provider.shutdown()
        except Exception as exc:  # an unreachable collector must never stop the service
            log.warning("tracing: shutting the exporter down failed: %s", type(exc).__name__)


def enabled() -> bool:
    return _tracer is not None


def tracer() -> trace.Tracer | None:
    return _tracer


# ---- the request's spans ----------------------------------------------------------------------------

def extract(headers: Iterable[tuple[bytes, bytes]]) -> otel_context.Context:
    """The caller's trace context from a W3C `traceparent` (and `tracestate`) header, if valid."""
    carrier: dict[str, str] = {}
    for key, value in headers:
        name = key.decode("latin-1").lower()
        if name in ("traceparent", "tracestate"):
            carrier[name] = value.decode("latin-1")
    return _PROPAGATOR.extract(carrier) if carrier else otel_context.Context()


def current_context() -> otel_context.Context | None:
    """The running request's trace context, to parent spans made later elsewhere (None: not tracing)."""
    return otel_context.get_current() if _tracer is not None else None


def trace_id() -> str | None:
    """The current trace id (32 hex digits) for log lines, or None."""
    if _tracer is None:
        return None
    span_context = trace.get_current_span().get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else None


@contextmanager
def span(name: str, **attributes: Any) -> Iterator[Any]:
    """A child span of the current one around a block (nothing when tracing is off)."""
    if _tracer is None:
        yield None
        return
    with _tracer.start_as_current_span(name, attributes=attributes or None) as current:
        yield current


def record_span(name: str, parent: otel_context.Context | None, start_ns: int, end_ns: int | None = None,
                **attributes: Any) -> None:
    """A finished child span of `parent` with measured times (time.time_ns())."""
    if _tracer is None or parent is None:
        return
    child = _tracer.start_span(name, context=parent, start_time=start_ns, attributes=attributes or None)
    child.end(end_time=end_ns if end_ns is not None else time.time_ns())


def engine_spans(jobs: Iterable[tuple[Any, int, int, bool]], started_ns: int, stats: Any, batch_images: int) -> None:
    """After one engine call: each job's `queue`, `encode` and `decode` spans, with the measured times.
    `jobs`: (trace context, enqueued at, images, cancelled) per job; `stats`: the call's EngineStats."""
    if _tracer is None:
        return
    jobs = list(jobs)
    search = stats.search
    for parent, enqueued_ns, images, cancelled in jobs:
        if parent is None:
            continue
        common = {"captioner.batch.images": batch_images, "captioner.batch.requests": len(jobs),
                  "captioner.request.images": images}
        record_span("queue", parent, enqueued_ns, started_ns, **common)
        if stats.encode_start_ns:
            record_span("encode", parent, stats.encode_start_ns, stats.encode_end_ns, **common)
        if stats.decode_start_ns:
            record_span("decode", parent, stats.decode_start_ns, stats.decode_end_ns, **common,
                        **{"captioner.decode.steps": search.steps, "captioner.decode.rows": search.rows,
                           "captioner.decode.dropped_rows": search.dropped_rows, "captioner.cancelled": cancelled})
