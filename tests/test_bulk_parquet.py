"""`captioner caption-dir --out X.parquet` (or `--format parquet`): the Parquet output of app/bulk/output.py,
a folder of parts read as one table; buffering, atomic parts, resuming, a killed run, --retry-errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from app.bulk import BulkError, Output, Record, error_record, format_for, open_output
from app.bulk.output import ParquetOutput, display_path
from captioner.cli import cli
from tests.support.live_server import image_bytes

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

CAPTION = pa.struct([("text", pa.string()), ("score", pa.float64()), ("normalized_score", pa.float64())])
LABEL = pa.struct([("name", pa.string()), ("class_id", pa.int64()), ("probability", pa.float64())])
COLUMNS = {"path": pa.string(), "captions": pa.list_(CAPTION), "labels": pa.list_(LABEL),
           "error_code": pa.string(), "error_message": pa.string(), "path_bytes_b64": pa.string()}

RECORDS = [
    Record("a/cat.jpg", captions=[{"text": "a cat on a sofa", "score": -1.25, "normalized_score": -0.3125},
                                  {"text": "a cat", "score": -2.5, "normalized_score": -1.25}],
           labels=[{"name": "tabby, tabby cat", "class_id": 281, "probability": 0.612345},
                   {"name": "Egyptian cat", "class_id": 285, "probability": 0.2}]),
    Record("a/b/dog.png", captions=[{"text": "a dog", "score": -0.5, "normalized_score": -0.25}]),  # no labels
    error_record("a/broken.jpg", "corrupt_image", "cannot identify image file"),
    Record("odd/naN score.gif", captions=[{"text": "something", "score": None, "normalized_score": None}],
           labels=[{"name": "x", "class_id": 0, "probability": None}]),
    Record("zero_labels.jpg", captions=[{"text": "a thing", "score": -3.0, "normalized_score": -1.0}], labels=[]),
    error_record("d/gone.jpg", "unreadable_file", "No such file or directory"),
    Record("ünïcode/ß.webp", captions=[{"text": "a street at night", "score": -4.0, "normalized_score": -0.8}]),
    Record("latin-1/caf\udce9.jpg", captions=[{"text": "a cup", "score": -1.0, "normalized_score": -0.5}]),  # not UTF-8
]


def as_json(row: dict) -> dict:
    """A Parquet row as the JSON-lines record (Record.as_json) would be; written here independently."""
    out = {"path": row["path"]}
    if row["path_bytes_b64"] is not None:
        out["path_bytes_b64"] = row["path_bytes_b64"]
    if row["error_code"] is not None:
        return {**out, "error": {"code": row["error_code"], "message": row["error_message"]}}
    out["captions"] = row["captions"]
    if row["labels"] is not None:
        out["labels"] = row["labels"]
    return out


def part_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def write(out: Path, records, rows_per_part: int = 2, retry_errors: bool = False) -> ParquetOutput:
    output = open_output(out, retry_errors=retry_errors, rows_per_part=rows_per_part)
    assert isinstance(output, ParquetOutput)
    with output:
        for record in records:
            output.write([record])
    return output


def test_format_for():
    assert format_for(Path("x.parquet"), None) == "parquet"
    assert format_for(Path("x.PARQUET"), None) == "parquet"
    assert format_for(Path("x.jsonl"), "Parquet") == "parquet"
    assert format_for(Path("x.parquet"), "jsonl") == "jsonl"  # --format wins
    assert format_for(Path("x.csv"), None) == "csv" and format_for(Path("x.txt"), None) == "jsonl"
    with pytest.raises(BulkError, match=r"jsonl, csv or parquet, not 'xml'"):
        format_for(Path("x.parquet"), "xml")


def test_records_are_one_table_of_parts(tmp_path):
    out = tmp_path / "sub" / "captions.parquet"
    output = open_output(out, rows_per_part=3)
    assert isinstance(output, ParquetOutput) and output.temp_path.parent == out
    with output:
        output.write(RECORDS[:2])
        assert not out.exists() or part_names(out) == []  # buffered: nothing written yet
        output.write(RECORDS[2:5])  # 5 buffered: one part of 3, 2 left
        assert part_names(out) == ["part-00000.parquet"]
        output.write(RECORDS[5:])
        assert part_names(out) == ["part-00000.parquet", "part-00001.parquet"]
    assert part_names(out) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]  # the rest, at close

    table = pq.read_table(out)
    assert {name: table.schema.field(name).type for name in table.schema.names} == COLUMNS
    assert table.schema.names == list(COLUMNS)
    rows = table.to_pylist()
    assert [as_json(row) for row in rows] == [r.as_json() for r in RECORDS]
    assert rows[3]["captions"][0]["score"] is None and rows[3]["labels"][0]["probability"] is None  # null, not NaN
    assert rows[1]["labels"] is None and rows[4]["labels"] == []
    assert rows[2]["captions"] is None and rows[2]["labels"] is None and rows[0]["error_code"] is None

    import pandas as pd

    frame = pd.read_parquet(out)
    assert list(frame["path"]) == [display_path(r.path) for r in RECORDS]
    assert frame["error_code"].notna().sum() == 2


def test_resume_sees_the_same_and_appends_a_part(tmp_path):
    out = tmp_path / "captions.parquet"
    first = write(out, RECORDS)
    second = open_output(out)
    assert isinstance(second, ParquetOutput)
    assert second.done == first.done == {r.path for r in RECORDS}
    assert second.errors == {"a/broken.jpg", "d/gone.jpg"}
    assert not second.repaired and second.is_done("a/cat.jpg") and not second.is_done("new.jpg")
    before = part_names(out)
    with second:
        second.write([Record("new.jpg", captions=[{"text": "new", "score": -1.0, "normalized_score": -1.0}])])
    assert part_names(out) == [*before, "part-00004.parquet"]
    assert pq.read_table(out).column("path").to_pylist() == [display_path(r.path) for r in RECORDS] + ["new.jpg"]
    with second:  # opened again with nothing written: no empty part
        pass
    assert len(part_names(out)) == len(before) + 1


def test_a_killed_run_leaves_whole_parts(tmp_path):
    out = tmp_path / "captions.parquet"
    killed = ParquetOutput(out, rows_per_part=2)
    killed.load()
    killed.open()
    killed.write(RECORDS[:3])  # one part of 2; RECORDS[2] still buffered
    # killed here, while writing the next part: no close(), half a part in the temporary file
    killed.temp_path.write_bytes(b"PAR1 half a part")
    assert part_names(out) == [".part.parquet.tmp", "part-00000.parquet"]

    logged: list[str] = []
    again = open_output(out, rows_per_part=2, log=logged.append)
    assert again.repaired and "removed an unfinished part" in logged[0]
    assert part_names(out) == ["part-00000.parquet"]  # the temporary file is gone
    assert again.done == {RECORDS[0].path, RECORDS[1].path}  # the buffered record is done again
    todo = [r for r in RECORDS if not again.is_done(r.path)]
    with again:
        again.write(todo)
    paths = pq.read_table(out).column("path").to_pylist()
    assert sorted(paths) == sorted(display_path(r.path) for r in RECORDS)  # nothing lost, nothing twice
    assert not open_output(out).repaired


def test_retry_errors_rewrites_the_parts(tmp_path):
    out = tmp_path / "captions.parquet"
    records = [RECORDS[0], RECORDS[2], RECORDS[5], RECORDS[1], RECORDS[3], RECORDS[6]]
    write(out, records)  # parts: [cat, broken] [gone, dog] [nan, unicode]
    untouched = (out / "part-00002.parquet").read_bytes()
    write(out, [error_record("only/error.jpg", "too_large", "too large")])  # part-00003: errors only

    retried = open_output(out, retry_errors=True)
    assert retried.errors == set()
    assert retried.done == {r.path for r in records if r.error is None}
    assert part_names(out) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]  # 3: emptied, removed
    assert (out / "part-00002.parquet").read_bytes() == untouched  # a part without errors is left alone
    table = pq.read_table(out)
    assert table.schema.names == list(COLUMNS)
    assert [as_json(row) for row in table.to_pylist()] == [r.as_json() for r in records if r.error is None]

    with retried:  # the files are tried again: one fails again, one is captioned now
        retried.write([error_record("a/broken.jpg", "corrupt_image", "still broken"),
                       Record("d/gone.jpg", captions=[{"text": "back", "score": -1.0, "normalized_score": -1.0}])])
    assert part_names(out)[-1] == "part-00003.parquet"  # numbered after the last part there
    resumed = open_output(out)
    assert resumed.errors == {"a/broken.jpg"} and resumed.done == {r.path for r in records}
    paths = pq.read_table(out).column("path").to_pylist()
    assert len(paths) == len(set(paths)) == len(records)


def test_what_is_not_a_parquet_output(tmp_path, monkeypatch):
    a_file = tmp_path / "captions.parquet"
    a_file.write_bytes(b"not a folder")
    with pytest.raises(BulkError, match="is a file, not a Parquet output folder"):
        open_output(a_file)
    (tmp_path / "sub").mkdir()
    for fmt in ("jsonl", "csv"):  # a folder for these: the error it always was
        with pytest.raises(BulkError, match="is a folder, not an output file"):
            open_output(tmp_path / "sub", fmt)

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"...")
    with pytest.raises(BulkError, match="not a caption-dir Parquet folder .*'cat.jpg'"):
        open_output(foreign, "parquet")
    empty = tmp_path / "empty.parquet"
    empty.mkdir()
    (empty / "_SUCCESS").write_bytes(b"")  # hidden from Parquet readers: allowed, as dot files are
    assert open_output(empty).done == set()

    damaged = tmp_path / "damaged.parquet"
    damaged.mkdir()
    (damaged / "part-00000.parquet").write_bytes(b"garbage")
    with pytest.raises(BulkError, match="part-00000.parquet is not a caption-dir Parquet part"):
        open_output(damaged)

    # without pyarrow: a clear error, whether asked by name or by suffix
    for name in ("pyarrow", "pyarrow.parquet", "pyarrow.compute"):
        monkeypatch.setitem(sys.modules, name, None)
    for out, fmt in [(tmp_path / "x.parquet", None), (tmp_path / "x.jsonl", "parquet")]:
        with pytest.raises(BulkError, match=r"Parquet output needs pyarrow: pip install 'captioner\[ray\]'"):
            open_output(out, fmt)
    with pytest.raises(BulkError, match="needs pyarrow"):
        ParquetOutput(tmp_path / "y.parquet").open()
    assert isinstance(open_output(tmp_path / "x.jsonl"), Output)  # the other formats do not need it


# ---- the command, end to end ----------------------------------------------------------------------------


def invoke(*args: str):
    return CliRunner().invoke(cli, ["caption-dir", *args], catch_exceptions=False)


@pytest.fixture
def photos(tmp_path) -> Path:
    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for i, fmt in enumerate(["JPEG", "PNG", "JPEG", "PNG", "GIF"]):
        path = root / ("sub" if i % 2 else "") / f"img{i}.{fmt.lower()}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8), fmt))
    jpeg = (root / "img0.jpeg").read_bytes()
    (root / "broken.jpg").write_bytes(jpeg[: len(jpeg) // 4])
    (root / "notes.txt").write_text("not an image\n", encoding="utf-8")
    return root


def test_caption_dir_to_parquet_and_resume(photos, tiny_bundle, tmp_path):
    out = tmp_path / "captions.parquet"
    args = [str(photos), "--out", str(out), "--bundle", str(tiny_bundle), "--device", "cpu", "--batch-size", "2",
            "--no-progress"]
    result = invoke(*args)
    assert result.exit_code == 1, result.output  # broken.jpg failed
    assert "6 images found" in result.stderr and "5 captioned now" in result.stderr and "1 failed" in result.stderr
    table = pq.read_table(out)
    assert table.schema.names == list(COLUMNS)
    rows = {row["path"]: row for row in table.to_pylist()}
    assert len(rows) == table.num_rows == 6
    assert set(rows) == {"img0.jpeg", "sub/img1.png", "img2.jpeg", "sub/img3.png", "img4.gif", "broken.jpg"}
    for path, row in rows.items():
        if path == "broken.jpg":
            assert row["error_code"] == "corrupt_image" and row["captions"] is None
        else:
            assert row["error_code"] is None and len(row["captions"]) == 1 and row["captions"][0]["text"]
            assert row["labels"] is None  # a bundle without labels
    first = {p.name: p.read_bytes() for p in out.iterdir()}

    # the same command again: nothing to do, nothing written
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "6 already in" in result.stderr and "0 captioned now" in result.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first

    # --retry-errors: broken.jpg is tried again (and fails again), once
    result = invoke(*args, "--retry-errors")
    assert result.exit_code == 1 and "0 captioned now" in result.stderr and "1 failed" in result.stderr
    again = pq.read_table(out).to_pylist()
    assert len(again) == 6 and sorted(r["path"] for r in again) == sorted(rows)
    assert json.dumps(sorted(again, key=lambda r: r["path"])) == json.dumps(sorted(rows.values(), key=lambda r: r["path"]))


def test_caption_dir_format_parquet_with_labels(photos, tiny_bundles, tmp_path):
    bundle = tiny_bundles(attention=True, max_length=8, labels=True)
    out = tmp_path / "captions.out"  # no .parquet: --format says so
    result = invoke(str(photos / "sub"), "--out", str(out), "--format", "parquet", "--labels", "2",
                    "--bundle", str(bundle), "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    assert sorted(r["path"] for r in rows) == ["img1.png", "img3.png"]
    for row in rows:
        assert [sorted(x) for x in row["labels"]] == [["class_id", "name", "probability"]] * 2
        assert isinstance(row["labels"][0]["class_id"], int) and row["labels"][0]["name"]
