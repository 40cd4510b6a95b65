"""Seeing the worker processes of a live `captioner serve --workers N` (tests/support/live_server.py) from
outside: which workers are ready, which one answered a request, which one holds a connection.

With several workers every log line names its process (`pid`, app/observability/logs.py), and all of
them write to the server's one log. A request is told apart by its X-Request-ID, which its access line
carries. Requests are sent on fresh connections (no keep-alive), so that the kernel hands each to
whichever worker accepts first; `spread` keeps sending until every worker asked for has answered."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Collection
from pathlib import Path

import httpx

from app.serving.control import pid_alive
from tests.support.live_server import LiveServer

WORKER_TIMEOUT_S = 120.0  # generous: a worker loads and checks its models before it logs "ready"


def log_records(server: LiveServer) -> list[dict]:
    out = []
    for line in server.log().splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line still being written
                pass
    return out


def ready_workers(server: LiveServer) -> set[int]:
    """The workers that logged "ready" and still run."""
    return {r["pid"] for r in log_records(server) if r.get("msg") == "ready" and "pid" in r and pid_alive(r["pid"])}


def wait_for_workers(server: LiveServer, count: int, exclude: Collection[int] = (),
                     timeout: float = WORKER_TIMEOUT_S) -> set[int]:
    """Wait until `count` workers (none of `exclude`) are ready; returns their pids."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = ready_workers(server) - set(exclude)
        if len(pids) >= count:
            return pids
        assert server.process.poll() is None, f"the supervisor exited with {server.process.returncode}"
        time.sleep(0.2)
    raise AssertionError(f"{count} workers were not ready within {timeout} s:\n{server.log()[-3000:]}")


def control_dir(server: LiveServer) -> Path:
    """The supervisor's control folder (app/serving/control.py), from its "workers started" line."""
    [line] = [r for r in log_records(server) if r.get("msg") == "workers started"]
    return Path(line["control_dir"])


def served_by(server: LiveServer, request_ids: Collection[str], timeout: float = 30.0) -> dict[str, int]:
    """{request id: pid of the worker whose access line has it}, waiting for every line to be written."""
    deadline = time.monotonic() + timeout
    while True:
        found = {r["request_id"]: r["pid"] for r in log_records(server)
                 if r.get("logger") == "captioner.access" and r.get("request_id") in request_ids}
        if len(found) == len(set(request_ids)) or time.monotonic() > deadline:
            missing = set(request_ids) - set(found)
            assert not missing, f"no access line for {sorted(missing)[:3]}"
            return found
        time.sleep(0.05)


def spread(server: LiveServer, send: Callable[[httpx.Client], httpx.Response], workers: Collection[int],
           at_least: int = 3, batch: int = 12, most: int = 400) -> list[tuple[httpx.Response, int]]:
    """Send requests (`send`, each on a connection of its own) until each of `workers` answered at least
    `at_least` of them; returns every (response, worker pid). Fails after `most` requests."""
    out: list[tuple[httpx.Response, int]] = []
    fresh = httpx.Limits(max_keepalive_connections=0)  # a new connection per request
    with server.client(limits=fresh) as client:
        while True:
            responses = [send(client) for _ in range(batch)]
            pids = served_by(server, [r.headers["X-Request-ID"] for r in responses])
            out += [(r, pids[r.headers["X-Request-ID"]]) for r in responses]
            counts = {pid: sum(1 for _, p in out if p == pid) for pid in workers}
            if min(counts.values()) >= at_least:
                return out
            assert len(out) < most, f"after {len(out)} requests on fresh connections the workers answered {counts}"


def _proc_net_port(hex_address: str) -> int:
    return int(hex_address.rsplit(":", 1)[1], 16)


def connection_owner(workers: Collection[int], client: socket.socket, server_port: int,
                     timeout: float = 10.0) -> int:
    """The worker that accepted the TCP connection of `client` (its socket's inode in /proc/net/tcp, found
    among the worker's open files)."""
    client_port = client.getsockname()[1]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        inode = None
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if _proc_net_port(fields[1]) == server_port and _proc_net_port(fields[2]) == client_port:
                inode = fields[9]
        if inode not in (None, "0"):  # 0: still in the listening socket's queue, accepted by nobody yet
            for pid in workers:
                try:
                    links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
                except OSError:
                    continue
                if f"socket:[{inode}]" in links:
                    return pid
        time.sleep(0.05)
    raise AssertionError(f"no worker of {sorted(workers)} accepted the connection from port {client_port}")
