"""Podman helpers shared by the container tests (tests/test_containers.py, tests/test_replicas.py).

Nothing here runs at import time but the environment check: call `require_podman()` at the top of
a test module, before it imports anything only a container machine needs.

The images are built once per test session: the session fixture ``container_images``
(tests/conftest.py) holds a `SessionImages`, and the modules ask it for the variants they use
(`container_images.get("cpu", "balancer")`). The first request builds, in parallel, every variant
that the session's modules name in their ``IMAGE_VARIANTS``; later requests reuse those tags.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
STATE = Path(os.environ.get("CONTAINER_TEST_STATE", "/var/tmp/captioner-container-tests"))
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")

BASE_TAG = "localhost/captioner-ci-base:bookworm"
PYTHON_BASE_CONTAINERFILE = """\
FROM {base}
RUN apt-get update \\
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \\
    && rm -rf /var/lib/apt/lists/*
"""
IMAGE_REPO = "localhost/captioner-ci"
# variant: (Dockerfile, which base of ensure_bases())
DOCKERFILES = {"gpu": ("Dockerfile", "gpu"), "cpu": ("docker/Dockerfile.cpu", "cpu"),
               "balancer": ("docker/Dockerfile.balancer", "gpu")}

BUILD_TIMEOUT = 480
HEALTH_TIMEOUT = 120
UP_TIMEOUT = 120


# ---- podman: can it run here? ----------------------------------------------------------------


def _podman_env() -> dict[str, str]:
    # CAPTIONER_* from the host would pass into the containers through the compose file.
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("CAPTIONER_", "COMPOSE_"))}
    if "CONTAINERS_CONF" not in env:
        # crun and podman's default ulimits fail in some sandboxes (setrlimit, hybrid cgroups);
        # runc and explicit ulimits work there and everywhere else.
        STATE.mkdir(parents=True, exist_ok=True)
        conf = STATE / "containers.conf"
        text = '[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
        if shutil.which("runc"):
            text += '[engine]\nruntime = "runc"\n'
        if not conf.exists() or conf.read_text() != text:
            conf.write_text(text)
        env["CONTAINERS_CONF"] = str(conf)
    return env


def _why_podman_cannot_run() -> str | None:
    if not shutil.which("podman"):
        return "podman is not installed"
    try:
        result = subprocess.run(["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"], env=_podman_env(),
                                capture_output=True, text=True, check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`podman info` failed: {exc}"
    if result.returncode != 0:
        return f"`podman info` failed: {result.stderr.strip()[-500:]}"
    return None


def require_podman(what: str) -> None:
    """Skip the calling module (loudly) where podman cannot run; fail instead with
    REQUIRE_CONTAINER_TESTS=1 or CI=true. `what` names what goes untested."""
    reason = _why_podman_cannot_run()
    if reason is None:
        return
    message = f"CONTAINER TESTS SKIPPED: podman cannot run here ({reason}); {what} NOT tested"
    if os.environ.get("REQUIRE_CONTAINER_TESTS") == "1" or os.environ.get("CI", "").lower() in ("1", "true"):
        pytest.fail(f"CONTAINER TESTS CANNOT RUN: podman cannot run here ({reason}), and with "
                    "REQUIRE_CONTAINER_TESTS=1 or CI=true they must (install podman: see .ci/run)", pytrace=False)
    print("\n" + "!" * 100 + f"\n!! {message}\n" + "!" * 100, file=sys.stderr)
    warnings.warn(message, stacklevel=2)
    pytest.skip(message, allow_module_level=True)


ENV = _podman_env()


# ---- helpers ----------------------------------------------------------------------------------


def run(args: list[str], timeout: float = 120, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(args, env=kwargs.pop("env", ENV), capture_output=True, text=True, check=False,
                                timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"timed out after {timeout:.0f} s: {' '.join(args)}\n{exc.stdout or ''}{exc.stderr or ''}")
    if check and result.returncode != 0:
        pytest.fail(f"exit {result.returncode}: {' '.join(args)}\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return result


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    return run(["podman", *args], timeout=timeout, check=check)


def compose_cli() -> list[str]:
    local = Path(sys.executable).parent / "podman-compose"
    if local.exists():
        return [str(local)]
    if shutil.which("podman-compose"):
        return ["podman-compose"]
    pytest.fail("podman-compose is not installed: install the test extra (pip install -e '.[test]')")


def compose(file: Path, profile: str, project: str, *args: str, env: dict[str, str], timeout: float = UP_TIMEOUT,
            check: bool = True) -> subprocess.CompletedProcess:
    return run([*compose_cli(), "-p", project, "-f", str(file), "--profile", profile, *args],
               env={**ENV, **env}, timeout=timeout, check=check, cwd=ROOT)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def state_lock() -> Iterator[None]:
    """Serialise base-image and image builds between concurrent test runs (the tags are shared)."""
    STATE.mkdir(parents=True, exist_ok=True)
    with open(STATE / "lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def image_exists(tag: str) -> bool:
    return podman("image", "exists", tag, check=False).returncode == 0


def image_id(tag: str) -> str | None:
    result = podman("image", "inspect", "--format", "{{.Id}}", tag, check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def inspect(name: str) -> dict:
    return json.loads(podman("inspect", name).stdout)[0]


def logs(name: str) -> str:
    result = podman("logs", name, check=False)
    return result.stdout + result.stderr


def state(name: str) -> dict:
    result = podman("inspect", "--format", "{{json .State}}|{{.RestartCount}}", name, check=False)
    if result.returncode != 0:
        return {"Status": "missing", "ExitCode": None, "RestartCount": 0}
    raw, _, restarts = result.stdout.strip().rpartition("|")
    data = json.loads(raw)
    data["RestartCount"] = int(restarts or 0)
    return data


def wait_healthy(name: str, timeout: float = HEALTH_TIMEOUT) -> float:
    """Poll `podman healthcheck run` (nothing runs health checks here without systemd) until the
    container is healthy; fail at once with its log if it exits. Returns the seconds waited."""
    start = time.monotonic()
    while True:
        if podman("healthcheck", "run", name, check=False, timeout=30).returncode == 0:
            return time.monotonic() - start
        current = state(name)
        if current["Status"] not in ("running", "created", "configured", "initialized"):
            pytest.fail(f"{name} is {current['Status']} (exit code {current.get('ExitCode')}) instead of healthy:\n"
                        f"{logs(name)[-4000:]}")
        if time.monotonic() - start > timeout:
            pytest.fail(f"{name} not healthy after {timeout:.0f} s:\n{logs(name)[-4000:]}")
        time.sleep(0.5)


def compose_containers(project: str, service: str) -> list[str]:
    """The names of a compose service's containers (one per replica), sorted."""
    result = podman("ps", "-a", "--filter", f"label=com.docker.compose.project={project}",
                    "--filter", f"label=com.docker.compose.service={service}", "--format", "{{.Names}}")
    return sorted(result.stdout.split())


def compose_container(project: str, service: str) -> str:
    names = compose_containers(project, service)
    assert len(names) == 1, f"expected one container of {service} in {project}, got {names}"
    return names[0]


def _debian_mirror() -> str:
    if os.environ.get("DEBIAN_MIRROR"):
        return os.environ["DEBIAN_MIRROR"]
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for source in sources:
        with contextlib.suppress(OSError):
            for uri in re.findall(r"(?:^URIs:\s*|^deb\s+(?:\[[^\]]*\]\s+)?)(\S+)", source.read_text(), re.MULTILINE):
                if "debian" in uri and "security" not in uri:
                    return uri
    return "http://deb.debian.org/debian"


def _build_debian_base() -> None:
    if not shutil.which("debootstrap"):
        pytest.fail("debootstrap is needed to make the local base image (apt-get install debootstrap)")
    STATE.mkdir(parents=True, exist_ok=True)
    rootfs = Path(tempfile.mkdtemp(prefix="rootfs-", dir=STATE))
    try:
        run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), _debian_mirror()], timeout=420)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / junk).glob("*"):
                if path.is_file():
                    path.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(["podman", "import", "--change", 'CMD ["/bin/bash"]', "-", BASE_TAG],
                                  stdin=tar.stdout, env=ENV, capture_output=True, text=True, check=False, timeout=300)
        tar.stdout.close()
        tar.wait(timeout=60)
        assert imported.returncode == 0, imported.stderr
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)


def build_args_for_pip() -> list[str]:
    if HOST_CA.is_file():
        return ["-v", f"{HOST_CA}:/run/host-ca.crt:ro", "--build-arg", "PIP_CERT=/run/host-ca.crt"]
    return []


def ensure_bases() -> dict[str, str]:
    """Make (once; cached by tag) and return the local base images: {"gpu": Debian without Python, the
    stand-in for ./Dockerfile's CUDA base and the balancer's Debian base; "cpu": Debian with Python,
    the stand-in for docker/Dockerfile.cpu's python:*-slim}."""
    containerfile = PYTHON_BASE_CONTAINERFILE.format(base=BASE_TAG)
    python_tag = f"localhost/captioner-ci-python:bookworm-{hashlib.sha256(containerfile.encode()).hexdigest()[:10]}"
    with state_lock():
        if not image_exists(BASE_TAG):
            started = time.monotonic()
            _build_debian_base()
            seconds = time.monotonic() - started
            print(f"\n[containers] made {BASE_TAG} with debootstrap in {seconds:.0f} s (cached by tag)")
        if not image_exists(python_tag):
            started = time.monotonic()
            with tempfile.TemporaryDirectory(dir=STATE) as context:
                (Path(context) / "Containerfile").write_text(containerfile)
                podman("build", "--format", "docker", "-t", python_tag, context, timeout=300)
            print(f"\n[containers] made {python_tag} in {time.monotonic() - started:.0f} s (cached by tag)")
    return {"gpu": BASE_TAG, "cpu": python_tag}


# ---- the images -------------------------------------------------------------------------------


def make_container_bundle(path: Path) -> Path:
    """A tiny real bundle (model_export/tiny_bundle.py) readable by the services' users."""
    from model_export.tiny_bundle import make_tiny_bundle

    path = make_tiny_bundle(path)
    path.chmod(0o755)
    for file in path.iterdir():
        file.chmod(0o644)
    return path


def stage_context(bundle: Path, target: Path) -> Path:
    """The build context: what the repository's context holds for the images (the .dockerignore
    allow-list), plus model_export/ and tests/ to show that they never get in, and the tiny bundle
    as models/default."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, target / name)
    for name in ("app", "captioner", "docker", "model_export", "tests"):
        shutil.copytree(ROOT / name, target / name, ignore=ignore)
    shutil.copytree(bundle, target / "models" / "default")
    return target


def build_images(bases: dict[str, str], context: Path, variants: tuple[str, ...],
                 failed: dict[str, str] | None = None) -> dict[str, str]:
    """Build the variants' images (in parallel) from the staged context; {variant: tag}. A failed
    build fails the test, or with `failed` given, is left out of the answer and its output put there."""
    tags = {variant: f"{IMAGE_REPO}:{variant}" for variant in variants}

    def build(variant: str) -> tuple[str, subprocess.CompletedProcess, float]:
        dockerfile, base = DOCKERFILES[variant]
        started = time.monotonic()
        result = subprocess.run(
            ["podman", "build", "--format", "docker", "--layers", "-f", str(context / dockerfile),
             "--build-arg", f"BASE={bases[base]}", "--build-arg", "VERSION=0.1.0-test", *build_args_for_pip(),
             "-t", tags[variant], str(context)],
            env=ENV, capture_output=True, text=True, check=False, timeout=BUILD_TIMEOUT)
        return variant, result, time.monotonic() - started

    with state_lock():
        old = {variant: image_id(tag) for variant, tag in tags.items()}
        with ThreadPoolExecutor(max_workers=2) as pool:
            results = list(pool.map(build, variants))
        for variant, result, seconds in results:
            if result.returncode != 0:
                message = f"building the {variant} image failed:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
                assert failed is not None, message
                failed[variant] = message
                del tags[variant]
                continue
            print(f"\n[containers] built {tags[variant]} in {seconds:.0f} s")
        for variant, tag in tags.items():
            # Drop the image this build replaced (its layers stay as long as the new one uses them).
            if old[variant] and old[variant] != image_id(tag):
                podman("rmi", old[variant], check=False)
    return tags


class SessionImages:
    """The images of one test session (the ``container_images`` fixture): every variant built at
    most once, all from one staged build context that holds a tiny bundle as models/default.

    `wanted` is every variant the session will ask for (the modules' IMAGE_VARIANTS): the first
    `get()` builds them all at once, in parallel, so no module waits for a second build."""

    def __init__(self, root: Path, wanted: tuple[str, ...] = ()):
        self.root, self.wanted = root, tuple(v for v in DOCKERFILES if v in wanted)
        self._bases: dict[str, str] | None = None
        self._context: Path | None = None
        self.tags: dict[str, str] = {}
        self.failed: dict[str, str] = {}   # variant: the failed build's output (fails only who asks for it)
        self.builds = 0   # how many times build_images ran this session

    def bases(self) -> dict[str, str]:
        if self._bases is None:
            self._bases = ensure_bases()
        return self._bases

    def context(self) -> Path:
        if self._context is None:
            bundle = make_container_bundle(self.root / "bundle")
            self._context = stage_context(bundle, Path(tempfile.mkdtemp(prefix="context-", dir=self.root)))
        return self._context

    def get(self, *variants: str) -> dict[str, str]:
        """{variant: tag} for these variants, building those not built yet this session."""
        unknown = set(variants) - set(DOCKERFILES)
        assert not unknown, f"no such image variant: {unknown} (known: {list(DOCKERFILES)})"
        missing = tuple(dict.fromkeys(v for v in (*variants, *self.wanted) if v not in self.tags
                                      and v not in self.failed))
        if missing:
            self.tags.update(build_images(self.bases(), self.context(), missing, failed=self.failed))
            self.builds += 1
        for variant in variants:
            if variant in self.failed:
                pytest.fail(self.failed[variant], pytrace=False)
        return {variant: self.tags[variant] for variant in variants}
