"""A client that hangs up while its request is in the engine stops costing work: its rows leave the
beam search at the next step (app/serving/batcher.py marks the running job cancelled, app/inference/decoding.py drops
its rows, app/inference/engine.py runs the decoder on the others' blocks only).

The engine on the tiny bundle first (the other images' captions are exactly those of a call without
the cancellation, on both step paths), then the real service on 127.0.0.1 with a bundle whose captions
never end before max_length and an engine slowed to 20 ms a step (a sitecustomize in the server
process), so a client can hang up mid-search; the decoder step counter shows the steps saved."""

from __future__ import annotations

import re
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from app.inference.bundle import load_bundle
from app.inference.decoding import DecodingConfig
from app.inference.engine import Engine, EngineStats
from tests.support.live_server import LiveServer, image_bytes

MAX_LENGTH = 64
FULL_STEPS = MAX_LENGTH + 1  # the bundle never ends a caption early: 64 words, then the forced <end>
STEP_DELAY_S = 0.02
QUEUE_DELAY_S = 0.3  # max_queue_delay_ms: the two requests of the shared-call test meet in one engine call
HANG_UP_S = QUEUE_DELAY_S + 0.4  # the client hangs up ~0.4 s into the search

# Runs in the server process (PYTHONPATH): every decoder step of the host path sleeps a little.
SLOW_ENGINE = r'''
import os, time
_delay = float(os.environ.get("TEST_STEP_DELAY_S", "0") or 0)
if _delay:
    import app.inference.engine as _engine

    _make_step = _engine.Engine._make_step

    def _slowed(self, *args, **kwargs):
        step = _make_step(self, *args, **kwargs)

        def slow_step(*step_args):
            time.sleep(_delay)
            return step(*step_args)

        return slow_step

    _engine.Engine._make_step = _slowed
'''


def _images(engine: Engine, count: int, seed: int = 0) -> np.ndarray:
    height, width = engine.bundle.preprocessing.image_size
    return np.random.default_rng(seed).normal(size=(count, 3, height, width)).astype(np.float32)


def _same(a, b) -> bool:
    return ([(c.token_ids, c.score, c.token_log_probs) for c in a.captions]
            == [(c.token_ids, c.score, c.token_log_probs) for c in b.captions])


@pytest.mark.parametrize("io_binding", [False, True], ids=["plain", "bound"])
def test_engine_drops_a_cancelled_image_and_the_others_get_the_same_captions(tiny_bundle, io_binding):
    engine = Engine(load_bundle(tiny_bundle), device="cpu", threads=1, io_binding=io_binding)
    images = _images(engine, 3)
    configs = [DecodingConfig(beam_size=4, num_captions=2), DecodingConfig(beam_size=3),
               DecodingConfig(strategy="greedy", max_length=12)]
    full_stats = EngineStats()
    full = engine.run(images, configs, stats=full_stats)

    asked = 0

    def cancelled():
        nonlocal asked
        asked += 1
        return {1} if asked > 2 else ()  # image 1's client hangs up after two steps

    stats = EngineStats()
    got = engine.run(images, configs, cancelled=cancelled, stats=stats)
    assert got[1].captions == [] and full[1].captions
    assert _same(got[0], full[0]) and _same(got[2], full[2])
    assert stats.search.cancelled_images == {1} and stats.search.dropped_rows == 3
    assert stats.search.rows < full_stats.search.rows
    assert stats.decode_end_ns >= stats.decode_start_ns >= stats.encode_end_ns >= stats.encode_start_ns > 0


def test_engine_stops_when_every_image_is_cancelled(tiny_bundles):
    engine = Engine(load_bundle(tiny_bundles(end_bias=-30.0, max_length=MAX_LENGTH)), device="cpu", threads=1)
    full_stats, stats = EngineStats(), EngineStats()
    config = DecodingConfig(beam_size=3, max_length=MAX_LENGTH)
    engine.run(_images(engine, 2), config, stats=full_stats)
    assert full_stats.steps == FULL_STEPS  # the bundle never ends early
    asked = 0

    def cancelled():
        nonlocal asked
        asked += 1
        return {0, 1} if asked > 5 else ()

    results = engine.run(_images(engine, 2), config, cancelled=cancelled, stats=stats)
    assert [r.captions for r in results] == [[], []]
    assert stats.steps == 5


# ---- the real service ------------------------------------------------------------------------------


def _metric(text: str, name: str, labels: str = "") -> float:
    pattern = re.compile(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", re.M)
    found = pattern.search(text)
    return float(found.group(1)) if found else 0.0


def _counters(server: LiveServer) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {
        "steps": _metric(text, "captioner_decoder_steps_total"),
        "rows": _metric(text, "captioner_decoder_rows_total"),
        "dropped": _metric(text, "captioner_cancelled_rows_total"),
        "cancelled_images": _metric(text, "captioner_cancelled_images_total"),
        "gone_running": _metric(text, "captioner_rejected_requests_total", '{reason="client_gone_running"}'),
        "calls": _metric(text, "captioner_batch_size_count"),
        "images": _metric(text, "captioner_batch_size_sum"),
    }


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}


PARAMS = {"max_length": MAX_LENGTH, "beam_size": 3}


def _hang_up(server: LiveServer, data: bytes, after_s: float) -> None:
    """Send a whole captioning request over a raw socket, wait, and close it without reading the answer."""
    boundary = "cancel-test-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    query = "&".join(f"{k}={v}" for k, v in PARAMS.items())
    head = (f"POST /v1/captions?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode()
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(head + body)
        time.sleep(after_s)


def _settle(server: LiveServer, before: dict[str, float], calls: int, timeout: float = 20.0) -> dict[str, float]:
    """The counters once `calls` more engine calls have finished."""
    give_up = time.monotonic() + timeout
    while True:
        now = _counters(server)
        if now["calls"] - before["calls"] >= calls or time.monotonic() > give_up:
            return _delta(now, before)
        time.sleep(0.05)


@pytest.fixture(scope="module")
def slow_server(tiny_bundles, start_server, tmp_path_factory) -> LiveServer:
    hook = tmp_path_factory.mktemp("slow-engine")
    (hook / "sitecustomize.py").write_text(SLOW_ENGINE, encoding="utf-8")
    bundle = tiny_bundles(end_bias=-30.0, max_length=MAX_LENGTH)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", str(hook))
        mp.setenv("TEST_STEP_DELAY_S", str(STEP_DELAY_S))
        return start_server(bundle, log_name="slow-engine", max_queue_delay_ms=int(QUEUE_DELAY_S * 1000))


def _png(seed: int) -> bytes:
    return image_bytes(np.random.default_rng(seed).integers(0, 255, size=(48, 64, 3), dtype=np.uint8), "PNG")


def test_a_client_that_hangs_up_mid_search_stops_the_decoder(slow_server, record_property):
    before = _counters(slow_server)
    with slow_server.client() as client:  # the same request, waited for: the whole search
        r = client.post("/v1/captions", params=PARAMS, files={"image": ("a.png", _png(1), "image/png")})
    assert r.status_code == 200 and len(r.json()["captions"][0]["tokens"]) == MAX_LENGTH
    full = _settle(slow_server, before, 1)
    assert full["steps"] == FULL_STEPS and full["gone_running"] == 0

    before = _counters(slow_server)
    _hang_up(slow_server, _png(1), after_s=HANG_UP_S)
    cut = _settle(slow_server, before, 1)
    assert cut["gone_running"] == 1 and cut["cancelled_images"] == 1
    assert cut["dropped"] == 3  # its three beams left the search
    assert 1 <= cut["steps"] < FULL_STEPS / 2  # ~0.4 s of 20 ms steps (+ the 50 ms disconnect probe), not 65
    record_property("steps", {"full": full["steps"], "cut": cut["steps"], "saved": full["steps"] - cut["steps"]})
    print(f"\nsteps: full {full['steps']:g}, hung up ~0.4 s into the search {cut['steps']:g}, "
          f"saved {full['steps'] - cut['steps']:g}; rows: full {full['rows']:g}, cut {cut['rows']:g}")
    assert "Traceback" not in slow_server.log() and '"level": "error"' not in slow_server.log()
    assert httpx.get(f"{slow_server.url}/readyz", timeout=5).status_code == 200


def _together(server: LiveServer, first, second_data: bytes) -> httpx.Response:
    """`first(server)` in a thread and the second request at once: both within max_queue_delay_ms, so
    one engine call of two images. Returns the second's answer."""
    with server.client() as client:
        client.get("/readyz")  # connected: the request below leaves at once
        thread = threading.Thread(target=first, args=(server,))
        thread.start()
        answer = client.post("/v1/captions", params={**PARAMS, "num_captions": 2},
                             files={"image": ("b.png", second_data, "image/png")})
        thread.join()
    return answer


def test_the_other_request_of_the_engine_call_gets_the_same_captions(slow_server):
    """The same two requests in one engine call twice: once both wait for their answers, once the first
    hangs up mid-search. The second's answer is the same both times (to the last bit of every score)."""
    other, hanger_data = _png(2), _png(1)

    def wait_for_it(server: LiveServer) -> None:
        with server.client() as client:
            r = client.post("/v1/captions", params=PARAMS, files={"image": ("a.png", hanger_data, "image/png")})
        assert r.status_code == 200

    before = _counters(slow_server)
    control = _together(slow_server, wait_for_it, other)
    both = _settle(slow_server, before, 1)
    assert both["calls"] == 1 and both["images"] == 2 and both["gone_running"] == 0, both

    before = _counters(slow_server)
    answer = _together(slow_server, lambda server: _hang_up(server, hanger_data, HANG_UP_S), other)
    shared = _settle(slow_server, before, 1)
    assert shared["calls"] == 1 and shared["images"] == 2, shared
    assert control.status_code == answer.status_code == 200
    assert answer.json()["captions"] == control.json()["captions"]  # same texts, scores, probabilities
    assert shared["gone_running"] == 1 and shared["dropped"] == 3
    assert shared["steps"] == both["steps"] == FULL_STEPS  # the other request decoded to the end
    assert shared["rows"] < both["rows"]  # the hung-up request's three rows left the decoder's calls
    print(f"\nshared call: rows decoded {both['rows']:g} without the hang-up, {shared['rows']:g} with it")
