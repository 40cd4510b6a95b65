"""caption-dir's `--url` mode: the files go to a running service's `POST /v1/captions/batch`.

* `ServiceClient`: one pooled `httpx.Client` (keep-alive connections, as many as requests run at
  once), multipart uploads with httpx's encoder (`files=`), and the retry rule: 429, 502, 503, 504
  and failed connections (refused, reset, timed out) are retried `retries` times with exponential
  backoff (0.5 s, 1 s, 2 s, ... plus up to 25 % jitter; at most 60 s), or as long as a Retry-After
  header says. Other answers are returned as they are.
* `RemoteCaptioner.connect(...)`: asks `GET /v1/model` for the model and limits (labels, the default
  label count, max_batch_files, max_upload_bytes) and resolves --labels and --batch-size by them;
  calling it with the items to do yields their records (`caption_remotely`: `concurrency` requests
  in flight, records per batch in the order the requests finish).

Proxies: the usual HTTP(S)_PROXY / NO_PROXY variables are honoured, except for a loopback URL.
TLS: verified against the system's certificates (SSL_CERT_FILE / SSL_CERT_DIR honoured).
"""

from __future__ import annotations

import json
import random
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from app.bulk.errors import BulkError
from app.bulk.output import Record, caption_dicts, error_record, label_dicts, raw_path
from app.bulk.source import Item, in_batches, os_message

RETRY_STATUSES = {429, 502, 503, 504}
BATCH_PATH = "/v1/captions/batch"
LOOPBACK = ("127.0.0.1", "localhost", "::1")

# A multipart part: (field, (filename, data, content type)), as httpx's `files=` takes it.
FilePart = tuple[str, tuple[str, bytes, str]]


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header (seconds or an HTTP date) in seconds from now; None if absent/unparsable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def upload_name(filename: str) -> str:
    """The filename sent for a file: each byte of a name that is not UTF-8 as U+FFFD (so the multipart
    header can be encoded; the records keep the exact name: only the order of the results matters),
    backslashes as `/`, line breaks as spaces (httpx escapes quotes)."""
    shown = raw_path(filename).decode("utf-8", "replace")
    return shown.replace("\\", "/").replace("\r", " ").replace("\n", " ")


class ServiceClient:
    """HTTP calls to a running service, with retries on 429/502/503/504 and connection failures.

    Thread-safe: the `caption_remotely` threads share it, and its connection pool (`connections`
    keep-alive connections at most). `timeout` applies to connecting, sending and each read (a
    request waiting for a free connection of the pool waits as long as it takes). Close it when done
    (or `with ServiceClient(...) as client:`). `transport` replaces httpx's (tests: httpx.MockTransport)."""

    def __init__(self, url: str, retries: int = 5, backoff: float = 0.5, max_wait: float = 60.0,
                 timeout: float = 300.0, connections: int = 2, log: Callable[[str], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep, transport: httpx.BaseTransport | None = None):
        self.base = url.rstrip("/")
        if not self.base.startswith(("http://", "https://")):
            raise BulkError(f"--url must start with http:// or https://, not {url!r}")
        try:
            host = httpx.URL(self.base).host
        except httpx.InvalidURL as exc:
            raise BulkError(f"--url {url!r} is not a valid URL ({exc})") from None
        if not host:
            raise BulkError(f"--url {url!r} names no host")
        self.retries = retries
        self.backoff = backoff
        self.max_wait = max_wait
        self.timeout = timeout
        self.log = log or (lambda message: None)
        self.sleep = sleep
        self.retried = 0
        self._lock = threading.Lock()
        pool = max(1, connections)
        self.http = httpx.Client(
            timeout=httpx.Timeout(timeout, pool=None),
            limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool),
            verify=ssl.create_default_context(),  # the system's CAs, as urllib did (not certifi's)
            trust_env=host not in LOOPBACK,  # env proxies, but never for the service on this machine
            transport=transport,
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, files: Sequence[FilePart] | None = None) -> httpx.Response:
        """The answer to `method base+path` (with a multipart body of `files`), retried as the class
        says; BulkError once the retries are spent. Redirects are followed for GET only."""
        url = self.base + path
        for attempt in range(self.retries + 1):
            wait_s: float | None = None
            try:
                response = self.http.request(method, url, files=list(files) if files else None,
                                             follow_redirects=method == "GET")
            except (httpx.TransportError, OSError) as exc:  # refused, reset, timed out, cut off
                reason = os_message(exc) if isinstance(exc, OSError) else (str(exc) or type(exc).__name__)
                why = f"connection failed ({reason})"
            else:
                if response.status_code not in RETRY_STATUSES:
                    return response
                wait_s = retry_after_seconds(response.headers.get("Retry-After"))
                why = f"HTTP {response.status_code}"
            if attempt == self.retries:
                raise BulkError(f"{method} {url}: {why}, still after {self.retries} retries")
            if wait_s is None:
                wait_s = self.backoff * (2 ** attempt) * (1.0 + 0.25 * random.random())
            wait_s = min(wait_s, self.max_wait)
            with self._lock:
                self.retried += 1
            self.log(f"{method} {path}: {why}; retrying in {wait_s:.1f} s")
            self.sleep(wait_s)
        raise AssertionError("unreachable")  # pragma: no cover

    def json(self, method: str, path: str, files: Sequence[FilePart] | None = None) -> dict[str, Any]:
        """`request`'s answer as a JSON object; BulkError for any status but 200 (with the service's
        error code and message) or a body that is not a JSON object."""
        response = self.request(method, path, files=files)
        status, payload = response.status_code, response.content
        try:
            body = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            body = None
        if status != 200:
            err = body.get("error") if isinstance(body, dict) else None
            detail = (f"{err.get('code')}: {err.get('message')}" if isinstance(err, dict)
                      else payload[:200].decode("utf-8", "replace"))
            raise BulkError(f"{method} {self.base}{path} answered HTTP {status} ({detail})")
        if not isinstance(body, dict):
            raise BulkError(f"{method} {self.base}{path} did not answer a JSON object")
        return body


def batch_path(params: dict[str, Any]) -> str:
    """`/v1/captions/batch` with the decoding and labels parameters that are set as its query."""
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    return BATCH_PATH + (f"?{query}" if query else "")


def caption_remotely(items: Sequence[Item], client: ServiceClient, params: dict[str, Any], batch_size: int,
                     concurrency: int, max_upload_bytes: int | None = None) -> Iterator[list[Record]]:
    """Records per batch, in the order the requests finish: each batch one `POST /v1/captions/batch`,
    at most `concurrency` of them in flight. A file over `max_upload_bytes`, or that cannot be read,
    is an error record without being sent; the service's per-file errors are error records too."""
    path = batch_path(params)

    def send(batch: list[Item]) -> list[Record]:
        records: dict[int, Record] = {}
        parts: list[FilePart] = []
        slots: list[int] = []
        for index, item in enumerate(batch):
            try:
                size = item.path.stat().st_size
                if max_upload_bytes is not None and size > max_upload_bytes:
                    records[index] = error_record(item.rel, "file_too_large",
                                                  f"the file is {size} bytes; the service's limit is {max_upload_bytes}")
                    continue
                data = item.read()
            except OSError as exc:
                records[index] = error_record(item.rel, "unreadable_file", os_message(exc))
                continue
            parts.append(("images", (upload_name(item.path.name), data, "application/octet-stream")))
            slots.append(index)
        if parts:
            answer = client.json("POST", path, files=parts)
            results = answer.get("results")
            if not isinstance(results, list) or len(results) != len(parts):
                raise BulkError(f"POST {client.base}{path}: expected {len(parts)} results, got {results!r:.200}")
            for result, index in zip(results, slots):
                rel = batch[index].rel
                if result.get("error"):
                    e = result["error"]
                    records[index] = error_record(rel, str(e.get("code", "error")), str(e.get("message", "")))
                else:
                    records[index] = Record(rel, captions=caption_dicts(result.get("captions") or []),
                                            labels=label_dicts(result.get("labels") or []))
        return [records[i] for i in range(len(batch))]

    batches = iter(in_batches(items, batch_size))
    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="caption-dir-http") as pool:
        running: set[Future[list[Record]]] = set()
        try:
            for batch in batches:
                running.add(pool.submit(send, batch))
                if len(running) >= concurrency:
                    done, running = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        yield future.result()
            while running:
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        finally:
            for future in running:
                future.cancel()


@dataclass
class RemoteCaptioner:
    """A running service, as a captioner for app.bulk.job.run: `captioner(items)` yields the records."""

    client: ServiceClient
    params: dict[str, Any]  # the query of each POST: decoding options and labels
    batch_size: int  # files per request (at most the service's max_batch_files)
    concurrency: int = 2
    max_upload_bytes: int | None = None
    model: dict[str, Any] = field(default_factory=dict)  # GET /v1/model's answer

    @classmethod
    def connect(cls, url: str, *, batch_size: int, decoding: dict[str, Any], labels: int | None = None,
                concurrency: int = 2, retries: int = 5, log: Callable[[str], None] = lambda message: None,
                **client_options: Any) -> RemoteCaptioner:
        """Ask the service at `url` for its model and limits: `labels` None is the service's
        default_labels when its model has labels, else 0; `batch_size` is cut to its max_batch_files
        (logged). BulkError, with the message to show, if it cannot be used (exit status 2)."""
        from app.cli_options import resolve_labels

        client = ServiceClient(url, retries=retries, connections=concurrency, log=log, **client_options)
        try:
            try:
                info = client.json("GET", "/v1/model")
            except BulkError as exc:
                raise BulkError(f"the service cannot be used: {exc}") from None
            try:
                top_k = resolve_labels(labels, bool(info.get("labels")), int(info.get("default_labels") or 0),
                                       f"the service's model {info.get('name') or ''}".rstrip())
            except ValueError as exc:
                raise BulkError(str(exc)) from None
        except BaseException:
            client.close()
            raise
        limits = info.get("limits") or {}
        size = min(batch_size, int(limits.get("max_batch_files") or batch_size))
        if size < batch_size:
            log(f"the service takes at most {size} files per request; --batch-size {size}")
        return cls(client, {**decoding, "labels": top_k}, size, concurrency=concurrency,
                   max_upload_bytes=limits.get("max_upload_bytes"), model=info)

    def __call__(self, items: Sequence[Item]) -> Iterator[list[Record]]:
        return caption_remotely(items, self.client, self.params, self.batch_size, self.concurrency,
                                max_upload_bytes=self.max_upload_bytes)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> RemoteCaptioner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
