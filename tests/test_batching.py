"""The dynamic batcher (app/serving/batcher.py): unit tests on a controllable fake engine, then the real
service on 127.0.0.1 with the real default bundle."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.inference.decoding import DecodingConfig
from app.inference.engine import ImageResult
from app.serving.batcher import ClientGone, DeadlineExceeded, DynamicBatcher, Overloaded, TooLarge
from tests.support.live_server import live_server

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BUNDLE = REPO / "models" / "default"


class FakeEngine:
    """Answers each image with its own first pixel value and config; each call can be held open."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[float, DecodingConfig, bool]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def run(self, arrays, configs, attention=False, labels=0, cancelled=None, stats=None):
        self.entered.set()
        self.gate.wait(10)
        call = [(float(a.flat[0]), c, w) for a, c, w in zip(arrays, configs, attention)]
        self.calls.append(call)
        return [ImageResult([("caption", value, config, want)], []) for value, config, want in call]


def image(value: float) -> np.ndarray:
    return np.full((3, 2, 2), value, dtype=np.float32)


@pytest.fixture
def executor():
    pool = ThreadPoolExecutor(max_workers=1)
    yield pool
    pool.shutdown(wait=True)


def run(coro):
    return asyncio.run(coro)


def test_requests_waiting_together_share_one_engine_call_with_their_own_settings(executor):
    engine = FakeEngine()
    configs = [DecodingConfig(strategy="greedy"), DecodingConfig(beam_size=5, num_captions=2), DecodingConfig()]

    async def main():
        batcher = DynamicBatcher(engine, executor, max_batch_images=32, max_queue_delay_s=0.5)
        batcher.start()
        jobs = [
            batcher.submit([image(1.0)], configs[0]),
            batcher.submit([image(2.0), image(3.0)], configs[1], attention=True),
            batcher.submit([image(4.0)], configs[2]),
        ]
        results = await asyncio.gather(*jobs)
        await batcher.close()
        return results

    results = run(main())
    assert len(engine.calls) == 1 and len(engine.calls[0]) == 4  # one engine call for three requests
    assert [[c[0][1] for c in r.captions] for r in results] == [[1.0], [2.0, 3.0], [4.0]]
    assert [c[0][2] for c in results[1].captions] == [configs[1], configs[1]]
    assert [c[0][3] for c in results[1].captions] == [True, True]
    assert results[0].captions[0][0][3] is False
    assert all(r.batch_images == 4 for r in results)


def test_batches_hold_whole_jobs_up_to_the_limit_in_arrival_order(executor):
    engine = FakeEngine()
    engine.gate.clear()

    async def main():
        batcher = DynamicBatcher(engine, executor, max_batch_images=4, max_queue_delay_s=0.0)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit([image(0.0)], DecodingConfig()))
        while not engine.entered.is_set():  # the first job occupies the engine
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(batcher.submit([image(float(i))] * size, DecodingConfig()))
                for i, size in [(1, 3), (2, 2), (3, 1), (4, 6)]]
        await asyncio.sleep(0.05)
        assert batcher.queued_images == 12
        engine.gate.set()
        await asyncio.gather(first, *rest)
        await batcher.close()

    run(main())
    sizes = [[v for v, _, _ in call] for call in engine.calls]
    # [3 + 1 would be 4 but job order is kept: 3, then 2 + 1, then the 6-image job alone]
    assert sizes == [[0.0], [1.0] * 3, [2.0] * 2 + [3.0], [4.0] * 6]


def test_without_batching_each_request_is_its_own_engine_call(executor):
    engine = FakeEngine()

    async def main():
        batcher = DynamicBatcher(engine, executor, enabled=False, max_queue_delay_s=0.5)
        batcher.start()
        await asyncio.gather(*(batcher.submit([image(float(i))], DecodingConfig()) for i in range(5)))
        await batcher.close()

    run(main())
    assert [len(call) for call in engine.calls] == [1] * 5


def test_a_job_bigger_than_the_whole_queue_is_refused_as_too_large(executor):
    async def main():
        batcher = DynamicBatcher(FakeEngine(), executor, max_queue_images=3)
        batcher.start()
        with pytest.raises(TooLarge):
            await batcher.submit([image(1.0)] * 4, DecodingConfig())
        await batcher.close()

    run(main())


def test_a_full_queue_refuses_at_once_with_retry_after_and_recovers(executor):
    engine = FakeEngine()
    engine.gate.clear()

    async def main():
        batcher = DynamicBatcher(engine, executor, max_batch_images=2, max_queue_delay_s=0.0, max_queue_images=3)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit([image(0.0)], DecodingConfig()))
        while not engine.entered.is_set():
            await asyncio.sleep(0.001)
        queued = asyncio.ensure_future(batcher.submit([image(1.0)] * 3, DecodingConfig()))
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as refused:
            await batcher.submit([image(2.0)], DecodingConfig())
        assert refused.value.retry_after >= 1
        engine.gate.set()
        await asyncio.gather(running, queued)
        after = await batcher.submit([image(3.0)], DecodingConfig())  # recovered
        await batcher.close()
        return after

    assert run(main()).captions[0][0][1] == 3.0


def test_past_the_deadline_a_job_leaves_the_queue_and_is_never_run(executor):
    engine = FakeEngine()
    engine.gate.clear()

    async def main():
        batcher = DynamicBatcher(engine, executor, max_queue_delay_s=0.0)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit([image(0.0)], DecodingConfig()))
        while not engine.entered.is_set():
            await asyncio.sleep(0.001)
        with pytest.raises(DeadlineExceeded):
            await batcher.submit([image(9.0)], DecodingConfig(), deadline=time.perf_counter() + 0.05)
        assert batcher.queued_images == 0
        engine.gate.set()
        await running
        await batcher.close()

    run(main())
    assert all(v != 9.0 for call in engine.calls for v, _, _ in call)


def test_a_client_that_goes_away_frees_its_place(executor):
    engine = FakeEngine()
    engine.gate.clear()

    async def main():
        flag = asyncio.Event()
        batcher = DynamicBatcher(engine, executor, max_queue_delay_s=0.0, max_queue_images=4)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit([image(0.0)], DecodingConfig()))
        while not engine.entered.is_set():
            await asyncio.sleep(0.001)

        async def disconnected():
            return flag.is_set()

        waiting = asyncio.ensure_future(batcher.submit([image(5.0)] * 4, DecodingConfig(), disconnected=disconnected))
        await asyncio.sleep(0.02)
        assert batcher.queued_images == 4
        flag.set()
        with pytest.raises(ClientGone):
            await waiting
        assert batcher.queued_images == 0  # its place is free again
        engine.gate.set()
        await running
        await batcher.close()

    run(main())
    assert all(v != 5.0 for call in engine.calls for v, _, _ in call)


def test_close_lets_queued_jobs_finish_and_refuses_new_ones(executor):
    engine = FakeEngine()
    engine.gate.clear()

    async def main():
        batcher = DynamicBatcher(engine, executor, max_batch_images=1, max_queue_delay_s=0.0)
        batcher.start()
        jobs = [asyncio.ensure_future(batcher.submit([image(float(i))], DecodingConfig())) for i in range(3)]
        while not engine.entered.is_set():
            await asyncio.sleep(0.001)
        closing = asyncio.ensure_future(batcher.close(timeout=10))
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded):
            await batcher.submit([image(7.0)], DecodingConfig())
        engine.gate.set()
        results = await asyncio.gather(*jobs)
        await closing
        return results

    assert [r.captions[0][0][1] for r in run(main())] == [0.0, 1.0, 2.0]


# ---- the real service -------------------------------------------------------------------------


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, size=(96, 128, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


@pytest.mark.service  # starts a subprocess
def test_concurrent_requests_are_batched_and_get_the_captions_they_would_get_alone(tmp_path):
    images = [_jpeg(i) for i in range(8)]
    params = [{"strategy": "greedy"}, {"beam_size": 4, "num_captions": 2}, {"no_repeat_ngram_size": 2}, {}] * 2
    with live_server(DEFAULT_BUNDLE, tmp_path / "server.log", max_queue_delay_ms=300) as server:
        with server.client() as client:
            alone = [client.post("/v1/captions", params=p, files={"image": ("x.jpg", data, "image/jpeg")}).json()
                     for data, p in zip(images, params)]
            before = client.get("/metrics").text

        async def together():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as aclient:
                return await asyncio.gather(*(
                    aclient.post("/v1/captions", params=p, files={"image": ("x.jpg", data, "image/jpeg")})
                    for data, p in zip(images, params)))

        answers = asyncio.run(together())
        with server.client() as client:
            after = client.get("/metrics").text
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    for got, want in zip(answers, alone):
        assert [c["text"] for c in got.json()["captions"]] == [c["text"] for c in want["captions"]]
        assert got.json()["settings"] == want["settings"]
    calls = _metric(after, "captioner_batch_size_count") - _metric(before, "captioner_batch_size_count")
    assert 1 <= calls < len(images)  # eight requests, fewer engine calls


@pytest.mark.service  # starts a subprocess
def test_a_request_bigger_than_the_queue_is_422_and_the_deadline_is_504(tmp_path, tiny_bundle):
    """(503 on a full queue: the unit tests above and tests/test_faults.py.)"""
    data = _jpeg(1)
    with live_server(tiny_bundle, tmp_path / "server.log", max_queue_images=1) as server, server.client() as client:
        files = [("images", ("a.jpg", data, "image/jpeg")), ("images", ("b.jpg", data, "image/jpeg"))]
        refused = client.post("/v1/captions/batch", files=files)
        assert refused.status_code == 422  # it could never fit: retrying would not help
        assert refused.json()["error"]["code"] == "too_many_files"
        assert "queues at most 1" in refused.json()["error"]["message"]
        assert client.post("/v1/captions", files={"image": ("a.jpg", data, "image/jpeg")}).status_code == 200
    with live_server(tiny_bundle, tmp_path / "server2.log", request_timeout_s=0.001) as server, server.client() as client:
        late = client.post("/v1/captions", files={"image": ("a.jpg", data, "image/jpeg")})
        assert late.status_code == 504
        assert late.json()["error"]["code"] == "deadline_exceeded"
        assert client.get("/readyz").status_code == 200
