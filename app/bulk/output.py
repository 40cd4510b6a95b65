"""The records of a caption-dir run and the output file they go to: JSON lines or CSV, appended to,
and resumed from.

The record schema (one per image; paths relative to the folder, `/`-separated):

  JSON lines (default)  {"path": "a/b.jpg", "captions": [{"text", "score", "normalized_score"}, ...],
                         "labels": [{"name", "class_id", "probability"}, ...]}
                        {"path": "a/bad.jpg", "error": {"code": "corrupt_image", "message": "..."}}
  CSV (`--format csv`, or an --out ending in .csv): the columns `CSV_COLUMNS`; one row per caption
  (rank 1 = best), one row per failed file (no rank). The `labels` cell is the same on each of the
  image's caption rows: `class_id:name:probability` per label, joined by `|` (a `|` in a class name
  is written as `/`), empty with no labels and in error rows.

`labels` is absent (JSON) / empty (CSV) when none were asked (--labels 0) and in error records.

Resuming (`open_output`): the paths already in the file, captioned or failed, are done; a truncated
last line (a killed run) is cut off first; `retry_errors` drops the error records (the file is
rewritten), so those files are tried again. Records without labels (an older run, another --labels)
count as done all the same; a CSV from before the labels column gets the column (empty) added to its
header and rows.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.bulk.errors import BulkError

FORMATS = ("jsonl", "csv")
CSV_COLUMNS = ["path", "rank", "text", "score", "normalized_score", "error_code", "error_message", "labels"]
OLD_CSV_COLUMNS = CSV_COLUMNS[:-1]  # before the labels column: still read, and upgraded when resumed


# ---- the records --------------------------------------------------------------------------------------


@dataclass
class Record:
    """What the output says about one file: its captions (and labels), or an error."""

    path: str
    captions: list[dict[str, Any]] | None = None  # {text, score, normalized_score}, best first
    error: dict[str, str] | None = None  # {code, message}
    labels: list[dict[str, Any]] | None = None  # {name, class_id, probability}, best first; None: not asked

    def as_json(self) -> dict[str, Any]:
        """The JSON-lines object."""
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        out: dict[str, Any] = {"path": self.path, "captions": self.captions or []}
        if self.labels is not None:
            out["labels"] = self.labels
        return out

    def csv_rows(self) -> list[list[Any]]:
        """The CSV rows (in `CSV_COLUMNS` order): one per caption, or one for an error."""
        if self.error is not None:
            return [[self.path, "", "", "", "", self.error.get("code", ""), self.error.get("message", ""), ""]]
        labels = labels_to_csv(self.labels)
        return [[self.path, rank, c["text"], _fmt(c["score"]), _fmt(c["normalized_score"]), "", "", labels]
                for rank, c in enumerate(self.captions or [], 1)]

    @property
    def failure(self) -> str | None:
        """"code: message" for an error record (as the summary names it), else None."""
        return None if self.error is None else f"{self.error['code']}: {self.error['message']}"


def error_record(rel: str, code: str, message: str) -> Record:
    return Record(rel, error={"code": code, "message": message})


def caption_dicts(captions: Iterable[Any]) -> list[dict[str, Any]]:
    """Engine Captions (or API caption dicts) -> {text, score, normalized_score} dicts, scores rounded
    to 6 decimals (None where not finite)."""
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


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _fmt(x: float | None) -> str:
    return "" if x is None else repr(float(x))


# ---- the output file ------------------------------------------------------------------------------------


def format_for(out: Path, fmt: str | None) -> str:
    """The output format: `fmt` (jsonl or csv, any case), else csv for a `.csv` file, else jsonl."""
    if fmt is None:
        return "csv" if Path(out).suffix.lower() == ".csv" else "jsonl"
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
    """The output file: what it already holds (`load`, for resuming) and appending new records
    (`open`, `write`, `close`; or `with output:`). A written record is flushed at once, so a killed
    run leaves whole records and at most a cut last line."""

    def __init__(self, path: Path, fmt: str):
        self.path = Path(path)
        self.fmt = fmt
        self.done: set[str] = set()  # the paths with a record (captioned or failed): not done again
        self.errors: set[str] = set()  # those of them with an error record
        self.repaired = False  # load() cut off a truncated last line
        self.upgraded = False  # a CSV from before the labels column, rewritten with it
        self._legacy_header = False
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


def open_output(out: Path, fmt: str | None = None, retry_errors: bool = False,
                log: Callable[[str], None] = lambda message: None) -> Output:
    """The output file `out` in format `fmt` (see `format_for`), loaded for resuming (see
    `Output.load`; what it repaired or upgraded is logged), not yet opened for writing."""
    out = Path(out)
    output = Output(out, format_for(out, fmt))
    output.load(retry_errors=retry_errors)
    if output.repaired:
        log(f"{out}: cut off a truncated last line (from a run that was stopped)")
    if output.upgraded:
        log(f"{out}: added the labels column (the file is from before it)")
    return output
