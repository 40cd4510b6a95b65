"""Load and fault scenarios against the real service on 127.0.0.1, with bounded counts and time; each
prints the figures docs/reliability.md quotes (tests/test_faults.py runs them small and checks the
behaviour, never the timings).

    python bench/faults.py --json bench/results/faults.json                  # all, full size
    python bench/faults.py --scenario soak --soak-requests 20000

- overload: 4x the queue capacity at once. Excess requests get 503 + Retry-After; accepted ones
  finish (or 504 past the deadline); nothing else; the service answers normally afterwards.
- soak: N requests (tiny bundle, so that it takes minutes, not hours); resident memory after a
  warm-up and at the end; every status counted.
- sigterm: SIGTERM while batch requests are queued and running. Every accepted request completes;
  new connections are refused; the process exits 0.
- disconnect: clients that hang up mid-upload and while their job waits for the engine: their
  queue places are freed (rejected{client_gone}) and the service keeps serving.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
from common import REPO, environment, rss_kib, write_report
from http_load import Service, photo_jpeg

DEFAULT_BUNDLE = REPO / "models" / "default"


def metric(url: str, name: str, **labels: str) -> float:
    """One sample of the service's /metrics (0 when absent)."""
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "") + " "
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(want):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _files(image: bytes, count: int = 1, field: str = "image"):
    return [(field, (f"{i}.jpg", image, "image/jpeg")) for i in range(count)]


async def _fire(url: str, image: bytes, count: int, path: str = "/v1/captions", per_request: int = 1) -> list[dict]:
    limits = httpx.Limits(max_connections=count + 4, max_keepalive_connections=count + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def one() -> dict:
            start = time.perf_counter()
            field = "images" if path.endswith("batch") else "image"
            try:
                r = await client.post(path, files=_files(image, per_request, field))
                body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
                return {"status": r.status_code, "seconds": time.perf_counter() - start,
                        "retry_after": r.headers.get("retry-after"), "code": body.get("error", {}).get("code")}
            except httpx.HTTPError as exc:
                return {"status": type(exc).__name__, "seconds": time.perf_counter() - start}

        return await asyncio.gather(*(one() for _ in range(count)))


def overload(tmp: Path, image: bytes, capacity: int, bundle: Path, deadline_s: float = 1.0, deadline_requests: int = 6) -> dict:
    """`4 x capacity` single-image requests at once against max_queue_images=capacity."""
    out: dict = {"queue_capacity_images": capacity, "requests": 4 * capacity}
    service = Service(bundle, tmp / "overload.log", max_queue_images=capacity, max_batch_images=4,
                      request_timeout_s=30)
    try:
        results = asyncio.run(_fire(service.url, image, 4 * capacity))
        statuses = Counter(str(r["status"]) for r in results)
        refused = [r for r in results if r["status"] == 503]
        accepted = [r for r in results if r["status"] == 200]
        out.update({
            "statuses": dict(statuses),
            "refused_with_retry_after": sum(1 for r in refused if r["retry_after"] and int(r["retry_after"]) >= 1),
            "refused_seconds_max": round(max((r["seconds"] for r in refused), default=0.0), 3),
            "accepted_seconds_max": round(max((r["seconds"] for r in accepted), default=0.0), 3),
            "other_statuses": sum(v for k, v in statuses.items() if k not in ("200", "503")),
        })
        after = [httpx.post(service.url + "/v1/captions", files=_files(image), timeout=60).status_code for _ in range(3)]
        out["after_overload_statuses"] = after
        out["service_alive"] = service.process.poll() is None
    finally:
        service.close()

    # the deadline: a burst the engine cannot finish within request_timeout_s (size both to the
    # engine's speed: 16 images a request, so the burst is deadline_requests * 16 images)
    service = Service(bundle, tmp / "deadline.log", max_queue_images=100_000, request_timeout_s=deadline_s)
    try:
        results = asyncio.run(_fire(service.url, image, deadline_requests, path="/v1/captions/batch", per_request=16))
        statuses = Counter(str(r["status"]) for r in results)
        late = [r for r in results if r["status"] == 504]
        out["deadline"] = {
            "request_timeout_s": deadline_s, "requests": deadline_requests, "images_each": 16, "statuses": dict(statuses),
            "timed_out_seconds_max": round(max((r["seconds"] for r in late), default=0.0), 3),
            **_recovery(service.url, image),
        }
    finally:
        service.close()
    return out


def _recovery(url: str, image: bytes, tries: int = 20, pause_s: float = 0.5) -> dict:
    """After a burst that ran past its deadline: wait for the queue to empty, then send one image at a
    time until one is captioned. The engine may still be finishing the batch it had started when
    its requests gave up (its encoder pass cannot be cut short), and on a busy machine that can
    outlast a short request_timeout_s, so a 504 or two may come first; anything else, or no 200
    within `tries`, is a failure to recover."""
    start = time.perf_counter()
    while metric(url, "captioner_queue_images") > 0 and time.perf_counter() - start < 60:
        time.sleep(0.05)
    statuses: list[int] = []
    for _ in range(tries):
        statuses.append(httpx.post(url + "/v1/captions", files=_files(image), timeout=60).status_code)
        if statuses[-1] != 504:
            break
        time.sleep(pause_s)
    return {"after_statuses": statuses, "recovered_seconds": round(time.perf_counter() - start, 3)}


def soak(tmp: Path, image: bytes, requests: int, concurrency: int, warmup: int) -> dict:
    """Many requests to a tiny bundle; memory after warm-up and at the end."""
    sys.path.insert(0, str(REPO))
    from model_export.tiny_bundle import make_tiny_bundle

    bundle = make_tiny_bundle(tmp / "tiny", attention=True)
    service = Service(bundle, tmp / "soak.log")
    statuses: Counter = Counter()

    async def run(count: int) -> None:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=service.url, timeout=60, limits=limits) as client:
            left = count

            async def worker():
                nonlocal left
                while left > 0:
                    left -= 1
                    try:
                        r = await client.post("/v1/captions", files=_files(image))
                        statuses[str(r.status_code)] += 1
                    except httpx.HTTPError as exc:
                        statuses[type(exc).__name__] += 1

            await asyncio.gather(*(worker() for _ in range(concurrency)))

    try:
        started = time.perf_counter()
        asyncio.run(run(warmup))
        after_warmup = rss_kib(service.process.pid)["VmRSS"]
        asyncio.run(run(requests - warmup))
        end = rss_kib(service.process.pid)
        seconds = time.perf_counter() - started
        return {
            "requests": sum(statuses.values()), "concurrency": concurrency, "seconds": round(seconds, 1),
            "statuses": dict(statuses), "unexpected_5xx": sum(v for k, v in statuses.items() if k.startswith("5")),
            "rss_kib_after_warmup": after_warmup, "rss_kib_end": end["VmRSS"], "rss_kib_peak": end["VmHWM"],
            "rss_growth_after_warmup_percent": round(100.0 * (end["VmRSS"] - after_warmup) / after_warmup, 2),
            "bundle": "model_export/tiny_bundle.py tiny attention bundle", "warmup_requests": warmup,
        }
    finally:
        service.close()


def sigterm(tmp: Path, image: bytes, jobs: int, bundle: Path) -> dict:
    """SIGTERM while `jobs` 16-image batch requests are queued or running."""
    service = Service(bundle, tmp / "sigterm.log", max_batch_images=16)
    out: dict = {"in_flight_requests": jobs, "images_each": 16}

    async def scenario() -> tuple[list[dict], list[str], float]:
        task = asyncio.ensure_future(_fire(service.url, image, jobs, path="/v1/captions/batch", per_request=16))
        # wait until every job is accepted: all but the running one wait in the queue
        give_up = time.perf_counter() + 60
        while time.perf_counter() < give_up:
            queued = await asyncio.to_thread(metric, service.url, "captioner_queue_images")
            if queued >= 16 * (jobs - 1):
                break
            await asyncio.sleep(0.02)
        signalled = time.perf_counter()
        service.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        late = []
        for _ in range(3):  # new requests after the signal
            try:
                r = await asyncio.to_thread(httpx.post, service.url + "/v1/captions", files=_files(image), timeout=10)
                late.append(str(r.status_code))
            except httpx.HTTPError as exc:
                late.append(type(exc).__name__)
        results = await task
        return results, late, signalled

    try:
        results, late, signalled = asyncio.run(scenario())
        code = service.process.wait(60)
        out.update({
            "statuses": dict(Counter(str(r["status"]) for r in results)),
            "new_requests_after_signal": late,
            "exit_code": code,
            "drain_seconds": round(time.perf_counter() - signalled, 2),
        })
    finally:
        if service.process.poll() is None:
            service.close()
        service.log.close()
    return out


def disconnect(tmp: Path, image: bytes, bundle: Path, clients: int) -> dict:
    """Clients hang up mid-upload, and while their jobs wait behind a long one."""
    service = Service(bundle, tmp / "disconnect.log", max_batch_images=1)
    host, port = "127.0.0.1", service.port
    out: dict = {}
    try:
        # 1. mid-upload: a body announced at 2 MB, 64 KB sent, then the socket closes
        boundary = "bench42"
        head = (f"POST /v1/captions HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
                f"Content-Length: 2000000\r\n\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
                f"filename=\"x.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n").encode()
        for _ in range(clients):
            with socket.create_connection((host, port)) as s:
                s.sendall(head + image[: 64 * 1024])
        out["mid_upload_disconnects"] = clients

        # 2. mid-wait: a long job occupies the engine; `clients` complete requests queue behind it, then hang up
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.jpg\"\r\n"
                f"Content-Type: image/jpeg\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
        request = (f"POST /v1/captions HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body

        async def scenario() -> list[dict]:
            long = asyncio.ensure_future(_fire(service.url, image, 3, path="/v1/captions/batch", per_request=16))
            give_up = time.perf_counter() + 60
            while await asyncio.to_thread(metric, service.url, "captioner_queue_images") < 16 and time.perf_counter() < give_up:
                await asyncio.sleep(0.01)  # one long job runs, the others wait
            sockets = [socket.create_connection((host, port)) for _ in range(clients)]
            for s in sockets:
                s.sendall(request)
            while (await asyncio.to_thread(metric, service.url, "captioner_queue_images") < 32 + clients
                   and time.perf_counter() < give_up):
                await asyncio.sleep(0.01)
            out["queued_images_before_hangup"] = await asyncio.to_thread(metric, service.url, "captioner_queue_images")
            for s in sockets:
                s.close()
            await asyncio.sleep(0.5)
            out["queued_images_after_hangup"] = await asyncio.to_thread(metric, service.url, "captioner_queue_images")
            return await long

        long_results = asyncio.run(scenario())
        out["long_job_statuses"] = dict(Counter(str(r["status"]) for r in long_results))
        out["client_gone"] = metric(service.url, "captioner_rejected_requests_total", reason="client_gone")
        out["queued_images_at_end"] = metric(service.url, "captioner_queue_images")
        out["after_statuses"] = [httpx.post(service.url + "/v1/captions", files=_files(image), timeout=60).status_code]
        out["service_alive"] = service.process.poll() is None
        log = (tmp / "disconnect.log").read_text(errors="replace")
        out["server_errors_logged"] = len(re.findall(r'"level": "error"', log))
    finally:
        service.close()
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=["all", "overload", "soak", "sigterm", "disconnect"], default="all")
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--queue-capacity", type=int, default=16)
    parser.add_argument("--deadline-s", type=float, default=1.0, help="request_timeout_s of the deadline scenario")
    parser.add_argument("--deadline-requests", type=int, default=6, help="batch requests of 16 images in its burst")
    parser.add_argument("--soak-requests", type=int, default=20_000)
    parser.add_argument("--soak-warmup", type=int, default=2_000)
    parser.add_argument("--soak-concurrency", type=int, default=8)
    parser.add_argument("--sigterm-jobs", type=int, default=4)
    parser.add_argument("--disconnect-clients", type=int, default=4)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    report: dict = {"benchmark": "faults", "environment": environment(), "settings": {**vars(args), "bundle": str(args.bundle)}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image = photo_jpeg(tmp / "photo.jpg").read_bytes()
        wanted = ["overload", "soak", "sigterm", "disconnect"] if args.scenario == "all" else [args.scenario]
        for name in wanted:
            started = time.perf_counter()
            if name == "overload":
                report[name] = overload(tmp, image, args.queue_capacity, args.bundle, args.deadline_s, args.deadline_requests)
            elif name == "soak":
                report[name] = soak(tmp, image, args.soak_requests, args.soak_concurrency,
                                    min(args.soak_warmup, args.soak_requests // 2))
            elif name == "sigterm":
                report[name] = sigterm(tmp, image, args.sigterm_jobs, args.bundle)
            else:
                report[name] = disconnect(tmp, image, args.bundle, args.disconnect_clients)
            report[name]["scenario_seconds"] = round(time.perf_counter() - started, 1)
    write_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
