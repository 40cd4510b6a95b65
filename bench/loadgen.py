"""A small HTTP load generator (used when wrk is not installed, and by the tests): `concurrency`
workers each POST one image to /v1/captions back to back for `duration` seconds (or `requests`
in all). Prints one JSON object: requests, seconds, statuses, latency percentiles in ms.

    python bench/loadgen.py --url http://127.0.0.1:8000 --image photo.jpg --concurrency 8 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np


async def run(url: str, image: bytes, concurrency: int, duration: float, total: int | None, params: dict) -> dict:
    latencies: list[float] = []
    statuses: Counter = Counter()
    sent = 0
    deadline = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker():
            nonlocal sent
            while time.perf_counter() < deadline and (total is None or sent < total):
                sent += 1
                start = time.perf_counter()
                try:
                    response = await client.post("/v1/captions", params=params,
                                                 files={"image": ("image.jpg", image, "image/jpeg")})
                    statuses[str(response.status_code)] += 1
                except httpx.HTTPError as exc:
                    statuses[type(exc).__name__] += 1
                latencies.append(time.perf_counter() - start)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - began
    lat = np.array(latencies) * 1000.0
    return {
        "loadgen": "python-httpx",
        "concurrency": concurrency,
        "requests": len(latencies),
        "seconds": round(seconds, 3),
        "requests_per_s": round(len(latencies) / seconds, 2),
        "ok": statuses.get("200", 0),
        "statuses": dict(statuses),
        "latency_ms": {f"p{p}": round(float(np.percentile(lat, p)), 1) for p in (50, 90, 95, 99)} if len(lat) else {},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--requests", type=int)
    args = parser.parse_args()
    result = asyncio.run(run(args.url, args.image.read_bytes(), args.concurrency, args.duration, args.requests, {}))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
