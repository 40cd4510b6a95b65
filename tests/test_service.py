"""The HTTP service, end to end, against a real uvicorn on 127.0.0.1 serving the tiny bundle."""

from __future__ import annotations

import io
import json
import re
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support.live_server import REPO, image_bytes, service_env

skimage_data = pytest.importorskip("skimage.data")

MAX_UPLOAD = 1_000_000
MAX_PIXELS = 4_000_000
MAX_FILES = 4
BODY_LIMIT = MAX_UPLOAD + 64 * 1024
HEX32 = re.compile(r"^[0-9a-f]{32}$")


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_bundle, start_server):
    return start_server(tiny_bundle, max_upload_bytes=MAX_UPLOAD, max_image_pixels=MAX_PIXELS,
                        max_batch_files=MAX_FILES)


@pytest.fixture()
def client(server):
    with server.client() as c:
        yield c


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert {"code", "message", "request_id"} <= set(error)
    assert isinstance(error["message"], str) and error["message"]
    assert error["request_id"] == response.headers["x-request-id"]
    if code is not None:
        assert error["code"] == code, body
    text = response.text
    assert "Traceback" not in text and "File \"" not in text
    return error


def assert_still_serving(client: httpx.Client, image: bytes) -> None:
    r = client.post("/v1/captions", files={"image": ("ok.jpg", image, "image/jpeg")}, params={"strategy": "greedy"})
    assert r.status_code == 200, r.text
    assert r.json()["captions"][0]["text"]


def caption(client: httpx.Client, data: bytes, name: str = "x.jpg", ctype: str = "image/jpeg", **params):
    return client.post("/v1/captions", files={"image": (name, data, ctype)}, params=params)


# ---- health, readiness, model --------------------------------------------------------------------


def test_health_and_readiness(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "model": {"name": "tiny-sat", "version": "0.0.1"}}


def test_model_info(client, tiny_bundle):
    r = client.get("/v1/model")
    assert r.status_code == 200, r.text
    info = r.json()
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert info["name"] == "tiny-sat" and info["version"] == "0.0.1"
    assert info["architecture"] == manifest["architecture"]
    assert info["preprocessing"] == manifest["preprocessing"]
    assert info["special_tokens"] == {"pad": 0, "start": 1, "end": 2, "unk": 3}
    assert info["max_length"] == manifest["max_length"]
    assert info["vocab_size"] == manifest["architecture"]["vocab_size"]
    assert info["evaluation"]["greedy"]["BLEU-4"] == manifest["evaluation"]["greedy"]["BLEU-4"]
    assert info["provider"] == "CPUExecutionProvider" and info["device"] == "cpu"
    assert info["limits"] == {"max_upload_bytes": MAX_UPLOAD, "max_image_pixels": MAX_PIXELS,
                              "max_batch_files": MAX_FILES}
    assert info["decoding_defaults"]["strategy"] == "beam"
    assert info["decoding_defaults"]["max_length"] == manifest["max_length"]


# ---- captioning ---------------------------------------------------------------------------------------


def test_caption_jpeg(client, cat_jpeg):
    r = caption(client, cat_jpeg, "cat.jpg")
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"captions", "settings", "model", "timings_ms", "request_id"}
    assert body["request_id"] == r.headers["x-request-id"]
    assert len(body["captions"]) == 1
    cap = body["captions"][0]
    assert cap["text"] == " ".join(cap["tokens"]) and cap["tokens"]
    assert not any(t.startswith("<") for t in cap["tokens"])
    assert cap["score"] < 0
    # normalized score = score / (words + 1) ** 1.0
    assert cap["normalized_score"] == pytest.approx(cap["score"], rel=1e-5)  # default length_penalty 0: the sum
    # how sure (tests/test_confidence.py has the rest): min_confidence is off by default
    assert len(cap["token_probs"]) == len(cap["tokens"]) and 0.0 <= cap["confidence"] <= 1.0
    assert cap["low_confidence"] is False
    assert body["settings"] == {"strategy": "beam", "beam_size": 3, "num_captions": 1, "max_length": 16,
                                "length_penalty": 0.0, "no_repeat_ngram_size": 0, "include": [], "guide": "none",
                                "guide_threshold": 0.5, "guide_words": 1}
    assert body["model"] == {"name": "tiny-sat", "version": "0.0.1"}
    t = body["timings_ms"]
    assert set(t) == {"decode_image", "preprocess", "inference", "total"}
    assert all(v >= 0 for v in t.values())
    assert t["total"] >= t["inference"]


def test_caption_png_nbest_and_settings(client, astronaut_png):
    r = caption(client, astronaut_png, "astronaut.png", "image/png", num_captions=3, beam_size=4,
                length_penalty=0.5, max_length=10, no_repeat_ngram_size=2)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["settings"] == {"strategy": "beam", "beam_size": 4, "num_captions": 3, "max_length": 10,
                                "length_penalty": 0.5, "no_repeat_ngram_size": 2, "include": [], "guide": "none",
                                "guide_threshold": 0.5, "guide_words": 1}
    caps = body["captions"]
    assert len(caps) == 3
    ranks = [c["normalized_score"] for c in caps]
    assert ranks == sorted(ranks, reverse=True)
    assert len({c["text"] for c in caps}) == 3
    for c in caps:
        assert 1 <= len(c["tokens"]) <= 10
        bigrams = list(zip(c["tokens"], c["tokens"][1:], strict=False))
        assert len(bigrams) == len(set(bigrams))  # no repeated 2-gram


def test_greedy_means_one_beam(client, cat_jpeg):
    r = caption(client, cat_jpeg, strategy="greedy")
    assert r.status_code == 200, r.text
    s = r.json()["settings"]
    assert (s["strategy"], s["beam_size"], s["num_captions"]) == ("greedy", 1, 1)
    # same as beam search with one beam
    r1 = caption(client, cat_jpeg, strategy="beam", beam_size=1)
    assert r1.json()["captions"] == r.json()["captions"]


def test_captions_depend_on_the_image(client, cat_jpeg, astronaut_png, coffee_jpeg):
    texts = set()
    for data in (cat_jpeg, astronaut_png, coffee_jpeg, image_bytes(np.full((64, 64, 3), 255, np.uint8), "PNG")):
        r = caption(client, data, strategy="greedy")
        assert r.status_code == 200
        texts.add(r.json()["captions"][0]["text"])
    assert len(texts) >= 2


def _exif_rotated_jpeg() -> bytes:
    img = Image.fromarray(skimage_data.chelsea())
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


def _animated_gif() -> bytes:
    frames = [Image.fromarray(np.full((40, 50, 3), v, np.uint8)) for v in (30, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def _mode_image(mode: str, fmt: str) -> bytes:
    rgb = Image.fromarray(skimage_data.astronaut()).resize((96, 96))
    if mode == "I;16":
        img = Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257).astype(np.uint16))
    else:
        img = rgb.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    "name, make",
    [
        ("grey.png", lambda: _mode_image("L", "PNG")),
        ("grey-alpha.png", lambda: _mode_image("LA", "PNG")),
        ("palette.png", lambda: _mode_image("P", "PNG")),
        ("rgba.png", lambda: _mode_image("RGBA", "PNG")),
        ("cmyk.jpg", lambda: _mode_image("CMYK", "JPEG")),
        ("deep.png", lambda: _mode_image("I;16", "PNG")),
        ("anim.gif", _animated_gif),
        ("rotated.jpg", _exif_rotated_jpeg),
        ("photo.webp", lambda: image_bytes(skimage_data.coffee(), "WEBP")),
        ("photo.bmp", lambda: _mode_image("RGB", "BMP")),
    ],
)
def test_image_kinds(client, name, make):
    # the declared content type is not trusted: the bytes decide
    r = caption(client, make(), name, "application/octet-stream", strategy="greedy")
    assert r.status_code == 200, r.text
    assert r.json()["captions"][0]["text"]


# ---- batch ------------------------------------------------------------------------------------------------


def test_batch_in_order_with_per_file_errors(client, cat_jpeg, astronaut_png, coffee_jpeg):
    files = [
        ("images", ("cat.jpg", cat_jpeg, "image/jpeg")),
        ("images", ("notes.txt", b"just some text", "text/plain")),
        ("images", ("astronaut.png", astronaut_png, "image/png")),
        ("images", ("broken.jpg", cat_jpeg[: len(cat_jpeg) // 3], "image/jpeg")),
    ]
    r = client.post("/v1/captions/batch", files=files, params={"num_captions": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["request_id"] == r.headers["x-request-id"]
    assert body["settings"]["num_captions"] == 2
    results = body["results"]
    assert [x["index"] for x in results] == [0, 1, 2, 3]
    assert [x["filename"] for x in results] == ["cat.jpg", "notes.txt", "astronaut.png", "broken.jpg"]
    assert "error" not in results[0] and len(results[0]["captions"]) == 2
    assert results[1]["error"]["code"] == "unsupported_media_type" and "captions" not in results[1]
    assert len(results[2]["captions"]) == 2
    assert results[3]["error"]["code"] == "corrupt_image"

    # batching does not change the answer: same captions as one image at a time
    for index, data in ((0, cat_jpeg), (2, astronaut_png)):
        single = caption(client, data, num_captions=2).json()["captions"]
        assert [c["text"] for c in single] == [c["text"] for c in results[index]["captions"]]
        assert [c["score"] for c in single] == pytest.approx([c["score"] for c in results[index]["captions"]],
                                                             abs=1e-4)


def test_batch_all_bad_files(client, cat_jpeg):
    r = client.post("/v1/captions/batch", files=[("images", ("a.txt", b"hello", "text/plain")),
                                                 ("images", ("b.jpg", b"", "image/jpeg"))])
    assert r.status_code == 200, r.text
    codes = [x["error"]["code"] for x in r.json()["results"]]
    assert codes == ["unsupported_media_type", "empty_file"]
    assert_still_serving(client, cat_jpeg)


def test_batch_too_many_files(client, cat_jpeg):
    files = [("images", (f"{i}.jpg", cat_jpeg, "image/jpeg")) for i in range(MAX_FILES + 1)]
    assert_error(client.post("/v1/captions/batch", files=files), 422, "too_many_files")
    assert_still_serving(client, cat_jpeg)


def test_batch_missing_field(client, cat_jpeg):
    r = client.post("/v1/captions/batch", files={"image": ("a.jpg", cat_jpeg, "image/jpeg")})
    assert_error(r, 422, "missing_field")


def test_batch_bad_params(client, cat_jpeg):
    r = client.post("/v1/captions/batch", files=[("images", ("a.jpg", cat_jpeg, "image/jpeg"))],
                    params={"strategy": "sampling"})
    assert_error(r, 422, "validation_error")


# ---- bad input: each one a 4xx with the error shape, and the server keeps serving -------------------------


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height but carries almost no data (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _png_corrupt_data() -> bytes:
    """A valid PNG header with its compressed pixel data scrambled."""
    data = bytearray(image_bytes(skimage_data.astronaut()[:128, :128], "PNG"))
    start = data.index(b"IDAT") + 4
    for i in range(start + 16, min(start + 2000, len(data) - 16)):
        data[i] ^= 0x5A
    return bytes(data)


BAD_UPLOADS = [
    # name, bytes-maker, status, code
    ("text", lambda jpg: b"this is not an image at all\n" * 10, 415, "unsupported_media_type"),
    ("pdf", lambda jpg: b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\ntrailer\n<<>>\n%%EOF\n", 415, "unsupported_media_type"),
    ("truncated-jpeg", lambda jpg: jpg[: len(jpg) // 2], 422, "corrupt_image"),
    ("corrupt-png-data", lambda jpg: _png_corrupt_data(), 422, "corrupt_image"),
    ("truncated-png", lambda jpg: image_bytes(skimage_data.astronaut(), "PNG")[:5000], 422, "corrupt_image"),
    ("empty", lambda jpg: b"", 422, "empty_file"),
    ("too-many-pixels", lambda jpg: image_bytes(np.zeros((2100, 2100, 3), np.uint8), "PNG"), 413,
     "image_too_large"),
    ("bomb-header", lambda jpg: _png_header_only(60_000, 60_000), 413, "image_too_large"),
]


@pytest.mark.parametrize("name, make, status, code", BAD_UPLOADS, ids=[b[0] for b in BAD_UPLOADS])
def test_bad_upload(client, cat_jpeg, name, make, status, code):
    r = caption(client, make(cat_jpeg), f"{name}.jpg")
    assert_error(r, status, code)  # a bomb is refused from its header: tests/test_bad_input.py's
    # png-header-50000x50000 case checks that resident memory stays flat (decoding would need 7.5 GB)
    assert_still_serving(client, cat_jpeg)


@pytest.mark.parametrize(
    "params, code",
    [
        ({"beam_size": 0}, "validation_error"),
        ({"beam_size": 11}, "validation_error"),
        ({"beam_size": "three"}, "validation_error"),
        ({"strategy": "sampling"}, "validation_error"),
        ({"num_captions": 0}, "validation_error"),
        ({"beam_size": 2, "num_captions": 3}, "invalid_parameter"),
        ({"strategy": "greedy", "num_captions": 2}, "invalid_parameter"),
        ({"max_length": 0}, "validation_error"),
        ({"max_length": 1000}, "validation_error"),
        ({"length_penalty": -1}, "validation_error"),
        ({"length_penalty": "nan"}, "validation_error"),
        ({"no_repeat_ngram_size": 11}, "validation_error"),
    ],
)
def test_bad_params(client, cat_jpeg, params, code):
    error = assert_error(caption(client, cat_jpeg, **params), 422, code)
    if code == "validation_error":
        assert error["details"] and error["details"][0]["loc"][0] == "query"
    assert_still_serving(client, cat_jpeg)


def test_missing_field(client, cat_jpeg):
    error = assert_error(client.post("/v1/captions", files={"picture": ("a.jpg", cat_jpeg, "image/jpeg")}),
                         422, "missing_field")
    assert error["details"][0]["loc"] == ["body", "image"]
    assert_error(client.post("/v1/captions", data={"image": "not a file"}), 422)
    assert_error(client.post("/v1/captions", json={"image": "x"}), 422)
    assert_error(client.post("/v1/captions"), 422)
    assert_still_serving(client, cat_jpeg)


def test_unknown_route_and_method(client, cat_jpeg):
    assert_error(client.get("/v1/nothing-here"), 404, "not_found")
    r = client.delete("/v1/captions")
    assert_error(r, 405, "method_not_allowed")
    assert "POST" in r.headers.get("allow", "")
    assert_still_serving(client, cat_jpeg)


def test_body_over_limit_from_content_length(client, cat_jpeg):
    big = b"\xff\xd8" + b"\x00" * (BODY_LIMIT + 10)
    r = caption(client, big, "big.jpg")
    assert_error(r, 413, "payload_too_large")
    assert_still_serving(client, cat_jpeg)


def test_body_over_limit_refused_without_reading_it(server, client, cat_jpeg):
    """Declare a 500 MB body, send only the first bytes: the 413 comes at once."""
    head = (
        b"--XyZ\r\nContent-Disposition: form-data; name=\"image\"; filename=\"huge.jpg\"\r\n"
        b"Content-Type: image/jpeg\r\n\r\n\xff\xd8\xff"
    )
    request = (
        f"POST /v1/captions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        "Content-Type: multipart/form-data; boundary=XyZ\r\n"
        "X-Request-ID: huge-upload-1\r\n"
        f"Content-Length: {500 * 1024 * 1024}\r\n\r\n"
    ).encode() + head
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head_text, _, body = data.partition(b"\r\n\r\n")
    assert head_text.startswith(b"HTTP/1.1 413"), data[:200]
    assert b"x-request-id: huge-upload-1" in head_text.lower()
    assert json.loads(body)["error"]["code"] == "payload_too_large"
    assert_still_serving(client, cat_jpeg)


def test_body_over_limit_while_streaming(client, cat_jpeg):
    """A chunked upload (no Content-Length) is cut off once it passes the limit."""
    boundary = "StReAm"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"s.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()
    chunk = b"\x00" * 65536
    chunks_needed = BODY_LIMIT // len(chunk) + 2

    def body():
        yield head
        for _ in range(chunks_needed):
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    r = client.post("/v1/captions", content=body(),
                    headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert_error(r, 413, "payload_too_large")
    assert_still_serving(client, cat_jpeg)


def test_file_over_limit_in_batch_is_an_item_error(client, cat_jpeg):
    # each file may be max_upload_bytes; a bigger one (still within the batch body limit) fails alone
    big = b"\xff\xd8" + b"\x00" * (MAX_UPLOAD + 100)
    r = client.post("/v1/captions/batch", files=[("images", ("big.jpg", big, "image/jpeg")),
                                                 ("images", ("cat.jpg", cat_jpeg, "image/jpeg"))])
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert results[0]["error"]["code"] == "file_too_large"
    assert results[1]["captions"]


# ---- request ids, logs, metrics --------------------------------------------------------------------------


def test_request_id_echo(client, cat_jpeg):
    r = client.get("/healthz", headers={"X-Request-ID": "client-id.42:abc"})
    assert r.headers["x-request-id"] == "client-id.42:abc"
    r = client.post("/v1/captions", files={"image": ("a.jpg", cat_jpeg, "image/jpeg")},
                    headers={"X-Request-ID": "cap-1"})
    assert r.headers["x-request-id"] == "cap-1" and r.json()["request_id"] == "cap-1"
    r = client.post("/v1/captions", files={"image": ("a.jpg", b"nope", "image/jpeg")},
                    headers={"X-Request-ID": "err-1"})
    assert r.json()["error"]["request_id"] == "err-1" and r.headers["x-request-id"] == "err-1"
    # generated when absent, replaced when unsafe or too long
    assert HEX32.match(client.get("/healthz").headers["x-request-id"])
    for bad in ("has space", "x" * 129, "semi;colon", "<script>"):
        assert HEX32.match(client.get("/healthz", headers={"X-Request-ID": bad}).headers["x-request-id"])
    assert HEX32.match(client.get("/nowhere").headers["x-request-id"])


def test_access_log_is_one_json_line_per_request(server, client):
    rid = "log-check-7"
    client.get("/v1/model", headers={"X-Request-ID": rid})
    time.sleep(0.2)
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{") and rid in line]
    access = [e for e in lines if e.get("logger") == "captioner.access"]
    assert len(access) == 1, lines
    entry = access[0]
    assert entry["method"] == "GET" and entry["path"] == "/v1/model" and entry["status"] == 200
    assert entry["request_id"] == rid and entry["duration_ms"] >= 0


def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        metric, _, value = line.rpartition(" ")
        if metric.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in metric for k, v in labels.items()):
            return float(value)
    raise AssertionError(f"{name} {labels} not in metrics")


def test_metrics(client, cat_jpeg):
    before = client.get("/metrics").text
    images_before = _metric(before, "captioner_images_captioned_total")
    caption(client, cat_jpeg)
    client.post("/v1/captions/batch", files=[("images", ("a.jpg", cat_jpeg, "image/jpeg"))] * 3)
    caption(client, b"garbage", "g.jpg")
    caption(client, b"\xff" * (BODY_LIMIT + 1), "big.jpg")  # refused before routing, still labelled
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert _metric(text, "captioner_images_captioned_total") == images_before + 4
    assert _metric(text, "captioner_http_requests_total", route="/v1/captions", method="POST", status="200") >= 1
    assert _metric(text, "captioner_http_requests_total", route="/v1/captions", method="POST", status="415") >= 1
    assert _metric(text, "captioner_http_requests_total", route="/v1/captions/batch", status="200") >= 1
    assert _metric(text, "captioner_http_requests_total", route="/v1/captions", status="413") >= 1
    assert _metric(text, "captioner_http_request_duration_seconds_count", route="/v1/captions") >= 2
    assert _metric(text, "captioner_batch_size_bucket", le="4.0") >= 1
    assert _metric(text, "captioner_batch_size_count") >= 2
    assert _metric(text, "captioner_queue_seconds_count") >= 2
    assert _metric(text, "captioner_inference_seconds_count") >= 2
    assert _metric(text, "captioner_image_errors_total", code="unsupported_media_type") >= 1
    assert _metric(text, "captioner_ready") == 1.0
    assert 'provider="CPUExecutionProvider"' in text


def test_openapi_documents_errors_and_binary_uploads(client):
    spec = client.get("/openapi.json").json()
    ops = {op["operationId"]: (path, method, op) for path, item in spec["paths"].items()
           for method, op in item.items()}
    assert {"create_caption", "create_captions_batch", "get_model_info", "get_health", "get_readiness",
            "get_metrics"} <= set(ops)
    for path, _method, op in ops.values():
        # the Open Inference Protocol's routes answer its own error shape (tests/test_open_inference.py)
        shape = "/V2Error" if path.startswith("/v2") else "/ErrorResponse"
        assert op["responses"]["500"]["content"]["application/json"]["schema"]["$ref"].endswith(shape), path
        for response in op["responses"].values():
            assert "X-Request-ID" in response["headers"]
    create = ops["create_caption"][2]
    for status in ("413", "415", "422"):
        assert create["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith(
            "/ErrorResponse")
    schemas = spec["components"]["schemas"]
    assert schemas["CaptionUpload"]["properties"]["image"]["format"] == "binary"
    assert schemas["BatchUpload"]["properties"]["images"]["items"]["format"] == "binary"
    assert "contentMediaType" not in json.dumps(schemas["CaptionUpload"])
    assert {"CaptionResponse", "CaptionItem", "BatchResponse", "BatchItem", "ModelInfo", "Health",
            "Readiness", "ErrorResponse"} <= set(schemas)
    assert spec["info"]["title"] and spec["info"]["version"]


# ---- start-up, readiness, faults (in-process or separate processes) -------------------------------------------


def test_not_ready_before_startup(tiny_bundle):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    app = create_app(Settings(bundle=tiny_bundle, device="cpu"))
    c = TestClient(app)  # not entered: the lifespan has not run, nothing is loaded
    assert c.get("/healthz").status_code == 200
    error = assert_error(c.get("/readyz"), 503, "not_ready")
    assert error["message"]
    r = c.post("/v1/captions", files={"image": ("a.png", image_bytes(np.zeros((8, 8, 3), np.uint8), "PNG"))})
    assert_error(r, 503, "not_ready")
    assert "captioner_ready 0.0" in c.get("/metrics").text


def test_unexpected_error_is_a_bare_500(tiny_bundle, cat_jpeg):
    from fastapi.testclient import TestClient

    from app.api.state import service_state
    from app.main import create_app
    from app.settings import Settings

    app = create_app(Settings(bundle=tiny_bundle, device="cpu"))
    with TestClient(app, raise_server_exceptions=False) as c:
        def boom(*args, **kwargs):
            raise RuntimeError("secret detail /srv/internal/path.py")

        service_state(app).engine.run = boom
        r = c.post("/v1/captions", files={"image": ("a.jpg", cat_jpeg, "image/jpeg")},
                   headers={"X-Request-ID": "fault-1"})
        error = assert_error(r, 500, "internal_error")
        assert error["request_id"] == "fault-1"
        assert "secret" not in r.text and "/srv" not in r.text
        # still serving
        assert c.get("/healthz").status_code == 200


def test_cors_only_when_configured(tiny_bundle):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    preflight = {"Origin": "https://example.org", "Access-Control-Request-Method": "POST"}
    off = TestClient(create_app(Settings(bundle=tiny_bundle, device="cpu")))
    assert "access-control-allow-origin" not in off.get("/healthz", headers={"Origin": "https://example.org"}).headers
    on = TestClient(create_app(Settings(bundle=tiny_bundle, device="cpu", cors_origins=["https://example.org"])))
    r = on.options("/v1/captions", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://example.org"
    r = on.get("/healthz", headers={"Origin": "https://example.org"})
    assert r.headers["access-control-allow-origin"] == "https://example.org"
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()


@pytest.mark.service  # starts a subprocess
def test_cli_caption(tiny_bundle, tmp_path, cat_jpeg):
    img = tmp_path / "cat.jpg"
    img.write_bytes(cat_jpeg)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    env = service_env(tiny_bundle)
    result = subprocess.run([sys.executable, "-m", "app.cli", "caption", str(img), "--json", "--num-captions", "2"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["image"] == str(img) and len(out["captions"]) == 2
    result = subprocess.run([sys.executable, "-m", "app.cli", "caption", str(img), str(bad), "--strategy", "greedy"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stdout.startswith(f"{img}: ") and "bad.jpg" in result.stderr


@pytest.mark.service  # starts a subprocess
def test_cli_caption_labels(tiny_bundles, tiny_bundle, tmp_path, cat_jpeg, astronaut_png):
    from model_export.tiny_bundle import LABEL_NAMES

    cat, astronaut = tmp_path / "cat.jpg", tmp_path / "astronaut.png"
    cat.write_bytes(cat_jpeg)
    astronaut.write_bytes(astronaut_png)
    labelled = tiny_bundles(attention=True, labels=True)

    def run(bundle: Path, *args: str, **settings: object) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "app.cli", "caption", *args], cwd=REPO,
                              env=service_env(bundle, **settings), capture_output=True, text=True, timeout=60)

    # text: the caption line, then the labels (default: the default_labels setting, 3)
    result = run(labelled, str(cat), str(astronaut))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and lines[0].startswith(f"{cat}: ") and lines[2].startswith(f"{astronaut}: ")
    for line in (lines[1], lines[3]):
        assert re.fullmatch(r"  labels: tiny class \d \d+\.\d%, tiny class \d \d+\.\d%, tiny class \d \d+\.\d%", line)
    # the captions are those of the same model without labels
    plain = run(tiny_bundle, str(cat), str(astronaut)).stdout.splitlines()
    assert plain == [lines[0], lines[2]]
    # several captions: the numbered list, then the labels
    result = run(labelled, str(cat), "--num-captions", "2", "--labels", "1", default_labels=5)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{cat}:" and lines[1].startswith("  1. ") and lines[2].startswith("  2. ")
    assert re.fullmatch(r"  labels: tiny class \d \d+\.\d%", lines[3]) and len(lines) == 4

    # --json: {name, class_id, probability}, best first
    result = run(labelled, str(cat), "--json", "--labels", "5")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip())
    labels = out["labels"]
    assert len(labels) == 5 and all(set(x) == {"name", "class_id", "probability"} for x in labels)
    assert all(LABEL_NAMES[x["class_id"]] == x["name"] for x in labels)
    probs = [x["probability"] for x in labels]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    text = run(labelled, str(cat), "--labels", "5").stdout.splitlines()[1]
    assert text.startswith(f"  labels: {labels[0]['name']} {labels[0]['probability']:.1%}, ")
    # the setting decides the default, --labels 0 asks for none
    assert len(json.loads(run(labelled, str(cat), "--json", default_labels=2).stdout)["labels"]) == 2
    result = run(labelled, str(cat), "--json", "--labels", "0")
    assert result.returncode == 0 and "labels" not in json.loads(result.stdout)
    assert len(run(labelled, str(cat), "--labels", "0").stdout.splitlines()) == 1

    # a bundle without labels: none by default, and asking for some is a clear error (exit 2)
    result = run(tiny_bundle, str(cat), "--json")
    assert result.returncode == 0 and "labels" not in json.loads(result.stdout)
    result = run(tiny_bundle, str(cat), "--labels", "3")
    assert result.returncode == 2 and result.stdout == ""
    assert "--labels 3: the model tiny-sat has no ImageNet labels" in result.stderr
    assert "Traceback" not in result.stderr
    result = run(labelled, str(cat), "--labels", "21")
    assert result.returncode == 2 and "--labels" in result.stderr
