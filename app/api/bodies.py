"""Request bodies in flight: how many bytes they may hold together, how long they may take to arrive,
and giving the memory back.

`BodyBudgetMiddleware` (inside BodyLimitMiddleware, app/api/middleware.py, so a body over the per-request
limit is a 413 first) reserves each request's body in one `BodyBudget` (settings.inflight_body_limit()):
a body with Content-Length reserves it all before a byte is read; a chunked one reserves as it streams.
A request that would pass the bound gets 503 `overloaded` with `Retry-After` and `Connection: close`
(before its body is read when its length is declared; as soon as a chunked body passes the bound
otherwise). The reservation is held until the request is answered (its parts and decoded images live
that long) and then released. `/metrics`: `captioner_inflight_body_bytes`,
`captioner_refused_bodies_total{reason="inflight_full"}`.

The same middleware gives each body a deadline, `body_timeout_s` from the request's arrival: while the
body is incomplete, each read of it waits at most until then; past it the request gets 408
`request_timeout` with `Connection: close` (uvicorn then closes the connection), counted in
`captioner_refused_bodies_total{reason="body_timeout"}`. Reads after the body is complete (a route waiting
for the client to hang up) are not limited.

A multipart/form-data body that ends without its closing boundary (`--<boundary>--`: cut short) is a 400
`bad_request` when its last byte arrives, instead of a parse that silently drops the unfinished part.

CPython's allocator and glibc's malloc keep freed memory for reuse; after large bodies the process would
stay at its peak. When the bytes in flight drop to zero after at least TRIM_AFTER_BYTES were held,
`malloc_trim(0)` (glibc only, through ctypes) hands the free heap pages back to the system
(bench/memory_attack.py measures it: docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import ctypes
import platform
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import BODY_METHODS, BodyRefused, TrackedSend, error_json, new_request_id
from app.api.state import ServiceState
from app.observability.metrics import Metrics

TRIM_AFTER_BYTES = 16 << 20  # give memory back once this much body was held since the last trim
RETRY_AFTER_S = 1


def _malloc_trim() -> Callable[[], None] | None:
    """glibc's malloc_trim(0), or None elsewhere (looked up in the process's own symbols: no ldconfig)."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int

    def release() -> None:
        trim(0)

    return release


release_free_memory = _malloc_trim()


class BodyBudget:
    """The bytes of request bodies in flight, at most `limit` (one event loop: no lock needed)."""

    def __init__(self, limit: int, metrics: Metrics | None = None) -> None:
        self.limit = limit
        self.held = 0
        self.metrics = metrics
        self._since_trim = 0

    def reserve(self, size: int) -> bool:
        if size <= 0:
            return True
        if self.held + size > self.limit:
            return False
        self.held += size
        self._since_trim += size
        self._report()
        return True

    def release(self, size: int) -> None:
        self.held = max(0, self.held - size)
        self._report()
        if self.held == 0 and self._since_trim >= TRIM_AFTER_BYTES and release_free_memory is not None:
            self._since_trim = 0
            release_free_memory()

    def _report(self) -> None:
        if self.metrics is not None:
            self.metrics.inflight_body_bytes.set(self.held)

    def refusal(self) -> BodyRefused:
        if self.metrics is not None:
            self.metrics.refused_bodies.labels("inflight_full").inc()
        return BodyRefused(503, "overloaded", f"the request bodies in flight hold {self.held} of the "
                           f"{self.limit} bytes allowed (max_inflight_body_bytes); retry later",
                           {"Retry-After": str(RETRY_AFTER_S)})


class BodyBudgetMiddleware:
    """Reserve each request's body in the service's BodyBudget; 503 `overloaded` past it (module docstring)."""

    def __init__(self, app: ASGIApp, service: ServiceState) -> None:
        self.app = app
        self.budget = BodyBudget(service.settings.inflight_body_limit(), service.metrics)
        self.body_timeout_s = service.settings.body_timeout_s
        self.metrics = service.metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        budget = self.budget
        deadline = scope.get("state", {}).get("start_time") or time.perf_counter()
        deadline += self.body_timeout_s
        complete = False
        reserved = 0
        declared = _content_length(scope)
        if declared is not None:
            if not budget.reserve(declared):
                await _answer(scope, receive, send, budget.refusal())
                return
            reserved = declared
        received = 0
        closing = _closing_delimiter(scope)  # None: not multipart, or already seen
        tail = b""

        async def counted_receive() -> Message:
            nonlocal received, reserved, complete, closing, tail
            if complete:
                return await receive()
            try:
                async with asyncio.timeout(deadline - time.perf_counter()):
                    message = await receive()
            except TimeoutError:
                self.metrics.refused_bodies.labels("body_timeout").inc()
                raise BodyRefused(408, "request_timeout", f"the request body did not arrive within body_timeout_s "
                                  f"({self.body_timeout_s:g} s); got {received} bytes") from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                complete = True
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                received += len(chunk)
                if closing is not None:
                    window = tail + chunk
                    if closing in window:
                        closing = None
                    else:
                        tail = window[-(len(closing) - 1):]
                        if complete:
                            raise BodyRefused(400, "bad_request", "the multipart body ends before its closing boundary "
                                              f"({closing.decode('latin-1')}): it was cut short", close=False)
                if received > reserved:  # chunked (or past its declared length): reserve as it comes
                    if not budget.reserve(received - reserved):
                        raise budget.refusal()
                    reserved = received
            return message

        tracked = TrackedSend(send)
        try:
            await self.app(scope, counted_receive, tracked)
        except BodyRefused as exc:
            if tracked.started:
                raise
            await _answer(scope, receive, send, exc)
        finally:
            budget.release(reserved)


def _closing_delimiter(scope: Scope) -> bytes | None:
    """`--<boundary>--` of a multipart/form-data request, else None."""
    for key, value in scope.get("headers", ()):
        if key.lower() == b"content-type":
            kind, _, params = value.partition(b";")
            if kind.strip().lower() != b"multipart/form-data":
                return None
            for param in params.split(b";"):
                name, _, boundary = param.strip().partition(b"=")
                if name.strip().lower() == b"boundary" and boundary.strip(b' "'):
                    return b"--" + boundary.strip(b' "') + b"--"
            return None
    return None


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == b"content-length":
            try:
                return max(0, int(value))
            except ValueError:
                return None
    return None


async def _answer(scope: Scope, receive: Receive, send: Send, exc: BodyRefused) -> None:
    rid = scope.get("state", {}).get("request_id") or new_request_id()
    response = error_json(exc.status_code, exc.code, str(exc.detail), rid, headers=dict(exc.headers or {}))
    await response(scope, receive, send)
