"""Caption every image in a folder: `captioner caption-dir DIR --out captions.jsonl`.

* Walks DIR recursively (sorted, symlinked folders not followed) and finds images by their content
  (the file's first bytes: JPEG, PNG, GIF, WebP, BMP, TIFF), whatever their extension. Other files
  (text, archives, ...) are not images: they are counted and named on stderr, not written.
* Captions in batches of `--batch-size` images, either locally (the bundle, the Engine and the
  service's preprocessing: decode_image / to_array / draft_size) or, with `--url`, by sending the files
  to a running service's `POST /v1/captions/batch`, `--concurrency` requests at a time, retrying 429,
  502, 503, 504 and connection failures with exponential backoff (a Retry-After header is honoured).
* Writes one record per image (paths relative to DIR, `/`-separated):
  JSON lines (default)  {"path": "a/b.jpg", "captions": [{"text", "score", "normalized_score"}, ...],
                         "labels": [{"name", "class_id", "probability"}, ...]}
                        {"path": "a/bad.jpg", "error": {"code": "corrupt_image", "message": "..."}}
  CSV (`--format csv`, or an --out ending in .csv): columns path, rank, text, score, normalized_score,
  error_code, error_message, labels; one row per caption (rank 1 = best), one row per failed file
  (no rank).
* ImageNet labels (`--labels K`; default as the HTTP API: the default_labels setting, or the
  service's, when the model has labels, else 0): a captioned image's K best ImageNet-1k classes, best
  first, probabilities rounded to 6 decimals. In JSON lines the `labels` list (absent with K = 0 and
  in error records); in CSV the `labels` column, the same on each of the image's caption rows (empty
  with K = 0 and in error rows): `class_id:name:probability` per label, joined by `|`, e.g.
  `285:Egyptian cat:0.819941|282:tiger cat:0.070631|281:tabby, tabby cat:0.066340` (a `|` in a
  class name is written as `/`). K > 0 for a model without labels is refused before any work.
* Files that cannot be used (unreadable, corrupt, too large) are recorded with an `error` and the
  run goes on; a summary on stderr names them. The exit status is 0 when this run captioned every
  image it tried, 1 when some failed (or the run stopped early), 2 for bad options or a model that
  cannot load.
* Resumable: paths already in the output (captioned or failed) are skipped, so running the same
  command again continues where it stopped; a truncated last line (a killed run) is cut off first.
  `--retry-errors` drops the error records first, so those files are tried again. Records without
  labels (an older run, or another --labels) count as done all the same; a CSV from before the labels
  column gets the column (empty) added to its header and rows when resumed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from app.cli_options import (
    BeamSizeOption,
    BundleOption,
    DeviceOption,
    LabelsOption,
    LengthPenaltyOption,
    MaxLengthOption,
    NoRepeatNgramOption,
    NumCaptionsOption,
    StrategyOption,
    ThreadsOption,
    resolve_labels,
)

FORMATS = ("jsonl", "csv")
CSV_COLUMNS = ["path", "rank", "text", "score", "normalized_score", "error_code", "error_message", "labels"]
OLD_CSV_COLUMNS = CSV_COLUMNS[:-1]  # before the labels column: still read, and upgraded when resumed
RETRY_STATUSES = {429, 502, 503, 504}
SNIFF_BYTES = 32


class BulkError(Exception):
    """The run cannot go on (bad output file, unreachable service, a request the service refuses)."""


# ---- finding images -------------------------------------------------------------------------------


def sniff_image(head: bytes) -> str | None:
    """The image format from a file's first bytes, or None if it is not an image we caption."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in (12, 16, 40, 52, 56, 64, 108, 124):
        return "BMP"  # "BM" plus a known DIB header size, so a text file starting "BM" is not one
    return None


@dataclass
class Item:
    rel: str  # relative to the folder, "/"-separated: the record's key
    path: Path


@dataclass
class Scan:
    images: list[Item] = field(default_factory=list)
    not_images: list[str] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (rel, message)


def scan_folder(root: Path, exclude: Iterable[Path] = ()) -> Scan:
    """Every file under `root` (recursively, sorted), sorted into images, other files, unreadable."""
    root = Path(root)
    skip = {p.resolve() for p in exclude}
    scan = Scan()

    def on_error(exc: OSError) -> None:
        where = Path(exc.filename) if exc.filename else root
        rel = where.relative_to(root).as_posix() if where != root and where.is_relative_to(root) else "."
        scan.unreadable.append((rel + "/", exc.strerror or str(exc)))

    for folder, dirs, files in os.walk(root, onerror=on_error):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder) / name
            if path.resolve() in skip:
                continue
            rel = path.relative_to(root).as_posix()
            try:
                with open(path, "rb") as handle:
                    head = handle.read(SNIFF_BYTES)
            except OSError as exc:
                scan.unreadable.append((rel, exc.strerror or str(exc)))
                continue
            if sniff_image(head):
                scan.images.append(Item(rel, path))
            else:
                scan.not_images.append(rel)
    return scan


# ---- records and the output file --------------------------------------------------------------------


@dataclass
class Record:
    path: str
    captions: list[dict[str, Any]] | None = None
    error: dict[str, str] | None = None
    labels: list[dict[str, Any]] | None = None  # {name, class_id, probability}, best first; None: not asked

    def as_json(self) -> dict[str, Any]:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        out: dict[str, Any] = {"path": self.path, "captions": self.captions or []}
        if self.labels is not None:
            out["labels"] = self.labels
        return out


def error_record(rel: str, code: str, message: str) -> Record:
    return Record(rel, error={"code": code, "message": message})


def caption_dicts(captions: Iterable[Any]) -> list[dict[str, Any]]:
    """Engine Captions (or API caption dicts) -> {text, score, normalized_score} dicts."""
    out = []
    for c in captions:
        def get(key: str, c: Any = c) -> Any:
            return c.get(key) if isinstance(c, dict) else getattr(c, key)

        score, norm = float(get("score")), float(get("normalized_score"))
        out.append({"text": get("text"), "score": round(score, 6) if math.isfinite(score) else None,
                    "normalized_score": round(norm, 6) if math.isfinite(norm) else None})
    return out


def label_dicts(labels: Iterable[Any]) -> list[dict[str, Any]] | None:
    """Engine Labels (or API label dicts) -> {name, class_id, probability} dicts; None for none."""
    out = []
    for x in labels:
        def get(key: str, x: Any = x) -> Any:
            return x.get(key) if isinstance(x, dict) else getattr(x, key)

        p = float(get("probability"))
        out.append({"name": str(get("name")), "class_id": int(get("class_id")),
                    "probability": round(p, 6) if math.isfinite(p) else None})
    return out or None


def labels_to_csv(labels: list[dict[str, Any]] | None) -> str:
    """The CSV `labels` cell: `class_id:name:probability` per label, joined by `|` ("" for none)."""
    if not labels:
        return ""
    return "|".join(f"{x['class_id']}:{str(x['name']).replace('|', '/')}:"
                    f"{'' if x['probability'] is None else format(x['probability'], '.6f')}" for x in labels)


def labels_from_csv(cell: str) -> list[dict[str, Any]] | None:
    """The dicts back from a CSV `labels` cell; None for an empty (or damaged) one."""
    out = []
    for part in cell.split("|") if cell else ():
        class_id, sep, rest = part.partition(":")
        name, sep2, prob = rest.rpartition(":")
        if not (sep and sep2 and class_id.isdigit()):
            return None
        out.append({"name": name, "class_id": int(class_id), "probability": _float(prob)})
    return out or None


def format_for(out: Path, fmt: str | None) -> str:
    if fmt is None:
        return "csv" if out.suffix.lower() == ".csv" else "jsonl"
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise BulkError(f"--format must be jsonl or csv, not {fmt!r}")
    return fmt


def _complete_part(path: Path) -> tuple[bytes, bool]:
    """The file's bytes up to its last newline, and whether anything after it was cut off."""
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return data, False
    cut = data.rfind(b"\n") + 1
    return data[:cut], True


class Output:
    """The output file: what it already holds (for resuming) and appending new records."""

    def __init__(self, path: Path, fmt: str):
        self.path = Path(path)
        self.fmt = fmt
        self.done: set[str] = set()
        self.errors: set[str] = set()
        self.repaired = False
        self.upgraded = False  # a CSV from before the labels column, rewritten with it
        self._legacy_header = False
        self._handle: io.TextIOBase | None = None
        self._csv: Any = None

    # reading what is there
    def load(self, retry_errors: bool = False) -> None:
        if not self.path.exists():
            return
        if self.path.is_dir():
            raise BulkError(f"{self.path} is a folder, not an output file")
        data, cut = _complete_part(self.path)
        records = self._parse(data)
        if retry_errors and any(r.error is not None for r in records):
            kept = [r for r in records if r.error is None]
            self._rewrite(kept)
            records = kept
            self.upgraded = self._legacy_header
        elif self._legacy_header:  # new rows have the labels column: so must the header and the old rows
            self._rewrite(records)  # (drops a truncated last line too)
            self.upgraded = True
            self.repaired = cut
        elif cut:
            self.path.write_bytes(data)  # drop the truncated last line of a killed run
            self.repaired = True
        for record in records:
            self.done.add(record.path)
            if record.error is not None:
                self.errors.add(record.path)

    def _parse(self, data: bytes) -> list[Record]:
        text = data.decode("utf-8", errors="replace")
        by_path: dict[str, Record] = {}
        if self.fmt == "jsonl":
            for line in text.splitlines():
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a damaged line: its image is done again
                if isinstance(obj, dict) and isinstance(obj.get("path"), str):
                    labels = obj.get("labels")
                    by_path[obj["path"]] = Record(obj["path"], obj.get("captions"), obj.get("error"),
                                                  labels if isinstance(labels, list) else None)
            return list(by_path.values())
        rows = list(csv.reader(io.StringIO(text)))
        if not rows:
            return []
        header = rows[0]
        if header not in (CSV_COLUMNS, OLD_CSV_COLUMNS):
            raise BulkError(f"{self.path} is not a caption-dir CSV (its header is {header!r})")
        self._legacy_header = header == OLD_CSV_COLUMNS
        for row in rows[1:]:
            if len(row) != len(header):
                continue
            rec = dict(zip(header, row))
            record = by_path.setdefault(rec["path"], Record(rec["path"]))
            if rec["error_code"]:
                record.error = {"code": rec["error_code"], "message": rec["error_message"]}
            else:
                record.captions = (record.captions or []) + [{
                    "text": rec["text"], "score": _float(rec["score"]),
                    "normalized_score": _float(rec["normalized_score"]),
                }]
                if record.labels is None:
                    record.labels = labels_from_csv(rec.get("labels", ""))
        return list(by_path.values())

    def _rewrite(self, records: list[Record]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n") if self.fmt == "csv" else None
            if writer:
                writer.writerow(CSV_COLUMNS)
            for record in records:
                self._emit(handle, writer, record)
        os.replace(tmp, self.path)

    # writing
    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._handle = open(self.path, "a", encoding="utf-8", newline="")
        if self.fmt == "csv":
            self._csv = csv.writer(self._handle, lineterminator="\n")
            if new:
                self._csv.writerow(CSV_COLUMNS)
                self._handle.flush()

    def _emit(self, handle, writer, record: Record) -> None:
        if self.fmt == "jsonl":
            handle.write(json.dumps(record.as_json(), ensure_ascii=False) + "\n")
        elif record.error is not None:
            writer.writerow([record.path, "", "", "", "", record.error.get("code", ""), record.error.get("message", ""),
                             ""])
        else:
            labels = labels_to_csv(record.labels)
            for rank, c in enumerate(record.captions or [], 1):
                writer.writerow([record.path, rank, c["text"], _fmt(c["score"]), _fmt(c["normalized_score"]), "", "",
                                 labels])

    def write(self, records: Sequence[Record]) -> None:
        assert self._handle is not None, "open() first"
        for record in records:
            self._emit(self._handle, self._csv, record)
            self.done.add(record.path)
        self._handle.flush()  # a record is either whole in the file or (when killed) a cut last line

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _fmt(x: float | None) -> str:
    return "" if x is None else repr(float(x))


# ---- captioning locally ---------------------------------------------------------------------------


def _batches(items: Sequence[Item], size: int) -> Iterator[list[Item]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


def caption_locally(items: Sequence[Item], engine, config, max_pixels: int, batch_size: int,
                    workers: int = 2, labels: int = 0) -> Iterator[list[Record]]:
    """Records per batch, in order: files decoded in `workers` threads (the next batch while the
    engine runs this one), each batch one `engine.run` call (with each image's `labels` best labels)."""
    from app.preprocess import ImageDecodeError, decode_image, draft_size, to_array

    spec = engine.bundle.preprocessing
    draft = draft_size(spec)

    def load(item: Item):
        try:
            data = item.path.read_bytes()
        except OSError as exc:
            return error_record(item.rel, "unreadable_file", exc.strerror or str(exc))
        try:
            return to_array(decode_image(data, max_pixels, draft), spec)
        except ImageDecodeError as exc:
            return error_record(item.rel, exc.code, exc.message)

    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="caption-dir-decode") as pool:
        batches = list(_batches(items, batch_size))
        pending = [pool.submit(load, it) for it in batches[0]] if batches else []
        for index, batch in enumerate(batches):
            loaded = [f.result() for f in pending]
            pending = [pool.submit(load, it) for it in batches[index + 1]] if index + 1 < len(batches) else []
            arrays = [x for x in loaded if not isinstance(x, Record)]
            results = iter(engine.run(arrays, config, labels=labels) if arrays else [])
            records = []
            for item, outcome in zip(batch, loaded):
                if isinstance(outcome, Record):
                    records.append(outcome)
                else:
                    result = next(results)
                    records.append(Record(item.rel, captions=caption_dicts(result.captions),
                                          labels=label_dicts(result.labels)))
            yield records


# ---- captioning through a running service ------------------------------------------------------------


def _no_proxy_for_loopback(url: str) -> urllib.request.OpenerDirector:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host in ("127.0.0.1", "localhost", "::1"):
        return urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener()


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


def multipart(files: Sequence[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """(field, filename, data) parts -> (body, content type)."""
    boundary = "caption-dir-" + uuid.uuid4().hex
    out = io.BytesIO()
    for name, filename, data in files:
        safe = filename.replace("\\", "/").replace('"', "%22").replace("\r", " ").replace("\n", " ")
        out.write(f"--{boundary}\r\n".encode())
        out.write(f'Content-Disposition: form-data; name="{name}"; filename="{safe}"\r\n'.encode())
        out.write(b"Content-Type: application/octet-stream\r\n\r\n")
        out.write(data)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


class ServiceClient:
    """HTTP calls to a running service, with retries on 429/502/503/504 and connection failures."""

    def __init__(self, url: str, retries: int = 5, backoff: float = 0.5, max_wait: float = 60.0,
                 timeout: float = 300.0, log: Callable[[str], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.base = url.rstrip("/")
        if not self.base.startswith(("http://", "https://")):
            raise BulkError(f"--url must start with http:// or https://, not {url!r}")
        self.retries = retries
        self.backoff = backoff
        self.max_wait = max_wait
        self.timeout = timeout
        self.log = log or (lambda message: None)
        self.sleep = sleep
        self.opener = _no_proxy_for_loopback(self.base)
        self.retried = 0
        self._lock = threading.Lock()

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        url = self.base + path
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
            wait_s: float | None = None
            try:
                with self.opener.open(request, timeout=self.timeout) as response:
                    return response.status, response.read()
            except urllib.error.HTTPError as exc:
                payload = exc.read()
                if exc.code not in RETRY_STATUSES:
                    return exc.code, payload
                wait_s = retry_after_seconds(exc.headers.get("Retry-After"))
                why = f"HTTP {exc.code}"
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                why = f"connection failed ({reason})"
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

    def json(self, method: str, path: str, **kwargs) -> dict[str, Any]:
        status, payload = self.request(method, path, **kwargs)
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


def caption_remotely(items: Sequence[Item], client: ServiceClient, params: dict[str, Any], batch_size: int,
                     concurrency: int, max_upload_bytes: int | None = None) -> Iterator[list[Record]]:
    """Records per batch, in the order the requests finish: each batch one `POST /v1/captions/batch`,
    at most `concurrency` of them in flight."""
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    path = "/v1/captions/batch" + (f"?{query}" if query else "")

    def send(batch: list[Item]) -> list[Record]:
        records: dict[int, Record] = {}
        parts, slots = [], []
        for index, item in enumerate(batch):
            try:
                size = item.path.stat().st_size
                if max_upload_bytes is not None and size > max_upload_bytes:
                    records[index] = error_record(item.rel, "file_too_large",
                                                  f"the file is {size} bytes; the service's limit is {max_upload_bytes}")
                    continue
                data = item.path.read_bytes()
            except OSError as exc:
                records[index] = error_record(item.rel, "unreadable_file", exc.strerror or str(exc))
                continue
            parts.append(("images", item.path.name, data))
            slots.append(index)
        if parts:
            body, content_type = multipart(parts)
            answer = client.json("POST", path, body=body, headers={"Content-Type": content_type})
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

    batches = iter(_batches(items, batch_size))
    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="caption-dir-http") as pool:
        running: set[Future] = set()
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


# ---- the run ------------------------------------------------------------------------------------------


@dataclass
class Summary:
    images: int = 0
    skipped: int = 0
    captioned: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, "code: message")
    not_images: list[str] = field(default_factory=list)
    stopped: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failed and self.stopped is None


def run(
    folder: Path,
    out: Path,
    *,
    fmt: str | None = None,
    batch_size: int = 16,
    captioner: Callable[[Sequence[Item]], Iterator[list[Record]]],
    retry_errors: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
) -> Summary:
    """Scan `folder`, skip what `out` already has, caption the rest with `captioner` (a function of
    the items to do that yields records per batch) and append the records to `out`."""
    from tqdm import tqdm

    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise BulkError(f"{folder} is not a folder")
    if batch_size < 1:
        raise BulkError("--batch-size must be at least 1")
    output = Output(out, format_for(out, fmt))
    output.load(retry_errors=retry_errors)
    if output.repaired:
        log(f"{out}: cut off a truncated last line (from a run that was stopped)")
    if output.upgraded:
        log(f"{out}: added the labels column (the file is from before it)")

    scan = scan_folder(folder, exclude=[out, out.with_name(out.name + ".tmp")])
    summary = Summary(images=len(scan.images), not_images=scan.not_images)
    todo = [item for item in scan.images if item.rel not in output.done]
    summary.skipped = len(scan.images) - len(todo)
    fresh_unreadable = [(rel, msg) for rel, msg in scan.unreadable if rel not in output.done]

    output.open()
    try:
        if fresh_unreadable:
            records = [error_record(rel, "unreadable_file", msg) for rel, msg in fresh_unreadable]
            output.write(records)
            summary.failed += [(r.path, f"unreadable_file: {msg}") for (_, msg), r in zip(fresh_unreadable, records)]
        bar = tqdm(total=len(todo), unit="img", disable=not progress, file=sys.stderr, dynamic_ncols=True,
                   desc="captioning")
        try:
            for records in captioner(todo) if todo else ():
                output.write(records)
                for record in records:
                    if record.error is not None:
                        summary.failed.append((record.path, f"{record.error['code']}: {record.error['message']}"))
                    else:
                        summary.captioned += 1
                bar.update(len(records))
        except BulkError as exc:
            summary.stopped = str(exc)
        finally:
            bar.close()
    finally:
        output.close()
    _report(summary, out, log)
    return summary


def _report(summary: Summary, out: Path, log: Callable[[str], None]) -> None:
    log(f"caption-dir: {summary.images} images found, {summary.skipped} already in {out}, "
        f"{summary.captioned} captioned now, {len(summary.failed)} failed, "
        f"{len(summary.not_images)} other files skipped (not images)")
    if summary.not_images:
        shown = ", ".join(summary.not_images[:10]) + (" ..." if len(summary.not_images) > 10 else "")
        log(f"  not images: {shown}")
    for path, why in summary.failed[:20]:
        log(f"  failed: {path}: {why}")
    if len(summary.failed) > 20:
        log(f"  ... and {len(summary.failed) - 20} more failures (error records in {out})")
    if summary.stopped:
        log(f"caption-dir: stopped early: {summary.stopped}. Run the same command again to continue.")


# ---- the command ---------------------------------------------------------------------------------------

def caption_dir(
    folder: Annotated[Path, typer.Argument(help="Folder to caption (recursively; images found by content).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file; appended to, and resumed from.")] = Path(
        "captions.jsonl"),
    fmt: Annotated[str | None, typer.Option("--format", help="jsonl or csv (default: csv if --out ends in "
                                                                ".csv, else jsonl)")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per engine call (or per request with --url)")] = 16,
    url: Annotated[str | None, typer.Option(help="Send the images to a running service (e.g. "
                                                    "http://127.0.0.1:8000) instead of loading the model")] = None,
    concurrency: Annotated[int, typer.Option(min=1, max=64, help="With --url: requests in flight at once")] = 2,
    retries: Annotated[int, typer.Option(min=0, max=100, help="With --url: retries of a request that got "
                                                              "429/502/503/504 or no connection")] = 5,
    retry_errors: Annotated[bool, typer.Option("--retry-errors", help="Drop the output's error records first, "
                                                                      "so those files are tried again")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar")] = True,
    strategy: StrategyOption = None,
    beam_size: BeamSizeOption = None,
    num_captions: NumCaptionsOption = None,
    max_length: MaxLengthOption = None,
    length_penalty: LengthPenaltyOption = None,
    no_repeat_ngram_size: NoRepeatNgramOption = None,
    labels: LabelsOption = None,
    bundle: BundleOption = None,
    device: DeviceOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Caption every image in a folder into a JSON-lines or CSV file (resumable; locally or via --url).

    With a model that has ImageNet labels, each captioned image also gets its best --labels K classes:
    JSON lines a `labels` list of {name, class_id, probability}; CSV a `labels` column of
    `class_id:name:probability` joined by `|` (e.g. `285:Egyptian cat:0.819941|282:tiger cat:0.070631`).

    Exit status: 0 all captioned, 1 some files failed (error records) or the run stopped early,
    2 bad options or a model that cannot load."""
    decoding = {"strategy": strategy, "beam_size": beam_size, "num_captions": num_captions,
                "max_length": max_length, "length_penalty": length_penalty,
                "no_repeat_ngram_size": no_repeat_ngram_size}

    def fail(message: str) -> NoReturn:
        typer.echo(f"captioner: {message}", err=True)
        raise typer.Exit(2)

    try:
        format_for(out, fmt)
    except BulkError as exc:
        fail(str(exc))
    if not folder.is_dir():
        fail(f"{folder} is not a folder")

    if url:
        client = ServiceClient(url, retries=retries, log=lambda m: typer.echo(f"caption-dir: {m}", err=True)) \
            if url.startswith(("http://", "https://")) else None
        if client is None:
            fail(f"--url must start with http:// or https://, not {url!r}")
        try:
            info = client.json("GET", "/v1/model")
        except BulkError as exc:
            fail(f"the service cannot be used: {exc}")
        try:
            top_k = resolve_labels(labels, bool(info.get("labels")), int(info.get("default_labels") or 0),
                                   f"the service's model {info.get('name') or ''}".rstrip())
        except ValueError as exc:
            fail(str(exc))
        params = {**decoding, "labels": top_k}
        limits = info.get("limits") or {}
        size = min(batch_size, int(limits.get("max_batch_files") or batch_size))
        if size < batch_size:
            typer.echo(f"caption-dir: the service takes at most {size} files per request; --batch-size {size}",
                       err=True)

        def captioner(items):
            return caption_remotely(items, client, params, size, concurrency,
                                    max_upload_bytes=limits.get("max_upload_bytes"))
    else:
        from app.bundle import BundleError, load_bundle
        from app.engine import Engine, EngineError
        from app.settings import SettingsError, load_settings

        try:
            settings = load_settings(bundle=bundle, device=device, threads=threads)
            config = settings.decoding_defaults().with_overrides(**decoding)
        except SettingsError as exc:
            fail(str(exc))
        except ValueError as exc:
            fail(f"invalid decoding settings: {exc}")
        try:
            engine = Engine(load_bundle(settings.bundle), device=settings.device, threads=settings.threads)
        except (BundleError, EngineError) as exc:
            fail(f"cannot load the model: {exc}")
        config = settings.decoding_defaults(engine.bundle.recommended_decoding).with_overrides(**decoding)
        try:
            top_k = resolve_labels(labels, engine.has_labels, settings.default_labels,
                                   f"the model {engine.bundle.name}")
        except ValueError as exc:
            fail(str(exc))
        size = batch_size

        def captioner(items):
            return caption_locally(items, engine, config, settings.max_image_pixels, size, labels=top_k)

    try:
        summary = run(folder, out, fmt=fmt, batch_size=size, captioner=captioner, retry_errors=retry_errors,
                      progress=progress, log=lambda m: typer.echo(m, err=True))
    except BulkError as exc:
        fail(str(exc))
    if not summary.ok:
        raise typer.Exit(1)
