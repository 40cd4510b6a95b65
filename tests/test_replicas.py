"""docker-compose.replicas.yml for real with podman: two CPU replicas behind the HAProxy balancer
(docker/Dockerfile.balancer), under load, with one replica killed and one stopped.

What runs (about 2 minutes warm on 2 cores): the CPU image and the balancer image built from the
local Debian base (tests/support/podman.py; the same Dockerfiles users build; once per session,
shared with tests/test_containers.py through the `container_images` fixture), the replicas file
brought up with podman-compose (`cpu` profile, CAPTIONER_REPLICAS=2), then:

* the balancer's hardening, its settings derived from the replicas' (timeouts from
  CAPTIONER_REQUEST_TIMEOUT_S, per-replica limits from the queue), requests spread over both
  replicas, every replica's /metrics and HAProxy's own figures on the stats port;
* 16 concurrent clients for at least 20 s while one replica is killed (SIGKILL to its process, as
  the kernel's OOM killer would; its restart policy brings it back): every request the clients
  sent is matched by its request id to exactly one line of the balancer's log, and is either a 200,
  a JSON 502/503 the balancer logged with that status, or a connection closed without an answer
  that the balancer logged with an `SD` termination; only requests in flight on the killed
  replica may be anything but a 200, and none reaches the client's timeout. The balancer
  takes it out (and routes nothing to it) until it is ready again, then it takes traffic again.
  The figures (requests, failures, time to eject, to be ready, to readmit) are printed, written to
  work/containers/replicas.json, and with UPDATE_CONTAINER_DOCS=1 into docs/reliability.md.
* the same load while one replica is stopped (SIGTERM) and started again: nothing fails;
* both replicas stopped: the balancer answers 503 in the service's JSON error shape, and turns
  unhealthy; then both come back.

No timing is a pass/fail check: the tests assert the order of events and what each request got.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from tests.support.podman import require_podman

require_podman("docker-compose.replicas.yml and the balancer image are")

import httpx  # noqa: E402  (after the module-level skip: only a machine that runs containers needs them)
from PIL import Image  # noqa: E402

from tests.support.podman import (  # noqa: E402
    ROOT,
    compose,
    compose_containers,
    free_port,
    inspect,
    logs,
    make_container_bundle,
    podman,
    wait_healthy,
)

pytestmark = pytest.mark.slow

REPLICAS_FILE = ROOT / "docker-compose.replicas.yml"
DOCS = ROOT / "docs" / "reliability.md"
REPLICAS = 2
REQUEST_TIMEOUT_S = 10          # the replicas' deadline; the balancer waits for it + 5 s
CLIENT_TIMEOUT_S = REQUEST_TIMEOUT_S + 10
CONCURRENCY = 16
LOAD_SECONDS = 20.0
ACTION_AT_S = 7.0               # when the replica is killed or stopped, into the load
MAX_LOAD_SECONDS = 90.0         # the load also waits for the replica to be readmitted, at most this long
BALANCER_UID = 10002
LOG_WAIT_S = 10.0               # how long the balancer may take to write the log lines of the last requests
IMAGE_VARIANTS = ("cpu", "balancer")   # built once per session by the container_images fixture (tests/conftest.py)


# ---- the deployment ---------------------------------------------------------------------------


@dataclass
class Cluster:
    project: str
    env: dict[str, str]
    url: str
    stats: str
    replicas: list[str]
    balancer: str


@pytest.fixture(scope="module")
def images(container_images) -> dict[str, str]:
    """{"cpu": tag, "balancer": tag}: the session's images (the CPU one shared with test_containers)."""
    return container_images.get(*IMAGE_VARIANTS)


@pytest.fixture(scope="module")
def cluster(images, tmp_path_factory) -> Iterator[Cluster]:
    bundle = make_container_bundle(tmp_path_factory.mktemp("replicas-mounted") / "bundle")
    port, stats_port = free_port(), free_port()
    project = f"reptest{os.getpid()}"
    env = {"CAPTIONER_CPU_IMAGE": images["cpu"], "CAPTIONER_BALANCER_IMAGE": images["balancer"],
           "CAPTIONER_BUNDLE_DIR": str(bundle), "CAPTIONER_PUBLISH": f"127.0.0.1:{port}",
           "CAPTIONER_STATS_PUBLISH": f"127.0.0.1:{stats_port}", "CAPTIONER_REPLICAS": str(REPLICAS),
           "CAPTIONER_THREADS": "1", "CAPTIONER_REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S)}
    try:
        started = time.monotonic()
        compose(REPLICAS_FILE, "cpu", project, "up", "-d", "--no-build", env=env)
        replicas = compose_containers(project, "replica-cpu")
        assert len(replicas) == REPLICAS, replicas
        [balancer] = compose_containers(project, "balancer")
        for name in [*replicas, balancer]:
            wait_healthy(name)
        stats = f"http://127.0.0.1:{stats_port}"
        wait_for(lambda: all(s.status == "UP" for s in slots(stats).values()) and len(slots(stats)) == REPLICAS,
                 60, "both replicas UP in the balancer")
        print(f"\n[replicas] compose up -> {REPLICAS} replicas and the balancer healthy in "
              f"{time.monotonic() - started:.1f} s")
        yield Cluster(project, env, f"http://127.0.0.1:{port}", stats, replicas, balancer)
    finally:
        compose(REPLICAS_FILE, "cpu", project, "down", "-t", "5", env=env, check=False, timeout=120)
        podman("pod", "rm", "-f", f"pod_{project}", check=False)
        remaining = podman("ps", "-a", "--filter", f"label=com.docker.compose.project={project}",
                           "--format", "{{.Names}}", check=False).stdout.split()
        assert remaining == [], f"`down` left containers behind: {remaining}"


# ---- reading the balancer ---------------------------------------------------------------------


@dataclass
class Slot:
    status: str   # UP, DOWN, MAINT (no address), "UP 1/2" / "DOWN 1/2" while changing
    addr: str     # ip:port, or empty


def slots(stats: str) -> dict[str, Slot]:
    """The replicas backend's server slots from HAProxy's CSV stats."""
    text = httpx.get(f"{stats}/stats;csv", timeout=5).text
    rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
    return {row["svname"]: Slot(row["status"], row.get("addr") or "") for row in rows
            if row["pxname"] == "replicas" and row["svname"] not in ("FRONTEND", "BACKEND")}


def container_ip(name: str) -> str:
    networks = inspect(name)["NetworkSettings"]["Networks"]
    [ip] = [n["IPAddress"] for n in networks.values() if n.get("IPAddress")]
    return ip


def slot_of(stats: str, ip: str) -> str | None:
    return next((name for name, s in slots(stats).items() if s.addr == f"{ip}:8000"), None)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while True:
        try:
            if condition():
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        if time.monotonic() - start > timeout:
            pytest.fail(f"not {what} after {timeout:.0f} s")
        time.sleep(0.2)


def dropped_logs(stats: str) -> int:
    """How many log lines HAProxy has dropped so far: it writes them to stdout without blocking, and
    drops a line when the pipe to the container's log is full (a busy machine's conmon lagging)."""
    text = httpx.get(f"{stats}/metrics", timeout=5).text
    found = re.findall(r"^haproxy_process_dropped_logs_total (\d+)", text, re.MULTILINE)
    assert found, f"no haproxy_process_dropped_logs_total in the balancer's /metrics: {text[:300]!r}"
    return int(found[0])


def balancer_log(name: str) -> list[dict]:
    """The balancer's access log: one JSON line per request (docker/balancer/haproxy.cfg)."""
    return [json.loads(line) for line in logs(name).splitlines() if line.startswith('{"ts":')]


# ---- load -------------------------------------------------------------------------------------


def small_png() -> bytes:
    import skimage.data

    buffer = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).resize((96, 64)).save(buffer, "PNG")
    return buffer.getvalue()


@dataclass
class Outcome:
    request_id: str
    start: float          # wall clock (time.time()), comparable with the balancer's log
    end: float
    status: int | None    # None: no HTTP answer at all (the client's own error)
    replica: str | None   # X-Captioner-Replica
    error: str | None     # the JSON error code, or the client's exception
    echoed_id: str | None = None   # the request id the answer carries: a 200's X-Request-ID (from the
    #                                replica), the balancer's JSON error's request_id


@dataclass
class Load:
    url: str
    prefix: str           # request ids are <prefix>-<worker>-<n>: unique across the module's episodes
    stop: threading.Event = field(default_factory=threading.Event)
    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        image = small_png()
        for worker in range(CONCURRENCY):
            thread = threading.Thread(target=self._client, args=(worker, image), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _client(self, worker: int, image: bytes) -> None:
        with httpx.Client(base_url=self.url, timeout=CLIENT_TIMEOUT_S) as client:
            n = 0
            while not self.stop.is_set():
                n += 1
                rid = f"{self.prefix}-{worker}-{n}"
                start = time.time()
                status = replica = error = echoed = None
                try:
                    response = client.post("/v1/captions", files={"image": ("cat.png", image, "image/png")},
                                           headers={"X-Request-ID": rid})
                    status, replica = response.status_code, response.headers.get("x-captioner-replica")
                    echoed = response.headers.get("x-request-id")
                    if status != 200:
                        try:
                            error = response.json()["error"]["code"]
                            echoed = echoed or response.json()["error"].get("request_id")
                        except (ValueError, KeyError, TypeError):
                            error = f"not the JSON error shape: {response.text[:200]!r}"
                except httpx.HTTPError as exc:
                    error = f"{type(exc).__name__}: {exc}"
                with self.lock:
                    self.outcomes.append(Outcome(rid, start, time.time(), status, replica, error, echoed))

    def finish(self) -> list[Outcome]:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=CLIENT_TIMEOUT_S + 5)
        assert not any(t.is_alive() for t in self.threads), "a client is stuck past its timeout"
        return list(self.outcomes)


class Monitor(threading.Thread):
    """Polls the balancer's view of the replicas every 100 ms: [(wall time, {slot: Slot})]."""

    def __init__(self, stats: str):
        super().__init__(daemon=True)
        self.stats, self.samples, self.stopped = stats, [], threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.samples.append((time.time(), slots(self.stats)))
            except httpx.HTTPError:
                pass
            time.sleep(0.1)

    def first(self, after: float, condition: Callable[[dict[str, Slot]], bool]) -> float | None:
        return next((t for t, s in self.samples if t > after and condition(s)), None)


def wait_ready(name: str, after: float) -> float:
    """Wall time at which the container answers its health check (/readyz 200) again."""
    deadline = time.monotonic() + MAX_LOAD_SECONDS
    while time.monotonic() < deadline:
        if time.time() > after and podman("healthcheck", "run", name, check=False, timeout=30).returncode == 0:
            return time.time()
        time.sleep(0.2)
    pytest.fail(f"{name} not ready again after {MAX_LOAD_SECONDS:.0f} s:\n{logs(name)[-3000:]}")


@dataclass
class Episode:
    action: str
    victim: str
    slot: str
    outcomes: list[Outcome]
    samples: list
    t_load: float
    t_action: float
    t_ready: float
    t_down: float | None
    t_up: float | None
    readmitted_slot: str | None
    log: list[dict]       # the balancer's whole log, read once it held a line for every request of the load
    prefix: str           # the load's request ids start with it
    dropped_logs: int     # log lines HAProxy dropped during the episode (its own count)

    def figures(self) -> dict:
        failures = [o for o in self.outcomes if o.status != 200]
        ms = lambda t: None if t is None else round((t - self.t_action) * 1000)  # noqa: E731
        after_up = [o for o in self.outcomes if self.t_up and o.start > self.t_up]
        return {
            "action": self.action, "replicas": REPLICAS, "concurrency": CONCURRENCY,
            "load_seconds": round(max(o.end for o in self.outcomes) - self.t_load, 1),
            "requests": len(self.outcomes), "ok": len(self.outcomes) - len(failures),
            "failures": {("closed" if k is None else str(k)): sum(1 for o in failures if o.status == k)
                         for k in sorted({o.status for o in failures}, key=str)},
            "failed_started_before_action": sum(1 for o in failures if o.start <= self.t_action <= o.end),
            "eject_ms": ms(self.t_down), "ready_ms": ms(self.t_ready), "readmit_ms": ms(self.t_up),
            "readmit_after_ready_ms": None if self.t_up is None else round((self.t_up - self.t_ready) * 1000),
            "served_by_victim_after_readmit": sum(1 for o in after_up if o.replica == self.readmitted_slot),
            "slowest_ms": round(max(o.end - o.start for o in self.outcomes) * 1000),
            "log_lines_dropped": self.dropped_logs,
            "closed_logged_as": [f"{line['status']} {line['termination']}" for line in self.log
                                 if line["request_id"] in {o.request_id for o in failures if o.status is None}],
        }


def run_episode(cluster: Cluster, action: str) -> Episode:
    """Load for at least LOAD_SECONDS; at ACTION_AT_S kill (SIGKILL) or stop (SIGTERM, then start)
    the second replica; keep the load on until the balancer has readmitted it and it served."""
    victim = cluster.replicas[-1]
    ip = container_ip(victim)
    slot = slot_of(cluster.stats, ip)
    assert slot, f"{victim} ({ip}) is in no balancer slot: {slots(cluster.stats)}"
    dropped_before = dropped_logs(cluster.stats)
    monitor = Monitor(cluster.stats)
    monitor.start()
    prefix = f"{action}-load"
    load = Load(cluster.url, prefix)
    t_load = time.time()
    load.start()
    time.sleep(ACTION_AT_S)
    pid = inspect(victim)["State"]["Pid"]
    t_action = time.time()
    if action == "kill":
        os.kill(pid, signal.SIGKILL)                                # the restart policy restarts it
    else:
        podman("stop", "-t", "20", victim, timeout=60)              # SIGTERM: the service drains
        podman("start", victim)
    t_ready = wait_ready(victim, t_action)

    def readmitted() -> str | None:
        for t, view in reversed(monitor.samples):
            if t > t_ready:
                new = next((n for n, s in view.items() if s.addr == f"{container_ip(victim)}:8000"), None)
                return new if new and view[new].status == "UP" else None
        return None

    deadline = t_load + MAX_LOAD_SECONDS
    while time.time() < deadline:
        new_slot = readmitted()
        served = new_slot and any(o.replica == new_slot and o.start > t_ready for o in list(load.outcomes))
        if time.time() - t_load >= LOAD_SECONDS and served:
            break
        time.sleep(0.2)
    outcomes = load.finish()
    monitor.stopped.set()
    monitor.join(timeout=5)
    new_slot = readmitted()
    t_down = monitor.first(t_action, lambda view: not view[slot].status.startswith("UP"))
    t_up = (monitor.first(max(t_down or t_action, t_ready - 1), lambda view: view.get(new_slot, Slot("", "")).status
                          == "UP" and view[new_slot].addr == f"{container_ip(victim)}:8000")
            if new_slot else None)
    log, dropped = log_of_all(cluster, {o.request_id for o in outcomes}, dropped_before)
    return Episode(action, victim, slot, outcomes, monitor.samples, t_load, t_action, t_ready, t_down, t_up,
                   new_slot, log, prefix, dropped)


def log_of_all(cluster: Cluster, request_ids: set[str], dropped_before: int) -> tuple[list[dict], int]:
    """(the balancer's log, how many lines HAProxy dropped since `dropped_before`), read once the log
    holds a line for each of these requests (HAProxy writes a line when the request's stream ends,
    which can be just after the client has its answer), or once the lines still missing are no more
    than the dropped ones and none came in the last second, or after LOG_WAIT_S."""
    deadline = time.monotonic() + LOG_WAIT_S
    previous: set[str] | None = None
    while True:
        log = balancer_log(cluster.balancer)
        dropped = dropped_logs(cluster.stats) - dropped_before
        missing = request_ids - {line["request_id"] for line in log}
        if not missing or (missing == previous and len(missing) <= dropped) or time.monotonic() > deadline:
            return log, dropped
        previous = missing
        time.sleep(1.0)


@dataclass
class Accounting:
    """Every request of an episode's load with the one balancer log line of the same request id."""

    # The line is None where HAProxy dropped it (and counted it): the answer itself is the evidence.
    ok: list[tuple[Outcome, dict | None]]      # a 200, logged as a 200 from the replica that answered
    errors: list[tuple[Outcome, dict | None]]  # the balancer's JSON 502/503, logged with that status
    closed: list[tuple[Outcome, dict]]    # no answer: the connection closed, logged with an SD termination


ERROR_CODES = {502: "bad_gateway", 503: "no_replica_available"}


def account(episode: Episode) -> Accounting:
    """Match every request the clients sent to exactly one line of the balancer's log by its request id
    (the balancer keeps a valid client X-Request-ID and logs it), and sort it into one of Accounting's
    three kinds. Fails on a request with no line, or two; on a line for a request never sent; and on
    a request whose answer and line do not agree. Nothing is left over and nothing counts twice."""
    outcomes = episode.outcomes
    ids = [o.request_id for o in outcomes]
    assert len(set(ids)) == len(ids), "a request id was sent twice"
    lines: dict[str, list[dict]] = {}
    for line in episode.log:
        if line["request_id"].startswith(episode.prefix + "-"):
            lines.setdefault(line["request_id"], []).append(line)
    never_sent = sorted(set(lines) - set(ids))
    assert never_sent == [], f"the balancer logged requests the clients never sent: {never_sent[:5]}"
    twice = {rid: found for rid, found in lines.items() if len(found) > 1}
    assert twice == {}, f"requests logged more than once: {dict(list(twice.items())[:3])}"
    # HAProxy drops a log line when its stdout is full, and counts it; the drops come in bursts, as at
    # the kill. A request may lack its line only as one of those counted, and only with an answer that
    # is evidence enough on its own: a 200 that carries its own request id (from the replica) and the
    # replica's name (from the balancer), or the balancer's JSON 502/503 for its request id. A
    # connection closed without an answer has no such evidence: it must have its SD line.
    unlogged = [o for o in outcomes if o.request_id not in lines]
    assert len(unlogged) <= episode.dropped_logs, (
        f"{len(unlogged)} requests have no line in the balancer's log after {LOG_WAIT_S:.0f} s, and HAProxy "
        f"dropped only {episode.dropped_logs}: {unlogged[:5]}")
    result = Accounting([], [], [])
    for o in unlogged:
        assert o.echoed_id == o.request_id, f"{o}: its line is among the {episode.dropped_logs} HAProxy dropped, " \
            "and its answer does not carry its request id"
        if o.status == 200 and o.replica and o.replica.startswith("replica"):
            result.ok.append((o, None))
        elif o.status in ERROR_CODES and o.error == ERROR_CODES[o.status]:
            result.errors.append((o, None))
        else:
            pytest.fail(f"{o}: its line is among the {episode.dropped_logs} HAProxy dropped, and its answer alone "
                        "does not say what happened to it")
    for o in outcomes:
        if o.request_id not in lines:
            continue
        [line] = lines[o.request_id]
        if o.status == 200:
            assert o.echoed_id == o.request_id, f"{o}: the answer carries another request id"
            assert line["status"] == 200 and line["termination"].startswith("--"), (o, line)
            assert o.replica == line["server"], f"answered by {o.replica}, logged for {line['server']}: {line}"
            result.ok.append((o, line))
        elif o.status in ERROR_CODES:
            assert o.error == ERROR_CODES[o.status], f"{o}: not the balancer's JSON error ({line})"
            assert line["status"] == o.status, f"{o}: the client got {o.status}, the balancer logged {line}"
            result.errors.append((o, line))
        elif o.status is None:
            # The connection closed without a whole answer: HAProxy 2.6 does that (termination "SD",
            # server-side, data phase) when the replica dies while it still forwards the request's
            # body to it, or after the replica sent its answer's status line and headers but not its
            # body: HAProxy had passed the headers on, and logs the replica's 200 (seen once in 10
            # kill runs; counting the log's non-200 lines missed it: "assert 5 == 6").
            assert "RemoteProtocolError" in (o.error or ""), f"{o}: the client's own error, not a closed connection"
            assert line["termination"].startswith("SD"), f"{o}: closed, but the balancer logged {line}"
            result.closed.append((o, line))
        else:
            pytest.fail(f"{o}: neither a 200 nor the balancer's 502/503 ({line})")
    assert len(result.ok) + len(result.errors) + len(result.closed) == len(outcomes) == len(lines) + len(unlogged)
    print(f"\n[replicas] {episode.action}: {len(outcomes)} requests = {len(result.ok)} × 200 "
          f"({len(unlogged)} of them without a log line; HAProxy dropped {episode.dropped_logs}) + "
          f"{len(result.errors)} × balancer error {sorted(o.status for o, _ in result.errors)} "
          f"({sum(1 for _, line in result.errors if line is None)} without a log line) + "
          f"{len(result.closed)} × closed (logged as "
          f"{[(line['status'], line['termination']) for _, line in result.closed]})")
    for o, line in result.closed:
        print(f"[replicas] {episode.action}: closed: {o.error}; logged: {json.dumps(line)}")
    return result


def slot_history(episode: Episode, around: float, seconds: float = 1.0) -> list[tuple[float, str]]:
    """The monitor's view of the victim's slot within `seconds` of `around` (for failure messages)."""
    return [(round(t, 3), view[episode.slot].status) for t, view in episode.samples
            if abs(t - around) <= seconds and episode.slot in view]


def no_timeouts(outcomes: list[Outcome]) -> None:
    """No request reached the client's timeout (CLIENT_TIMEOUT_S; httpx's *Timeout errors)."""
    timed_out = [o for o in outcomes if "Timeout" in (o.error or "")]
    assert timed_out == [], f"{len(timed_out)} requests hit the client's {CLIENT_TIMEOUT_S} s timeout: {timed_out[:3]}"


def record(episode: Episode) -> dict:
    figures = episode.figures()
    print(f"\n[replicas] {episode.action}: {json.dumps(figures)}")
    report = ROOT / "work" / "containers" / "replicas.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(report.read_text()) if report.exists() else {}
    existing[episode.action] = figures
    report.write_text(json.dumps(existing, indent=2) + "\n")
    if os.environ.get("UPDATE_CONTAINER_DOCS") == "1":
        _write_into_docs(episode.action, figures)
    return figures


def _write_into_docs(action: str, f: dict) -> None:
    begin, end = f"<!-- replicas-{action}:begin -->", f"<!-- replicas-{action}:end -->"
    text = DOCS.read_text()
    assert begin in text and end in text, f"{DOCS} has no {begin} ... {end} block"
    failures = ", ".join(f"{n} × {'connection closed, no answer' if code == 'closed' else code}"
                         for code, n in f["failures"].items())
    failures = f"{failures} (all in flight on it at that moment)" if failures else "none"
    line = (f"| {'SIGKILL to one replica' if action == 'kill' else 'SIGTERM to one replica, then start'} "
            f"| {f['requests']:,} in {f['load_seconds']} s | {f['ok']:,} | {failures} | {f['eject_ms']} ms | "
            f"{f['ready_ms']} ms | {f['readmit_ms']} ms ({f['readmit_after_ready_ms']} ms after ready) | "
            f"{f['served_by_victim_after_readmit']} | {f['slowest_ms']} ms |")
    DOCS.write_text(re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: f"{begin}\n{line}\n{end}", text,
                           flags=re.DOTALL))


# ---- the tests --------------------------------------------------------------------------------


def test_balancer_is_hardened_and_sized_from_the_replicas_settings(cluster):
    config = inspect(cluster.balancer)
    host = config["HostConfig"]
    assert host["ReadonlyRootfs"] is True
    assert any("no-new-privileges" in opt for opt in host["SecurityOpt"] or []), host["SecurityOpt"]
    probe = podman("exec", cluster.balancer, "sh", "-c",
                   "grep -E '^(Uid|CapEff|CapBnd|NoNewPrivs):' /proc/1/status; tr '\\0' ' ' < /proc/1/cmdline; echo; "
                   "dpkg-query -W -f '${Package} ${Version}\\n' haproxy; touch /etc/probe 2>&1 || echo read-only").stdout
    assert re.search(rf"^Uid:\s+{BALANCER_UID}\s+{BALANCER_UID}", probe, re.MULTILINE), probe
    # No capability at all (cap_drop: ALL), none to gain.
    assert re.search(r"^CapEff:\s+0+$", probe, re.MULTILINE) and re.search(r"^CapBnd:\s+0+$", probe, re.MULTILINE), probe
    assert re.search(r"^NoNewPrivs:\s+1$", probe, re.MULTILINE), probe
    assert "haproxy -W -db" in probe, f"HAProxy is not PID 1: {probe}"
    assert re.search(r"^haproxy 2\.\d+", probe, re.MULTILINE), f"not Debian's haproxy package: {probe}"
    assert "read-only" in probe
    # Only the balancer is published; the replicas have no host port.
    for replica in cluster.replicas:
        bindings = inspect(replica)["HostConfig"].get("PortBindings") or {}
        assert not any(bindings.values()), f"{replica} publishes a port: {bindings}"
    # Timeouts from CAPTIONER_REQUEST_TIMEOUT_S, per-replica limit from the queue (256 / 16 files).
    started = logs(cluster.balancer)
    assert (f"{REPLICAS} replica slots on captioner-replicas:8000, at most 16 requests at once each, "
            f"timeouts: server {REQUEST_TIMEOUT_S + 5}s, queue {REQUEST_TIMEOUT_S}s") in started, started[-2000:]


def test_requests_are_spread_and_every_replicas_metrics_are_reachable(cluster):
    image = small_png()
    seen: dict[str, int] = {}
    with httpx.Client(base_url=cluster.url, timeout=30) as client:
        for i in range(24):
            response = client.post("/v1/captions", files={"image": ("cat.png", image, "image/png")},
                                   headers={"X-Request-ID": f"spread-{i}"})
            assert response.status_code == 200, response.text
            assert response.headers["x-request-id"] == f"spread-{i}", "the client's request id reaches the replica"
            assert response.json()["captions"][0]["text"]
            seen[response.headers["x-captioner-replica"]] = seen.get(response.headers["x-captioner-replica"], 0) + 1
    assert set(seen) == {f"replica{i}" for i in range(1, REPLICAS + 1)}, seen
    with httpx.Client(base_url=cluster.stats, timeout=10) as stats:
        served = 0
        for i in range(1, REPLICAS + 1):
            metrics = stats.get(f"/replicas/{i}/metrics")
            assert metrics.status_code == 200 and "captioner_ready 1.0" in metrics.text, metrics.text[:500]
            [count] = re.findall(r"^captioner_images_captioned_total (\d+\.\d+)$", metrics.text, re.MULTILINE)
            assert float(count) > 0, f"replica {i} captioned nothing: each slot reaches its own replica"
            served += float(count)
        assert served >= 24, "the replicas' own counters add up to at least what was sent"
        assert stats.get(f"/replicas/{REPLICAS + 1}/metrics").status_code == 404
        own = stats.get("/metrics").text
        assert 'haproxy_server_status{proxy="replicas",server="replica1",state="UP"} 1' in own
        assert stats.get("/stats").status_code == 200
        assert stats.get("/healthz").status_code == 200
    lines = [line for line in balancer_log(cluster.balancer) if line["request_id"].startswith("spread-")]
    assert len(lines) == 24 and all(line["status"] == 200 and line["server"].startswith("replica") for line in lines)


# How long after the monitor sees the slot DOWN on the stats page a request may still have been sent to it:
# one CI run logged such a 502 accepted 63 ms after that on a stop, another 21 ms after on a kill (the stats
# page and the routing are not read at one instant; the cause was not pinned down). Only the stopped or
# killed replica's own failures get this slack.
DOWN_SLACK_S = 0.25


def test_killing_a_replica_under_load_fails_only_its_requests_in_flight(cluster):
    episode = run_episode(cluster, "kill")
    figures = record(episode)
    outcomes = episode.outcomes
    assert len(outcomes) > 100, f"too little load to say anything: {len(outcomes)} requests"
    # No request hung: none reached the client's timeout (the slowest is in the figures).
    no_timeouts(outcomes)
    # Every request is exactly one of: a 200, the balancer's JSON 502/503 (logged with that status),
    # a connection closed without an answer (logged with an SD termination).
    accounting = account(episode)
    for o, line in accounting.errors + accounting.closed:
        # In flight on the killed replica: sent to it before the balancer took it out, and still
        # unanswered when the signal went (a request sent in the instant between the signal and the
        # process's death counts: the replica had accepted it).
        if line is None:
            # Its line was dropped (counted above): the client's own times bound when the balancer had it.
            assert episode.t_down is not None and o.start <= episode.t_down + DOWN_SLACK_S and o.end >= episode.t_action, \
                f"{o} failed (its log line dropped) but was not in flight at the kill"
            continue
        assert line["server"] == episode.slot, f"{o} failed on {line}, not on the killed {episode.slot}"
        assert episode.t_down is not None and line["ts"] <= episode.t_down + DOWN_SLACK_S and o.end >= episode.t_action, \
            (f"{o} failed but was not in flight on the killed replica: {line}; signal at {episode.t_action:.3f}, "
             f"the slot seen: {slot_history(episode, line['ts'])}")
    # The balancer took it out, sent nothing to it until it was ready again, and then readmitted it.
    assert episode.t_down is not None, "the balancer never marked the killed replica down"
    assert episode.t_up is not None and episode.t_up > episode.t_down, "the replica was never readmitted"
    assert figures["served_by_victim_after_readmit"] > 0, "the readmitted replica took no traffic"
    sent_while_down = [line for line in episode.log if line["server"] == episode.slot
                       and episode.t_down + DOWN_SLACK_S < line["ts"] < episode.t_ready - 0.5]
    assert sent_while_down == [], f"requests sent to the replica while it was down: {sent_while_down[:3]}"
    # Nothing else went wrong: the balancer's lines for the load are the 200s, the errors and the
    # closed connections above, one each.
    load_lines = [line for line in episode.log if line["request_id"].startswith(episode.prefix + "-")]
    assert sorted(line["request_id"] for line in load_lines if line["status"] != 200 or line["termination"][:2] != "--") \
        == sorted(o.request_id for o, line in accounting.errors + accounting.closed if line is not None)


def test_stopping_a_replica_under_load_fails_almost_nothing(cluster):
    episode = run_episode(cluster, "stop")
    figures = record(episode)
    assert len(episode.outcomes) > 100
    no_timeouts(episode.outcomes)
    accounting = account(episode)
    # A graceful stop drains what the replica accepted. The one race left: a connection the kernel
    # accepted for the replica in the instant it closed its listening socket is reset, and HAProxy,
    # which had already sent the request, answers 502 (1 to 5 requests, in 3 of about 11 stop runs). Only that
    # may fail: a 502 from the stopping replica, sent to it before the balancer took it out.
    assert accounting.closed == [], f"connections closed without an answer on a graceful stop: {accounting.closed}"
    for o, line in accounting.errors:
        assert o.status == 502 and o.error == "bad_gateway", o
        if line is None:   # its log line dropped (counted): the client's own times bound when the balancer had it
            assert episode.t_down is not None and episode.t_action - 1 <= o.end and o.start <= episode.t_down + DOWN_SLACK_S, o
            continue
        assert line["server"] == episode.slot and episode.t_down is not None \
            and episode.t_action - 1 <= line["ts"] <= episode.t_down + DOWN_SLACK_S, \
            (f"{o} failed outside the stop: {line}; stop at {episode.t_action:.3f}, "
             f"the slot seen: {slot_history(episode, line['ts'])}")
    assert episode.t_up is not None, "the stopped replica was never readmitted"
    assert figures["served_by_victim_after_readmit"] > 0


def test_no_replica_left_gets_a_json_503_and_an_unhealthy_balancer(cluster):
    # Last: it stops every replica, then brings them back.
    for replica in cluster.replicas:
        podman("stop", "-t", "10", replica, timeout=60)
    wait_for(lambda: all(not s.status.startswith("UP") for s in slots(cluster.stats).values()), 30,
             "every replica down in the balancer")
    response = httpx.post(f"{cluster.url}/v1/captions", files={"image": ("cat.png", small_png(), "image/png")},
                          headers={"X-Request-ID": "none-left"}, timeout=CLIENT_TIMEOUT_S)
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/json" and response.headers["retry-after"] == "1"
    assert response.json()["error"] == {"code": "no_replica_available", "request_id": "none-left",
                                        "message": response.json()["error"]["message"]}
    assert httpx.get(f"{cluster.stats}/healthz", timeout=5).status_code == 503
    assert podman("healthcheck", "run", cluster.balancer, check=False).returncode != 0
    for replica in cluster.replicas:
        podman("start", replica)
    for replica in cluster.replicas:
        wait_healthy(replica)
    wait_for(lambda: all(s.status == "UP" for s in slots(cluster.stats).values()), 60, "both replicas back")
    assert podman("healthcheck", "run", cluster.balancer, check=False).returncode == 0
