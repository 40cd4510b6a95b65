"""The overload check before the body (app/api/middleware.py `OverloadMiddleware`) looks at the queue of
the model the request asks for (``?model=``, else the default), not at the default model's alone.

A real uvicorn (in a thread of this process, so the test can reach the app's `ServiceState`) serves a
repository of two tiny models, each with its own batcher and a queue of one image. The queues are
filled for real: the one inference thread they share is held by a gate, so one request of a model
is in the engine (waiting for the thread) and the next one waits in its queue. Then an upload for
that model is refused 503 `overloaded` from its headers alone (10 MB declared, 64 KB sent), while
the other model's requests pass and are answered once the gate opens; a model that is not loaded
passes on to its route (404 model_not_found).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn

from app.api.state import ServiceState, service_state
from app.main import create_app
from app.settings import Settings
from model_export.tiny_bundle import make_tiny_bundle
from tests.support.live_server import free_port, image_bytes, partial_upload

pytestmark = pytest.mark.service

DEFAULT, OTHER = "tiny", "other"
IMAGE = image_bytes(np.random.default_rng(7).integers(0, 256, (48, 64, 3), dtype=np.uint8), "PNG")


@dataclass
class Served:
    service: ServiceState
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    root: Path = tmp_path_factory.mktemp("repository")
    make_tiny_bundle(root / DEFAULT / "1.0.0", seed=0, name=DEFAULT, version="1.0.0")
    make_tiny_bundle(root / OTHER / "0.1.0", attention=False, seed=5, name=OTHER, version="0.1.0")
    settings = Settings(model_repository=root, default_model=DEFAULT, device="cpu", threads=1,
                        max_queue_images=1, max_queue_delay_ms=0, request_timeout_s=60)
    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the service did not start"
        time.sleep(0.05)
    try:
        yield Served(service_state(app), "127.0.0.1", port)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def caption(served: Served, model: str | None) -> httpx.Response:
    params = {"model": model} if model is not None else {}
    with httpx.Client(base_url=served.url, timeout=60) as client:
        return client.post("/v1/captions", params=params, files={"image": ("x.png", IMAGE, "image/png")})


def refused_from_headers(served: Served, query: str) -> tuple[bytes, dict]:
    """Declare a 10 MB upload, send the headers and 64 KB only: (status line, error body). An answer at all
    shows it came before the body (tests/support/live_server.py partial_upload)."""
    head_text, body = partial_upload(served.host, served.port, f"/v1/captions{query}")
    assert b"connection: close" in head_text.lower(), head_text
    return head_text.split(b"\r\n")[0], json.loads(body)


def wait_for(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@contextmanager
def full_queue(served: Served, model: str | None) -> Iterator[tuple[threading.Event, list[Future]]]:
    """Hold the shared inference thread, then send `model` two requests: the first is taken into the
    engine (it waits for the thread), the second stays queued, so that model's queue (one image) is
    full. Yields the gate (set it to let everything run) and the requests' futures."""
    found = served.service.find_model(model)
    assert found is not None and found.batcher is not None
    batcher = found.batcher
    executor = served.service.inference_executor
    assert executor is not None
    gate = threading.Event()
    held = executor.submit(gate.wait, 60)
    with ThreadPoolExecutor(max_workers=4) as clients:
        futures = [clients.submit(caption, served, model)]
        wait_for(lambda: batcher.running_images == 1, "the first request to enter the engine")
        futures.append(clients.submit(caption, served, model))
        wait_for(batcher.is_full, "the second request to fill the queue")
        try:
            yield gate, futures
        finally:
            gate.set()
            held.result(timeout=60)
    assert not batcher.is_full()
    for future in futures:
        assert future.result(timeout=60).status_code == 200


def test_a_full_queue_refuses_only_its_own_models_uploads_before_the_body(served):
    other = served.service.find_model(OTHER)
    default = served.service.find_model(None)
    assert other is not None and default is not None and other is not default

    # the other model's queue full, the default's free
    with full_queue(served, OTHER) as (gate, more):
        assert not default.batcher.is_full()
        status, body = refused_from_headers(served, f"?model={OTHER}")
        assert status.startswith(b"HTTP/1.1 503"), status
        assert body["error"]["code"] == "overloaded", body
        # name:version and a repeated parameter (the last one counts, as for the routes) are that model too
        status, _ = refused_from_headers(served, f"?model={DEFAULT}&model={OTHER}:0.1.0")
        assert status.startswith(b"HTTP/1.1 503"), status
        # the default model's requests pass the check: they are answered once the engine is free
        with ThreadPoolExecutor(max_workers=2) as clients:
            passed = [clients.submit(caption, served, None)]
            wait_for(lambda: default.batcher.running_images == 1, "the default model's request to enter the engine")
            passed.append(clients.submit(caption, served, f"{DEFAULT}:1.0.0"))
            wait_for(lambda: default.batcher.queued_images == 1, "the default model's second request to be queued")
            gate.set()
            for future in passed:
                answer = future.result(timeout=60)
                assert answer.status_code == 200, answer.text
                assert answer.headers["X-Model-Version"] == f"{DEFAULT}:1.0.0"

    # and the other way round: the default's queue full, the other model's free
    with full_queue(served, None) as (gate, more):
        assert not other.batcher.is_full()
        status, body = refused_from_headers(served, "")
        assert status.startswith(b"HTTP/1.1 503"), status
        assert body["error"]["code"] == "overloaded", body
        status, _ = refused_from_headers(served, f"?model={DEFAULT}")
        assert status.startswith(b"HTTP/1.1 503"), status
        # a model that is not loaded passes on to its route, which says so (not 503)
        missing = caption(served, "nosuchmodel")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
        with ThreadPoolExecutor(max_workers=1) as clients:
            passed_other = clients.submit(caption, served, OTHER)
            wait_for(lambda: other.users == 1, "the other model's request to reach its route")
            gate.set()
            answer = passed_other.result(timeout=60)
            assert answer.status_code == 200, answer.text
            assert answer.headers["X-Model-Version"] == f"{OTHER}:0.1.0"
