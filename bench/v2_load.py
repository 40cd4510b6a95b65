"""The Open Inference Protocol (/v2, binary and JSON) against /v1 multipart, on the same server, under load.

    python bench/v2_load.py --json bench/results/v2_load.json                  # models/default, 20 s a mode
    python bench/v2_load.py --bundle PATH --seconds 5 --concurrency 4 --json -  # smaller

One service (`python -m app.cli serve`, uvicorn on 127.0.0.1, CPU) and one load generator (asyncio + httpx, in
this process, `concurrency` connections kept alive) sending back to back, for `seconds` after a warm-up, each
mode in turn, the same photo (scikit-image's astronaut, 640x480 JPEG) with the service's default decoding
(beam 3, its default labels), `--images` per request:

* v1-multipart: POST /v1/captions (or /v1/captions/batch), the image as multipart/form-data; the answer is /v1's
  JSON (captions with tokens and token probabilities, labels, settings, timings);
* v2-binary: POST /v2/models/{name}/infer as tritonclient sends it by default: the JSON header and the BYTES
  tensor as binary data (Inference-Header-Content-Length), every output asked for in binary (binary_data_output);
* v2-json: the same request in JSON only, the images base64 in `data`, the outputs in JSON.

The answers are the protocols' defaults (for v2: caption, score, confidence, low_confidence, labels, label_ids,
label_probs). Reported per mode: requests/s, images/s, latency p50/p95, statuses, and the bytes on the wire per
request each way (request line, headers and body as sent; status line, headers and body as received).
Not a test: tests/test_open_inference.py checks the answers.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import struct
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from common import REPO, environment, write_report
from http_load import Service, photo_jpeg

MODES = ("v1-multipart", "v2-binary", "v2-json")


def v2_binary_body(images: list[bytes]) -> tuple[bytes, dict[str, str]]:
    blob = b"".join(struct.pack("<I", len(x)) + x for x in images)
    head = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)],
                                   "parameters": {"binary_data_size": len(blob)}}],
                       "parameters": {"binary_data_output": True}}).encode()
    return head + blob, {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


def v2_json_body(images: list[bytes]) -> tuple[bytes, dict[str, str]]:
    body = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)],
                                   "data": [base64.b64encode(x).decode() for x in images]}]}).encode()
    return body, {"Content-Type": "application/json"}


def request_for(mode: str, model: str, images: list[bytes]) -> httpx.Request:
    if mode == "v1-multipart":
        path = "/v1/captions" if len(images) == 1 else "/v1/captions/batch"
        field = "image" if len(images) == 1 else "images"
        files = [(field, (f"photo{i}.jpg", x, "image/jpeg")) for i, x in enumerate(images)]
        return httpx.Request("POST", f"http://127.0.0.1{path}", files=files)
    body, headers = (v2_binary_body if mode == "v2-binary" else v2_json_body)(images)
    return httpx.Request("POST", f"http://127.0.0.1/v2/models/{model}/infer", content=body, headers=headers)


def request_bytes(request: httpx.Request, host: str) -> int:
    """The request as it goes on the wire: request line, headers (httpx adds Host, Accept, ...), body."""
    lines = [f"{request.method} {request.url.raw_path.decode()} HTTP/1.1", f"Host: {host}"]
    defaults = {"accept": "*/*", "accept-encoding": "gzip, deflate", "connection": "keep-alive",
                "user-agent": f"python-httpx/{httpx.__version__}"}
    headers = {**defaults, **{k.lower(): v for k, v in request.headers.items() if k.lower() != "host"}}
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return len("\r\n".join(lines).encode()) + 4 + len(request.read())


def response_bytes(response: httpx.Response) -> int:
    head = [f"HTTP/1.1 {response.status_code} {response.reason_phrase}"]
    head += [f"{k}: {v}" for k, v in response.headers.items()]
    return len("\r\n".join(head).encode()) + 4 + len(response.content)


async def load(url: str, template: httpx.Request, concurrency: int, seconds: float, warmup: float) -> dict:
    body = template.read()
    headers = {k: v for k, v in template.headers.items() if k.lower() not in ("host", "content-length")}
    path = template.url.raw_path.decode()
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    received: list[int] = []
    sent = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        start = time.perf_counter()
        measure_from, stop = start + warmup, start + warmup + seconds

        async def worker() -> None:
            nonlocal sent
            while (now := time.perf_counter()) < stop:
                response = await client.post(path, content=body, headers=headers)
                sent += 1
                if now >= measure_from:
                    latencies.append(time.perf_counter() - now)
                    statuses[str(response.status_code)] += 1
                    received.append(response_bytes(response))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - measure_from
    done = len(latencies)
    ms = np.asarray(latencies) * 1000.0
    return {"requests": done, "seconds": round(elapsed, 2), "requests_per_s": round(done / elapsed, 2),
            "latency_ms": {"p50": round(float(np.percentile(ms, 50)), 1), "p95": round(float(np.percentile(ms, 95)), 1)},
            "statuses": dict(statuses), "response_bytes": int(np.median(received)) if received else 0,
            "all_requests": sent}


def cpu_seconds(pid: int) -> float:
    """The process's user + system CPU time so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--images", type=int, default=1, help="images per request")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every mode this many times, the order rotated each round (a shared machine's load "
                        "varies): the report gives each mode's median round")
    parser.add_argument("--json", help="write the report here ('-': stdout only)")
    args = parser.parse_args()

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        photo = photo_jpeg(Path(tmp) / "photo.jpg").read_bytes()
        images = [photo] * args.images
        service = Service(args.bundle, Path(tmp) / "service.log", max_batch_files=max(16, args.images))
        try:
            model = httpx.get(f"{service.url}/readyz", timeout=10).json()["model"]["name"]
            host = f"127.0.0.1:{service.port}"
            modes = args.modes.split(",")
            rounds: dict[str, list[dict]] = {mode: [] for mode in modes}
            for r in range(args.rounds):
                for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
                    template = request_for(mode, model, images)
                    cpu_before = cpu_seconds(service.process.pid)
                    row = asyncio.run(load(service.url, template, args.concurrency, args.seconds, args.warmup))
                    row["server_cpu_ms_per_request"] = round(
                        (cpu_seconds(service.process.pid) - cpu_before) * 1000.0 / max(1, row.pop("all_requests")), 1)
                    row["images_per_s"] = round(row["requests_per_s"] * args.images, 2)
                    row["request_bytes"] = request_bytes(template, host)
                    rounds[mode].append(row)
                    print(f"round {r + 1} {mode:13s} {row['requests_per_s']:7.2f} req/s  p50 {row['latency_ms']['p50']:7.1f} ms  "
                          f"p95 {row['latency_ms']['p95']:7.1f} ms  server CPU {row['server_cpu_ms_per_request']:6.1f} ms/req  "
                          f"request {row['request_bytes']:>8d} B  response {row['response_bytes']:>6d} B  {row['statuses']}",
                          file=sys.stderr)
            results = {mode: {**sorted(rows, key=lambda x: x["requests_per_s"])[len(rows) // 2], "rounds": rows}
                       for mode, rows in rounds.items()}
        finally:
            service.close()
    report = {"benchmark": "v2_load", "photo": {"bytes": len(photo), "size": "640x480 JPEG"},
              "bundle": str(args.bundle), "model": model, "concurrency": args.concurrency, "images_per_request":
              args.images, "seconds_per_mode": args.seconds, "results": results, "environment": environment(),
              "rounds": args.rounds, "load_average_1min_after": round(os.getloadavg()[0], 2),  # other work shows here
              "wall_seconds": round(time.perf_counter() - started, 1)}
    write_report(None if args.json == "-" else args.json, report)  # (prints it)


if __name__ == "__main__":
    main()
