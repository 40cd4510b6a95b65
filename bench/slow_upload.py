"""The slow upload of issue 24 against a live service: headers with `Content-Length: 9000000`, 4 MB of body,
then one byte every 0.5 s. Prints one JSON object: the status line, the error code, whether the server
closed the connection, and the seconds from the first byte sent to the answer (docs/reliability.md). Gives
up after `--give-up` seconds (before the fix: no answer, the connection still open).

    python bench/slow_upload.py                        # models/default, the default body_timeout_s
    python bench/slow_upload.py CAPTIONER_BODY_TIMEOUT_S=10
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, service_settings
from http_load import Service


def slow_upload(host: str, port: int, give_up: float) -> dict:
    sock = socket.create_connection((host, port), timeout=give_up)
    start = time.perf_counter()
    sock.sendall(b"POST /v1/captions HTTP/1.1\r\nHost: bench\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                 b"Content-Length: 9000000\r\n\r\n--x\r\nContent-Disposition: form-data; name=\"image\"; "
                 b"filename=\"a.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n" + b"\0" * 4_000_000)
    sock.settimeout(0.5)
    answer = b""
    while time.perf_counter() - start < give_up and not answer:
        try:
            sock.sendall(b"\0")
            answer = sock.recv(65536)
            if not answer:
                break
        except TimeoutError:
            continue
        except OSError:
            break
    seconds = time.perf_counter() - start
    closed = False
    if answer:
        sock.settimeout(5)
        try:
            while chunk := sock.recv(65536):
                answer += chunk
            closed = True
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            pass
    sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    code = json.loads(body).get("error", {}).get("code") if body.startswith(b"{") else None
    return {"status_line": head.split(b"\r\n")[0].decode() if head else None, "code": code,
            "connection_closed": closed, "seconds": round(seconds, 2), "gave_up": not answer}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--give-up", type=float, default=90.0)
    parser.add_argument("settings", nargs="*", help="CAPTIONER_NAME=value settings for the server")
    args = parser.parse_args(argv)
    settings = service_settings(args.settings)
    with tempfile.TemporaryDirectory() as tmp:
        service = Service(args.bundle, Path(tmp) / "service.log", **settings)
        try:
            report = {"settings": settings, **slow_upload("127.0.0.1", service.port, args.give_up)}
        finally:
            service.close()
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
