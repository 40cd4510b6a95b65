"""OpenTelemetry tracing (app/observability/tracing.py): one request makes one trace, parented to the caller's
W3C `traceparent`, with the receive, preprocess, queue, encode, decode and respond spans; spans go
over OTLP/HTTP only when OTEL_EXPORTER_OTLP_ENDPOINT is set, and without it nothing is set up and no
socket is opened."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from app.main import create_app
from app.observability import tracing
from app.settings import Settings
from tests.support.live_server import REPO, image_bytes

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
STAGES = ("receive", "preprocess", "queue", "encode", "decode", "respond")


def _png(seed: int = 0) -> bytes:
    return image_bytes(np.random.default_rng(seed).integers(0, 255, size=(40, 56, 3), dtype=np.uint8), "PNG")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def _traced_client(settings: Settings):
    """The app with these settings, tracing into an in-memory exporter of its own (create_app sets tracing up
    from the environment: installed after it); yields the client and the exporter."""
    app = create_app(settings)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        with TestClient(app) as client:
            yield client, exporter
    finally:
        tracing.install(None)
        provider.shutdown()


@pytest.fixture
def traced(tiny_bundle):
    """The app on the tiny bundle, tracing into an in-memory exporter; the access log's records."""
    records = _Records()
    access = logging.getLogger("captioner.access")
    access.addHandler(records)
    try:
        with _traced_client(Settings(bundle=tiny_bundle, device="cpu", threads=1)) as (client, exporter):
            yield client, exporter, records
    finally:
        access.removeHandler(records)


def _finished(exporter: InMemorySpanExporter, names=STAGES, timeout: float = 5.0):
    give_up = time.monotonic() + timeout
    while True:  # the batcher records its spans just after the answer is set
        spans = exporter.get_finished_spans()
        if {s.name for s in spans} >= set(names) or time.monotonic() > give_up:
            return spans
        time.sleep(0.01)


def test_one_request_makes_one_trace_under_the_callers_span(traced):
    client, exporter, records = traced
    r = client.post("/v1/captions", params={"beam_size": 3, "max_length": 12},
                    files={"image": ("a.png", _png(), "image/png")}, headers={"traceparent": TRACEPARENT})
    assert r.status_code == 200
    spans = _finished(exporter)
    assert {format(s.context.trace_id, "032x") for s in spans} == {TRACE_ID}  # one trace: the caller's
    (server,) = [s for s in spans if s.kind == SpanKind.SERVER]
    assert server.name == "POST /v1/captions"
    assert server.parent is not None and format(server.parent.span_id, "016x") == CALLER_SPAN
    assert server.parent.is_remote
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["http.route"] == "/v1/captions"
    by_name = {s.name: s for s in spans if s.kind != SpanKind.SERVER}
    assert set(by_name) == set(STAGES)
    for child in by_name.values():  # every stage a child of the server span, inside its time
        assert child.parent is not None and child.parent.span_id == server.context.span_id
        assert server.start_time <= child.start_time <= child.end_time <= server.end_time, child.name
    stages = [by_name[name] for name in STAGES]
    for earlier, later in zip(stages, stages[1:]):  # in the order a request flows
        assert earlier.end_time <= later.start_time + 1_000_000, (earlier.name, later.name)  # (1 ms: clocks)
    decode = by_name["decode"]
    assert decode.attributes["captioner.decode.steps"] >= 2
    assert decode.attributes["captioner.decode.rows"] >= decode.attributes["captioner.decode.steps"]
    assert decode.attributes["captioner.batch.images"] == 1 and decode.attributes["captioner.cancelled"] is False
    assert by_name["receive"].attributes["http.request.body.size"] > 0
    # the access log line carries the trace id
    (line,) = [rec for rec in records.records if rec.getMessage() == "request"]
    assert line.fields["trace_id"] == TRACE_ID


def test_without_traceparent_the_request_starts_its_own_trace(traced):
    client, exporter, _ = traced
    r = client.post("/v1/captions/batch", files=[("images", ("a.png", _png(1), "image/png")),
                                                 ("images", ("b.png", _png(2), "image/png"))])
    assert r.status_code == 200
    spans = _finished(exporter)
    (server,) = [s for s in spans if s.kind == SpanKind.SERVER]
    assert server.parent is None and server.name == "POST /v1/captions/batch"
    assert {s.context.trace_id for s in spans} == {server.context.trace_id}
    assert [s.name for s in spans].count("preprocess") == 2  # one per upload
    (decode,) = [s for s in spans if s.name == "decode"]
    assert decode.attributes["captioner.request.images"] == 2


def test_a_caller_that_does_not_sample_gets_no_spans_and_bad_headers_are_ignored(traced):
    client, exporter, _ = traced
    files = {"image": ("a.png", _png(), "image/png")}
    r = client.post("/v1/captions", files=files, headers={"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-00"})
    assert r.status_code == 200
    time.sleep(0.1)
    assert exporter.get_finished_spans() == ()  # parentbased_always_on obeys the caller
    for bad in ("garbage", "00-" + "0" * 32 + "-" + CALLER_SPAN + "-01", "ff-zz-yy-01", "\u00e9" * 60):
        r = client.post("/v1/captions", files=files, headers={"traceparent": bad.encode("utf-8")})
        assert r.status_code == 200, bad
    spans = _finished(exporter)
    servers = [s for s in spans if s.kind == SpanKind.SERVER]
    assert len(servers) == 4 and all(s.parent is None for s in servers)  # a fresh trace each


# ---- configuration from the OTEL_* variables ------------------------------------------------------


def _processors(provider):
    return list(provider._active_span_processor._span_processors)


def test_no_endpoint_means_no_tracing_at_all():
    try:
        for env in ({}, {"OTEL_SERVICE_NAME": "x"}, {"OTEL_TRACES_EXPORTER": "otlp"},
                    {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_SDK_DISABLED": "true"},
                    {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_TRACES_EXPORTER": "none"}):
            assert tracing.configure_from_env(env) is None, env
            assert not tracing.enabled() and tracing.current_context() is None
    finally:
        tracing.configure_from_env({})


def test_an_endpoint_configures_a_batching_otlp_exporter():
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    try:
        provider = tracing.configure_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})
        assert provider is not None and tracing.enabled()
        (processor,) = _processors(provider)
        assert isinstance(processor, BatchSpanProcessor)
        assert isinstance(processor.span_exporter, OTLPSpanExporter)
        assert provider.resource.attributes["service.name"] == "captioner"
    finally:
        tracing.configure_from_env({})  # shuts it down: nothing was recorded, nothing is sent
    assert not tracing.enabled()


def test_otel_service_name_is_respected(monkeypatch):
    monkeypatch.setenv("OTEL_SERVICE_NAME", "captioner-eu")
    try:
        provider = tracing.configure_from_env({"OTEL_TRACES_EXPORTER": "console"})
        assert provider.resource.attributes["service.name"] == "captioner-eu"
    finally:
        tracing.configure_from_env({})


# A fresh interpreter without any OTEL_* variable: the app serves a traced request, the audit hook
# records every outbound connection, and nothing of the SDK or the exporter is even imported.
NO_EXPORTER = r"""
import json, sys
events = []
sys.addaudithook(lambda event, args: events.append(repr(args[1])) if event == "socket.connect" else None)
from fastapi.testclient import TestClient
from app.observability import tracing
from app.main import create_app
from app.settings import Settings
app = create_app(Settings(bundle=sys.argv[1], device="cpu", threads=1))
with TestClient(app) as client:
    r = client.post("/v1/captions", files={"image": ("a.png", open(sys.argv[2], "rb"), "image/png")},
                    headers={"traceparent": sys.argv[3]})
print(json.dumps({"status": r.status_code, "enabled": tracing.enabled(), "connects": events,
                  "sdk": sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter")))}))
"""


@pytest.mark.service  # starts a subprocess
def test_without_an_endpoint_no_exporter_is_set_up_and_no_socket_is_opened(tiny_bundle, tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(_png())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "CAPTIONER_"))}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-c", NO_EXPORTER, str(tiny_bundle), str(image), TRACEPARENT],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"status": 200, "enabled": False, "connects": [], "sdk": []}


# ---- the real service, exporting to a local OTLP/HTTP receiver -------------------------------------


class _Collector(BaseHTTPRequestHandler):
    received: list[tuple[str, bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).received.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_the_service_exports_its_spans_over_otlp_when_the_endpoint_is_set(tiny_bundles, start_server, monkeypatch):
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    collector = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{collector.server_address[1]}")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "captioner-test")
        server = start_server(tiny_bundles(max_length=8), log_name="otlp")
        with server.client() as client:
            r = client.post("/v1/captions", files={"image": ("a.png", _png(), "image/png")},
                            headers={"traceparent": TRACEPARENT})
        assert r.status_code == 200
        names: dict[str, dict] = {}
        give_up = time.monotonic() + 10
        while not set(STAGES) <= set(names) and time.monotonic() < give_up:
            time.sleep(0.1)
            for path, body in list(_Collector.received):
                assert path == "/v1/traces"
                request = ExportTraceServiceRequest.FromString(body)
                for resource_spans in request.resource_spans:
                    service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}["service.name"]
                    for scope_spans in resource_spans.scope_spans:
                        for span in scope_spans.spans:
                            names[span.name] = {"trace": span.trace_id.hex(), "parent": span.parent_span_id.hex(),
                                                "service": service}
        assert set(STAGES) | {"POST /v1/captions"} <= set(names), names
        assert {v["trace"] for v in names.values()} == {TRACE_ID}
        assert names["POST /v1/captions"]["parent"] == CALLER_SPAN
        assert {v["service"] for v in names.values()} == {"captioner-test"}
    finally:
        collector.shutdown()


def _inline_flags(client: TestClient, exporter: InMemorySpanExporter, uploads: list[tuple[str, bytes, str]]) -> list:
    exporter.clear()
    r = client.post("/v1/captions/batch", files=[("images", upload) for upload in uploads])
    assert r.status_code == 200, r.text
    spans = _finished(exporter)
    return [s.attributes["captioner.preprocess.inline"]
            for s in sorted((s for s in spans if s.name == "preprocess"), key=lambda s: s.start_time)]


def test_small_sequential_jpegs_are_decoded_on_the_event_loop_and_the_rest_in_the_pool(traced, tiny_bundle):
    """The preprocess span says where an upload was decoded (app/api/pipeline.py load_bytes): a small
    sequential JPEG on the event loop, a progressive JPEG, a PNG or a JPEG over `inline_decode_pixels` in
    the decoding threads; 0 sends every upload to the threads. Either way the caption is the same."""
    client, exporter, _ = traced
    pixels = np.random.default_rng(3).integers(0, 255, size=(48, 64, 3), dtype=np.uint8)
    baseline = image_bytes(pixels, "JPEG")
    uploads = [("a.jpg", baseline, "image/jpeg"), ("b.png", _png(), "image/png")]
    assert _inline_flags(client, exporter, uploads) == [True, False]
    r = client.post("/v1/captions", files={"image": ("a.jpg", baseline, "image/jpeg")})
    inline_caption = r.json()["captions"]

    with _traced_client(Settings(bundle=tiny_bundle, device="cpu", threads=1, inline_decode_pixels=0)) as (pooled, spans):
        assert _inline_flags(pooled, spans, uploads) == [False, False]
        r = pooled.post("/v1/captions", files={"image": ("a.jpg", baseline, "image/jpeg")})
        assert r.json()["captions"] == inline_caption
    with _traced_client(Settings(bundle=tiny_bundle, device="cpu", threads=1,
                                 inline_decode_pixels=64 * 48 - 1)) as (small, spans):
        assert _inline_flags(small, spans, uploads[:1]) == [False]
