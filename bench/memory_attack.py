"""Resident memory of the service under the upload attack of issue 24: `--clients` parallel batch posts
of `--files` uploads of `--file-mb` MB each (a small JPEG padded to the size: decoding stays cheap, the
body is what costs), repeated `--rounds` times. Prints one JSON object (docs/reliability.md quotes it):
VmRSS before (after a warm-up caption), the peak sampled while the posts run (and VmHWM), after (two
seconds after the last answer), and every status answered.

    python bench/memory_attack.py                                    # models/default, 3 x 16 x 10 MB
    python bench/memory_attack.py --bundle /tmp/tiny --files 4 --file-mb 1 --json out.json
    python bench/memory_attack.py -- CAPTIONER_MAX_INFLIGHT_BODY_BYTES=200000000   # settings for the server

No timing here is a pass/fail; tests/test_inflight_bodies.py checks the behaviour.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from common import REPO, rss_kib, service_settings
from http_load import Service
from PIL import Image


def padded_jpeg(size: int) -> bytes:
    """A 64x48 JPEG followed by zero bytes up to `size` (Pillow ignores what follows the image)."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 90, 60)).save(buf, format="JPEG", quality=80)
    data = buf.getvalue()
    return data + b"\0" * max(0, size - len(data))


def attack(url: str, pid: int, clients: int, files: int, file_bytes: int, rounds: int, junk: bool = False) -> dict:
    image = b"\0" * file_bytes if junk else padded_jpeg(file_bytes)
    statuses: Counter[str] = Counter()
    peak = 0
    running = True

    def sample() -> None:
        nonlocal peak
        while running:
            peak = max(peak, rss_kib(pid)["VmRSS"])
            time.sleep(0.02)

    def post() -> None:
        parts = [("images", (f"{i}.jpg", image, "image/jpeg")) for i in range(files)]
        try:
            r = httpx.post(url + "/v1/captions/batch", files=parts, timeout=120)
            code = r.json().get("error", {}).get("code", "") if r.status_code != 200 else ""
            statuses[f"{r.status_code} {code}".strip()] += 1
        except httpx.HTTPError as exc:
            statuses[type(exc).__name__] += 1

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    for _ in range(rounds):
        threads = [threading.Thread(target=post) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    seconds = time.perf_counter() - start
    running = False
    sampler.join()
    return {"statuses": dict(statuses), "peak_rss_mib": round(peak / 1024, 1), "seconds": round(seconds, 2)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--file-mb", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--junk", action="store_true", help="send files that are no image (415: nothing reaches "
                        "the engine, so only the bodies' memory shows)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("settings", nargs="*", help="CAPTIONER_NAME=value settings for the server")
    args = parser.parse_args(argv)
    settings = service_settings(args.settings)
    file_bytes = int(args.file_mb * 1_000_000)
    with tempfile.TemporaryDirectory() as tmp:
        service = Service(args.bundle, Path(tmp) / "service.log", **settings)
        try:
            pid = service.process.pid
            small = padded_jpeg(0)
            httpx.post(service.url + "/v1/captions", files={"image": ("w.jpg", small, "image/jpeg")}, timeout=60)
            before = rss_kib(pid)["VmRSS"]
            result = attack(service.url, pid, args.clients, args.files, file_bytes, args.rounds, args.junk)
            time.sleep(2.0)
            after = rss_kib(pid)
            ok = httpx.post(service.url + "/v1/captions", files={"image": ("w.jpg", small, "image/jpeg")},
                            timeout=60).status_code
        finally:
            service.close()
    report = {
        "attack": f"{args.rounds} x {args.clients} parallel batch posts of {args.files} x {args.file_mb:g} MB"
                  + (" (no images)" if args.junk else ""),
        "bundle": str(args.bundle), "settings": settings,
        "rss_before_mib": round(before / 1024, 1), **result,
        "rss_after_mib": round(after["VmRSS"] / 1024, 1), "vmhwm_mib": round(after["VmHWM"] / 1024, 1),
        "status_after": ok,
    }
    print(json.dumps(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
