"""The bad-input corpus: one table of bad and odd requests against a real uvicorn serving the real
default bundle (models/default), each with the status and error code it must get.

Every refused request is a 4xx with `{"error": {"code", "message", "request_id"}}` (never a 5xx, never
a stack trace); every odd-but-valid image is captioned. Some rows check more: a PNG whose header
claims 50,000 x 50,000 pixels is refused from the header (the server's resident memory does not
grow), a 500 MB body is refused without being read, an EXIF-rotated JPEG is captioned as its upright
version. After the whole corpus the service still answers a good request normally.

tests/test_service.py checks the same service feature by feature on a tiny bundle; this file is the
complete list in one place (docs/reliability.md counts it).
"""

from __future__ import annotations

import functools
import io
import json
import socket
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support.live_server import REPO, LiveServer, image_bytes

skimage_data = pytest.importorskip("skimage.data")

BUNDLE = REPO / "models" / "default"
MAX_FILES = 4
MAX_UPLOAD = 10 * 1024 * 1024  # the service's default
BODY_LIMIT = MAX_UPLOAD + 64 * 1024


# ---- the server ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(start_server):
    if not (BUNDLE / "manifest.json").exists():
        pytest.skip("models/default is missing (make default-model)")
    return start_server(BUNDLE, max_batch_files=MAX_FILES)


@pytest.fixture(scope="module")
def client(server):
    with server.client(timeout=60.0) as c:
        yield c


def memory_kb(server: LiveServer) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (peak resident) of the service process, in kB."""
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    out = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


# ---- images -------------------------------------------------------------------------------------


@functools.cache
def photo() -> np.ndarray:
    return skimage_data.chelsea()  # 300 x 451 RGB


@functools.cache
def good_jpeg() -> bytes:
    return image_bytes(photo(), "JPEG", quality=90)


def _save(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG header that claims width x height RGB pixels, followed by a little real
    compressed data: decoding it would allocate width * height * 3 bytes first."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (3 * 4096 + 1) * 16, 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def png_bad_crc() -> bytes:
    data = bytearray(image_bytes(photo()[:128, :128], "PNG"))
    start = data.index(b"IDAT") + 4
    for i in range(start + 16, min(start + 2000, len(data) - 16)):
        data[i] ^= 0x5A
    return bytes(data)


def cmyk_jpeg() -> bytes:
    return _save(Image.fromarray(photo()).convert("CMYK"), "JPEG", quality=90)


def png_16bit() -> bytes:
    grey = np.asarray(Image.fromarray(photo()).convert("L"), np.uint16) * 257
    img = Image.fromarray(grey.astype(np.uint16))
    data = _save(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really 16 bits per sample
    return data


def palette_png_transparent() -> bytes:
    img = Image.fromarray(photo()).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return _save(img, "PNG", transparency=0)


def animated_gif() -> bytes:
    frames = [Image.fromarray(photo()).convert("P", palette=Image.Palette.ADAPTIVE),
              Image.fromarray(np.full((300, 451, 3), 200, np.uint8)).convert("P")]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _with_orientation(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(img, "JPEG", quality=95, exif=exif.tobytes())


def upright_jpeg() -> bytes:
    return _save(Image.fromarray(photo()), "JPEG", quality=95)


def rotated_pixels() -> Image.Image:
    """The upright photo as a camera held sideways stores it: EXIF orientation 6 turns it back."""
    return Image.fromarray(photo()).transpose(Image.Transpose.ROTATE_90)


def exif_rotated_jpeg() -> bytes:
    return _with_orientation(rotated_pixels(), 6)


def webp() -> bytes:
    return _save(Image.fromarray(photo()), "WEBP", quality=80)


def one_pixel_png() -> bytes:
    return _save(Image.new("RGB", (1, 1), (120, 30, 200)), "PNG")


def progressive_jpeg() -> bytes:
    return _save(Image.fromarray(photo()), "JPEG", quality=85, progressive=True)


def thin_strip_png() -> bytes:
    return _save(Image.fromarray(np.tile(photo()[150:151], (1, 8, 1))[:, :3000]), "PNG")  # 3000 x 1


def lzw_tiff() -> bytes:
    return _save(Image.fromarray(photo()), "TIFF", compression="tiff_lzw")


def too_many_pixels_png() -> bytes:
    return _save(Image.new("L", (7000, 6000)), "PNG")  # 42 M pixels > max_image_pixels (40 M)


SVG = (b'<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="640" '
       b'height="480"><rect width="640" height="480" fill="red"/><circle cx="320" cy="240" r="100"/></svg>\n')
HTML = b"<!DOCTYPE html>\n<html><head><title>cat</title></head><body><img src='cat.jpg'></body></html>\n"
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nnewpath 0 0 moveto 64 64 lineto stroke\n"
       b"showpage\n%%EOF\n")
PDF = b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\ntrailer\n<<>>\n%%EOF\n"


# ---- raw HTTP, for what httpx will not send ------------------------------------------------------


@dataclass
class RawResponse:
    status_code: int
    headers: dict[str, str]
    body: bytes
    seconds: float

    def json(self):
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def raw_request(server: LiveServer, head: str, body: bytes, timeout: float = 20.0) -> RawResponse:
    """Send `head` (request line and headers, no blank line) and `body`, read one response."""
    started = time.perf_counter()
    with socket.create_connection((server.host, server.port), timeout=timeout) as sock:
        sock.sendall(head.encode("latin-1") + b"\r\n\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head_bytes, _, rest = data.partition(b"\r\n\r\n")
        lines = head_bytes.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
    return RawResponse(int(lines[0].split()[1]), headers, rest[:length], time.perf_counter() - started)


def _multipart_head(server: LiveServer, content_type: str, length: int, path: str = "/v1/captions") -> str:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\nConnection: close")


def _part(boundary: str, name: str | None, filename: str | None, data: bytes) -> bytes:
    disposition = "form-data" + (f'; name="{name}"' if name else "") + (f'; filename="{filename}"' if filename else "")
    return (f"--{boundary}\r\nContent-Disposition: {disposition}\r\nContent-Type: image/jpeg\r\n\r\n").encode() + data


# ---- the corpus -------------------------------------------------------------------------------------

Send = Callable[[httpx.Client, LiveServer], "httpx.Response | RawResponse"]


@dataclass
class Case:
    id: str
    send: Send
    status: int
    code: str | None  # None: a success (200)
    note: str = ""
    extra: Callable[..., None] | None = field(default=None, repr=False)


def upload(data: Callable[[], bytes], filename: str = "upload.jpg", content_type: str = "image/jpeg",
           **params) -> Send:
    params = {"strategy": "greedy", **params}
    return lambda c, s: c.post("/v1/captions", files={"image": (filename, data(), content_type)}, params=params)


def with_params(**params) -> Send:
    return lambda c, s: c.post("/v1/captions", files={"image": ("cat.jpg", good_jpeg(), "image/jpeg")},
                               params=params)


def batch(files: Callable[[], list], **params) -> Send:
    return lambda c, s: c.post("/v1/captions/batch", files=files(), params={"strategy": "greedy", **params})


def raw_multipart(content_type: str, body: Callable[[], bytes]) -> Send:
    def send(c, s):
        data = body()
        return raw_request(s, _multipart_head(s, content_type, len(data)), data)

    return send


def huge_declared_body(c, s) -> RawResponse:
    """Declare a 500 MB body and send only its first bytes: the 413 must come at once."""
    start = _part("XyZ", "image", "huge.jpg", b"\xff\xd8\xff" + b"\x00" * 1000)
    before = memory_kb(s)
    r = raw_request(s, _multipart_head(s, "multipart/form-data; boundary=XyZ", 500 * 1024 * 1024), start)
    after = memory_kb(s)
    r.memory = (before, after)  # type: ignore[attr-defined]
    return r


def chunked_over_limit(c, s):
    boundary = "StReAm"
    head = _part(boundary, "image", "s.jpg", b"")
    chunk = b"\x00" * 65536

    def body():
        yield head
        for _ in range(BODY_LIMIT // len(chunk) + 2):
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    return c.post("/v1/captions", content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})


def bomb_header(c, s):
    before = memory_kb(s)
    r = c.post("/v1/captions", files={"image": ("bomb.png", png_claiming(50_000, 50_000), "image/png")})
    after = memory_kb(s)
    r.memory = (before, after)  # type: ignore[attr-defined]
    return r


def _memory_bounded(r, **_):
    before, after = r.memory
    # decoding 50,000 x 50,000 RGB would need 7.5 GB; 500 MB read would show too. Allow 64 MB of noise.
    assert after["VmRSS"] - before["VmRSS"] < 64 * 1024, (before, after)
    assert after["VmHWM"] - before["VmHWM"] < 64 * 1024, (before, after)


def _refused_before_the_body(r, **_):
    # Only a few bytes of the declared 500 MB were sent: an answer at all means the server did not wait for
    # the body (it would have waited for the socket's timeout). How long it took is not a pass/fail bound.
    _memory_bounded(r)
    assert r.headers.get("connection", "").lower() == "close"


def mixed_batch_files() -> list:
    return [
        ("images", ("cat.jpg", good_jpeg(), "image/jpeg")),
        ("images", ("notes.txt", b"just some text", "text/plain")),
        ("images", ("cut.jpg", good_jpeg()[:2000], "image/jpeg")),
        ("images", ("empty.png", b"", "image/png")),
    ]


def _mixed_batch_results(r, **_):
    results = r.json()["results"]
    assert [x["index"] for x in results] == [0, 1, 2, 3]
    assert results[0]["captions"][0]["text"] and "error" not in results[0]
    assert [x.get("error", {}).get("code") for x in results[1:]] == ["unsupported_media_type", "corrupt_image",
                                                                      "empty_file"]
    assert all("captions" not in x for x in results[1:])


def _same_as_upright(r, client, **_):
    """The EXIF-rotated upload is captioned as the upright photo, not as the sideways pixels."""
    from app.inference.preprocess import decode_image

    rotated = r.json()["captions"][0]
    upright = upload(upright_jpeg)(client, None).json()["captions"][0]
    sideways = upload(lambda: _save(rotated_pixels(), "JPEG", quality=95))(client, None).json()["captions"][0]
    assert rotated["text"] == upright["text"], (rotated, upright)
    assert sideways["text"] != upright["text"], "the check has teeth: the model sees the orientation"
    # and the decoder turns the pixels upright (up to JPEG noise)
    turned = np.asarray(decode_image(exif_rotated_jpeg(), 10**8), np.float32)
    straight = np.asarray(decode_image(upright_jpeg(), 10**8), np.float32)
    assert turned.shape == straight.shape == photo().shape
    assert np.abs(turned - straight).mean() < 4.0


CASES: list[Case] = [
    # -- not an image, or not one we take
    Case("zero-bytes", upload(lambda: b""), 422, "empty_file"),
    Case("text-named-jpg", upload(lambda: b"this is not an image at all\n" * 20), 415, "unsupported_media_type"),
    Case("html-named-jpg", upload(lambda: HTML), 415, "unsupported_media_type"),
    Case("svg", upload(lambda: SVG, "drawing.svg", "image/svg+xml"), 415, "unsupported_media_type",
         "vector formats are not rasterised"),
    Case("pdf-named-jpg", upload(lambda: PDF), 415, "unsupported_media_type"),
    Case("eps", upload(lambda: EPS, "figure.eps", "application/postscript"), 415, "unsupported_media_type",
         "Pillow can open EPS, the service refuses it (no Ghostscript)"),
    Case("ico", upload(lambda: _save(Image.new("RGB", (16, 16)), "ICO"), "favicon.ico"), 415,
         "unsupported_media_type"),
    # -- broken images
    Case("truncated-jpeg", upload(lambda: good_jpeg()[: len(good_jpeg()) // 2]), 422, "corrupt_image"),
    Case("truncated-png", upload(lambda: image_bytes(photo(), "PNG")[:5000], "cut.png"), 422, "corrupt_image"),
    Case("png-corrupt-data", upload(png_bad_crc, "crc.png"), 422, "corrupt_image"),
    Case("truncated-gif", upload(lambda: animated_gif()[: len(animated_gif()) // 2], "cut.gif"), 422,
         "corrupt_image"),
    # -- too big
    Case("png-header-50000x50000", bomb_header, 413, "image_too_large",
         "refused from the header: resident memory unchanged", extra=_memory_bounded),
    Case("png-42-megapixels", upload(too_many_pixels_png, "big.png"), 413, "image_too_large",
         "a real image over max_image_pixels"),
    Case("body-declared-500MB", huge_declared_body, 413, "payload_too_large",
         "refused from Content-Length after a few bytes", extra=_refused_before_the_body),
    Case("body-chunked-over-limit", chunked_over_limit, 413, "payload_too_large",
         "no Content-Length: cut off once past the limit"),
    Case("file-11MiB", upload(lambda: b"\xff\xd8\xff" + b"\x00" * (11 * 1024 * 1024)), 413, "payload_too_large"),
    # -- odd but valid images: captioned
    Case("cmyk-jpeg", upload(cmyk_jpeg), 200, None),
    Case("png-16-bit", upload(png_16bit, "deep.png"), 200, None),
    Case("palette-png-transparency", upload(palette_png_transparent, "palette.png"), 200, None),
    Case("animated-gif", upload(animated_gif, "anim.gif"), 200, None, "first frame"),
    Case("exif-rotated-jpeg", upload(exif_rotated_jpeg, "sideways.jpg"), 200, None,
         "captioned as the upright photo", extra=_same_as_upright),
    Case("exif-bogus-orientation", upload(lambda: _with_orientation(Image.fromarray(photo()), 9)), 200, None),
    Case("webp", upload(webp, "photo.webp", "image/webp"), 200, None),
    Case("one-pixel", upload(one_pixel_png, "dot.png"), 200, None),
    Case("3000x1-strip", upload(thin_strip_png, "strip.png"), 200, None),
    Case("progressive-jpeg", upload(progressive_jpeg), 200, None),
    Case("tiff-lzw", upload(lzw_tiff, "scan.tiff", "image/tiff"), 200, None),
    Case("content-type-lies", upload(good_jpeg, "notes.txt", "text/plain"), 200, None, "the bytes decide"),
    Case("filename-traversal", upload(good_jpeg, "../../../etc/passwd"), 200, None, "the name is never used"),
    # -- malformed requests
    Case("wrong-field-name", lambda c, s: c.post("/v1/captions", files={"picture": ("a.jpg", good_jpeg())}),
         422, "missing_field"),
    Case("text-field-not-file", lambda c, s: c.post("/v1/captions", data={"image": "a cat.jpg"}), 422,
         "validation_error"),
    Case("json-body", lambda c, s: c.post("/v1/captions", json={"image": "aGVsbG8="}), 422, "missing_field"),
    Case("no-body", lambda c, s: c.post("/v1/captions"), 422, "missing_field"),
    Case("multipart-no-boundary",
         raw_multipart("multipart/form-data", lambda: _part("abc", "image", "a.jpg", good_jpeg()) + b"\r\n--abc--\r\n"),
         400, "bad_request"),
    Case("multipart-broken-boundary",
         raw_multipart("multipart/form-data; boundary=xyz",
                       lambda: _part("abc", "image", "a.jpg", good_jpeg()) + b"\r\n--abc--\r\n"),
         400, "bad_request", "the body's boundary is not the declared one"),
    Case("multipart-unterminated",
         raw_multipart("multipart/form-data; boundary=abc", lambda: _part("abc", "image", "a.jpg", good_jpeg())),
         400, "bad_request", "no closing boundary: the body was cut short"),
    Case("multipart-part-without-name",
         raw_multipart("multipart/form-data; boundary=abc",
                       lambda: _part("abc", None, "a.jpg", good_jpeg()) + b"\r\n--abc--\r\n"),
         400, "bad_request"),
    Case("unknown-route", lambda c, s: c.post("/v1/caption", files={"image": ("a.jpg", good_jpeg())}), 404,
         "not_found"),
    Case("wrong-method", lambda c, s: c.get("/v1/captions"), 405, "method_not_allowed"),
    # -- batches
    Case("batch-too-many-files",
         batch(lambda: [("images", (f"{i}.png", one_pixel_png(), "image/png")) for i in range(MAX_FILES + 1)]),
         422, "too_many_files"),
    Case("batch-mixed-good-and-bad", batch(mixed_batch_files), 200, None, "good files captioned, bad ones "
         "get their own error", extra=_mixed_batch_results),
    Case("batch-wrong-field-name", batch(lambda: [("image", ("a.jpg", good_jpeg(), "image/jpeg"))]), 422,
         "missing_field"),
    Case("batch-bad-parameter", batch(lambda: [("images", ("a.jpg", good_jpeg(), "image/jpeg"))], beam_size=0),
         422, "validation_error"),
    # -- decoding parameters out of range
    Case("beam-size-0", with_params(beam_size=0), 422, "validation_error"),
    Case("beam-size-11", with_params(beam_size=11), 422, "validation_error"),
    Case("beam-size-not-int", with_params(beam_size="3.5"), 422, "validation_error"),
    Case("num-captions-over-beam", with_params(beam_size=2, num_captions=3), 422, "invalid_parameter"),
    Case("greedy-two-captions", with_params(strategy="greedy", num_captions=2), 422, "invalid_parameter"),
    Case("strategy-unknown", with_params(strategy="sampling"), 422, "validation_error"),
    Case("max-length-0", with_params(max_length=0), 422, "validation_error"),
    Case("max-length-1000", with_params(max_length=1000), 422, "validation_error"),
    Case("length-penalty-nan", with_params(length_penalty="nan"), 422, "validation_error"),
    Case("length-penalty-inf", with_params(length_penalty="inf"), 422, "validation_error"),
    Case("length-penalty-negative", with_params(length_penalty=-1), 422, "validation_error"),
    Case("no-repeat-ngram-11", with_params(no_repeat_ngram_size=11), 422, "validation_error"),
]


def test_corpus_is_large_and_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 20
    assert sum(1 for c in CASES if c.status >= 400) >= 20


def _body_has_no_internals(text: str) -> None:
    for leak in ("Traceback", 'File "', ".py\"", str(REPO), "/site-packages/"):
        assert leak not in text, text


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(server, client, case: Case):
    response = case.send(client, server)
    assert response.status_code == case.status, response.text[:500]
    body = response.json()
    _body_has_no_internals(response.text)
    if case.code is None:
        if "captions" in body:
            assert body["captions"] and body["captions"][0]["text"], body
    else:
        assert set(body) == {"error"}, body
        error = body["error"]
        assert error["code"] == case.code, body
        assert isinstance(error["message"], str) and error["message"]
        assert error["request_id"] and error["request_id"] == response.headers["x-request-id"]
    if case.extra is not None:
        case.extra(response, client=client, server=server)
    # the process is still there and answering
    assert server.process.poll() is None
    assert client.get("/healthz").status_code == 200


def test_service_is_healthy_after_the_corpus(server, client):
    """Run last (file order): a good request is answered normally, nothing leaked into the log."""
    r = client.post("/v1/captions", files={"image": ("cat.jpg", good_jpeg(), "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["captions"][0]["text"] and body["settings"]["strategy"] == "beam"
    assert client.get("/readyz").status_code == 200
    log = server.log()
    assert "Traceback" not in log and '"level": "error"' not in log, log[-3000:]
    # every request of the corpus got its access-log line, none with a 5xx
    statuses = [json.loads(line).get("status") for line in log.splitlines()
                if line.startswith("{") and '"captioner.access"' in line]
    assert statuses and all(isinstance(s, int) and s < 500 for s in statuses)
