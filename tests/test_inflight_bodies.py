"""Request bodies against a live server (issue 24, items 3 and 4), with raw sockets so that a body can
be held half-sent:

* the bytes of request bodies in flight are bounded (`max_inflight_body_bytes`): a request that would
  pass the bound gets 503 `overloaded` with `Retry-After`, from its Content-Length before a byte of
  its body is read, or as a chunked body streams past it; once the bodies in flight are answered the
  bytes are free again;
* a body that does not arrive within `body_timeout_s` gets 408 `request_timeout` and the connection
  is closed; it is counted in /metrics.

No timing is a pass/fail: the cut-off time is printed (docs/reliability.md quotes it).
"""

from __future__ import annotations

import io
import json
import socket
import time

import pytest
from PIL import Image

UPLOAD = 100_000  # max_upload_bytes: a batch of 4 may carry 400 000 + 64 KiB of framing
INFLIGHT = 600_000  # room for one batch body, not two
BOUNDARY = "bOuNdArY"


def jpeg(size: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (10, 120, 200)).save(buf, format="JPEG")
    data = buf.getvalue()
    return data + b"\0" * (size - len(data))


def multipart(field: str, files: list[bytes]) -> bytes:
    out = b""
    for i, data in enumerate(files):
        out += (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{i}.jpg\"\r\n"
                "Content-Type: image/jpeg\r\n\r\n").encode() + data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def head(path: str, length: int | None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"{framing}\r\n\r\n").encode()


def connect(server, timeout: float = 30.0) -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], dict, bool]:
    """(status, headers, JSON body, whether the server then closed the connection)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed without an answer: {data!r}"
        data += chunk
    header_text, _, body = data.partition(b"\r\n\r\n")
    lines = header_text.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the connection closed mid-answer"
        body += chunk
    closed = False
    if headers.get("connection", "").lower() == "close":
        sock.settimeout(10)
        try:
            closed = sock.recv(1) == b""
        except (ConnectionResetError, TimeoutError):
            closed = True
    return status, headers, json.loads(body[:length] or b"{}"), closed


@pytest.fixture(scope="module")
def server(tiny_bundles, start_server):
    return start_server(tiny_bundles(max_length=6), log_name="bodies", max_upload_bytes=UPLOAD, max_batch_files=4,
                        max_inflight_body_bytes=INFLIGHT, body_timeout_s=3)


def test_bodies_in_flight_are_bounded(server):
    body = multipart("images", [jpeg(UPLOAD)] * 3)  # 300 KB: one fits, two do not
    holder = connect(server)
    try:
        holder.sendall(head("/v1/captions/batch", len(body)) + body[:1000])  # holds its reservation
        time.sleep(0.3)
        with connect(server) as second:  # declared: refused before its body is read
            second.sendall(head("/v1/captions/batch", len(body)))
            status, headers, answer, closed = read_answer(second)
        print(f"second body while one is in flight: {status} {answer}")
        assert status == 503 and answer["error"]["code"] == "overloaded", answer
        assert int(headers["retry-after"]) >= 1 and closed
        with connect(server) as chunked:  # chunked: refused as it streams past the bound
            chunked.sendall(head("/v1/captions/batch", None))
            for start in range(0, len(body), 50_000):
                piece = body[start:start + 50_000]
                try:
                    chunked.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                except OSError:
                    break
            status, headers, answer, _ = read_answer(chunked)
        assert status == 503 and answer["error"]["code"] == "overloaded", answer
        assert "retry-after" in headers
        # a small request still fits beside the one in flight
        with server.client() as c:
            r = c.post("/v1/captions", files={"image": ("s.jpg", jpeg(2000), "image/jpeg")})
        assert r.status_code == 200, r.text
        holder.sendall(body[1000:])
        status, _, answer, _ = read_answer(holder)
        assert status == 200, answer
    finally:
        holder.close()
    # the bytes are free again: the same body is accepted now
    with server.client() as c:
        r = c.post("/v1/captions/batch", content=body,
                   headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
        assert r.status_code == 200, r.text
        metrics = c.get("/metrics").text
    assert 'captioner_refused_bodies_total{reason="inflight_full"} 2.0' in metrics
    assert "captioner_inflight_body_bytes 0.0" in metrics


def test_the_inflight_bound_must_fit_the_largest_body(tiny_bundle):
    from app.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="CAPTIONER_MAX_INFLIGHT_BODY_BYTES"):
        load_settings(bundle=tiny_bundle, max_upload_bytes=UPLOAD, max_batch_files=4, max_inflight_body_bytes=UPLOAD)
    default = load_settings(bundle=tiny_bundle).inflight_body_limit()
    assert default >= load_settings(bundle=tiny_bundle).body_limit(16)
    print(f"default bound on this machine: {default / 2**20:.0f} MiB")



def test_a_slow_body_is_cut_off_with_408(server):
    """Headers, a part of the body, then a trickle: 408 `request_timeout` once `body_timeout_s` (3 s here)
    has passed since the request arrived, and the connection is closed."""
    body = multipart("images", [jpeg(UPLOAD)] * 3)
    with connect(server, timeout=40) as sock:
        start = time.perf_counter()
        sock.sendall(head("/v1/captions/batch", len(body)) + body[:100_000])
        sock.settimeout(0.25)
        answer = b""
        for i in range(100_000, 100_000 + 160):  # at most 40 s of one byte every 0.25 s
            try:
                sock.sendall(body[i:i + 1])
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if answer:
                break
        assert answer, "no answer while the body trickled in"
        sock.settimeout(10)
        rest = answer
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                chunk = b""
            if not chunk:
                break
            rest += chunk
        elapsed = time.perf_counter() - start
    head_text, _, payload = rest.partition(b"\r\n\r\n")
    print(f"slow body cut off after {elapsed:.2f} s: {head_text.splitlines()[0]!r} {payload!r}")
    assert head_text.startswith(b"HTTP/1.1 408"), rest
    assert json.loads(payload)["error"]["code"] == "request_timeout"
    assert b"connection: close" in head_text.lower()  # and the loop above saw the server close it
    with server.client() as c:
        metrics = c.get("/metrics").text
    assert 'captioner_refused_bodies_total{reason="body_timeout"} 1.0' in metrics
    assert "captioner_inflight_body_bytes 0.0" in metrics


def test_uvicorn_limits_come_from_the_settings(tiny_bundle):
    from app.cli import uvicorn_config
    from app.settings import load_settings

    settings = load_settings(bundle=tiny_bundle, max_connections=77, keep_alive_s=4)
    config = uvicorn_config(object(), settings)
    assert config.limit_concurrency == 77 and config.timeout_keep_alive == 4
    default = uvicorn_config(object(), load_settings(bundle=tiny_bundle))
    assert default.limit_concurrency == 1000 and default.timeout_keep_alive == 5


@pytest.mark.service
def test_the_benchmarks_run_small(tiny_bundles):
    """bench/memory_attack.py and bench/slow_upload.py (docs/reliability.md's figures) on tiny inputs: the
    behaviour, never the figures."""
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench"
    bundle = str(tiny_bundles(max_length=6))
    out = subprocess.run([sys.executable, "memory_attack.py", "--bundle", bundle, "--clients", "2", "--files", "2",
                          "--file-mb", "0.2", "CAPTIONER_MAX_INFLIGHT_BODY_BYTES=500000",
                          "CAPTIONER_MAX_UPLOAD_BYTES=210000", "CAPTIONER_MAX_BATCH_FILES=2"],
                         cwd=bench, capture_output=True, text=True, timeout=120, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    print(report)
    assert sum(report["statuses"].values()) == 2 and report["status_after"] == 200
    assert set(report["statuses"]) <= {"200", "503 overloaded"}, report["statuses"]
    out = subprocess.run([sys.executable, "slow_upload.py", "--bundle", bundle, "--give-up", "30",
                          "CAPTIONER_BODY_TIMEOUT_S=1"], cwd=bench, capture_output=True, text=True, timeout=120, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    print(report)
    assert report["code"] == "request_timeout" and report["connection_closed"], report
