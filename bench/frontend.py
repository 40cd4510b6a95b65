"""Benchmark: the front end's own capacity — the service with an engine that costs next to nothing.

    python bench/frontend.py --json bench/results/frontend.json

The service (`python -m app.cli serve`, uvicorn on 127.0.0.1) serves a stub bundle: the tiny bundle
of the tests (model_export/tiny_bundle.py: a pooling encoder and a 22-word decoder, captions of at
most `--max-length` words), so nearly all the CPU it spends per request is the front end's: HTTP
parsing, multipart, the dependencies and validation, the middleware, the JPEG decode and resize, the
batcher, JSON. A load generator in another process (wrk when installed, else bench/loadgen.py) sends
one 640 × 480 JPEG per request at each `--concurrency` for `--duration` seconds. Reported per point:
requests/s, latency percentiles, and the service process's CPU time per request (user + system, all
its threads, from /proc/<pid>/stat before and after), and beside it the stub engine's own CPU per
image measured in-process (so `frontend_cpu_ms_per_request` is the difference).

The figure times the cores of a GPU node bounds what one process's front end can feed a GPU:
docs/performance.md ("The front end") says how it was read.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from common import environment, rss_kib, write_report
from http_load import Service, load, photo_jpeg


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (/proc/<pid>/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def engine_cpu_ms_per_image(bundle: Path, image: Path, batch: int, rounds: int = 50) -> float:
    """The stub engine's CPU per image (process time), captioning batches of `batch` as the batcher would."""
    from app.inference.bundle import load_bundle
    from app.inference.engine import Engine
    from app.inference.preprocess import decode_image, draft_size, to_array
    from model_export.evaluate import recommended_decoding

    b = load_bundle(bundle)
    engine = Engine(b, device="cpu")
    array = to_array(decode_image(image.read_bytes(), 10**8, draft_size(b.preprocessing)), b.preprocessing)
    arrays = np.stack([array] * batch)
    config = recommended_decoding(b)
    engine.caption(arrays, config)
    start = time.process_time()
    for _ in range(rounds):
        engine.caption(arrays, config)
    return (time.process_time() - start) * 1000 / (rounds * batch)


def main(argv: list[str] | None = None) -> dict:
    from model_export.tiny_bundle import make_tiny_bundle

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load point")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--max-length", type=int, default=4, help="the stub's longest caption, in words")
    parser.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    loadgen = ("wrk" if shutil.which("wrk") else "python") if args.loadgen == "auto" else args.loadgen

    report: dict = {"benchmark": "frontend", "environment": environment(),
                    "settings": {**vars(args), "loadgen": loadgen}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image = photo_jpeg(tmp / "photo.jpg")
        bundle = make_tiny_bundle(tmp / "stub", max_length=args.max_length, name="stub", with_eval=False)
        engine_ms = engine_cpu_ms_per_image(bundle, image, batch=8)
        report["stub_engine_cpu_ms_per_image"] = round(engine_ms, 4)
        service = Service(bundle, tmp / "service.log")
        try:
            time.sleep(1.0)
            report["memory_kib_idle"] = rss_kib(service.process.pid)
            points = []
            for concurrency in args.concurrency:
                before = cpu_seconds(service.process.pid)
                point = load(service.url, image, concurrency, args.duration, loadgen)
                used = cpu_seconds(service.process.pid) - before
                requests = max(1, int(point.get("requests", 0)))
                point["service_cpu_s"] = round(used, 3)
                point["service_cpu_ms_per_request"] = round(used * 1000 / requests, 3)
                point["frontend_cpu_ms_per_request"] = round(used * 1000 / requests - engine_ms, 3)
                points.append(point)
            report["points"] = points
        finally:
            service.close()
    write_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
