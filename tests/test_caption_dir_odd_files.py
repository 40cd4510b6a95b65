"""`captioner caption-dir` on odd files (issue 24): file names that are not UTF-8 (captioned, and recorded
losslessly and readably in JSON lines, CSV and Parquet, locally and with `--url`; resume matches them), and
anything that is not a regular file (a FIFO, a socket, a symlink to a device, a broken symlink): an
`unreadable_file` record "not a regular file ...", never a hang or a read of an endless device."""

from __future__ import annotations

import base64
import csv
import json
import os
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from captioner.cli import cli
from tests.support.live_server import image_bytes

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

ODD = b"d/\xff\xfe.jpg"  # not UTF-8
ODD_TOO = b"caf\xe9 latin-1.png"  # Latin-1, as old archives have them
LITERAL = "d/\\xff\\xfe.jpg"  # a UTF-8 name that looks like ODD's display form: a different file
PLAIN = "plain.jpg"


def _image(seed: int, fmt: str) -> bytes:
    rng = np.random.default_rng(seed)
    return image_bytes(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), fmt)


@pytest.fixture
def odd_folder(tmp_path) -> Path:
    root = tmp_path / "photos"
    (root / "d").mkdir(parents=True)
    for seed, (name, fmt) in enumerate([(ODD, "JPEG"), (ODD_TOO, "PNG"), (LITERAL.encode(), "JPEG"),
                                        (PLAIN.encode(), "JPEG")]):
        with open(os.path.join(os.fsencode(root), name), "wb") as f:
            f.write(_image(seed, fmt))
    return root


@pytest.fixture(scope="module")
def bundle(tiny_bundles) -> Path:
    return tiny_bundles(attention=True, max_length=8)


def invoke(*args: str):
    return CliRunner().invoke(cli, ["caption-dir", *args], catch_exceptions=False)


def raw_path(record: dict) -> bytes:
    """The file's relative path as bytes, from a record (`path_bytes_b64` where the name is not UTF-8)."""
    if record.get("path_bytes_b64"):
        return base64.b64decode(record["path_bytes_b64"])
    return record["path"].encode("utf-8")


WANT = {ODD, ODD_TOO, LITERAL.encode(), PLAIN.encode()}
DISPLAY = {ODD: "d/\\xff\\xfe.jpg", ODD_TOO: "caf\\xe9 latin-1.png", LITERAL.encode(): LITERAL, PLAIN.encode(): PLAIN}


def _check(records: list[dict]) -> None:
    got = {raw_path(r): r for r in records}
    assert set(got) == WANT and len(records) == len(WANT)
    for raw, record in got.items():
        assert record["path"] == DISPLAY[raw]  # readable: undecodable bytes as \xNN
        assert bool(record.get("path_bytes_b64")) == (raw in (ODD, ODD_TOO))
        assert record["captions"] and record["captions"][0]["text"]


def test_non_utf8_names_in_every_format_and_resume(odd_folder, bundle, tmp_path):
    for out in (tmp_path / "c.jsonl", tmp_path / "c.csv", tmp_path / "c.parquet"):
        args = (str(odd_folder), "--out", str(out), "--bundle", str(bundle), "--device", "cpu", "--no-progress")
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        assert "4 images found" in result.stderr and "4 captioned now" in result.stderr
        if out.suffix == ".jsonl":
            text = out.read_text(encoding="utf-8")  # valid UTF-8
            records = [json.loads(line) for line in text.splitlines()]
        elif out.suffix == ".csv":
            with open(out, encoding="utf-8", newline="") as f:
                rows = list(csv.DictReader(f))
            assert "path_bytes_b64" in rows[0]
            records = [{"path": r["path"], "captions": [{"text": r["text"]}],
                        **({"path_bytes_b64": r["path_bytes_b64"]} if r["path_bytes_b64"] else {})} for r in rows]
        else:
            table = pq.read_table(out)
            records = [{k: v for k, v in row.items() if v is not None} for row in table.to_pylist()]
        _check(records)
        # a second run finds every record: nothing is done twice
        again = invoke(*args)
        assert again.exit_code == 0, again.output
        assert "4 already in" in again.stderr and "0 captioned now" in again.stderr


def test_non_utf8_names_through_a_service(odd_folder):
    """--url: the multipart filename can be encoded (U+FFFD for each byte that is not UTF-8), the records
    as locally."""
    import httpx

    from app.bulk import Item, ServiceClient, caption_remotely, scan_folder

    bodies: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = request.read()
        bodies.append(body)
        count = body.count(b'name="images"')
        return httpx.Response(200, json={"results": [{"captions": [{"text": f"t{i}", "score": -1.0,
                                                                     "normalized_score": -0.5}]}
                                                     for i in range(count)]})

    items: list[Item] = scan_folder(odd_folder).images
    with ServiceClient("http://service.test", transport=httpx.MockTransport(handler)) as client:
        records = [r for batch in caption_remotely(items, client, {"labels": 0}, batch_size=8, concurrency=1)
                   for r in batch]
    assert len(bodies) == 1 and "filename=\"\ufffd\ufffd.jpg\"".encode() in bodies[0]
    _check([r.as_json() for r in records])


def _unblock(fifo: Path) -> None:
    """Open the FIFO for writing (and close it), so a reader stuck opening it goes on."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


def test_not_regular_files_are_error_records_not_hangs(tmp_path, bundle):
    root = tmp_path / "src"
    root.mkdir()
    (root / "ok.png").write_bytes(_image(7, "PNG"))
    os.mkfifo(root / "pipe.jpg")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(root / "sock.jpg"))
    os.symlink("/dev/zero", root / "zero.jpg")
    os.symlink("/dev/null", root / "null.jpg")
    os.symlink(root / "nowhere.jpg", root / "broken.jpg")
    out = tmp_path / "out.jsonl"
    outcome: dict = {}

    def run() -> None:
        outcome["result"] = invoke(str(root), "--out", str(out), "--bundle", str(bundle), "--device", "cpu",
                                   "--no-progress")

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(60)
    try:
        assert not worker.is_alive(), "caption-dir hangs on a file that is not a regular file"
    finally:
        _unblock(root / "pipe.jpg")
        worker.join(10)
        sock.close()
    result = outcome["result"]
    assert result.exit_code == 1, result.output  # the odd files failed; the image was captioned
    records = {r["path"]: r for r in map(json.loads, out.read_text(encoding="utf-8").splitlines())}
    assert set(records) == {"ok.png", "pipe.jpg", "sock.jpg", "zero.jpg", "null.jpg", "broken.jpg"}
    assert records["ok.png"]["captions"]
    kinds = {"pipe.jpg": "named pipe", "sock.jpg": "socket", "zero.jpg": "device", "null.jpg": "device",
             "broken.jpg": "broken symbolic link"}
    for name, kind in kinds.items():
        error = records[name]["error"]
        assert error["code"] == "unreadable_file", error
        assert error["message"].startswith("not a regular file") and kind in error["message"], error


def test_reading_checks_the_file_kind_again(tmp_path):
    """A file replaced by a FIFO after the scan (a race): Item.read refuses it at once."""
    from app.bulk import Item

    os.mkfifo(tmp_path / "late.jpg")
    item = Item("late.jpg", tmp_path / "late.jpg")
    outcome: dict = {}

    def read() -> None:
        try:
            item.read()
        except OSError as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=read, daemon=True)
    worker.start()
    worker.join(10)
    try:
        assert not worker.is_alive(), "Item.read blocks on a FIFO"
    finally:
        _unblock(tmp_path / "late.jpg")
        worker.join(10)
    assert "not a regular file" in str(outcome["error"])
