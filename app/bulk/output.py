"""The records of a caption-dir run and the output they go to: JSON lines, CSV or Parquet, appended
to, and resumed from.

The record schema (one per image; paths relative to the folder, `/`-separated):

  JSON lines (default)  {"path": "a/b.jpg", "captions": [{"text", "score", "normalized_score", "confidence"}, ...],
                         "labels": [{"name", "class_id", "probability"}, ...]}
                        {"path": "a/bad.jpg", "error": {"code": "corrupt_image", "message": "..."}}
  CSV (`--format csv`, or an --out ending in .csv): the columns `CSV_COLUMNS`; one row per caption
  (rank 1 = best), one row per failed file (no rank). The `labels` cell is the same on each of the
  image's caption rows: `class_id:name:probability` per label, joined by `|` (a `|` in a class name
  is written as `/`), empty with no labels and in error rows.
  Parquet (`--format parquet`, or an --out ending in .parquet): a folder of parts (a Parquet dataset:
  `pyarrow.parquet.read_table(folder)`, pandas, Spark and DuckDB read it as one table),
  `part-00000.parquet`, `part-00001.parquet`, ...; one row per image, the JSON-lines fields as columns
  (`parquet_schema`): `path`, `captions` list<struct<text, score, normalized_score>>, `labels`
  list<struct<name, class_id, probability>>, `error_code`, `error_message`, `path_bytes_b64` (null where
  absent). Needs
  pyarrow (the `ray` extra).

File names that are not UTF-8 (bytes from an old archive or a shared drive: the path is a str with
surrogateescape'd bytes, as os.fsdecode gives it) are captioned like any other and written readably and
losslessly, in every format: `path` is the name with each byte that is not UTF-8 written `\\xNN`
(`display_path`: `d/\\xff\\xfe.jpg`), and `path_bytes_b64` holds the path's exact bytes in base64
(`path_bytes_b64`; JSON lines: only in such records; CSV: the last column, empty otherwise; Parquet: a
column, null otherwise). A record's key (`Record.path`, what resuming matches files by) is the path
from `path_bytes_b64` where present, else `path`: `base64.b64decode(r["path_bytes_b64"])` is the name
to open (`os.fsdecode` of it on this machine), and a UTF-8 file literally named `d/\\xff\\xfe.jpg` stays
another file.

`labels` is absent (JSON) / empty (CSV) when none were asked (--labels 0) and in error records.
A caption's `confidence` (0-1, app/inference/confidence.py) is in the JSON lines only (absent from captions of a
service too old to answer it); the CSV columns and the Parquet schema are unchanged.

Resuming (`open_output`): the paths already in the file, captioned or failed, are done; a truncated
last line (a killed run) is cut off first; `retry_errors` drops the error records (the file is
rewritten), so those files are tried again. Records without labels (an older run, another --labels)
count as done all the same; a CSV from before the labels or the path_bytes_b64 column gets the
column (empty) added to its header and rows. Parquet parts from before `path_bytes_b64` are read as they
are (their paths are all UTF-8); a reader of the whole folder may need to ask for the newest schema.
Parquet records are buffered and written `rows_per_part` at a time (and at close), each part to a
hidden temporary file renamed into place, so a killed run leaves whole parts only (its buffered records
are done again) and a leftover temporary file, removed when resumed; `retry_errors` rewrites (in place,
one part at a time) the parts that hold error rows.
"""

from __future__ import annotations

import base64
import binascii
import csv
import importlib.util
import io
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.bulk.errors import BulkError

FORMATS = ("jsonl", "csv", "parquet")
CSV_COLUMNS = ["path", "rank", "text", "score", "normalized_score", "error_code", "error_message", "labels",
               "path_bytes_b64"]
LABELS_CSV_COLUMNS = CSV_COLUMNS[:8]  # before the path_bytes_b64 column: still read, and upgraded when resumed
OLD_CSV_COLUMNS = CSV_COLUMNS[:7]  # before the labels column too: the same
KNOWN_CSV_HEADERS = (CSV_COLUMNS, LABELS_CSV_COLUMNS, OLD_CSV_COLUMNS)
ROWS_PER_PART = 10_000  # Parquet: records per part (the last part of a run may hold fewer)
PYARROW_MISSING = "Parquet output needs pyarrow: pip install 'captioner[ray]'"


# ---- the records --------------------------------------------------------------------------------------


def raw_path(key: str) -> bytes:
    """A record key's exact bytes (UTF-8, surrogateescape'd bytes back as they were)."""
    try:
        return key.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate not from surrogateescape (not a name of this machine)
        return key.encode("utf-8", "surrogatepass")


def display_path(key: str) -> str:
    """The `path` written for a key: the key itself when it is UTF-8, else with each byte that is not
    UTF-8 as `\\xNN` (readable, always encodable; not unique: `path_bytes_b64` is)."""
    try:
        key.encode("utf-8")
        return key
    except UnicodeEncodeError:
        return raw_path(key).decode("utf-8", "backslashreplace")


def path_bytes_b64(key: str) -> str | None:
    """The `path_bytes_b64` written for a key: its bytes in base64 when it is not UTF-8, else None."""
    try:
        key.encode("utf-8")
        return None
    except UnicodeEncodeError:
        return base64.b64encode(raw_path(key)).decode("ascii")


def path_key(path: str, b64: Any = None) -> str:
    """A record's key from its written `path` and `path_bytes_b64` (the exact bytes, when present and
    valid base64), as `Item.rel` has it (surrogateescape)."""
    if isinstance(b64, str) and b64:
        try:
            return base64.b64decode(b64, validate=True).decode("utf-8", "surrogateescape")
        except (binascii.Error, ValueError):
            pass  # damaged: the readable path will do
    return path


@dataclass
class Record:
    """What the output says about one file: its captions (and labels), or an error."""

    path: str  # the key: relative path, surrogateescape'd where not UTF-8 (written as display_path + path_bytes_b64)
    captions: list[dict[str, Any]] | None = None  # {text, score, normalized_score[, confidence]}, best first
    error: dict[str, str] | None = None  # {code, message}
    labels: list[dict[str, Any]] | None = None  # {name, class_id, probability}, best first; None: not asked

    def as_json(self) -> dict[str, Any]:
        """The JSON-lines object (`path_bytes_b64` only for a name that is not UTF-8)."""
        out: dict[str, Any] = {"path": display_path(self.path)}
        b64 = path_bytes_b64(self.path)
        if b64 is not None:
            out["path_bytes_b64"] = b64
        if self.error is not None:
            return {**out, "error": self.error}
        out["captions"] = self.captions or []
        if self.labels is not None:
            out["labels"] = self.labels
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Record:
        """The record back from its JSON-lines object (`as_json`)."""
        labels = obj.get("labels")
        return cls(path_key(obj["path"], obj.get("path_bytes_b64")), obj.get("captions"), obj.get("error"),
                   labels if isinstance(labels, list) else None)

    def csv_rows(self) -> list[list[Any]]:
        """The CSV rows (in `CSV_COLUMNS` order): one per caption, or one for an error."""
        path, b64 = display_path(self.path), path_bytes_b64(self.path) or ""
        if self.error is not None:
            return [[path, "", "", "", "", self.error.get("code", ""), self.error.get("message", ""), "", b64]]
        labels = labels_to_csv(self.labels)
        return [[path, rank, c["text"], _fmt(c["score"]), _fmt(c["normalized_score"]), "", "", labels, b64]
                for rank, c in enumerate(self.captions or [], 1)]

    def parquet_row(self) -> dict[str, Any]:
        """The Parquet row (the columns of `parquet_schema`): the JSON-lines fields, null where absent."""
        path, b64 = display_path(self.path), path_bytes_b64(self.path)
        if self.error is not None:
            return {"path": path, "captions": None, "labels": None, "error_code": self.error.get("code"),
                    "error_message": self.error.get("message"), "path_bytes_b64": b64}
        captions = [{"text": c.get("text"), "score": _float_or_none(c.get("score")),
                     "normalized_score": _float_or_none(c.get("normalized_score"))} for c in self.captions or []]
        labels = None if self.labels is None else [
            {"name": x.get("name"), "class_id": None if x.get("class_id") is None else int(x["class_id"]),
             "probability": _float_or_none(x.get("probability"))} for x in self.labels]
        return {"path": path, "captions": captions, "labels": labels, "error_code": None, "error_message": None,
                "path_bytes_b64": b64}

    @property
    def failure(self) -> str | None:
        """"code: message" for an error record (as the summary names it), else None."""
        return None if self.error is None else f"{self.error['code']}: {self.error['message']}"


def error_record(rel: str, code: str, message: str) -> Record:
    return Record(rel, error={"code": code, "message": message})


def caption_dicts(captions: Iterable[Any]) -> list[dict[str, Any]]:
    """Engine Captions (or API caption dicts) -> {text, score, normalized_score, confidence} dicts,
    numbers rounded to 6 decimals (None where not finite); no `confidence` where the caption has none
    (an API answer from an older service)."""
    out = []
    for c in captions:
        def get(key: str, c: Any = c) -> Any:
            return c.get(key) if isinstance(c, dict) else getattr(c, key, None)

        score, norm = float(get("score")), float(get("normalized_score"))
        item = {"text": get("text"), "score": round(score, 6) if math.isfinite(score) else None,
                "normalized_score": round(norm, 6) if math.isfinite(norm) else None}
        confidence = get("confidence")
        if confidence is not None:
            item["confidence"] = round(float(confidence), 6) if math.isfinite(float(confidence)) else None
        out.append(item)
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


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _fmt(x: float | None) -> str:
    return "" if x is None else repr(float(x))


def _float_or_none(x: Any) -> float | None:
    return None if x is None else float(x)


# ---- the output file ------------------------------------------------------------------------------------


def format_for(out: Path, fmt: str | None) -> str:
    """The output format: `fmt` (jsonl, csv or parquet, any case), else csv for a `.csv` --out,
    parquet for a `.parquet` one, else jsonl. BulkError for another `fmt`, or parquet without pyarrow
    (checked without importing it, so a command can ask before it loads the model)."""
    if fmt is None:
        fmt = {".csv": "csv", ".parquet": "parquet"}.get(Path(out).suffix.lower(), "jsonl")
    else:
        fmt = fmt.lower()
        if fmt not in FORMATS:
            raise BulkError(f"--format must be jsonl, csv or parquet, not {fmt!r}")
    if fmt == "parquet" and importlib.util.find_spec("pyarrow") is None:
        raise BulkError(PYARROW_MISSING)
    return fmt


def _complete_part(path: Path) -> tuple[bytes, bool]:
    """The file's bytes up to its last newline, and whether anything after it was cut off."""
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return data, False
    cut = data.rfind(b"\n") + 1
    return data[:cut], True


class Output:
    """The output file: what it already holds (`load`, for resuming) and appending new records
    (`open`, `write`, `close`; or `with output:`). A written record is flushed at once, so a killed
    run leaves whole records and at most a cut last line."""

    def __init__(self, path: Path, fmt: str):
        self.path = Path(path)
        self.fmt = fmt
        self.done: set[str] = set()  # the paths with a record (captioned or failed): not done again
        self.errors: set[str] = set()  # those of them with an error record
        self.repaired = False  # load() cut off a truncated last line
        self.upgraded: list[str] = []  # the columns a CSV from before them was rewritten with
        self._missing: list[str] = []  # the columns the CSV's header lacks
        self._handle: io.TextIOBase | None = None
        self._csv: Any = None

    @property
    def temp_path(self) -> Path:
        """Where a rewrite goes before it replaces the file (keep it out of the scan, too)."""
        return self.path.with_name(self.path.name + ".tmp")

    def is_done(self, rel: str) -> bool:
        """Whether `rel` has a record already: the resume rule."""
        return rel in self.done

    # reading what is there
    def load(self, retry_errors: bool = False) -> None:
        """Read what the file holds (if it exists) into `done`/`errors`; cut a truncated last line;
        with `retry_errors`, drop the error records from the file; add the labels column to a CSV
        from before it. BulkError for a folder or a CSV that is not caption-dir's."""
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
            self.upgraded = self._missing
        elif self._missing:  # new rows have the newer columns: so must the header and the old rows
            self._rewrite(records)  # (drops a truncated last line too)
            self.upgraded = self._missing
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
                    record = Record.from_json(obj)
                    by_path[record.path] = record
            return list(by_path.values())
        rows = list(csv.reader(io.StringIO(text)))
        if not rows:
            return []
        header = rows[0]
        if header not in KNOWN_CSV_HEADERS:
            raise BulkError(f"{self.path} is not a caption-dir CSV (its header is {header!r})")
        self._missing = CSV_COLUMNS[len(header):]
        for row in rows[1:]:
            if len(row) != len(header):
                continue
            rec = dict(zip(header, row))
            key = path_key(rec["path"], rec.get("path_bytes_b64"))
            record = by_path.setdefault(key, Record(key))
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
        tmp = self.temp_path
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n") if self.fmt == "csv" else None
            if writer:
                writer.writerow(CSV_COLUMNS)
            for record in records:
                self._emit(handle, writer, record)
        os.replace(tmp, self.path)

    # writing
    def open(self) -> None:
        """Open the file for appending (made, with the CSV header, if it is new or empty)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._handle = open(self.path, "a", encoding="utf-8", newline="")
        if self.fmt == "csv":
            self._csv = csv.writer(self._handle, lineterminator="\n")
            if new:
                self._csv.writerow(CSV_COLUMNS)
                self._handle.flush()

    def _emit(self, handle: Any, writer: Any, record: Record) -> None:
        if self.fmt == "jsonl":
            handle.write(json.dumps(record.as_json(), ensure_ascii=False) + "\n")
        else:
            writer.writerows(record.csv_rows())

    def write(self, records: Sequence[Record]) -> None:
        """Append the records (and mark their paths done)."""
        assert self._handle is not None, "open() first"
        for record in records:
            self._emit(self._handle, self._csv, record)
            self.done.add(record.path)
        self._handle.flush()  # a record is either whole in the file or (when killed) a cut last line

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> Output:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- the Parquet output ---------------------------------------------------------------------------------


PART_NAME = re.compile(r"part-(\d+)\.parquet")  # a finished part; `.part*.tmp`: one being written


def _pyarrow() -> tuple[Any, Any, Any]:
    """pyarrow, pyarrow.compute and pyarrow.parquet, or BulkError without them (the `ray` extra)."""
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:
        raise BulkError(PYARROW_MISSING) from None
    return pa, pc, pq


def parquet_schema() -> Any:
    """The Parquet output's schema (a pyarrow.Schema): one row per image, the JSON-lines fields."""
    pa, _, _ = _pyarrow()
    caption = pa.struct([("text", pa.string()), ("score", pa.float64()), ("normalized_score", pa.float64())])
    label = pa.struct([("name", pa.string()), ("class_id", pa.int64()), ("probability", pa.float64())])
    return pa.schema([pa.field("path", pa.string(), nullable=False), ("captions", pa.list_(caption)),
                      ("labels", pa.list_(label)), ("error_code", pa.string()), ("error_message", pa.string()),
                      ("path_bytes_b64", pa.string())])


class ParquetOutput(Output):
    """The Parquet output: a folder of parts, `part-NNNNN.parquet` (see the module's docstring).
    Appending adds parts: the records written are buffered, `rows_per_part` to a part, the rest at
    close; each part is written to `temp_path` and renamed into place, so the folder only ever holds
    whole parts, and a killed run loses its buffer only (those images are done again)."""

    def __init__(self, path: Path, rows_per_part: int = ROWS_PER_PART):
        if rows_per_part < 1:
            raise BulkError("rows_per_part must be at least 1")
        super().__init__(path, "parquet")
        self.rows_per_part = rows_per_part
        self._buffer: list[Record] = []
        self._next_part: int | None = None  # the number of the next part to write; None: not open

    @property
    def temp_path(self) -> Path:
        """Where a part is written before it is renamed into place (hidden: readers skip it)."""
        return self.path / ".part.parquet.tmp"

    def parts(self) -> list[Path]:
        """The finished parts, in order; BulkError for a folder that holds other (visible) things."""
        numbered = []
        for entry in self.path.iterdir():
            if entry.name.startswith((".", "_")):  # hidden from Parquet readers too
                continue
            match = PART_NAME.fullmatch(entry.name)
            if match is None or not entry.is_file():
                raise BulkError(f"{self.path} is not a caption-dir Parquet folder (it holds {entry.name!r})")
            numbered.append((int(match.group(1)), entry))
        return [entry for _, entry in sorted(numbered)]

    def load(self, retry_errors: bool = False) -> None:
        """Read the `path` and `error_code` of every part into `done`/`errors` (a later part wins);
        remove a temporary file a killed run left (`repaired`); with `retry_errors`, rewrite the parts
        holding error rows without them (a part left empty is removed). BulkError for a file in the
        place of the folder, a folder that is not caption-dir's, or a part that cannot be read."""
        if not self.path.exists():
            return
        if not self.path.is_dir():
            raise BulkError(f"{self.path} is a file, not a Parquet output folder (the Parquet output is a "
                            "folder of parts: give another --out, or another --format)")
        _, pc, pq = _pyarrow()
        for leftover in self.path.glob(".part*.tmp"):
            leftover.unlink()
            self.repaired = True
        for part in self.parts():
            try:
                parquet = pq.ParquetFile(part)
                columns = ["path", "error_code"] + (["path_bytes_b64"] if "path_bytes_b64" in parquet.schema_arrow.names
                                                    else [])  # a part from before the column: all UTF-8
                table = parquet.read(columns=columns)
            except Exception as exc:  # pyarrow's ArrowInvalid, a missing column, OSError
                raise BulkError(f"{part} is not a caption-dir Parquet part ({exc}); remove it, and its images "
                                "are done again") from None
            if retry_errors and table["error_code"].null_count < table.num_rows:
                self._drop_errors(part)
                table = table.filter(pc.is_null(table["error_code"]))
            b64s = table["path_bytes_b64"].to_pylist() if "path_bytes_b64" in table.column_names else [None] * len(table)
            for written, b64, code in zip(table["path"].to_pylist(), b64s, table["error_code"].to_pylist()):
                path = path_key(written, b64)
                self.done.add(path)
                if code is None:
                    self.errors.discard(path)
                else:
                    self.errors.add(path)

    def _drop_errors(self, part: Path) -> None:
        """Rewrite `part` without its error rows (atomically), or remove it if nothing is left."""
        _, pc, pq = _pyarrow()
        table = pq.ParquetFile(part).read()
        kept = table.filter(pc.is_null(table["error_code"]))
        if kept.num_rows:
            self._write_part(kept, part)
        else:
            part.unlink()

    def _write_part(self, table: Any, part: Path) -> None:
        """Write `table` to `temp_path`, to disk, and rename it to `part`."""
        _, _, pq = _pyarrow()
        tmp = self.temp_path
        with open(tmp, "wb") as handle:
            pq.write_table(table, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, part)

    def open(self) -> None:
        """Make the folder (if new); new parts are numbered after the last one there."""
        _pyarrow()
        self.path.mkdir(parents=True, exist_ok=True)
        numbers = [int(m.group(1)) for p in self.parts() if (m := PART_NAME.fullmatch(p.name))]
        self._next_part = max(numbers, default=-1) + 1
        self._buffer = []

    def write(self, records: Sequence[Record]) -> None:
        """Buffer the records (and mark their paths done); a part is written per `rows_per_part`."""
        assert self._next_part is not None, "open() first"
        for record in records:
            self._buffer.append(record)
            self.done.add(record.path)
        while len(self._buffer) >= self.rows_per_part:
            self._flush(self._buffer[: self.rows_per_part])
            self._buffer = self._buffer[self.rows_per_part:]

    def _flush(self, records: Sequence[Record]) -> None:
        assert self._next_part is not None, "open() first"
        pa, _, _ = _pyarrow()
        table = pa.Table.from_pylist([r.parquet_row() for r in records], schema=parquet_schema())
        self._write_part(table, self.path / f"part-{self._next_part:05d}.parquet")
        self._next_part += 1

    def close(self) -> None:
        """Write what is buffered as a last part."""
        if self._next_part is not None:
            if self._buffer:
                self._flush(self._buffer)
                self._buffer = []
            self._next_part = None


def open_output(out: Path, fmt: str | None = None, retry_errors: bool = False,
                log: Callable[[str], None] = lambda message: None, *,
                rows_per_part: int = ROWS_PER_PART) -> Output:
    """The output `out` in format `fmt` (see `format_for`): a file, or for parquet a folder
    (`ParquetOutput`, `rows_per_part` records a part), loaded for resuming (see `Output.load`; what it
    repaired or upgraded is logged), not yet opened for writing."""
    out = Path(out)
    fmt = format_for(out, fmt)
    output = ParquetOutput(out, rows_per_part=rows_per_part) if fmt == "parquet" else Output(out, fmt)
    output.load(retry_errors=retry_errors)
    if output.repaired and fmt == "parquet":
        log(f"{out}: removed an unfinished part (from a run that was stopped; its images are done again)")
    elif output.repaired:
        log(f"{out}: cut off a truncated last line (from a run that was stopped)")
    if output.upgraded:
        names = " and ".join(output.upgraded)
        log(f"{out}: added the {names} column{'s' if len(output.upgraded) > 1 else ''} (the file is from before "
            f"{'them' if len(output.upgraded) > 1 else 'it'})")
    return output
