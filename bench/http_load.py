"""Benchmarks 2 and 3: the service over HTTP under load, and dynamic batching on vs off.

    python bench/http_load.py --json bench/results/http_load.json

1. The in-process engine's throughput (app/inference/engine.py, batches of max_batch_images, the same JPEG
   decoded once) is the yardstick.
2. The real service (`python -m app.cli serve`, uvicorn, 127.0.0.1) under a load generator in a
   separate process (wrk when installed, else bench/loadgen.py) at concurrency 1, 8 and 32:
   requests/s, latency p50/p90/p95/p99, and the ratio to the engine at the highest concurrency.
3. Concurrency 16 with dynamic batching on and off (CAPTIONER_BATCHING).
The service's resident memory is read idle (after warm-up) and at its peak under load.
Every request is one JPEG (640x480 photo) captioned with beam 3.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from common import REPO, add_setting_option, environment, rss_kib_tree, service_settings, write_report
from PIL import Image

BENCH = Path(__file__).resolve().parent


def photo_jpeg(path: Path) -> Path:
    from skimage import data as skdata

    buf = io.BytesIO()
    Image.fromarray(skdata.astronaut()).resize((640, 480), Image.BICUBIC).save(buf, format="JPEG", quality=90)
    path.write_bytes(buf.getvalue())
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    def __init__(self, bundle: Path, log: Path, **settings):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONER_")}
        env.update({"CAPTIONER_BUNDLE": str(bundle), "CAPTIONER_PORT": str(self.port), "CAPTIONER_DEVICE": "cpu",
                    "CAPTIONER_LOG_LEVEL": "warning", "PYTHONPATH": str(REPO)})
        env.update({f"CAPTIONER_{k.upper()}": str(v) for k, v in settings.items()})
        self.log = open(log, "wb")
        self.process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], cwd=REPO, env=env,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited with {self.process.returncode}; see {log}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the service did not become ready")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


def load(url: str, image: Path, concurrency: int, duration: float, loadgen: str) -> dict:
    if loadgen == "wrk":
        out = subprocess.run(
            ["wrk", "-t", "1", "-c", str(concurrency), "-d", f"{max(1, round(duration))}s", "--timeout", "60s",
             "-s", str(BENCH / "multipart.lua"), url],
            env={**os.environ, "BENCH_IMAGE": str(image)}, capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result["concurrency"] = concurrency
        return result
    out = subprocess.run(
        [sys.executable, str(BENCH / "loadgen.py"), "--url", url, "--image", str(image),
         "--concurrency", str(concurrency), "--duration", str(duration)],
        capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def engine_rate(bundle: Path, image: Path, batch: int, seconds: float) -> float:
    from app.inference.bundle import load_bundle
    from app.inference.engine import Engine
    from app.inference.preprocess import decode_image, draft_size, to_array
    from model_export.evaluate import recommended_decoding

    b = load_bundle(bundle)
    engine = Engine(b, device="cpu")
    array = to_array(decode_image(image.read_bytes(), 10**8, draft_size(b.preprocessing)), b.preprocessing)
    arrays = np.stack([array] * batch)
    config = recommended_decoding(b)  # what the service decodes with by default
    engine.caption(arrays, config)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        engine.caption(arrays, config)
        done += batch
    return done / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per load point")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--batching-concurrency", type=int, default=16)
    parser.add_argument("--max-batch-images", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1,
                        help="CAPTIONER_WORKERS for the service points (each worker then has cores / N engine threads)")
    parser.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto")
    add_setting_option(parser)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    loadgen = ("wrk" if shutil.which("wrk") else "python") if args.loadgen == "auto" else args.loadgen
    extra = {**service_settings(args.settings), **({"workers": args.workers} if args.workers > 1 else {})}

    report: dict = {"benchmark": "http_load", "environment": environment(), "settings": {**vars(args), "loadgen": loadgen,
                    "bundle": str(args.bundle)}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image = photo_jpeg(tmp / "photo.jpg")
        report["engine_images_per_s"] = round(engine_rate(args.bundle, image, args.max_batch_images, args.duration), 2)

        service = Service(args.bundle, tmp / "on.log", max_batch_images=args.max_batch_images, **extra)
        try:
            time.sleep(1.0)
            report["memory_kib_idle"] = rss_kib_tree(service.process.pid)
            report["service"] = [load(service.url, image, c, args.duration, loadgen) for c in args.concurrency]
            report["batching_on"] = load(service.url, image, args.batching_concurrency, args.duration, loadgen)
            report["memory_kib_after_load"] = rss_kib_tree(service.process.pid)
        finally:
            service.close()
        service = Service(args.bundle, tmp / "off.log", batching="false", **extra)
        try:
            report["batching_off"] = load(service.url, image, args.batching_concurrency, args.duration, loadgen)
        finally:
            service.close()

    top = max(report["service"], key=lambda r: r["concurrency"])
    report["ratios"] = {
        f"service_c{top['concurrency']} / engine": round(top["requests_per_s"] / report["engine_images_per_s"], 2),
        f"batching_on / batching_off (c{args.batching_concurrency})":
            round(report["batching_on"]["requests_per_s"] / report["batching_off"]["requests_per_s"], 2),
    }
    write_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
