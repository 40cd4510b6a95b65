"""The control folder: how the worker processes of `captioner serve --workers N` agree on the model versions
they serve (docs/scale.md).

Each worker is a whole service with its own `ModelRegistry` (app/serving/registry.py), so an admin swap
(`POST /v1/models/{name}/load` or `.../rollback`), which lands on one worker, has to reach the others. The
supervisor (app/serving/supervisor.py) creates the folder, names it in CAPTIONER_CONTROL_DIR for its
workers and removes it when it exits. In it:

    models/<name>.json   the version every worker should serve, the history behind it and the swap that
                         wrote it: {"version": "2.0.0", "history": ["1.0.0"], "swap": "<pid>-<ns>"}
    workers/<pid>.json   what one worker serves: {"pid": ..., "active": {name: version},
                         "seen": {name: swap}} (the last swap of each name it acted on, followed or refused)
    locks/<name>.lock    flock-ed by the worker running an admin swap of that name
    metrics/             PROMETHEUS_MULTIPROC_DIR (app/observability/metrics.py)

Every JSON file is written whole under a temporary name and renamed over the old one (os.replace): a
reader sees the old version or the new one, never part of one.

A swap: the admin request's worker takes the name's lock (an admin swap of that name on any other worker
meanwhile gets 409 load_in_progress), catches up with the folder (`sync`), loads and checks the version
exactly as one process does, and only once that succeeded `publish`es models/<name>.json. Every worker
looks at the models folder every POLL_INTERVAL_S (a directory listing and a stat per file, in a
thread) and, for a file that changed, loads that version with the same checks (`ModelRegistry.follow`),
then rewrites its workers/<pid>.json. The admin answer waits (`wait_for`, at most request_timeout_s)
until every live worker has acted on the swap, and says how many serve the new version. A refused load
publishes nothing, so nothing changes anywhere; a worker that cannot follow (its check failed) keeps its
version, logs why, and counts as not switched. A worker that starts (or restarts after a crash) reads the
folder first and serves the versions it names (`snapshot` -> `ModelRegistry.start`). A worker whose
supervisor is gone (killed outright) notices within a round and stops gracefully, rather than serve on.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.observability.logs import service_log
from app.serving.registry import BundleRefused, LoadInProgress, ModelNotFound, ModelRegistry

POLL_INTERVAL_S = 0.25  # how often a worker looks for a swap made by another
WAIT_STEP_S = 0.1  # how often the admin answer looks at the workers' statuses
MODELS, WORKERS, LOCKS, METRICS = "models", "workers", "locks", "metrics"

FileState = tuple[int, int, int]  # inode, size, mtime (ns): a rename over the file changes the inode


@dataclass(frozen=True)
class Desired:
    """One name's entry in models/: the version to serve, its history, and the swap that wrote it."""

    version: str
    history: tuple[str, ...]
    swap: str


def prepare(root: Path) -> None:
    """Create the folder's parts (the supervisor, before any worker starts)."""
    for part in (MODELS, WORKERS, LOCKS, METRICS):
        (root / part).mkdir(parents=True, exist_ok=True)


def write_json(path: Path, data: Any) -> None:
    """Write `data` to `path` atomically: a temporary file in the same folder, renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def _json_files(folder: Path) -> list[Path]:
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return [folder / n for n in sorted(names) if n.endswith(".json") and not n.startswith(".")]


def _read(path: Path) -> tuple[FileState, Any] | None:
    """The file's state and its JSON, from one open file (None: gone or unreadable)."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            return (st.st_ino, st.st_size, st.st_mtime_ns), json.loads(f.read())
    except (OSError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs: exists and is not a zombie (dead, not yet reaped by the supervisor)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def forget_worker(root: Path, pid: int) -> None:
    """Remove a dead worker's status (the supervisor, when it reaps the worker)."""
    with contextlib.suppress(OSError):
        (root / WORKERS / f"{pid}.json").unlink()


class WorkerControl:
    """One worker's side of the control folder: what it reads at start-up, the watch that follows swaps made
    by other workers, its status, and what an admin swap on this worker does (`exclusive`, `publish`,
    `wait_for`)."""

    def __init__(self, root: Path, registry: ModelRegistry, interval: float = POLL_INTERVAL_S) -> None:
        self.root = root
        self.registry = registry
        self.interval = interval
        self.pid = os.getpid()
        self.supervisor = os.getppid()
        self._seen_files: dict[str, FileState] = {}  # per name: the models/ file state acted on
        self._seen_swaps: dict[str, str] = {}  # per name: the swap acted on (followed or refused)
        self._malformed: set[FileState] = set()
        self._sync_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    # ---- the folder ---------------------------------------------------------------------------

    def _desired(self) -> dict[str, tuple[FileState, Desired]]:
        out = {}
        for path in _json_files(self.root / MODELS):
            found = _read(path)
            if found is None:
                continue
            state, data = found
            try:
                out[path.stem] = (state, Desired(str(data["version"]), tuple(str(v) for v in data["history"]),
                                                 str(data["swap"])))
            except (KeyError, TypeError):
                if state not in self._malformed:  # once per version of the file, not every round
                    self._malformed.add(state)
                    service_log.warning("ignoring a malformed control file %s", path.name)
        return out

    def snapshot(self) -> dict[str, tuple[str, list[str]]]:
        """What the other workers serve, {name: (version, history)}, for `ModelRegistry.start` (start-up reads it
        before loading anything; a swap published meanwhile is followed once the watch starts)."""
        found = self._desired()
        for name, (state, desired) in found.items():
            self._seen_files[name] = state
            self._seen_swaps[name] = desired.swap
        return {name: (d.version, list(d.history)) for name, (_, d) in found.items()}

    def status(self) -> dict[str, Any]:
        return {"pid": self.pid, "active": {n: m.version for n, m in self.registry.active.items()},
                "seen": dict(self._seen_swaps)}

    async def write_status(self) -> None:
        data = self.status()  # read on the event loop: the registry's state at one instant
        await asyncio.to_thread(write_json, self.root / WORKERS / f"{self.pid}.json", data)

    def statuses(self) -> list[dict[str, Any]]:
        """The statuses of the live workers (a dead one's file may outlive it by one supervisor round)."""
        out = []
        for path in _json_files(self.root / WORKERS):
            found = _read(path)
            if found is None:
                continue
            data = found[1]
            if isinstance(data, dict) and isinstance(data.get("pid"), int) and pid_alive(data["pid"]):
                out.append(data)
        return out

    # ---- following the others -----------------------------------------------------------------

    async def start(self) -> None:
        """Write this worker's status and watch the folder (from the lifespan, once the models are loaded)."""
        await self.sync()  # a swap published while this worker loaded
        await self.write_status()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch(), name="captioner-control")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        forget_worker(self.root, self.pid)  # a draining worker is no longer waited for

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if os.getppid() != self.supervisor:  # the supervisor was killed (SIGKILL, OOM): do not serve on alone
                service_log.error("the supervisor (pid %s) is gone: this worker drains and stops", self.supervisor)
                os.kill(self.pid, signal.SIGTERM)  # uvicorn's graceful shutdown, as the supervisor would ask
                return
            try:
                await self.sync()
            except Exception as exc:  # never let the watch die: the versions in use stay
                service_log.error("following the control folder failed (%s: %s)", type(exc).__name__, exc)

    async def sync(self) -> None:
        """Serve what models/ says wherever its file changed since this worker last acted on it."""
        async with self._sync_lock:
            found = await asyncio.to_thread(self._desired)
            acted = False
            for name, (state, desired) in found.items():
                if self._seen_files.get(name) == state:
                    continue
                try:
                    await self.registry.follow(name, desired.version, desired.history)
                except LoadInProgress:
                    continue  # this worker is loading that name already: look again next round
                except (BundleRefused, ModelNotFound) as exc:
                    current = self.registry.active.get(name)
                    service_log.error(
                        "cannot follow the swap of %s to %s made by another worker (%s); this worker keeps serving %s",
                        name, desired.version, exc, current.version if current else "nothing",
                        extra={"fields": {"model": name, "version": desired.version, "swap": desired.swap}})
                self._seen_files[name] = state
                self._seen_swaps[name] = desired.swap
                acted = True
            if acted:
                await self.write_status()

    # ---- an admin swap on this worker ---------------------------------------------------------

    @contextlib.contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        """Hold the name's lock for an admin swap; LoadInProgress when a swap of it runs on any worker. The
        lock is an flock: released when the block ends, or by the kernel if the process dies."""
        fd = os.open(self.root / LOCKS / f"{name}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LoadInProgress(f"a load or rollback of {name} is already running in one of the workers; "
                                     "retry when it has finished") from None
            yield
        finally:
            os.close(fd)

    async def publish(self, name: str, version: str, history: list[str]) -> str:
        """Tell every worker to serve `name:version` (after this worker switched to it); returns the swap's id."""
        swap = f"{self.pid}-{time.time_ns()}"
        path = self.root / MODELS / f"{name}.json"
        await asyncio.to_thread(write_json, path, {"version": version, "history": history, "swap": swap})
        found = await asyncio.to_thread(_read, path)
        if found is not None:  # this worker has acted on its own swap: its watch need not load anything
            self._seen_files[name] = found[0]
        self._seen_swaps[name] = swap
        await self.write_status()
        return swap

    async def wait_for(self, name: str, version: str, swap: str, timeout: float) -> tuple[int, int]:
        """Wait (at most `timeout` s) until every live worker serves `name:version` or has acted on `swap`
        (refused it); returns (workers serving it, live workers)."""
        deadline = time.monotonic() + timeout
        while True:
            statuses = await asyncio.to_thread(self.statuses)
            switched = sum(1 for s in statuses if s.get("active", {}).get(name) == version)
            settled = sum(1 for s in statuses if s.get("active", {}).get(name) == version
                          or s.get("seen", {}).get(name) == swap)
            if settled >= len(statuses) or time.monotonic() >= deadline:
                return switched, len(statuses)
            await asyncio.sleep(WAIT_STEP_S)
