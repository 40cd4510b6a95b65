"""How a request reaches the model: the dynamic batcher.

Every captioning request (single or batch upload) becomes one job: its preprocessed images, its
decoding settings and whether it wants attention. Jobs wait in one bounded FIFO queue. One worker
task takes them out in batches and runs `Engine.run` (app/inference/engine.py) on the inference thread:

- a batch holds whole jobs, up to `max_batch_images` images (a job bigger than that runs alone);
- when the engine is idle and the queue holds less than a full batch, the worker waits up to
  `max_queue_delay_ms` after the oldest job arrived for more to come (Triton's dynamic batcher);
  while the engine is busy, jobs simply accumulate and the next batch leaves as soon as it is free;
- jobs with different settings share the batch: one encoder call, and one decoder call per step
  for the beams of every job (app/inference/decoding.py decodes each image with its own settings);
- a full queue (`max_queue_images` waiting images) refuses new jobs at once (503 + Retry-After);
  a job past its deadline is dropped from the queue, or its result discarded, and answers 504;
  a job whose client went away leaves the queue and frees its place; if it is already in the
  engine, it is marked cancelled and its rows leave the beam search at the next step (the other
  jobs of the call decode on, with the same captions; app/inference/decoding.py), counted as
  `captioner_rejected_requests_total{reason="client_gone_running"}` and in the decoder counters
  (a running job past its deadline, or whose request task was cancelled, is given up the same way).

With batching off, the worker runs one job per engine call (still queued, bounded and timed).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.inference.decoding import DecodingConfig
from app.inference.engine import Engine, EngineStats
from app.observability import tracing
from app.observability.metrics import Metrics

log = logging.getLogger("captioner.batcher")


class Overloaded(Exception):
    """The queue is full (or the service is shutting down); retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class TooLarge(Exception):
    """The job has more images than the whole queue holds: it could never be accepted."""

    def __init__(self, images: int, limit: int):
        super().__init__(f"{images} images in one request; this service queues at most {limit}")
        self.message = str(self)


class DeadlineExceeded(Exception):
    """The job did not finish before its deadline."""


class ClientGone(Exception):
    """The client disconnected while its job waited; the job was withdrawn."""


@dataclass
class JobResult:
    results: list  # per image: an engine ImageResult (its captions and labels)
    queue_s: float  # waiting for the engine
    inference_s: float  # the engine call this job was part of
    batch_images: int  # images in that engine call

    @property
    def captions(self) -> list:
        """Per image: its captions, best first."""
        return [result.captions for result in self.results]

    @property
    def labels(self) -> list:
        """Per image: its ImageNet labels, best first (empty unless asked for)."""
        return [result.labels for result in self.results]


@dataclass(eq=False)
class _Job:
    arrays: Sequence[np.ndarray]
    config: DecodingConfig
    attention: bool
    labels: int  # ImageNet labels per image (0: none)
    deadline: float  # time.perf_counter() value
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    enqueued_ns: int = field(default_factory=time.time_ns)  # the same instant, for trace spans
    # set when nobody waits for the result any more while the job is in the engine (read by its thread)
    cancelled: threading.Event = field(default_factory=threading.Event)
    running: bool = False
    trace_context: Any = None  # the request's trace context (app/observability/tracing.py), None when not tracing

    @property
    def images(self) -> int:
        return len(self.arrays)


class DynamicBatcher:
    """One engine's queue and the worker that feeds it (see the module docstring). `executor` runs the
    engine calls (the service's one inference thread, shared by every model's batcher). `metrics`:
    where the batches, searches, queue waits and rejections are counted (None: nowhere);
    `queue_changed`, if given, is called whenever the number of queued images changes, instead of
    setting captioner_queue_images to this batcher's count (the model registry sums its batchers')."""

    def __init__(
        self,
        engine: Engine,
        executor: Executor,
        *,
        enabled: bool = True,
        max_batch_images: int = 32,
        max_queue_delay_s: float = 0.005,
        max_queue_images: int = 256,
        metrics: Metrics | None = None,
        queue_changed: Callable[[], None] | None = None,
    ):
        self.engine = engine
        self.executor = executor
        self.enabled = enabled
        self.max_batch_images = max_batch_images
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_images = max_queue_images
        self.metrics = metrics
        self.queue_changed = queue_changed
        self._queue: deque[_Job] = deque()
        self._queued_images = 0
        self._running_images = 0
        self._seconds_per_image = 0.05  # running estimate, for Retry-After
        self._wakeup = asyncio.Event()
        self._closing = False
        self._worker: asyncio.Task | None = None

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="captioner-batcher")

    async def close(self, timeout: float = 60.0) -> None:
        """Refuse new jobs, let queued and running ones finish (up to `timeout`), stop the worker."""
        self._closing = True
        give_up = time.perf_counter() + timeout
        while (self._queue or self._running_images) and time.perf_counter() < give_up:
            await asyncio.sleep(0.01)
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        for job in self._queue:  # only after the timeout
            if not job.future.done():
                job.future.set_exception(Overloaded("the service is shutting down", 1))
        self._queue.clear()

    # ---- state ------------------------------------------------------------------------------

    @property
    def queued_images(self) -> int:
        return self._queued_images

    @property
    def running_images(self) -> int:
        return self._running_images

    def is_full(self) -> bool:
        return self._closing or self._queued_images >= self.max_queue_images

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained (at least 1)."""
        backlog = self._queued_images + self._running_images
        return max(1, math.ceil(backlog * self._seconds_per_image))

    # ---- submitting -------------------------------------------------------------------------

    async def submit(
        self,
        arrays: Sequence[np.ndarray],
        config: DecodingConfig,
        attention: bool = False,
        deadline: float | None = None,
        disconnected: Callable[[], Awaitable[bool]] | None = None,
        labels: int = 0,
    ) -> JobResult:
        """Queue one job and wait for its captions. Raises TooLarge (more images than the queue
        holds), Overloaded (queue full, or shutting down), DeadlineExceeded (`deadline`: a
        time.perf_counter() value), or ClientGone (the `disconnected` probe said so while the job
        waited: it is awaited again every 50 ms until it answers True, and may itself wait until the client
        hangs up, as app/api/pipeline.py's does)."""
        if self._closing:
            raise Overloaded("the service is shutting down", 1)
        images = len(arrays)
        if images > self.max_queue_images:
            raise TooLarge(images, self.max_queue_images)
        if self._queued_images + images > self.max_queue_images:
            self.count_rejection("queue_full")
            raise Overloaded(
                f"the queue is full ({self._queued_images} images waiting, limit {self.max_queue_images}); "
                "retry later", self.retry_after())
        loop = asyncio.get_running_loop()
        job = _Job(arrays, config, attention, labels, deadline if deadline is not None else math.inf,
                   loop.create_future(), trace_context=tracing.current_context())
        self._queue.append(job)
        self._queued_images += images
        self._gauge()
        self._wakeup.set()

        watcher = loop.create_task(self._watch(disconnected)) if disconnected is not None else None
        waiters = {job.future} | ({watcher} if watcher else set())
        remaining = job.deadline - time.perf_counter()
        try:
            done, _ = await asyncio.wait(waiters, timeout=None if math.isinf(remaining) else max(0.0, remaining),
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self._withdraw(job)
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
        if job.future in done:
            return job.future.result()
        was_running = self._withdraw(job)
        if watcher is not None and watcher in done and watcher.result():
            self.count_rejection("client_gone_running" if was_running else "client_gone")
            raise ClientGone()
        self.count_rejection("deadline")
        raise DeadlineExceeded()

    @staticmethod
    async def _watch(disconnected: Callable[[], Awaitable[bool]]) -> bool:
        while True:
            if await disconnected():
                return True
            await asyncio.sleep(0.05)

    def _withdraw(self, job: _Job) -> bool:
        """Take a job out of the queue if it is still there; a running job is marked cancelled (its
        rows leave the search at the next step) and its result dropped. True if it was running."""
        if not job.future.done():
            job.future.cancel()
        if job.running:
            job.cancelled.set()
            return True
        try:
            self._queue.remove(job)
        except ValueError:
            return False
        self._queued_images -= job.images
        self._gauge()
        return False

    # ---- the worker -------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self.enabled and self.max_queue_delay_s > 0:
                # the engine is idle: wait a little for company, unless a full batch is here already
                oldest = self._queue[0].enqueued
                while self._queue and self._queued_images < self.max_batch_images:
                    remaining = oldest + self.max_queue_delay_s - time.perf_counter()
                    if remaining <= 0:
                        break
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
                    except TimeoutError:
                        break
            batch = self._take()
            if not batch:
                continue
            await self._execute(loop, batch)

    def _take(self) -> list[_Job]:
        batch: list[_Job] = []
        images = 0
        now = time.perf_counter()
        while self._queue:
            job = self._queue[0]
            if job.future.done():  # withdrawn or timed out while queued
                self._queue.popleft()
                self._queued_images -= job.images
                continue
            if now >= job.deadline:
                self._queue.popleft()
                self._queued_images -= job.images
                self.count_rejection("deadline")
                job.future.set_exception(DeadlineExceeded())
                continue
            if batch and (not self.enabled or images + job.images > self.max_batch_images):
                break
            self._queue.popleft()
            self._queued_images -= job.images
            batch.append(job)
            images += job.images
            if not self.enabled:
                break
        self._gauge()
        return batch

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: list[_Job]) -> None:
        arrays = [a for job in batch for a in job.arrays]
        configs = [job.config for job in batch for _ in job.arrays]
        attention = [job.attention for job in batch for _ in job.arrays]
        labels = [job.labels for job in batch for _ in job.arrays]
        self._running_images = len(arrays)
        started = time.perf_counter()
        started_ns = time.time_ns()
        spans: list[tuple[_Job, range]] = []
        offset = 0
        for job in batch:
            job.running = True
            spans.append((job, range(offset, offset + job.images)))
            offset += job.images
        stats = EngineStats()

        def cancelled() -> set[int]:
            """The images of the jobs nobody waits for any more (asked by the search at every step)."""
            return {i for job, images in spans if job.cancelled.is_set() for i in images}

        def call():
            return self.engine.run(arrays, configs, attention=attention, labels=labels, cancelled=cancelled,
                                   stats=stats)

        try:
            results = await loop.run_in_executor(self.executor, call)
        except Exception as exc:  # a real engine fault: every job of the batch gets it
            log.error("engine call failed for %d images: %s", len(arrays), type(exc).__name__, exc_info=exc)
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        finally:
            self._running_images = 0
            for job in batch:
                job.running = False
        elapsed = time.perf_counter() - started
        search = stats.search
        if not search.cancelled_images:  # a cut-short call says nothing about the time per image
            self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * (elapsed / len(arrays))
        else:
            log.debug("engine call of %d images: %d cancelled, %d beam rows dropped, %d steps",
                      len(arrays), len(search.cancelled_images), search.dropped_rows, search.steps)
        if self.metrics is not None:
            self.metrics.observe_batch(len(arrays), elapsed)
            self.metrics.observe_search(search.steps, search.rows, search.dropped_rows, len(search.cancelled_images))
        tracing.engine_spans([(job.trace_context, job.enqueued_ns, job.images, job.cancelled.is_set())
                              for job in batch], started_ns, stats, len(arrays))
        offset = 0
        for job in batch:
            part = results[offset : offset + job.images]
            offset += job.images
            if self.metrics is not None:
                self.metrics.queue.observe(started - job.enqueued)
            if not job.future.done():
                job.future.set_result(JobResult(part, started - job.enqueued, elapsed, len(arrays)))

    # ---- metrics ----------------------------------------------------------------------------

    def _gauge(self) -> None:
        if self.queue_changed is not None:
            self.queue_changed()
        elif self.metrics is not None:
            self.metrics.queue_images.set(self._queued_images)

    def count_rejection(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.rejected.labels(reason).inc()
