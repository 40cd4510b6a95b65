"""`captioner serve --workers N` (issue 25): N uvicorn worker processes on one port under a supervisor, each a
whole service (app/serving/supervisor.py, app/serving/control.py; docs/scale.md), against a real supervisor
on 127.0.0.1 serving the tiny bundles.

* the setting: invalid counts are settings errors (exit 2), a worker that cannot start stops the supervisor
  (exit 3), threads per worker default to a share of the CPUs;
* requests on fresh connections spread over the workers (each answer's worker is read from the access log,
  where every line names its pid);
* a hot swap made through one worker reaches every worker (X-Model-Version of many requests, each
  worker's `previous` history), a refused one changes nothing anywhere, rollback likewise;
* a worker killed with SIGKILL is replaced; the service answers meanwhile; the new worker serves the
  swapped version (it read the control folder at start-up); its live gauges and status are cleaned up;
* /metrics, from any worker, counts every worker's requests;
* a rotated API key works on every worker;
* SIGTERM to the supervisor: the port stops accepting, every worker finishes its requests in flight, exit 0.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.live_server import REPO, LiveServer, free_port, service_env
from tests.support.workers import connection_owner, control_dir, log_records, spread, wait_for_workers
from tests.test_key_rotation import KEY_A, KEY_B, SecretVolume, bearer, small_png
from tests.test_model_repository import ADMIN, API, CORRUPT, IMAGES, NAME, V1, V2, build_repository

WORKERS = 2
GREEDY = {"strategy": "greedy"}
DEADLINE_S = 30.0  # generous: what the tests wait for takes about a second


def _auth(key: str = API) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _caption(client: httpx.Client) -> httpx.Response:
    r = client.post("/v1/captions", params=GREEDY, headers=_auth(), files={"image": ("a.png", IMAGES[0], "image/png")})
    assert r.status_code == 200, r.text
    return r


def _models(client: httpx.Client) -> httpx.Response:
    r = client.get("/v1/models", headers=_auth())
    assert r.status_code == 200, r.text
    return r


def _metric(text: str, sample: str) -> float:
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
    assert match, f"{sample} not in /metrics"
    return float(match.group(1))


# ---- the setting ------------------------------------------------------------------------------------


def test_threads_default_to_each_workers_share_of_the_cpus():
    from app.settings import Settings, available_memory

    cpus = os.cpu_count() or 2
    one, four = Settings(), Settings(workers=4)
    assert one.engine_threads() is None  # onnxruntime's own default, as before
    assert four.engine_threads() == max(1, cpus // 4)
    assert Settings(workers=4, threads=3).engine_threads() == 3
    assert one.preprocess_workers() == max(1, min(8, cpus // 2))
    assert four.preprocess_workers() == max(1, min(8, max(1, cpus // 4) // 2))
    largest = one.body_limit(one.max_batch_files)
    assert one.inflight_body_limit() == max(largest, available_memory() // 8)
    assert four.inflight_body_limit() == max(largest, available_memory() // 32)


def _serve(bundle: Path, *args: str, **settings: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", "serve", *args], cwd=REPO,
                          env=service_env(bundle, port=free_port(), **settings), capture_output=True, text=True,
                          timeout=120)


@pytest.mark.service  # starts subprocesses
def test_invalid_worker_counts_are_settings_errors(tiny_bundle):
    cases = [((), {"workers": "0"}), ((), {"workers": "-1"}), ((), {"workers": "65"}), ((), {"workers": "two"}),
             (("--workers", "0"), {}), (("--workers", "65"), {"workers": "2"})]
    for args, settings in cases:
        result = _serve(tiny_bundle, *args, **settings)
        output = result.stdout + result.stderr
        assert result.returncode == 2, (args, settings, output)
        assert "CAPTIONER_WORKERS" in output and "Traceback" not in output, output


@pytest.mark.service  # starts subprocesses
def test_workers_that_cannot_start_stop_the_supervisor_with_status_3(tiny_bundle, copy_bundle):
    broken = copy_bundle(tiny_bundle)
    data = bytearray((broken / "encoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / "encoder.onnx").write_bytes(bytes(data))
    result = _serve(broken, "--workers", "2")
    output = result.stdout + result.stderr
    assert result.returncode == 3, output
    assert "sha256 mismatch" in output and "Traceback" not in output, output
    assert output.count('"msg": "Started server process') <= 4, "a worker that cannot start was restarted in a loop"


# ---- one supervisor, two workers, a model repository -------------------------------------------------


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    return build_repository(tmp_path_factory.mktemp("repository"))


@pytest.fixture(scope="module")
def server(start_server, repository) -> LiveServer:
    started = start_server(repository, log_name="workers", model_repository=repository,
                           default_model=f"{NAME}:{V1}", admin_api_keys=ADMIN, api_keys=API, workers=WORKERS)
    wait_for_workers(started, WORKERS)
    return started


@pytest.fixture
def workers(server) -> set[int]:
    """The workers serving now (all of them ready)."""
    return wait_for_workers(server, WORKERS)


def test_requests_on_fresh_connections_spread_over_the_workers(server, workers):
    answers = spread(server, _caption, workers)
    assert {pid for _, pid in answers} == workers
    assert {r.headers["X-Model-Version"] for r, _ in answers} == {f"{NAME}:{V1}"}
    assert all(r["pid"] in workers for r in log_records(server) if r.get("logger") == "captioner.access")


def _listening_inodes(pid: int, port: int) -> set[int]:
    """The inodes of the TCP sockets in LISTEN state on `port` that process `pid` holds (/proc)."""
    listening = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
                listening.add(int(fields[9]))
    held = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            held.add(int(target[8:-1]))
    return listening & held


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT: a socket per worker on Linux only")
def test_each_worker_listens_on_a_socket_of_its_own(server, workers):
    """app/serving/supervisor.py: the kernel spreads connections over the workers' own sockets (SO_REUSEPORT)
    instead of the worker that wakes first taking a whole burst from one shared socket; the supervisor's
    socket only holds the port and never listens, so no connection can wait on it for nobody."""
    port = server.port
    sockets = {pid: _listening_inodes(pid, port) for pid in workers}
    assert all(len(found) == 1 for found in sockets.values()), sockets
    assert len(set.union(*sockets.values())) == WORKERS  # one each, not one shared
    assert _listening_inodes(server.process.pid, port) == set()
    [started] = [r for r in log_records(server) if r.get("msg") == "workers started"]
    assert started["listening"] == "a socket per worker (SO_REUSEPORT)"


def _swap(server: LiveServer, path: str, **body: str) -> httpx.Response:
    with server.client(timeout=120.0) as admin:
        return admin.post(f"/v1/models/{NAME}/{path}", json=body or None, headers=_auth(ADMIN))


def _everywhere(server: LiveServer, workers: set[int], version: str, previous: list[str]) -> None:
    """Every worker answers with `version` and has `previous` as the name's history."""
    answers = spread(server, _caption, workers)
    assert {r.headers["X-Model-Version"] for r, _ in answers} == {f"{NAME}:{version}"}, answers
    assert {r.json()["model"]["version"] for r, _ in answers} == {version}
    for r, pid in spread(server, _models, workers, at_least=1):
        repo = {m["name"]: m for m in r.json()["repository"]}[NAME]
        assert (repo["active"], repo["previous"]) == (version, previous), (pid, repo)


def test_a_load_reaches_every_worker_and_a_refused_one_changes_nothing(server, workers):
    r = _swap(server, "load", version=V2)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["version"], body["previous"], body["changed"]) == (V2, V1, True)
    assert body["workers"] == {"switched": WORKERS, "total": WORKERS}
    _everywhere(server, workers, V2, [V1])

    refused = _swap(server, "load", version=CORRUPT)
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["code"] == "bundle_refused" and "workers" not in refused.json()
    _everywhere(server, workers, V2, [V1])
    same = _swap(server, "load", version=V2)  # nothing to do; every worker still counted
    assert same.status_code == 200 and same.json()["changed"] is False
    assert same.json()["workers"] == {"switched": WORKERS, "total": WORKERS}
    with server.client() as c:  # the refusal was made (and counted) by one worker only: the others never tried
        text = c.get("/metrics", headers=_auth()).text
    assert _metric(text, f'captioner_model_loads_total{{model="{NAME}",result="refused"}}') == 1
    assert _metric(text, f'captioner_model_loads_total{{model="{NAME}",result="ok"}}') == WORKERS


def test_a_killed_worker_is_replaced_and_serves_the_swapped_version(server, workers):
    control = control_dir(server)
    with server.client() as c:
        before = _metric(c.get("/metrics", headers=_auth()).text,
                         'captioner_http_requests_total{method="POST",route="/v1/captions",status="200"}')
    victim, survivor = sorted(workers)
    os.kill(victim, signal.SIGKILL)
    # the service keeps answering: new connections go to the survivor
    answers = spread(server, _caption, {survivor}, at_least=10)
    assert {pid for _, pid in answers} == {survivor}
    # a new worker replaces the victim, and serves the version swapped to (read from the control folder)
    replacement = wait_for_workers(server, WORKERS, exclude=[victim]) - {survivor}
    assert len(replacement) == 1 and victim not in replacement
    _everywhere(server, {survivor, *replacement}, V2, [V1])
    # the victim's live gauges and status are gone; its counts stay in the totals
    deadline = time.monotonic() + DEADLINE_S
    while any(control.glob(f"metrics/gauge_live*_{victim}.db")) or (control / "workers" / f"{victim}.json").exists():
        assert time.monotonic() < deadline, sorted(p.name for p in control.rglob("*"))
        time.sleep(0.1)
    assert any(control.glob(f"metrics/counter_{victim}.db"))
    with server.client() as c:
        after = _metric(c.get("/metrics", headers=_auth()).text,
                        'captioner_http_requests_total{method="POST",route="/v1/captions",status="200"}')
    assert after >= before + len(answers)
    assert server.process.poll() is None


def test_a_rollback_reaches_every_worker(server, workers):
    r = _swap(server, "rollback")
    assert r.status_code == 200, r.text
    assert (r.json()["version"], r.json()["previous"]) == (V1, V2)
    assert r.json()["workers"] == {"switched": WORKERS, "total": WORKERS}
    _everywhere(server, workers, V1, [])
    nothing = _swap(server, "rollback")
    assert nothing.status_code == 409 and nothing.json()["error"]["code"] == "no_previous_version"


def test_metrics_from_any_worker_count_every_workers_requests(server, workers):
    sample = 'captioner_http_requests_total{method="POST",route="/v1/captions",status="200"}'

    def scrape(client: httpx.Client) -> httpx.Response:
        return client.get("/metrics", headers=_auth())

    before = {_metric(r.text, sample) for r, _ in spread(server, scrape, workers, at_least=1)}
    assert len(before) == 1, f"the workers disagree on the total: {before}"
    answers = spread(server, _caption, workers)
    scraped = spread(server, scrape, workers, at_least=2)
    assert {_metric(r.text, sample) for r, _ in scraped} == {before.pop() + len(answers)}
    text = scraped[0][0].text
    assert _metric(text, "captioner_ready") == 1.0  # livemin: every live worker is ready
    assert _metric(text, "captioner_queue_images") == 0.0  # livesum
    info = re.findall(r'^captioner_model_info\{(.*)\} (\S+)$', text, re.M)
    assert [labels for labels, value in info if float(value) == 1.0] == [
        f'device="cpu",name="{NAME}",provider="CPUExecutionProvider",version="{V1}"']
    assert _metric(text, f'captioner_model_loaded{{model="{NAME}",version="{V1}"}}') == 1.0
    assert _metric(text, f'captioner_model_loaded{{model="{NAME}",version="{V2}"}}') == 0.0
    assert 'pid="' not in text  # every series aggregated over the workers


# ---- API keys ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(start_server, tiny_bundles, tmp_path_factory):
    volume = SecretVolume(tmp_path_factory.mktemp("worker-keys") / "secret", f"{KEY_A}\n")
    server = start_server(tiny_bundles(max_length=8), log_name="worker-keys", api_keys_file=volume.path,
                          workers=WORKERS)
    return server, volume


def test_a_rotated_key_works_on_every_worker(keyed):
    server, volume = keyed
    workers = wait_for_workers(server, WORKERS)
    png = small_png()

    def caption_with(key: str):
        def send(client: httpx.Client) -> httpx.Response:
            return client.post("/v1/captions", params=GREEDY, headers=bearer(key),
                               files={"image": ("a.png", png, "image/png")})
        return send

    assert {r.status_code for r, _ in spread(server, caption_with(KEY_A), workers)} == {200}
    assert {r.status_code for r, _ in spread(server, caption_with(KEY_B), workers)} == {401}
    volume.update(f"{KEY_B}\n")
    deadline = time.monotonic() + DEADLINE_S  # each worker re-reads the file within about a second
    while True:
        answers = spread(server, caption_with(KEY_B), workers)
        if {r.status_code for r, _ in answers} == {200}:
            break
        assert time.monotonic() < deadline, [(r.status_code, pid) for r, pid in answers]
        time.sleep(0.2)
    assert {r.status_code for r, _ in spread(server, caption_with(KEY_B), workers, at_least=5)} == {200}
    assert {r.status_code for r, _ in spread(server, caption_with(KEY_A), workers, at_least=5)} == {401}
    reloads = [r for r in log_records(server) if r.get("msg", "").startswith("API keys reloaded")]
    assert {r["pid"] for r in reloads} == workers


# ---- SIGTERM ----------------------------------------------------------------------------------------


def _upload_head(server: LiveServer, png: bytes) -> tuple[bytes, bytes]:
    """A caption request's headers and body (multipart), to send in parts."""
    boundary = "workers-drain"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /v1/captions?strategy=greedy HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    return head, body


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.service  # starts the server itself (it does not survive the test)
def test_sigterm_drains_every_worker_and_exits_0(tiny_bundle, tmp_path):
    from tests.support.live_server import live_server

    png = small_png()
    with live_server(tiny_bundle, tmp_path / "drain.log", args=("--workers", str(WORKERS)),
                     request_timeout_s=60) as server:
        workers = wait_for_workers(server, WORKERS)
        head, body = _upload_head(server, png)
        held: list[tuple[socket.socket, int]] = []
        try:
            # requests in flight on every worker: each has sent its headers and half its body
            while {pid for _, pid in held} != workers:
                assert len(held) < 40, f"the held connections all went to {[pid for _, pid in held]}"
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
                sock.sendall(head + body[: len(body) // 2])
                held.append((sock, connection_owner(workers, sock, server.port)))
            server.process.send_signal(signal.SIGTERM)
            # the port stops accepting while the requests are still in flight
            deadline = time.monotonic() + DEADLINE_S
            while True:
                try:
                    httpx.get(f"{server.url}/healthz", timeout=2.0)
                except httpx.ConnectError:
                    break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "the port still accepts connections after SIGTERM"
                time.sleep(0.1)
            assert server.process.poll() is None
            # every request in flight is answered
            for sock, _ in held:
                sock.sendall(body[len(body) // 2:])
            answers = [_read_response(sock) for sock, _ in held]
        finally:
            for sock, _ in held:
                sock.close()
        assert [status for status, _ in answers] == [200] * len(held), answers
        assert server.process.wait(timeout=60) == 0
        records = log_records(server)
        finished = {r["pid"] for r in records if r.get("msg", "").startswith("Finished server process")}
        assert finished == workers
        assert not [r for r in records if r["level"] in ("error", "critical")], records


@pytest.mark.service  # starts the server itself (it does not survive the test)
def test_workers_stop_when_the_supervisor_is_killed(tiny_bundle, tmp_path):
    import shutil

    from app.serving.control import pid_alive
    from tests.support.live_server import live_server

    with live_server(tiny_bundle, tmp_path / "orphans.log", workers=WORKERS) as server:
        workers = wait_for_workers(server, WORKERS)
        control = control_dir(server)
        os.kill(server.process.pid, signal.SIGKILL)  # no clean-up, no SIGTERM to the workers
        server.process.wait(timeout=30)
        deadline = time.monotonic() + DEADLINE_S
        while any(pid_alive(pid) for pid in workers):
            assert time.monotonic() < deadline, "the workers serve on without their supervisor"
            time.sleep(0.1)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/healthz", timeout=5.0)
        records = log_records(server)
        assert {r["pid"] for r in records if r.get("msg", "").startswith("Finished server process")} == workers
        shutil.rmtree(control)  # the supervisor could not remove it


# ---- the control folder, in process ------------------------------------------------------------------


class _Served:
    def __init__(self, version: str) -> None:
        self.version = version


class _Registry:
    """What WorkerControl uses of a ModelRegistry: the active versions and `follow`."""

    def __init__(self, version: str, refuse: frozenset[str] = frozenset()) -> None:
        self.active = {NAME: _Served(version)}
        self.refuse = refuse
        self.history: dict[str, list[str]] = {}

    async def follow(self, name: str, version: str, history) -> bool:
        from app.serving.registry import BundleRefused

        if version in self.refuse:
            raise BundleRefused("parity", "refused for the test")
        changed = self.active[name].version != version
        self.active[name] = _Served(version)
        self.history[name] = list(history)
        return changed


def test_control_folder_swaps_one_at_a_time_and_counts_a_worker_that_refused(tmp_path):
    from app.serving.control import WorkerControl, prepare
    from app.serving.registry import LoadInProgress

    async def scenario() -> None:
        prepare(tmp_path)
        first, second = _Registry(V1), _Registry(V1, refuse={V2})
        a = WorkerControl(tmp_path, first)  # type: ignore[arg-type]
        b = WorkerControl(tmp_path, second)  # type: ignore[arg-type]
        b.pid = os.getppid()  # two "workers" in one process: b's status under another live process's pid
        a.snapshot(), b.snapshot()
        await a.write_status()
        await b.write_status()
        with a.exclusive(NAME):
            with pytest.raises(LoadInProgress), b.exclusive(NAME):
                pass
            first.active[NAME] = _Served(V2)
            swap = await a.publish(NAME, V2, [V1])
        await b.sync()  # b refuses V2: it keeps V1, and says it has seen the swap
        assert second.active[NAME].version == V1
        assert await a.wait_for(NAME, V2, swap, timeout=5.0) == (1, 2)
        with b.exclusive(NAME):  # free again
            pass
        second.refuse = frozenset()
        with a.exclusive(NAME):
            swap = await a.publish(NAME, V2, [V1])
        await b.sync()
        assert (second.active[NAME].version, second.history[NAME]) == (V2, [V1])
        assert await a.wait_for(NAME, V2, swap, timeout=5.0) == (2, 2)

    asyncio.run(scenario())
