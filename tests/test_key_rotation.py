"""API keys that rotate, hashed keys and per-key rate limits (app/api/auth.py, app/security/keys.py,
app/security/ratelimit.py), against real uvicorn processes serving a tiny bundle, plus a few in-process checks
of the parts (a fake clock for the token bucket, a Kubernetes-style Secret folder for the reload).

* rotation under load: client threads send requests with key A (and with key B) without pause while
  the keys file, laid out like a Kubernetes Secret volume, is swapped (`..data` symlink) to A+B,
  then to B only. No request with a key valid at the time fails, B takes effect and A is refused
  within the reload delay (about a second), nothing is ever 5xx, and the process never restarts.
* a keys file that becomes invalid or disappears while running: the keys in use stay, one warning
  per bad version (never a key), counted in `captioner_api_keys_reloads_total{result="error"}`; the
  next valid version is picked up.
* hashed keys (`sha256:<hex>`): the key works, the hash itself is no key, neither reaches the log.
* rate limits: 429 `rate_limited` with Retry-After and X-RateLimit-*, other keys unaffected, the
  bucket refills (observed through the headers, with a limit of 60 per minute and a burst of 3),
  a key's own limit changes with the keys file.

The figures of the rotation test (requests, failures, seconds until a change took effect) are
printed with `-s`; docs/reliability.md quotes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.support.live_server import LiveServer, image_bytes

KEY_A = "rotate-key-A-2fQx9LmN4pRt7vWy"
KEY_B = "rotate-key-B-8kJh3GfD6sAq1zXc"
KEY_C = "unusable-test-key-C-5tYu7iOp9"
KEY_D = "unusable-test-key-D-3eRw1qAs2"
KEY_H = "hashed-env-key-H-6nBv4cXz8lKj"
KEY_F = "hashed-file-key-F-0mNb5vCx7zLk"
KEY_G = "hashed-file-key-G-9pOi8uYt6rEw"
R1 = "rate-key-1-global-limit-aaaa"
R2 = "rate-key-2-global-limit-bbbb"
R3 = "rate-key-3-own-limit-cccccccc"
R4 = "rate-key-4-hashed-unlimited-dd"
RELOAD_DEADLINE_S = 15.0  # generous: the designed delay is about 1 s
FIGURES: dict[str, object] = {}


def sha256_hex(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def small_png() -> bytes:
    return image_bytes(np.random.default_rng(3).integers(0, 255, (24, 32, 3), dtype=np.uint8), "PNG")


def replace_file(path: Path, text: str) -> None:
    """Write a new version next to `path` and rename it over `path` (atomic)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class SecretVolume:
    """A folder laid out like a Kubernetes Secret volume: `api-keys` -> `..data/api-keys`, `..data` ->
    `..<version>/`. `update` writes a new `..<version>` folder, points a `..data_tmp` symlink at it,
    renames that over `..data` (the atomic swap) and removes the old folder, as the kubelet does."""

    def __init__(self, root: Path, text: str, item: str = "api-keys") -> None:
        self.root = root
        self.item = item
        self.version = 0
        self.current: str | None = None
        root.mkdir(parents=True, exist_ok=True)
        self.update(text)
        os.symlink(f"..data/{item}", root / item)

    @property
    def path(self) -> Path:
        return self.root / self.item

    def update(self, text: str) -> None:
        self.version += 1
        name = f"..2030_01_01_00_00_{self.version:02d}.{os.getpid()}"
        (self.root / name).mkdir(mode=0o755)
        (self.root / name / self.item).write_text(text, encoding="utf-8")
        tmp = self.root / "..data_tmp"
        os.symlink(name, tmp)
        os.replace(tmp, self.root / "..data")
        if self.current is not None:
            old = self.root / self.current
            (old / self.item).unlink()
            old.rmdir()
        self.current = name


def metric(server: LiveServer, key: str, name: str, labels: str = "") -> float:
    with server.client() as c:
        text = c.get("/metrics", headers=bearer(key)).text
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    assert match, f"{name}{labels} not in /metrics"
    return float(match.group(1))


def log_entries(server: LiveServer) -> list[dict]:
    return [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]


def wait_for(condition, timeout: float = RELOAD_DEADLINE_S, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"not within {timeout} s")


@pytest.fixture(scope="module")
def bundle(tiny_bundles) -> Path:
    return tiny_bundles(max_length=8)


# ---- rotation under load ----------------------------------------------------------------------------


@dataclass
class Result:
    key: str
    sent: float
    done: float
    status: int | None
    error: str | None


def _client_loop(server: LiveServer, name: str, key: str, stop: threading.Event, out: list[Result]) -> None:
    png = small_png()
    with server.client(timeout=30) as c:
        i = 0
        while not stop.is_set():
            sent = time.monotonic()
            try:
                if i % 2:
                    r = c.get("/v1/model", headers=bearer(key))
                else:
                    r = c.post("/v1/captions", files={"image": ("a.png", png, "image/png")},
                               params={"strategy": "greedy"}, headers=bearer(key))
                status, error = r.status_code, None
            except httpx.HTTPError as exc:
                status, error = None, type(exc).__name__
            out.append(Result(name, sent, time.monotonic(), status, error))
            i += 1


def test_rotation_under_load_with_a_kubernetes_secret_swap(bundle, start_server, tmp_path_factory):
    volume = SecretVolume(tmp_path_factory.mktemp("rotation") / "secret", f"# keys\n{KEY_A}\n")
    server = start_server(bundle, log_name="rotation", api_keys_file=volume.path)
    pid = server.process.pid
    results: list[Result] = []
    stop = threading.Event()
    threads = [threading.Thread(target=_client_loop, args=(server, name, key, stop, results), daemon=True)
               for name, key in [("A", KEY_A), ("A", KEY_A), ("A", KEY_A), ("B", KEY_B), ("B", KEY_B)]]
    started = time.monotonic()
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)  # A alone
        t1 = time.monotonic()
        volume.update(f"# keys\n{KEY_A}\n{KEY_B}\n")
        first_b = wait_for(lambda: next((r for r in list(results) if r.key == "B" and r.status == 200), None))
        time.sleep(1.5)  # A and B
        t2 = time.monotonic()
        volume.update(f"# keys\n{KEY_B}\n")
        first_a_refused = wait_for(lambda: next((r for r in list(results) if r.key == "A" and r.status == 401), None))
        time.sleep(1.5)  # B alone
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    elapsed = time.monotonic() - started
    a = [r for r in results if r.key == "A"]
    b = [r for r in results if r.key == "B"]

    assert [r for r in results if r.error] == [], "transport errors"
    assert {r.status for r in results} <= {200, 401}, sorted({r.status for r in results})  # never a 5xx
    # A: valid until the second swap, every request answered 200; refused for good once the swap is seen
    assert all(r.status == 200 for r in a if r.done < t2)
    assert all(r.done > t2 for r in a if r.status == 401)
    assert all(r.status == 401 for r in a if r.sent > first_a_refused.done)
    assert any(r.sent > first_a_refused.done for r in a), "A was still tried after its removal"
    # B: refused before the first swap; accepted for good once the swap is seen
    assert all(r.status == 401 for r in b if r.done < t1)
    assert first_b.done > t1
    assert all(r.status == 200 for r in b if r.sent > first_b.done)
    assert any(r.sent > first_b.done for r in b)
    # a key valid all along (A before t2, B after t1 plus the delay) never failed
    b_delay = first_b.done - t1
    a_delay = first_a_refused.done - t2
    assert b_delay < RELOAD_DEADLINE_S and a_delay < RELOAD_DEADLINE_S

    # no restart, two reloads logged, none failed
    assert server.process.poll() is None and server.process.pid == pid
    with server.client() as c:
        assert c.get("/readyz").status_code == 200
    entries = log_entries(server)
    assert [e["msg"] for e in entries].count("ready") == 1
    reloads = [e for e in entries if e["msg"].startswith("API keys reloaded")]
    assert [e["keys"] for e in reloads] == [2, 1], reloads
    assert not [e for e in entries if e["level"] in ("warning", "error")]
    assert metric(server, KEY_B, "captioner_api_keys_reloads_total", '{result="ok"}') == 2
    assert metric(server, KEY_B, "captioner_api_keys_reloads_total", '{result="error"}') == 0
    assert metric(server, KEY_B, "captioner_api_keys") == 1
    log = server.log()
    assert KEY_A not in log and KEY_B not in log

    FIGURES.update(requests=len(results), failures=sum(1 for r in results if r.status not in (200, 401) or r.error),
                   a_ok=sum(1 for r in a if r.status == 200), a_refused=sum(1 for r in a if r.status == 401),
                   b_ok=sum(1 for r in b if r.status == 200), b_refused=sum(1 for r in b if r.status == 401),
                   b_took_effect_s=round(b_delay, 2), a_refused_after_s=round(a_delay, 2), seconds=round(elapsed, 1))
    print(f"\nrotation under load: {FIGURES}")


def test_rotation_of_a_plain_file_rewritten_in_place(bundle, start_server, tmp_path_factory):
    """The file itself rewritten (no rename, same inode): the size and mtime change is seen too."""
    keys_file = tmp_path_factory.mktemp("in-place") / "api-keys"
    keys_file.write_text(f"{KEY_A}\n", encoding="utf-8")
    server = start_server(bundle, log_name="in-place", api_keys_file=keys_file)
    inode = keys_file.stat().st_ino
    with server.client() as c:
        assert c.get("/v1/model", headers=bearer(KEY_A)).status_code == 200
        assert c.get("/v1/model", headers=bearer(KEY_B)).status_code == 401
        with open(keys_file, "w", encoding="utf-8") as f:
            f.write(f"{KEY_B}\n# A is gone\n")
        assert keys_file.stat().st_ino == inode
        wait_for(lambda: c.get("/v1/model", headers=bearer(KEY_B)).status_code == 200)
        assert c.get("/v1/model", headers=bearer(KEY_A)).status_code == 401


# ---- a file that cannot be used ------------------------------------------------------------------------


def _warnings(server: LiveServer) -> list[dict]:
    return [e for e in log_entries(server) if e["level"] == "warning" and "keys file" in e["msg"]]


def test_an_unusable_keys_file_keeps_the_keys_in_use(bundle, start_server, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("unusable") / "api-keys"
    keys_file.write_text(f"{KEY_C}\n", encoding="utf-8")
    server = start_server(bundle, log_name="unusable", api_keys_file=keys_file)
    short = "too-short-key"
    with server.client() as c:
        def ok(key: str = KEY_C) -> bool:
            return c.get("/v1/model", headers=bearer(key)).status_code == 200

        # 1. an invalid version (a key too short on line 2): one warning, C still works, and keeps working
        replace_file(keys_file, f"# new keys\n{short}\n{KEY_D}\n")
        wait_for(lambda: _warnings(server))
        for _ in range(30):  # 3 s: three more checks of the same bad version
            assert ok()
            assert not ok(KEY_D)
            time.sleep(0.1)
        [warning] = _warnings(server)
        assert "line 2" in warning["msg"] and "16 to 256 characters" in warning["msg"], warning
        assert warning["keys"] == 1
        assert metric(server, KEY_C, "captioner_api_keys_reloads_total", '{result="error"}') == 1

        # 2. the file disappears: a second warning, C still works
        keys_file.unlink()
        wait_for(lambda: len(_warnings(server)) == 2)
        assert "cannot read the API keys file" in _warnings(server)[1]["msg"]
        assert ok() and not ok(KEY_D)

        # 3. an empty file (no key): a third warning
        keys_file.write_text("# nothing yet\n", encoding="utf-8")
        wait_for(lambda: len(_warnings(server)) == 3)
        assert "holds no key" in _warnings(server)[2]["msg"]
        assert ok()

        # 4. a valid version: picked up, with an info line naming the number of keys
        replace_file(keys_file, f"{KEY_C}\n{KEY_D}\n")
        wait_for(lambda: ok(KEY_D))
        assert ok()
    reloads = [e for e in log_entries(server) if e["msg"].startswith("API keys reloaded")]
    assert [(e["level"], e["keys"]) for e in reloads] == [("info", 2)]
    assert metric(server, KEY_C, "captioner_api_keys_reloads_total", '{result="error"}') == 3
    assert metric(server, KEY_C, "captioner_api_keys_reloads_total", '{result="ok"}') == 1
    assert server.process.poll() is None
    log = server.log()
    for secret in (KEY_C, KEY_D, short):
        assert secret not in log
    assert "Traceback" not in log


# ---- hashed keys --------------------------------------------------------------------------------------


def test_hashed_keys_work_and_no_key_or_hash_is_logged(bundle, start_server, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("hashed") / "api-keys"
    keys_file.write_text(f"# hashed keys\nSHA256:{sha256_hex(KEY_F).upper()}\n", encoding="utf-8")
    server = start_server(bundle, log_name="hashed", api_keys=f"sha256:{sha256_hex(KEY_H)}", api_keys_file=keys_file)
    with server.client() as c:
        for key in (KEY_H, KEY_F):
            assert c.get("/v1/model", headers=bearer(key)).status_code == 200
            r = c.post("/v1/captions", files={"image": ("a.png", small_png(), "image/png")},
                       params={"strategy": "greedy"}, headers=bearer(key))
            assert r.status_code == 200, r.text
        # the hash is not a key: presenting it (with or without the prefix) is refused like any wrong key
        for wrong in (f"sha256:{sha256_hex(KEY_H)}", sha256_hex(KEY_H), sha256_hex(KEY_F).upper()):
            r = c.get("/v1/model", headers=bearer(wrong))
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        # a hashed file entry rotates like a plain one
        replace_file(keys_file, f"sha256:{sha256_hex(KEY_G)}\n")
        wait_for(lambda: c.get("/v1/model", headers=bearer(KEY_G)).status_code == 200)
        assert c.get("/v1/model", headers=bearer(KEY_F)).status_code == 401
        assert c.get("/v1/model", headers=bearer(KEY_H)).status_code == 200  # the environment's stays
    time.sleep(0.2)
    log = server.log()
    for secret in (KEY_H, KEY_F, KEY_G):
        assert secret not in log
        assert sha256_hex(secret) not in log.lower()


# ---- rate limits -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited(bundle, start_server, tmp_path_factory):
    """R1 and R2: the global limit (60 a minute, burst 3: one token a second); R3: its own limit from
    the keys file; R4: hashed, `rate=off`."""
    keys_file = tmp_path_factory.mktemp("limited") / "api-keys"
    keys_file.write_text(f"{R3} rate=600 burst=2\nsha256:{sha256_hex(R4)} rate=off\n", encoding="utf-8")
    server = start_server(bundle, log_name="limited", api_keys=f"{R1},{R2}", api_keys_file=keys_file,
                          api_key_rate_limit=60, api_key_rate_burst=3)
    return server, keys_file


def _limits(r: httpx.Response) -> tuple[int, int, int]:
    return (int(r.headers["x-ratelimit-limit"]), int(r.headers["x-ratelimit-remaining"]),
            int(r.headers["x-ratelimit-reset"]))


def test_rate_limit_answers_429_and_the_bucket_refills(limited):
    limited, _ = limited
    with limited.client() as c:
        first = c.get("/v1/model", headers=bearer(R1))
        assert first.status_code == 200
        limit, remaining, reset = _limits(first)
        assert (limit, remaining) == (60, 2) and 1 <= reset <= 3  # a full bucket of 3, one taken
        answers = [c.get("/v1/model", headers=bearer(R1)) for _ in range(8)]
        statuses = [r.status_code for r in answers]
        assert statuses[:2] == [200, 200] and 429 in statuses, statuses
        refused = answers[statuses.index(429)]
        body = refused.json()
        assert set(body) == {"error"} and body["error"]["code"] == "rate_limited"
        assert body["error"]["request_id"] == refused.headers["x-request-id"]
        assert "60 requests per minute" in body["error"]["message"]
        retry_after = int(refused.headers["retry-after"])
        assert retry_after >= 1
        limit, remaining, reset = _limits(refused)
        assert (limit, remaining) == (60, 0) and 1 <= reset <= 3
        assert "www-authenticate" not in refused.headers

        # other keys are not affected: R2 has its own bucket, R3 its own limit, R4 none
        assert _limits(c.get("/v1/model", headers=bearer(R2)))[:2] == (60, 2)
        r3 = c.get("/v1/model", headers=bearer(R3))
        assert r3.status_code == 200 and _limits(r3)[:2] == (600, 1)
        for _ in range(10):
            r4 = c.get("/v1/model", headers=bearer(R4))
            assert r4.status_code == 200 and "x-ratelimit-limit" not in r4.headers
        # a wrong key is a 401 (no bucket, no rate-limit headers), whatever the limits
        wrong = c.get("/v1/model", headers=bearer(R1[:-1] + "x"))
        assert wrong.status_code == 401 and "x-ratelimit-limit" not in wrong.headers

        # an upload over the limit is refused before its body is read
        upload = c.post("/v1/captions", files={"image": ("a.png", small_png(), "image/png")}, headers=bearer(R1))
        if upload.status_code == 429:  # (a token may have come back meanwhile on a slow machine)
            assert upload.headers["connection"] == "close" and upload.json()["error"]["code"] == "rate_limited"

        # the bucket refills: after Retry-After seconds one request passes
        exhausted = wait_for(lambda: (r := c.get("/v1/model", headers=bearer(R1))).status_code == 429 and r)
        time.sleep(int(exhausted.headers["retry-after"]))
        again = c.get("/v1/model", headers=bearer(R1))
        assert again.status_code == 200, again.text
        # ... and after X-RateLimit-Reset seconds the whole burst is back
        time.sleep(_limits(again)[2])
        full = c.get("/v1/model", headers=bearer(R1))
        assert full.status_code == 200 and _limits(full)[1] == 2
    assert metric(limited, R4, "captioner_rate_limited_requests_total") >= 2


def test_a_keys_own_limit_follows_the_keys_file(limited):
    limited, keys_file = limited
    with limited.client() as c:
        replace_file(keys_file, f"{R3} rate=120 burst=5\nsha256:{sha256_hex(R4)} rate=off\n")
        # (polled 4 times a second: under R3's refill of 10 a second, so every poll passes)
        changed = wait_for(lambda: (r := c.get("/v1/model", headers=bearer(R3))).headers.get("x-ratelimit-limit")
                           == "120" and r, step=0.25)
        assert changed.status_code == 200 and _limits(changed)[0] == 120
        replace_file(keys_file, f"{R3} rate=off\nsha256:{sha256_hex(R4)}\n")  # R4 now has the global limit
        wait_for(lambda: "x-ratelimit-limit" not in c.get("/v1/model", headers=bearer(R3)).headers)
        assert _limits(c.get("/v1/model", headers=bearer(R4)))[0] == 60


def test_rate_limits_are_documented_and_no_key_is_logged(limited):
    limited, _ = limited
    with limited.client() as c:
        spec = c.get("/openapi.json").json()
    for path in ("/v1/captions", "/v1/model"):
        op = next(iter(spec["paths"][path].values()))
        too_many = op["responses"]["429"]
        assert too_many["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
        assert {"Retry-After", "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"} <= set(
            too_many["headers"])
        assert too_many["headers"]["Retry-After"]["required"] is True
        assert "X-RateLimit-Remaining" in op["responses"]["200"]["headers"]
    log = limited.log()
    for key in (R1, R2, R3, R4):
        assert key not in log
    assert '"status": 429' in log


# ---- the parts, in process ------------------------------------------------------------------------------


def test_token_bucket_with_a_fake_clock():
    from app.security.ratelimit import RateLimit, TokenBuckets

    now = [100.0]
    buckets = TokenBuckets(clock=lambda: now[0])
    limit = RateLimit(per_minute=60, burst=3)
    got = [buckets.take(b"k", limit) for _ in range(4)]
    assert [d.allowed for d in got] == [True, True, True, False]
    assert [d.remaining for d in got] == [2, 1, 0, 0]
    assert got[3].retry_after_s == 1 and got[3].reset_s == 3 and got[0].retry_after_s == 0
    assert buckets.take(b"other", limit).remaining == 2  # one bucket per key
    now[0] += 0.5
    assert not buckets.take(b"k", limit).allowed  # half a token
    now[0] += 0.5
    assert buckets.take(b"k", limit).allowed
    now[0] += 3600
    assert buckets.take(b"k", limit).remaining == 2  # never more than the burst
    buckets.retain({b"k"})
    assert len(buckets) == 1


def test_entry_syntax():
    from app.security.keys import entry_problem, parse_entry

    entry = parse_entry(f"  sha256:{sha256_hex(KEY_H).upper()}\trate=30  burst=5 ")
    assert entry.digest == hashlib.sha256(KEY_H.encode()).digest() and (entry.rate, entry.burst) == (30, 5)
    assert parse_entry(f"{KEY_A} rate=off").rate == 0
    assert parse_entry(KEY_A) == parse_entry(f"sha256:{sha256_hex(KEY_A)}")
    for bad, expected in [
        ("sha256:" + "0" * 63, "64 hexadecimal digits"),
        ("sha256:" + "g" * 64, "64 hexadecimal digits"),
        (f"{KEY_A} rate=0", "rate="),
        (f"{KEY_A} rate=1.5", "rate="),
        (f"{KEY_A} rate=2000000", "rate="),
        (f"{KEY_A} burst=off", "burst="),
        (f"{KEY_A} rate=5 rate=6", "twice"),
        (f"{KEY_A} limit=5", "not rate="),
        (f"{KEY_A[:8]} {KEY_A[8:]}", "16 to 256"),
    ]:
        problem = entry_problem(bad)
        assert problem and expected in problem, (bad, problem)
        assert KEY_A not in problem and KEY_A[8:] not in problem


def test_hashed_keys_are_compared_against_every_key(monkeypatch):
    from app.api import auth

    calls = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append((len(a), len(b))) or real(a, b))
    keys = auth.APIKeys([KEY_A, f"sha256:{sha256_hex(KEY_H)}", f"{KEY_B} rate=5"], rate_limit=100)
    for presented, expected in [(KEY_H, True), (KEY_A, True), (f"sha256:{sha256_hex(KEY_H)}", False), ("x", False)]:
        calls.clear()
        assert keys.matches(presented.encode()) is expected
        assert calls == [(32, 32)] * 3
    assert keys.limit_for(keys.identify(KEY_B.encode())).per_minute == 5
    assert keys.limit_for(keys.identify(KEY_A.encode())).per_minute == 100


def test_key_store_follows_a_secret_volume(tmp_path):
    """`KeyStore.check` (what the lifespan's task runs once a second) on each kind of change."""
    from app.api.auth import KeyStore
    from app.observability.metrics import Metrics

    volume = SecretVolume(tmp_path / "secret", f"{KEY_A}\n")
    metrics = Metrics()
    store = KeyStore([KEY_H], volume.path, metrics=metrics)
    assert len(store.current) == 2 and store.check() is None  # unchanged
    volume.update(f"{KEY_A}\n{KEY_B}\n")
    assert store.check() == "ok" and store.current.matches(KEY_B.encode()) and store.check() is None
    volume.update("short\n")
    assert store.check() == "error" and store.check() is None  # one warning per bad version
    assert store.current.matches(KEY_B.encode())
    os.unlink(tmp_path / "secret" / "..data")
    assert store.check() == "error" and store.check() is None
    volume.update(f"{KEY_B} rate=10\n")
    assert store.check() == "ok"
    assert not store.current.matches(KEY_A.encode()) and store.current.matches(KEY_H.encode())
    assert store.current.limit_for(store.current.identify(KEY_B.encode())).per_minute == 10
    text = metrics.render()[0].decode()
    assert 'captioner_api_keys_reloads_total{result="ok"} 2.0' in text
    assert 'captioner_api_keys_reloads_total{result="error"} 2.0' in text
    assert "captioner_api_keys 2.0" in text
