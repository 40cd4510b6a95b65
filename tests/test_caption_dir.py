"""`captioner caption-dir`: caption a folder into JSON lines or CSV, locally (tiny bundles and the real
models/default) or through a running service (`--url`, with retries on 503), and resume; ImageNet labels
(`--labels`) in both formats and both modes."""

from __future__ import annotations

import csv
import http.server
import json
import os
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from app.bulk import CSV_COLUMNS, OLD_CSV_COLUMNS, labels_from_csv, labels_to_csv, retry_after_seconds, sniff_image
from app.bulk.output import LABELS_CSV_COLUMNS
from captioner.cli import cli
from model_export.tiny_bundle import LABEL_NAMES
from tests.support.live_server import REPO, image_bytes

skimage_data = pytest.importorskip("skimage.data")

IMAGES = {  # relative path -> how it is made; names lie on purpose where noted
    "a/cat.jpg": ("chelsea", "JPEG"),
    "a/b/astronaut.png": ("astronaut", "PNG"),
    "a/b/c/coins.gif": ("coins", "GIF"),
    "a/b/c/rocket.webp": ("rocket", "WEBP"),
    "d/coffee.bmp": ("coffee", "BMP"),
    "d/camera.tiff": ("camera", "TIFF"),
    "d/really_a_png.txt": ("hubble_deep_field", "PNG"),   # wrong extension: still an image
    "photo.png": ("chelsea", "JPEG"),                      # a JPEG called .png
}
CORRUPT = "a/broken.jpg"
TEXT = "a/b/notes.txt"
DANGLING = "d/gone.jpg"  # a symlink to nothing: listed, cannot be read


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for rel, (name, fmt) in IMAGES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        array = getattr(skimage_data, name)()
        if array.dtype != np.uint8:
            array = (255 * (array - array.min()) / max(1e-9, float(array.max() - array.min()))).astype(np.uint8)
        if array.ndim == 3 and array.shape[2] == 4:
            array = array[..., :3]
        if max(array.shape[:2]) > 400:  # keep the test quick
            array = array[::2, ::2]
        path.write_bytes(image_bytes(np.ascontiguousarray(array), fmt))
    jpeg = image_bytes(skimage_data.chelsea(), "JPEG")
    (root / CORRUPT).write_bytes(jpeg[: len(jpeg) // 4])
    (root / TEXT).write_text("shopping list: milk, bread\n", encoding="utf-8")
    os.symlink(root / "nowhere.jpg", root / DANGLING)
    (root / "empty_folder").mkdir()
    return root


@pytest.fixture(scope="module")
def sat_bundle(tiny_bundles) -> Path:
    return tiny_bundles(attention=True, max_length=8)


@pytest.fixture(scope="module")
def labels_bundle(tiny_bundles) -> Path:
    """The same model as sat_bundle, plus the stand-in ImageNet head (10 classes)."""
    return tiny_bundles(attention=True, max_length=8, labels=True)


def invoke(*args: str, env: dict[str, str] | None = None):
    result = CliRunner().invoke(cli, ["caption-dir", *args], catch_exceptions=False, env=env)
    return result


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def by_path(records: list[dict]) -> dict[str, dict]:
    out = {r["path"]: r for r in records}
    assert len(out) == len(records), "duplicate paths"
    return out


# ---- helpers of app/bulk/ --------------------------------------------------------------------------------


def test_labels_csv_cell_round_trip():
    labels = [{"name": "tabby, tabby cat", "class_id": 281, "probability": 0.612345},
              {"name": "odd: name", "class_id": 7, "probability": 1e-06}, {"name": "x", "class_id": 0, "probability": 0.0}]
    cell = labels_to_csv(labels)
    assert cell == "281:tabby, tabby cat:0.612345|7:odd: name:0.000001|0:x:0.000000"
    assert labels_from_csv(cell) == labels
    assert labels_to_csv(None) == labels_to_csv([]) == "" and labels_from_csv("") is None
    assert labels_from_csv("not a labels cell") is None  # damaged: the record stays, without labels
    assert labels_to_csv([{"name": "a|b", "class_id": 1, "probability": 0.5}]) == "1:a/b:0.500000"


def test_sniff_image_by_content():
    for name, fmt in [("chelsea", "JPEG"), ("astronaut", "PNG"), ("coins", "GIF"), ("rocket", "WEBP"),
                      ("coffee", "BMP"), ("camera", "TIFF")]:
        assert sniff_image(image_bytes(getattr(skimage_data, name)(), fmt)[:32]) == fmt
    assert sniff_image(b"BM is a text file that starts like a bitmap") is None
    assert sniff_image(b"hello") is None and sniff_image(b"") is None


def test_retry_after_parsing():
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= retry_after_seconds(future) <= 31
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0



def test_service_client_retry_rules():
    """ServiceClient (httpx): 429/502/503/504 and failed connections are retried with the backoff or
    as long as Retry-After says; other answers come back at once; the retries spent, BulkError."""
    import httpx

    from app.bulk import BulkError, ServiceClient

    answers = [httpx.ConnectError("refused"), httpx.Response(502), httpx.Response(429, headers={"Retry-After": "2"}),
               httpx.ReadTimeout("slow"), httpx.Response(200, json={"ok": True})]
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    slept: list[float] = []
    logged: list[str] = []
    with ServiceClient("http://service.test/", retries=5, sleep=slept.append, log=logged.append,
                       transport=httpx.MockTransport(handler)) as client:
        assert client.json("GET", "/v1/model") == {"ok": True}
        assert client.retried == 4 and len(seen) == 5
        assert 0.5 <= slept[0] <= 0.625 and 1.0 <= slept[1] <= 1.25 and slept[2] == 2.0 and 4.0 <= slept[3] <= 5.0
        assert logged[0].startswith("GET /v1/model: connection failed (refused); retrying in 0.")
        assert logged[1].startswith("GET /v1/model: HTTP 502; retrying in 1.")
        assert logged[2] == "GET /v1/model: HTTP 429; retrying in 2.0 s"
        assert str(seen[0].url) == "http://service.test/v1/model"

        answers[:] = [httpx.Response(422, json={"error": {"code": "invalid_parameter", "message": "no"}})]
        with pytest.raises(BulkError, match=r"answered HTTP 422 \(invalid_parameter: no\)"):
            client.json("POST", "/v1/captions/batch")
        assert client.retried == 4 and not answers  # not retried

    slept.clear()
    with ServiceClient("http://service.test", retries=2, sleep=slept.append, max_wait=3.0,
                       transport=httpx.MockTransport(lambda r: httpx.Response(503, headers={"Retry-After": "30"}))) as c:
        with pytest.raises(BulkError, match="GET http://service.test/v1/model: HTTP 503, still after 2 retries"):
            c.request("GET", "/v1/model")
    assert slept == [3.0, 3.0]  # Retry-After, capped at max_wait
    for bad in ("ftp://x", "http://", "http://[::1"):
        with pytest.raises(BulkError, match="--url"):
            ServiceClient(bad)


def test_remote_upload_is_one_multipart_request_per_batch(tmp_path):
    """caption_remotely: each batch one POST with httpx's multipart body (field `images`, the file
    name, application/octet-stream) and the decoding options in the query; too large and unreadable
    files become error records without being sent."""
    import httpx

    from app.bulk import Item, ServiceClient, caption_remotely

    files = {"a.jpg": b"\xff\xd8\xffjpeg", "b.png": b"\x89PNG\r\n\x1a\npng", 'odd"name.jpg': b"\xff\xd8\xffodd",
             "big.jpg": b"\xff\xd8\xff" + b"x" * 100}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    items = [Item(name, tmp_path / name) for name in files] + [Item("gone.jpg", tmp_path / "gone.jpg")]
    bodies: list[tuple[str, str, bytes]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = request.read()
        bodies.append((str(request.url), request.headers["content-type"], body))
        count = body.count(b'name="images"')
        return httpx.Response(200, json={"results": [{"captions": [{"text": f"t{i}", "score": -1.0,
                                                                     "normalized_score": -0.5}]}
                                                     for i in range(count)]})

    with ServiceClient("http://service.test", transport=httpx.MockTransport(handler)) as client:
        batches = list(caption_remotely(items, client, {"max_length": 6, "strategy": None, "labels": 0},
                                        batch_size=3, concurrency=1, max_upload_bytes=50))
    records = {r.path: r for batch in batches for r in batch}
    assert set(records) == set(files) | {"gone.jpg"}
    assert records["big.jpg"].error["code"] == "file_too_large"
    assert records["gone.jpg"].error["code"] == "unreadable_file"
    assert records["a.jpg"].captions == [{"text": "t0", "score": -1.0, "normalized_score": -0.5}]
    assert len(bodies) == 1  # the second batch had nothing to send
    url, ctype, body = bodies[0]
    assert url == "http://service.test/v1/captions/batch?max_length=6&labels=0"
    assert ctype.startswith("multipart/form-data; boundary=")
    assert body.count(b"Content-Type: application/octet-stream") == 3
    assert b'filename="a.jpg"' in body and b'filename="odd%22name.jpg"' in body and files["b.png"] in body


@pytest.mark.service  # starts a subprocess
def test_the_package_imports_light():
    """`captioner` (app.cli) and the service's app factory load no HTTP client, no Ray and no pyarrow, and
    the CLI no engine until caption-dir runs; the modules a
    runner of its own reuses (source, output, job) load neither typer nor Pillow."""
    import subprocess
    import sys

    script = ("import sys, app.cli, app.main, app.bulk.source, app.bulk.output, app.bulk.job; "
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('httpx', 'httpcore', 'PIL', 'onnxruntime', "
              "'ray', 'pyarrow')))")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    script = "import sys, app.bulk.job; print(sorted(m for m in sys.modules if m.split('.')[0] in ('typer', 'PIL')))"
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"

# ---- locally ---------------------------------------------------------------------------------------------


def test_folder_to_jsonl_and_resume(folder, sat_bundle, tmp_path):
    out = tmp_path / "captions.jsonl"
    result = invoke(str(folder), "--out", str(out), "--bundle", str(sat_bundle), "--device", "cpu",
                    "--batch-size", "3", "--no-progress")
    assert result.exit_code == 1, result.output  # the corrupt and the dangling file failed
    records = by_path(read_jsonl(out))
    assert set(records) == set(IMAGES) | {CORRUPT, DANGLING}
    for rel in IMAGES:
        caps = records[rel]["captions"]
        assert len(caps) == 1 and caps[0]["text"] and caps[0]["score"] <= 0 and "normalized_score" in caps[0]
    assert records[CORRUPT]["error"]["code"] == "corrupt_image"
    assert records[DANGLING]["error"]["code"] == "unreadable_file"
    assert TEXT not in records
    stderr = result.stderr
    assert "9 images found" in stderr and "8 captioned now" in stderr and "2 failed" in stderr
    assert f"not images: {TEXT}" in stderr and f"failed: {CORRUPT}: corrupt_image" in stderr
    # the same picture twice (cat.jpg, photo.png) gets the same caption
    assert records["a/cat.jpg"]["captions"] == records["photo.png"]["captions"]
    first = out.read_text(encoding="utf-8")

    # a second run has nothing to do
    result = invoke(str(folder), "--out", str(out), "--bundle", str(sat_bundle), "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "9 already in" in result.stderr  # the dangling link is not an image: recorded, not "found"
    assert "0 captioned now" in result.stderr
    assert out.read_text(encoding="utf-8") == first

    # delete some lines, and leave a truncated last line as a killed run would
    lines = first.splitlines(keepends=True)
    kept = lines[:4]
    out.write_text("".join(kept) + lines[5][: len(lines[5]) // 2], encoding="utf-8")
    result = invoke(str(folder), "--out", str(out), "--bundle", str(sat_bundle), "--device", "cpu",
                    "--batch-size", "4", "--no-progress")
    assert "truncated last line" in result.stderr
    resumed = read_jsonl(out)
    again = by_path(resumed)  # no duplicates
    assert set(again) == set(records)
    assert resumed[:4] == [json.loads(line) for line in kept]
    for rel, record in records.items():
        assert again[rel] == record, rel

    # --retry-errors drops the two error records and tries those files again (once each)
    result = invoke(str(folder), "--out", str(out), "--bundle", str(sat_bundle), "--device", "cpu",
                    "--retry-errors", "--no-progress")
    assert result.exit_code == 1 and "2 captioned now" not in result.stderr and "2 failed" in result.stderr
    final = by_path(read_jsonl(out))
    assert final == records


def test_csv_with_several_captions(folder, sat_bundle, tmp_path):
    out = tmp_path / "captions.csv"
    args = [str(folder), "--out", str(out), "--bundle", str(sat_bundle), "--device", "cpu", "--no-progress",
            "--strategy", "beam", "--beam-size", "3", "--num-captions", "2"]
    result = invoke(*args)
    assert result.exit_code == 1, result.output

    def rows():
        with open(out, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))

    first = rows()
    assert list(first[0]) == ["path", "rank", "text", "score", "normalized_score", "error_code", "error_message",
                              "labels", "path_bytes_b64"]
    assert all(r["labels"] == "" for r in first)  # a bundle without labels
    assert all(r["path_bytes_b64"] == "" for r in first)  # every name is UTF-8
    captioned = [r for r in first if not r["error_code"]]
    assert len(captioned) == 2 * len(IMAGES)
    for rel in IMAGES:
        mine = [r for r in captioned if r["path"] == rel]
        assert [r["rank"] for r in mine] == ["1", "2"]
        assert float(mine[0]["normalized_score"]) >= float(mine[1]["normalized_score"])
    errors = {r["path"]: r for r in first if r["error_code"]}
    assert set(errors) == {CORRUPT, DANGLING} and errors[CORRUPT]["rank"] == ""

    # resume after losing the rows of the last images and half a row
    text = out.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    out.write_text("".join(lines[:7]) + lines[7][:10], encoding="utf-8")
    result = invoke(*args)
    again = rows()
    assert sorted(map(tuple, (r.values() for r in again))) == sorted(map(tuple, (r.values() for r in first)))

    # --format wins over the extension
    out2 = tmp_path / "captions.txt"
    result = invoke(str(folder / "d"), "--out", str(out2), "--format", "csv", "--bundle", str(sat_bundle),
                    "--device", "cpu", "--no-progress")
    assert out2.read_text(encoding="utf-8").startswith("path,rank,text,")
    assert invoke(str(folder), "--out", str(out2), "--format", "xml").exit_code == 2


def test_show_and_tell_bundle_and_bad_options(folder, tiny_bundles, tmp_path):
    st = tiny_bundles(attention=False, max_length=6)
    out = tmp_path / "st.jsonl"
    result = invoke(str(folder / "a" / "b"), "--out", str(out), "--bundle", str(st), "--device", "cpu",
                    "--strategy", "greedy", "--no-progress")
    assert result.exit_code == 0, result.output
    assert {r["path"] for r in read_jsonl(out)} == {"astronaut.png", "c/coins.gif", "c/rocket.webp"}
    assert invoke(str(tmp_path / "missing"), "--out", str(out)).exit_code == 2
    result = invoke(str(folder), "--out", str(out), "--bundle", str(st), "--beam-size", "2", "--num-captions", "3")
    assert result.exit_code == 2 and "invalid decoding settings" in result.stderr
    result = invoke(str(folder), "--out", str(out), "--bundle", str(tmp_path / "nope"))
    assert result.exit_code == 2 and "cannot load the model" in result.stderr


def test_default_model(folder, tmp_path):
    bundle = REPO / "models" / "default"
    if not (bundle / "encoder.onnx").exists():
        pytest.skip("models/default is not there")
    out = tmp_path / "default.jsonl"
    result = invoke(str(folder / "d"), "--out", str(out), "--bundle", str(bundle), "--device", "cpu",
                    "--threads", "1", "--strategy", "greedy", "--batch-size", "2", "--no-progress")
    assert result.exit_code == 1, result.output  # d/gone.jpg
    records = by_path(read_jsonl(out))
    assert set(records) == {"coffee.bmp", "camera.tiff", "really_a_png.txt", "gone.jpg"}
    for rel in ("coffee.bmp", "camera.tiff", "really_a_png.txt"):
        assert records[rel]["captions"][0]["text"].split()


# ---- through a running service ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(sat_bundle, start_server):
    return start_server(sat_bundle, max_batch_files=3)


class FlakyProxy:
    """A real HTTP server in front of the service: the first `fail` POSTs to /v1/captions/batch get
    503 with Retry-After (as a service that is overloaded or restarting); everything else is passed on."""

    def __init__(self, upstream: str, fail: int, retry_after: str = "1"):
        self.upstream = upstream
        self.fail = fail
        self.retry_after = retry_after
        self.log: list[tuple[float, str, int]] = []  # (time, path, status)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _answer(self, status: int, body: bytes, headers: dict[str, str]):
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                proxy.log.append((time.monotonic(), self.path, status))

            def _forward(self, method: str):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if method == "POST" and self.path.startswith("/v1/captions/batch") and proxy.fail > 0:
                    proxy.fail -= 1
                    payload = json.dumps({"error": {"code": "overloaded", "message": "busy", "request_id": "x"}})
                    self._answer(503, payload.encode(), {"Content-Type": "application/json",
                                                         "Retry-After": proxy.retry_after})
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type",)}
                request = urllib.request.Request(proxy.upstream + self.path, data=body, headers=headers, method=method)
                try:
                    with opener.open(request, timeout=60) as response:
                        status, payload, ctype = response.status, response.read(), response.headers["Content-Type"]
                except urllib.error.HTTPError as exc:
                    status, payload, ctype = exc.code, exc.read(), exc.headers["Content-Type"]
                self._answer(status, payload, {"Content-Type": ctype or "application/octet-stream"})

            def do_GET(self):
                self._forward("GET")

            def do_POST(self):
                self._forward("POST")

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_url_mode_matches_local(folder, sat_bundle, server, tmp_path):
    local = tmp_path / "local.jsonl"
    invoke(str(folder), "--out", str(local), "--bundle", str(sat_bundle), "--device", "cpu", "--no-progress",
           "--max-length", "6")
    remote = tmp_path / "remote.jsonl"
    result = invoke(str(folder), "--out", str(remote), "--url", server.url, "--batch-size", "16",
                    "--concurrency", "3", "--max-length", "6", "--no-progress")
    assert result.exit_code == 1, result.output
    assert "at most 3 files per request" in result.stderr
    want, got = by_path(read_jsonl(local)), by_path(read_jsonl(remote))
    assert set(got) == set(want)
    for rel in IMAGES:
        assert [c["text"] for c in got[rel]["captions"]] == [c["text"] for c in want[rel]["captions"]], rel
        assert got[rel]["captions"][0]["score"] == pytest.approx(want[rel]["captions"][0]["score"], abs=1e-4)
    assert got[CORRUPT]["error"]["code"] == "corrupt_image"
    assert got[DANGLING]["error"]["code"] == "unreadable_file"
    assert not any("labels" in r for r in got.values())  # the service's model has none: no labels by default

    # and it resumes like the local mode
    lines = remote.read_text(encoding="utf-8").splitlines(keepends=True)
    remote.write_text("".join(lines[:3]), encoding="utf-8")
    invoke(str(folder), "--out", str(remote), "--url", server.url, "--max-length", "6", "--no-progress")
    resumed = by_path(read_jsonl(remote))
    assert set(resumed) == set(got)
    for rel, record in got.items():  # the same captions; scores to float precision (other batch mates)
        if "captions" in record:
            assert [c["text"] for c in resumed[rel]["captions"]] == [c["text"] for c in record["captions"]], rel
            assert ([c["score"] for c in resumed[rel]["captions"]]
                    == pytest.approx([c["score"] for c in record["captions"]], abs=1e-4))
        else:
            assert resumed[rel] == record


def test_url_mode_retries_503_with_retry_after(folder, server, tmp_path):
    out = tmp_path / "retry.jsonl"
    with FlakyProxy(server.url, fail=1, retry_after="1") as proxy:
        result = invoke(str(folder / "a"), "--out", str(out), "--url", proxy.url, "--batch-size", "2",
                        "--concurrency", "1", "--no-progress")
    assert result.exit_code == 1, result.output  # a/broken.jpg
    assert "HTTP 503; retrying in 1.0 s" in result.stderr
    posts = [(t, status) for t, path, status in proxy.log if path.startswith("/v1/captions/batch")]
    assert posts[0][1] == 503 and posts[1][1] == 200
    assert posts[1][0] - posts[0][0] >= 0.9  # Retry-After: 1 was honoured
    records = by_path(read_jsonl(out))
    assert set(records) == {p[2:] for p in IMAGES if p.startswith("a/")} | {"broken.jpg"}
    assert all("captions" in r for p, r in records.items() if p != "broken.jpg")


def test_url_mode_gives_up_and_resumes(folder, server, tmp_path):
    out = tmp_path / "gave-up.jsonl"
    with FlakyProxy(server.url, fail=100, retry_after="0") as proxy:
        result = invoke(str(folder / "d"), "--out", str(out), "--url", proxy.url, "--retries", "2", "--no-progress")
    assert result.exit_code == 1
    assert "still after 2 retries" in result.stderr and "Run the same command again" in result.stderr
    assert sum(1 for _, path, s in proxy.log if path.startswith("/v1/captions/batch") and s == 503) == 3
    # only the unreadable file was recorded; the rest is done on the next run
    assert [r["path"] for r in read_jsonl(out)] == ["gone.jpg"]
    result = invoke(str(folder / "d"), "--out", str(out), "--url", server.url, "--no-progress")
    assert {r["path"] for r in read_jsonl(out)} == {"coffee.bmp", "camera.tiff", "really_a_png.txt", "gone.jpg"}
    # a service that is not there at all
    result = invoke(str(folder / "d"), "--out", str(out), "--url", "http://127.0.0.1:9", "--retries", "0")
    assert result.exit_code == 2 and "cannot be used" in result.stderr


# ---- ImageNet labels --------------------------------------------------------------------------------------


def _check_labels(labels: list[dict], k: int) -> None:
    assert len(labels) == k
    assert [set(x) for x in labels] == [{"name", "class_id", "probability"}] * k
    assert all(LABEL_NAMES[x["class_id"]] == x["name"] for x in labels)
    probs = [x["probability"] for x in labels]
    assert probs == sorted(probs, reverse=True) and all(0.0 <= p <= 1.0 for p in probs) and sum(probs) <= 1.0 + 1e-5
    assert len({x["class_id"] for x in labels}) == k


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_labels_locally_in_jsonl_and_csv(folder, labels_bundle, sat_bundle, tmp_path):
    common = ["--bundle", str(labels_bundle), "--device", "cpu", "--no-progress"]
    # the default: the default_labels setting (3) for a bundle with labels
    out = tmp_path / "labels.jsonl"
    result = invoke(str(folder), "--out", str(out), *common)
    assert result.exit_code == 1, result.output
    records = by_path(read_jsonl(out))
    for rel in IMAGES:
        assert list(records[rel]) == ["path", "captions", "labels"]
        _check_labels(records[rel]["labels"], 3)
    assert "labels" not in records[CORRUPT] and "labels" not in records[DANGLING]  # error records: none
    assert records["a/cat.jpg"]["labels"] == records["photo.png"]["labels"]  # the same picture
    assert len({json.dumps(records[rel]["labels"]) for rel in IMAGES}) > 2  # they depend on the image
    # the captions are those of the same model without the head
    plain = tmp_path / "plain.jsonl"
    invoke(str(folder), "--out", str(plain), "--bundle", str(sat_bundle), "--device", "cpu", "--no-progress")
    assert {r: v.get("captions") for r, v in by_path(read_jsonl(plain)).items()} == \
        {r: v.get("captions") for r, v in records.items()}

    # the setting decides the default; --labels overrides it
    env_out = tmp_path / "one.jsonl"
    invoke(str(folder / "d"), "--out", str(env_out), *common, env={"CAPTIONER_DEFAULT_LABELS": "1"})
    assert all(len(r["labels"]) == 1 for r in read_jsonl(env_out) if "captions" in r)

    # CSV: the same labels, in the labels column of each of the image's caption rows
    out_csv = tmp_path / "labels.csv"
    result = invoke(str(folder), "--out", str(out_csv), *common, "--labels", "2", "--strategy", "beam",
                    "--beam-size", "3", "--num-captions", "2")
    assert result.exit_code == 1, result.output
    rows = read_csv(out_csv)
    assert list(rows[0]) == CSV_COLUMNS
    for rel in IMAGES:
        mine = [r for r in rows if r["path"] == rel]
        assert [r["rank"] for r in mine] == ["1", "2"] and mine[0]["labels"] == mine[1]["labels"]
        assert labels_from_csv(mine[0]["labels"]) == records[rel]["labels"][:2], rel
    assert all(r["labels"] == "" for r in rows if r["error_code"])

    # --labels 0: no labels field, an empty column
    none_out, none_csv = tmp_path / "none.jsonl", tmp_path / "none.csv"
    invoke(str(folder), "--out", str(none_out), *common, "--labels", "0")
    assert not any("labels" in r for r in read_jsonl(none_out))
    invoke(str(folder), "--out", str(none_csv), *common, "--labels", "0")
    assert all(r["labels"] == "" for r in read_csv(none_csv))

    # a bundle without labels: --labels 2 is refused, before any work
    refused = tmp_path / "refused.jsonl"
    result = invoke(str(folder), "--out", str(refused), "--bundle", str(sat_bundle), "--device", "cpu",
                    "--labels", "2", "--no-progress")
    assert result.exit_code == 2
    assert "--labels 2: the model tiny-sat has no ImageNet labels" in result.stderr and "--labels 0" in result.stderr
    assert not refused.exists()
    assert invoke(str(folder), "--out", str(refused), *common, "--labels", "21").exit_code == 2  # over MAX_LABELS


def test_labels_resume_keeps_older_records(folder, labels_bundle, sat_bundle, tmp_path):
    common = ["--bundle", str(labels_bundle), "--device", "cpu", "--no-progress"]
    # JSON lines from a run without labels: valid records, not captioned again
    out = tmp_path / "old.jsonl"
    invoke(str(folder), "--out", str(out), "--bundle", str(sat_bundle), "--device", "cpu", "--no-progress")
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    out.write_text("".join(lines[:5]), encoding="utf-8")
    result = invoke(str(folder), "--out", str(out), *common)
    kept_paths = {json.loads(line)["path"] for line in lines[:5]}
    already = len(kept_paths & (set(IMAGES) | {CORRUPT}))  # DANGLING is not an image: recorded, not "found"
    assert f"{already} already in" in result.stderr
    assert f"{len(set(IMAGES) - kept_paths)} captioned now" in result.stderr
    resumed = read_jsonl(out)
    assert resumed[:5] == [json.loads(line) for line in lines[:5]]  # untouched, without labels
    assert set(by_path(resumed)) == set(IMAGES) | {CORRUPT, DANGLING}
    assert all("labels" in r for r in resumed[5:] if "captions" in r)
    # --retry-errors rewrites the file: the labels of the records it keeps survive
    before = {r["path"]: r for r in resumed if "captions" in r}
    invoke(str(folder), "--out", str(out), *common, "--retry-errors")
    after = by_path(read_jsonl(out))
    assert all(after[rel] == record for rel, record in before.items())

    # a CSV from before the labels (and path_bytes_b64) column: resumed, its header and rows get the (empty) columns
    old_csv = tmp_path / "old.csv"
    invoke(str(folder), "--out", str(old_csv), "--bundle", str(sat_bundle), "--device", "cpu", "--no-progress")
    with open(old_csv, newline="", encoding="utf-8") as handle:
        full = list(csv.reader(handle))
    assert full[0] == CSV_COLUMNS
    legacy = [row[:len(OLD_CSV_COLUMNS)] for row in full]  # as an older caption-dir wrote it
    kept = legacy[:5]
    with open(old_csv, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, lineterminator="\n").writerows(kept)
    result = invoke(str(folder), "--out", str(old_csv), *common, "--labels", "2")
    old_paths = {row[0] for row in kept[1:]}
    assert "added the labels and path_bytes_b64 columns" in result.stderr
    assert f"{len(old_paths & (set(IMAGES) | {CORRUPT}))} already in" in result.stderr
    rows = read_csv(old_csv)
    assert list(rows[0]) == CSV_COLUMNS
    assert [list(r.values()) for r in rows[:4]] == [row + ["", ""] for row in kept[1:]]
    assert {r["path"] for r in rows} == set(IMAGES) | {CORRUPT, DANGLING}
    assert len(rows) == len(full) - 1  # nothing twice
    for r in rows:
        if r["path"] not in old_paths and not r["error_code"]:
            _check_labels(labels_from_csv(r["labels"]) or [], 2)
    # and the upgraded file resumes as a current one
    result = invoke(str(folder), "--out", str(old_csv), *common)
    assert "0 captioned now" in result.stderr and "added the" not in result.stderr
    # a CSV from before the path_bytes_b64 column only
    labels_csv = tmp_path / "labels.csv"
    with open(labels_csv, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, lineterminator="\n").writerows([row[:len(LABELS_CSV_COLUMNS)] for row in full])
    result = invoke(str(folder), "--out", str(labels_csv), *common)
    assert "added the path_bytes_b64 column (the file is from before it)" in result.stderr
    assert "0 captioned now" in result.stderr and read_csv(labels_csv)[0]["path_bytes_b64"] == ""


@pytest.fixture(scope="module")
def labels_server(labels_bundle, start_server):
    return start_server(labels_bundle, log_name="labels", max_batch_files=3, default_labels=2)


def test_labels_through_the_service(folder, labels_bundle, labels_server, server, tmp_path):
    local = tmp_path / "local.jsonl"
    invoke(str(folder), "--out", str(local), "--bundle", str(labels_bundle), "--device", "cpu", "--no-progress",
           "--labels", "4")
    want = by_path(read_jsonl(local))
    remote = tmp_path / "remote.jsonl"
    result = invoke(str(folder), "--out", str(remote), "--url", labels_server.url, "--labels", "4",
                    "--concurrency", "2", "--no-progress")
    assert result.exit_code == 1, result.output
    got = by_path(read_jsonl(remote))
    assert set(got) == set(want)
    for rel in IMAGES:
        _check_labels(got[rel]["labels"], 4)
        assert [(x["name"], x["class_id"]) for x in got[rel]["labels"]] == \
            [(x["name"], x["class_id"]) for x in want[rel]["labels"]], rel
        assert [x["probability"] for x in got[rel]["labels"]] == \
            pytest.approx([x["probability"] for x in want[rel]["labels"]], abs=1e-5)
    assert "labels" not in got[CORRUPT] and "labels" not in got[DANGLING]

    # the default is the service's default_labels (2 here), from GET /v1/model; CSV as locally
    remote_csv = tmp_path / "remote.csv"
    invoke(str(folder), "--out", str(remote_csv), "--url", labels_server.url, "--no-progress")
    rows = read_csv(remote_csv)
    for rel in IMAGES:
        mine = [r for r in rows if r["path"] == rel]
        labels = labels_from_csv(mine[0]["labels"])
        assert labels is not None and [x["class_id"] for x in labels] == [x["class_id"] for x in want[rel]["labels"][:2]]
    # --labels 0: none asked, none written
    zero = tmp_path / "zero.jsonl"
    invoke(str(folder / "d"), "--out", str(zero), "--url", labels_server.url, "--labels", "0", "--no-progress")
    assert not any("labels" in r for r in read_jsonl(zero))

    # a service whose model has no labels: refused with the reason before any image is sent
    refused = tmp_path / "refused.jsonl"
    result = invoke(str(folder), "--out", str(refused), "--url", server.url, "--labels", "1", "--no-progress")
    assert result.exit_code == 2
    assert "--labels 1: the service's model tiny-sat has no ImageNet labels" in result.stderr
    assert not refused.exists()
