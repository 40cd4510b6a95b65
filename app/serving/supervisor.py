"""`captioner serve --workers N` (N > 1): N uvicorn worker processes on one socket (docs/scale.md).

The socket is bound once, here, and handed to every worker; uvicorn's own supervisor
(`uvicorn.supervisors.Multiprocess`) starts the workers (spawned: each imports the app afresh and builds it
from the CAPTIONER_* environment, so `serve`'s command-line overrides reach them through it), pings them,
and replaces one that dies. What this module adds around it:

* the control folder (app/serving/control.py), created before any worker starts, named to them in
  CAPTIONER_CONTROL_DIR, and removed at exit; prometheus_client's multiprocess folder inside it
  (PROMETHEUS_MULTIPROC_DIR, also set before the workers start, as the library reads it on import);
* when a worker has exited (crashed, killed, or stopped): its live gauges are dropped
  (`multiprocess.mark_process_dead`) and its status file removed, so neither the metrics nor an admin swap
  count it;
* on SIGTERM or SIGINT the supervisor closes its own copy of the socket before it sends SIGTERM to the
  workers, so once they have closed theirs the port refuses new connections while each worker finishes its
  requests in flight (uvicorn's graceful shutdown, at most request_timeout_s + 5 s); then it exits 0;
* a worker that cannot start (exit 3: a bundle or engine that does not load; exit 2: invalid settings)
  stops the supervisor with that status (uvicorn stops on the first; a worker restarted in a loop would
  never serve).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from uvicorn import Config
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from app.observability.logs import service_log
from app.observability.metrics import MULTIPROC_DIR_ENV
from app.serving.control import METRICS, forget_worker, prepare
from app.settings import CONTROL_DIR_ENV

SETTINGS_ERROR = 2  # the exit status of invalid settings (app/main.py create_app)


def reuse_port_available() -> bool:
    """Whether each worker can listen on a socket of its own on the one port (Linux's SO_REUSEPORT)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port with SO_REUSEPORT (so that several bind it), not listening."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family=family, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


class Supervisor(Multiprocess):
    """uvicorn's supervisor, plus the clean-up of exited workers, a socket closed before the drain and, on
    Linux, a listening socket of its own for each worker.

    With one socket shared by every worker, the worker that wakes first accepts a whole burst of new
    connections, and keep-alive connections stay where they were accepted: in benchmark runs with 4, and
    sometimes 32, client connections nearly all of them landed on one of two workers (docs/scale.md). With
    SO_REUSEPORT the kernel spreads new connections over the workers' sockets by a hash of their addresses.
    The supervisor's own socket only holds the port (bound, never listening: it receives no connections);
    each worker gets a fresh socket bound to the same port, which joins the group when the worker listens
    and leaves it when the worker exits (its queued, not yet accepted connections are reset then; the
    supervisor replaces the worker)."""

    def __init__(self, config: Config, sockets: list[socket.socket], control: Path, reuse_port: bool = False) -> None:
        self.reuse_port = reuse_port
        self._handed: list[socket.socket] = []  # per-worker sockets given to a starting worker, closed here after
        super().__init__(config, sockets)
        self.control = control
        self.exit_code = 0
        self._workers: dict[int, Process] = {}  # every worker started and not yet cleaned up after

    @property
    def sockets(self) -> list[socket.socket]:
        """What uvicorn hands the next worker it starts: the port's socket, or (reuse_port) a fresh one of its own."""
        if not self.reuse_port:
            return self._port_sockets
        host, port = self._port_sockets[0].getsockname()[:2]
        sock = port_socket(host, port)
        self._handed.append(sock)
        return [sock]

    @sockets.setter
    def sockets(self, value: list[socket.socket]) -> None:
        self._port_sockets = value

    def _close_handed(self) -> None:
        """The started workers hold their sockets now (spawn sent each a duplicate): close the supervisor's
        copies, so that a worker's socket leaves the port's group when that worker exits."""
        for sock in self._handed:
            sock.close()
        self._handed.clear()

    def init_processes(self) -> None:
        super().init_processes()
        self._track()
        service_log.info("workers started", extra={"fields": {
            "workers": self.processes_num, "pids": sorted(self._workers), "control_dir": str(self.control),
            "listening": "a socket per worker (SO_REUSEPORT)" if self.reuse_port else "one shared socket"}})

    def keep_subprocess_alive(self) -> None:
        for process in self.processes:
            if process.exitcode == SETTINGS_ERROR and not self.should_exit.is_set():
                service_log.error("worker %s stopped on invalid settings; stopping", process.pid)
                self.exit_code = SETTINGS_ERROR
                self.should_exit.set()
                return
        super().keep_subprocess_alive()  # replaces a worker that died (or stops on a start-up failure)
        if any(p.exitcode == STARTUP_FAILURE for p in self.processes):
            self.exit_code = STARTUP_FAILURE
        self._track()
        self._clean_up()

    def terminate_all(self) -> None:
        self._close_handed()
        for sock in self._port_sockets:  # stop accepting: the port closes once the workers have closed theirs
            sock.close()
        super().terminate_all()

    def join_all(self) -> None:
        super().join_all()
        self._clean_up()

    def _track(self) -> None:
        self._close_handed()
        for process in self.processes:
            if process.pid is not None:
                self._workers.setdefault(process.pid, process)

    def _clean_up(self) -> None:
        """Forget the workers that have exited: their live gauges and their status file."""
        from prometheus_client import multiprocess

        for pid, process in list(self._workers.items()):
            if process.exitcode is None:  # polls the child (and reaps it once it has exited)
                continue
            multiprocess.mark_process_dead(pid, str(self.control / METRICS))
            forget_worker(self.control, pid)
            del self._workers[pid]
            if not self.should_exit.is_set():
                service_log.warning("worker %s exited (status %s)", pid, process.exitcode,
                                    extra={"fields": {"worker": pid, "exit_code": process.exitcode}})


def run_workers(config: Config, environment: dict[str, str]) -> int:
    """Run `config.workers` workers of `config.app` (an import string) under the supervisor; `environment`:
    variables the workers need (the command line's overrides). Returns the exit status."""
    control = Path(tempfile.mkdtemp(prefix="captioner-control-"))
    try:
        prepare(control)
        os.environ.update(environment)
        os.environ[CONTROL_DIR_ENV] = str(control)
        os.environ[MULTIPROC_DIR_ENV] = str(control / METRICS)
        reuse_port = reuse_port_available()
        if reuse_port:
            try:
                sock = port_socket(config.host, config.port)
            except OSError as exc:  # as uvicorn's bind_socket: one log line, exit 3
                service_log.error("cannot bind %s:%s: %s", config.host, config.port, exc)
                return STARTUP_FAILURE
        else:
            sock = config.bind_socket()  # exits 3 with one log line when the port is taken
        supervisor = Supervisor(config, [sock], control, reuse_port=reuse_port)
        supervisor.run()
        return supervisor.exit_code
    finally:
        shutil.rmtree(control, ignore_errors=True)
