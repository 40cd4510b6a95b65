"""The model repository: which bundles are served, and swapping versions with no downtime.

`CAPTIONER_MODEL_REPOSITORY=<dir>` holds bundles as `<name>/<version>/` (each a bundle folder whose
manifest names that model and version); `CAPTIONER_BUNDLE` alone is a repository of one. A
`ModelRegistry` (``ServiceState.models``, app/api/state.py) keeps, per name, one *active* `ServedModel`: the checked
bundle, its onnxruntime engine and its own dynamic batcher (they share the one inference thread).
One name is the default; a request may pick another with ``?model=name`` or ``?model=name:version``.

Swapping (`load`, `rollback`; one at a time per name):

1. the new version's bundle is read and every file's sha256 checked, its engine built and warmed up,
   a smoke caption made, and the bundle's reference captions (manifest `parity.reference`: greedy
   captions of deterministic inputs) re-captioned and compared word for word - all in a worker
   thread, beside the version that keeps serving;
2. only then its batcher starts and the active pointer switches (one assignment on the event loop):
   new requests get the new version;
3. the old version *drains*: a request holds the `ServedModel` it resolved until it has answered, so
   requests already under way (queued or reading their upload) finish on the version they started
   with; once none is left its batcher closes and it is unloaded (its engine freed).

A bundle that fails a check is refused (`BundleRefused`, naming the check) and the active version
keeps serving. Its message names the bundle's files by their absolute paths (for the log and start-up);
`ModelRegistry.public_text` makes them relative to the repository for an error body. Only the active
version of each name stays loaded: `?model=name:version` of any other version (an unloaded one) is a
`ModelNotFound` (404 model_not_found, listing what is loaded).
`rollback` loads the version the name served before the current one, with the same checks.

With several worker processes (`captioner serve --workers N`) each has its own registry; a swap made in
one reaches the others through the control folder (app/serving/control.py): they `follow` it, with the
same checks, and a worker that starts serves the versions the folder names (`start(desired=...)`).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from app.inference.bundle import MODEL_NAME_PATTERN, Bundle, BundleError, load_bundle, reference_input, scan_repository
from app.inference.decoding import DecodingConfig
from app.inference.engine import Engine, EngineError
from app.observability.logs import service_log
from app.observability.metrics import Metrics
from app.serving.batcher import DynamicBatcher
from app.settings import Settings

NAME_PATTERN = MODEL_NAME_PATTERN  # a model name or version (app/inference/bundle.py)
MODEL_SPEC_PATTERN = rf"^{NAME_PATTERN}(:{NAME_PATTERN})?$"
SMOKE_SEED = 1_000_003  # the smoke caption's input (reference_input), whatever the manifest records
_SPEC_RE = re.compile(MODEL_SPEC_PATTERN)
# An absolute path in a message (not a URL's path, not a relative one): `public_text` shortens what is left.
_ABSOLUTE = re.compile(r"(?<![\w.:/~%-])/(?:[^\s'\"`(),;<>/]+/)+(?=[^\s'\"`(),;<>/]*)")


class ModelNotFound(Exception):
    """No loaded model answers to this name (or name:version); `available` lists those that do."""

    def __init__(self, wanted: str, available: list[str], problem: str = "is not loaded"):
        self.wanted = wanted
        self.available = available
        super().__init__(f"model {wanted!r} {problem}; available: {', '.join(available) or 'none'}")


class BundleRefused(Exception):
    """The bundle failed a check (`check`: bundle, engine, warmup, smoke, parity); nothing changed."""

    def __init__(self, check: str, message: str):
        self.check = check
        self.message = message
        super().__init__(f"{check} check failed: {message}")


class LoadInProgress(Exception):
    """Another load or rollback of this name is running."""


class NoPreviousVersion(Exception):
    """Rollback asked for, but the name has served no other version."""


@dataclass
class Check:
    name: str  # sha256, warmup, smoke, parity
    passed: bool | None  # None: skipped (e.g. no reference captions in the manifest)
    detail: str


@dataclass(eq=False)
class ServedModel:
    """One loaded (name, version): its bundle, engine and batcher, and the requests using it."""

    bundle: Bundle
    engine: Engine
    checks: list[Check]
    load_seconds: float
    batcher: DynamicBatcher | None = None  # started once it serves
    loaded_at: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    state: str = "active"  # active -> draining -> unloaded
    users: int = 0  # requests that resolved this model and have not answered yet
    _idle: asyncio.Event | None = None

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def version(self) -> str:
        return self.bundle.version

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def memory_bytes(self) -> int:
        """Bytes of the bundle's graphs: the weights the onnxruntime sessions hold."""
        return sum(p.stat().st_size for p in (self.bundle.encoder_path, self.bundle.decoder_path) if p.exists())

    def acquire(self) -> None:
        self.users += 1

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        if self.users <= 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


def version_key(version: str) -> tuple:
    """Sort key: numeric parts as numbers (1.10.0 after 1.9.0), the others as text."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.\-+_]", version))


def build_served(bundle_path: Path, settings: Settings, expect: tuple[str, str] | None = None) -> ServedModel:
    """Read, check and warm up one bundle (in a worker thread: nothing here touches the event loop).
    Raises BundleRefused naming the failed check."""
    started = time.perf_counter()
    checks: list[Check] = []
    try:
        bundle = load_bundle(bundle_path)
    except BundleError as exc:
        raise BundleRefused("sha256" if "sha256" in exc.problem else "bundle", str(exc)) from None
    if expect is not None and (bundle.name, bundle.version) != expect:
        raise BundleRefused("bundle", f"{bundle_path}: the manifest names {bundle.name}:{bundle.version}, the folder "
                            f"{expect[0]}/{expect[1]}")
    checks.append(Check("sha256", True, f"{len(bundle.manifest.files)} files match the manifest"))
    try:
        engine = Engine(bundle, settings.device, settings.engine_threads())
        engine.warmup()
    except EngineError as exc:
        raise BundleRefused("engine", str(exc)) from None
    except Exception as exc:  # onnxruntime's own errors: a graph that does not run
        raise BundleRefused("warmup", f"the engine failed its warm-up caption ({type(exc).__name__}: {exc})") from None
    checks.append(Check("warmup", True, f"one beam-2 caption on {engine.provider}"))
    greedy = DecodingConfig(strategy="greedy", beam_size=1, num_captions=1)
    spec = bundle.manifest.preprocessing
    try:
        smoke = engine.run([reference_input(SMOKE_SEED, spec)], greedy)
    except Exception as exc:
        raise BundleRefused("smoke", f"the smoke caption failed ({type(exc).__name__}: {exc})") from None
    if not smoke or not smoke[0].captions or not smoke[0].captions[0].tokens:
        raise BundleRefused("smoke", "the smoke caption came back empty")
    checks.append(Check("smoke", True, f"greedy caption: {smoke[0].captions[0].text!r}"))
    reference = bundle.manifest.parity.reference if bundle.manifest.parity is not None else None
    if not reference:
        checks.append(Check("parity", None, "skipped: the manifest records no reference captions (parity.reference)"))
    else:
        results = engine.run([reference_input(r.seed, spec) for r in reference], greedy)
        for i, (ref, result) in enumerate(zip(reference, results, strict=True)):
            got = result.captions[0].tokens if result.captions else []
            if list(got) != list(ref.tokens):
                raise BundleRefused("parity", f"reference caption {i + 1} of {len(reference)} (seed {ref.seed}) "
                                    f"differs: the manifest records {' '.join(ref.tokens)!r}, this engine "
                                    f"({engine.provider}) wrote {' '.join(got)!r}")
        checks.append(Check("parity", True, f"{len(reference)} reference captions identical to the manifest's"))
    return ServedModel(bundle, engine, checks, time.perf_counter() - started)


class ModelRegistry:
    """The served models (`active` per name), the default name, and the swaps."""

    def __init__(self, settings: Settings, metrics: Metrics, executor: Executor,
                 on_default: Callable[[ServedModel], None] | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.executor = executor
        self.on_default = on_default  # told about the default name's new active model (the model info in /metrics)
        self.root = settings.model_repository
        self.active: dict[str, ServedModel] = {}
        self.history: dict[str, list[str]] = {}  # per name: the versions it served before, oldest first
        self.draining: list[ServedModel] = []
        self.default_name = ""
        self._busy: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        self._single: tuple[str, str, Path] | None = None  # CAPTIONER_BUNDLE: (name, version, path)

    # ---- the repository ---------------------------------------------------------------------

    def available(self) -> dict[str, list[str]]:
        """Per name, the versions the repository holds (oldest first)."""
        if self.root is None:
            return {self._single[0]: [self._single[1]]} if self._single else {}
        try:
            found, _ = scan_repository(self.root)  # names and versions of NAME_PATTERN only
        except OSError as exc:
            service_log.warning("cannot read the model repository (%s)", exc.strerror)
            return {}
        return {name: sorted(versions, key=version_key) for name, versions in found.items()}

    def bundle_path(self, name: str, version: str) -> Path:
        available = self.available()
        if version not in available.get(name, []):
            listed = [f"{n}:{v}" for n, vs in available.items() for v in vs]
            raise ModelNotFound(f"{name}:{version}", listed, "is not in the model repository")
        if self.root is None:
            assert self._single is not None
            return self._single[2]
        return self.root / name / version

    def public_text(self, text: str) -> str:
        """`text` (a `BundleRefused` message) fit for an error body: no absolute path of this machine. Paths
        in the model repository become relative to it (`<root>/tiny/9.0.0/encoder.onnx` ->
        `tiny/9.0.0/encoder.onnx`; a single CAPTIONER_BUNDLE's relative to its parent folder), and any
        other absolute path keeps only its last part (`…/name`)."""
        base = self.root if self.root is not None else (self._single[2].parent if self._single else None)
        if base is not None:
            prefixes = {str(base), os.path.abspath(base), os.path.realpath(base)}
            for prefix in sorted(prefixes, key=len, reverse=True):
                text = text.replace(prefix.rstrip("/") + "/", "")
        return _ABSOLUTE.sub("…/", text)

    def loaded(self) -> list[str]:
        """name:version of every active model, the default first."""
        keys = [m.key for n, m in sorted(self.active.items()) if n != self.default_name]
        default = self.active.get(self.default_name)
        return ([default.key] if default else []) + keys

    # ---- start and stop ---------------------------------------------------------------------

    async def start(self, desired: Mapping[str, tuple[str, Sequence[str]]] | None = None) -> None:
        """Load each name's newest version (CAPTIONER_DEFAULT_MODEL=name:version pins the default's), or the
        version `desired` names for it ({name: (version, history)}: what the other workers serve, from the
        control folder), with that history. Raises BundleRefused for a bundle that fails a check (start-up
        stops)."""
        loop = asyncio.get_running_loop()
        desired = desired or {}
        if self.root is None:
            served = await loop.run_in_executor(None, build_served, self.settings.bundle, self.settings, None)
            self._single = (served.name, served.version, self.settings.bundle)
            self.default_name = served.name
            self._activate(served)
            return
        pinned_name, _, pinned_version = (self.settings.default_model or "").partition(":")
        available = self.available()
        if not available or (pinned_name and pinned_name not in available):  # the settings checked it: changed since
            raise BundleRefused("bundle", f"the model repository {self.root} holds no bundle under a valid name"
                                if not available else f"the model repository {self.root} holds no model {pinned_name}")
        self.default_name = pinned_name or sorted(available)[0]
        for name, versions in available.items():
            version = pinned_version if name == pinned_name and pinned_version else versions[-1]
            wanted, history = desired.get(name, (None, ()))
            if wanted is not None and wanted in versions:
                version = wanted
                self.history[name] = list(history)
            elif wanted is not None:
                service_log.warning("the other workers serve %s:%s, which the repository no longer holds; starting "
                                    "on %s", name, wanted, version, extra={"fields": {"model": name, "version": version}})
            served = await loop.run_in_executor(None, build_served, self.root / name / version, self.settings,
                                                (name, version))
            self._activate(served)

    async def close(self, timeout: float) -> None:
        for task in list(self._tasks):
            task.cancel()
        for served in [*self.draining, *self.active.values()]:
            if served.batcher is not None:
                await served.batcher.close(timeout=timeout)

    # ---- requests ---------------------------------------------------------------------------

    def resolve(self, spec: str | None) -> ServedModel:
        """The active model for `spec` (None: the default; "name"; "name:version"). ModelNotFound else."""
        if not spec:
            return self.active[self.default_name]
        name, _, version = spec.partition(":")
        served = self.active.get(name)
        if served is None or (version and served.version != version):
            raise ModelNotFound(spec, self.loaded())
        return served

    def find(self, spec: str | None) -> ServedModel | None:
        """`resolve` without raising: None where `spec` is no valid name[:version] or names no active model
        (for a check that must not answer the request itself, e.g. the overload check before the body)."""
        if spec is not None and not _SPEC_RE.match(spec):
            return None
        try:
            return self.resolve(spec)
        except (ModelNotFound, KeyError):
            return None

    # ---- swapping ---------------------------------------------------------------------------

    async def load(self, name: str, version: str, *, rollback: bool = False) -> tuple[ServedModel, str | None, bool]:
        """Load `name:version` beside the active one, check it, switch to it; returns (the model
        now serving, the version it replaced or None, whether anything changed)."""
        if name in self._busy:
            raise LoadInProgress(f"a load or rollback of {name} is already running; retry when it has finished")
        path = self.bundle_path(name, version)  # ModelNotFound
        current = self.active.get(name)
        if current is not None and current.version == version:
            return current, None, False
        self._busy.add(name)
        started = time.perf_counter()
        try:
            expect = (name, version) if self.root is not None else None
            try:
                served = await asyncio.get_running_loop().run_in_executor(
                    None, build_served, path, self.settings, expect)
            except BundleRefused as exc:
                self.metrics.model_loads.labels(name, "refused").inc()
                service_log.warning("model load refused: %s", exc,
                                    extra={"fields": {"model": name, "version": version, "check": exc.check}})
                raise
            previous = self._activate(served)
            if previous is not None:
                history = self.history.setdefault(name, [])
                if rollback:
                    if history:
                        history.pop()
                else:
                    history.append(previous.version)
            self.metrics.model_loads.labels(name, "ok").inc()
            service_log.info("model switched", extra={"fields": {
                "model": name, "version": version, "previous": previous.version if previous else None,
                "rollback": rollback, "load_ms": round((time.perf_counter() - started) * 1000.0, 1)}})
            return served, previous.version if previous else None, True
        finally:
            self._busy.discard(name)

    async def rollback(self, name: str) -> tuple[ServedModel, str | None, bool]:
        if name not in self.active:
            raise ModelNotFound(name, self.loaded())
        history = self.history.get(name) or []
        if not history:
            raise NoPreviousVersion(f"{name} has served no other version since the service started: nothing to "
                                    "roll back to")
        return await self.load(name, history[-1], rollback=True)

    async def follow(self, name: str, version: str, history: Sequence[str]) -> None:
        """Serve `name:version` as another worker decided (the control folder): `load` it, with every check,
        unless it is already active, and take that worker's history, so a rollback on any worker goes back
        to the same version. Raises as `load` does."""
        await self.load(name, version)
        self.history[name] = list(history)

    def _activate(self, served: ServedModel) -> ServedModel | None:
        """Start the model's batcher and make it the active version of its name (on the event loop, no
        await between: a request resolves either the old or the new one); the old one drains."""
        s = self.settings
        served.batcher = DynamicBatcher(
            served.engine, self.executor, enabled=s.batching, max_batch_images=s.max_batch_images,
            max_queue_delay_s=s.max_queue_delay_ms / 1000.0, max_queue_images=s.max_queue_images,
            metrics=self.metrics, queue_changed=self._sum_queues,
        )
        served.batcher.start()
        previous = self.active.get(served.name)
        self.active[served.name] = served
        self.metrics.models_loaded.labels(served.name, served.version).set(1)
        if served.name == self.default_name and self.on_default is not None:
            self.on_default(served)
        if previous is not None:
            previous.state = "draining"
            self.draining.append(previous)
            task = asyncio.get_running_loop().create_task(self._drain(previous), name=f"drain-{previous.key}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return previous

    async def _drain(self, served: ServedModel) -> None:
        """Let the requests that resolved `served` answer, then close its batcher and let it go."""
        limit = self.settings.request_timeout_s + 5.0
        if not await served.wait_idle(limit):
            service_log.warning("%s still had %d requests after %.0f s; closing it", served.key, served.users, limit)
        if served.batcher is not None:
            await served.batcher.close(timeout=limit)
        served.state = "unloaded"
        self.draining.remove(served)
        self._sum_queues()
        self.metrics.models_loaded.labels(served.name, served.version).set(0)
        service_log.info("model unloaded", extra={"fields": {"model": served.name, "version": served.version}})

    def _sum_queues(self) -> None:
        """captioner_queue_images: the images queued for every loaded model (active or draining)."""
        self.metrics.queue_images.set(sum(m.batcher.queued_images for m in [*self.active.values(), *self.draining]
                                          if m.batcher is not None))


def process_rss_bytes() -> int | None:
    """The service process's resident memory (Linux), else None."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None

