"""Benchmark: the front end's own capacity — the service with an engine that costs next to nothing.

    python bench/frontend.py --workers 1 2 --json bench/results/frontend.json

The service (`python -m app.cli serve`, uvicorn on 127.0.0.1) serves a stub bundle: the tiny bundle
of the tests (model_export/tiny_bundle.py: a pooling encoder and a 22-word decoder, captions of at
most `--max-length` words) on one onnxruntime thread, so nearly all the CPU it spends per request is the
front end's: HTTP parsing, multipart, the dependencies and validation, the middleware, the JPEG decode
and resize, the batcher, JSON. A load generator in another process (wrk when installed, else
bench/loadgen.py) sends one 640 × 480 JPEG per request at each `--concurrency` for `--duration` seconds,
once per `--workers` count (CAPTIONER_WORKERS: HTTP processes on one port, docs/scale.md).

Reported per point: requests/s, latency percentiles, and the CPU time per request of every process of
the service (user + system, from /proc/<pid>/task/<tid>/stat before and after), split by thread: the event
loop (each process's main thread), image decoding (`captioner-prep`), the engine (`captioner-infer`,
app/observability/threads.py) and the rest. `frontend_cpu_ms_per_request` is everything but the engine.
That figure, times the cores of a GPU node, bounds the requests per second the front end can feed a GPU
(docs/performance.md, "The front end"; docs/scale.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

from common import add_setting_option, environment, rss_kib_tree, service_pids, service_settings, write_report
from http_load import Service, load, photo_jpeg

THREAD_KINDS = {"captioner-prep": "decode", "captioner-infer": "engine"}


def cpu_by_thread(root: int) -> Counter:
    """CPU seconds (user + system) of every thread of the service's processes, by kind: event_loop (a
    process's main thread), decode, engine, other."""
    tick = os.sysconf("SC_CLK_TCK")
    used: Counter = Counter()
    for pid in service_pids(root):
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                name = (task / "comm").read_text().strip()
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue  # a thread that ended meanwhile
            kind = "event_loop" if task.name == str(pid) else THREAD_KINDS.get(name, "other")
            used[kind] += (int(fields[11]) + int(fields[12])) / tick
    return used


def measure(bundle: Path, image: Path, workers: int, concurrency: list[int], duration: float, loadgen: str,
            log: Path, settings: dict[str, str] | None = None) -> dict:
    service = Service(bundle, log, **{"threads": 1, **(settings or {}), **({"workers": workers} if workers > 1 else {})})
    try:
        time.sleep(1.0 + workers)  # every worker up and warm
        load(service.url, image, max(concurrency), 2.0, loadgen)  # warm-up: connections, caches
        out: dict = {"workers": workers,
                     "memory_kib_idle": rss_kib_tree(service.process.pid)}
        points = []
        for c in concurrency:
            before = cpu_by_thread(service.process.pid)
            point = load(service.url, image, c, duration, loadgen)
            after = cpu_by_thread(service.process.pid)
            requests = max(1, int(point.get("requests", 0)))
            per_request = {kind: round((after[kind] - before[kind]) * 1000 / requests, 3) for kind in sorted(after)}
            point["cpu_ms_per_request"] = per_request
            point["service_cpu_ms_per_request"] = round(sum(per_request.values()), 3)
            point["frontend_cpu_ms_per_request"] = round(sum(v for k, v in per_request.items() if k != "engine"), 3)
            points.append(point)
        out["points"] = points
        return out
    finally:
        service.close()


def main(argv: list[str] | None = None) -> dict:
    from model_export.tiny_bundle import make_tiny_bundle

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load point")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--workers", type=int, nargs="+", default=[1], help="CAPTIONER_WORKERS values to measure")
    parser.add_argument("--max-length", type=int, default=4, help="the stub's longest caption, in words")
    parser.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto")
    add_setting_option(parser)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    loadgen = ("wrk" if shutil.which("wrk") else "python") if args.loadgen == "auto" else args.loadgen

    report: dict = {"benchmark": "frontend", "environment": environment(),
                    "settings": {**vars(args), "loadgen": loadgen}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image = photo_jpeg(tmp / "photo.jpg")
        bundle = make_tiny_bundle(tmp / "stub", max_length=args.max_length, name="stub", with_eval=False)
        report["runs"] = [measure(bundle, image, w, args.concurrency, args.duration, loadgen, tmp / f"service-{w}.log",
                                  service_settings(args.settings))
                          for w in args.workers]
    if len(report["runs"]) > 1:  # throughput at the highest concurrency, relative to the first workers count
        base = report["runs"][0]["points"][-1]["requests_per_s"]
        report["scaling"] = {str(run["workers"]): round(run["points"][-1]["requests_per_s"] / base, 3)
                             for run in report["runs"]}
    write_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
