"""The container images and the compose deployment, built and run for real with podman.

What runs (about 1 minute warm, 3 to 4 cold, on 2 cores):

* A local base image, since no registry may be reachable: `debootstrap` Debian 12 imported into
  podman (`localhost/captioner-ci-base:bookworm`, stands in for the CUDA base of ./Dockerfile) and
  that plus Python from apt (`localhost/captioner-ci-python:bookworm-*`, stands in for
  python:*-slim in docker/Dockerfile.cpu). Both are cached by tag in podman's store.
* Both images built with `--build-arg BASE=...` from a staged copy of the build context that holds a
  tiny bundle (model_export/tiny_bundle.py) as models/default, so the tests never wait for the real
  model; podman's layer cache makes rebuilds take seconds. They are built once per session (the
  `container_images` fixture, tests/conftest.py), together with tests/test_replicas.py's images.
* The images hold no torch and no model_export; their sizes are printed (and written into
  docs/containers.md with UPDATE_CONTAINER_DOCS=1).
* docker-compose.yml brought up with podman-compose, `cpu` profile, with a health check poll, an
  image and a batch captioned through the published port on 127.0.0.1, the service checked to run as
  non-root PID 1 on a read-only root, and a SIGTERM stop; the GPU image run with device=auto on this
  GPU-less machine, serving on CPU with a warning; bad input (missing / empty / unreadable bundle
  volume, a wrong CAPTIONER_DEVICE, device=cuda without CUDA) failing with a clear message and a
  non-zero status after a bounded number of restarts.
* The CPU image with CAPTIONER_WORKERS=2 on a read-only root: the supervisor as PID 1, both workers
  answering, /metrics counting both, a SIGTERM stop with status 0 (docs/scale.md).

The module skips only where podman cannot run at all, and says so loudly; with
REQUIRE_CONTAINER_TESTS=1 or CI=true in the environment it fails instead. Where a TLS-intercepting proxy is in
the way, the host's CA bundle is bind-mounted into the builds for pip (PIP_CERT).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.podman import require_podman

require_podman("the images and docker-compose.yml are")

import httpx  # noqa: E402  (after the module-level skip: only a machine that runs containers needs them)
from PIL import Image  # noqa: E402

from tests.support.podman import (  # noqa: E402
    ROOT,
    compose_container,
    free_port,
    inspect,
    logs,
    make_container_bundle,
    podman,
    state,
    wait_healthy,
)
from tests.support.podman import compose as podman_compose  # noqa: E402

pytestmark = pytest.mark.slow
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCS = ROOT / "docs" / "containers.md"
SERVICE_UID = 10001
UP_TIMEOUT = 120
IMAGE_VARIANTS = ("gpu", "cpu")   # built once per session by the container_images fixture (tests/conftest.py)


# ---- helpers ----------------------------------------------------------------------------------


def compose(project: str, *args: str, env: dict[str, str], timeout: float = UP_TIMEOUT,
            check: bool = True) -> subprocess.CompletedProcess:
    return podman_compose(COMPOSE_FILE, "cpu", project, *args, env=env, timeout=timeout, check=check)


def image_bytes(array, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **save)
    return buffer.getvalue()


def real_images() -> dict[str, tuple[bytes, str]]:
    import skimage.data

    return {
        "chelsea.jpg": (image_bytes(skimage.data.chelsea(), "JPEG", quality=90), "image/jpeg"),
        "astronaut.png": (image_bytes(skimage.data.astronaut(), "PNG"), "image/png"),
        "coffee.jpg": (image_bytes(skimage.data.coffee(), "JPEG", quality=85), "image/jpeg"),
    }


def human(size: int) -> str:
    return f"{size / 1e6:,.0f} MB"


# ---- the images -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bases(container_images) -> dict[str, str]:
    return container_images.bases()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A tiny real bundle, readable by the service's uid in the containers (mounted as a volume)."""
    return make_container_bundle(tmp_path_factory.mktemp("container-bundle") / "bundle")


@pytest.fixture(scope="module")
def images(container_images) -> dict[str, str]:
    """{"gpu": tag, "cpu": tag}: the session's images (built once, in parallel, with the replicas' ones)."""
    return container_images.get(*IMAGE_VARIANTS)


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_image_holds_no_torch_and_no_training_code(images, variant):
    probe = r"""
import importlib.metadata as md, importlib.util as u, json, os
found = []
for top in ("/opt", "/usr", "/srv", "/app", "/home", "/models", "/tmp", "/root"):
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            if name in ("torch", "model_export", "torchvision") or name.endswith((".pt", ".ckpt")):
                found.append(os.path.join(dirpath, name))
print(json.dumps({
    "specs": {m: u.find_spec(m) is not None for m in ("torch", "model_export", "app", "captioner", "onnxruntime")},
    "dists": sorted(d.metadata["Name"].lower() for d in md.distributions()),
    "found": found,
}))
"""
    out = podman("run", "--rm", "--entrypoint", "python", images[variant], "-c", probe).stdout
    info = json.loads(out.strip().splitlines()[-1])
    assert info["specs"] == {"torch": False, "model_export": False, "app": True, "captioner": True,
                             "onnxruntime": True}, info["specs"]
    assert info["found"] == [], f"training code or torch files in the image: {info['found']}"
    dists = set(info["dists"])
    assert not {d for d in dists if d.startswith(("torch", "nvidia-", "efficientnet"))}, dists
    assert "captioner" in dists
    if variant == "gpu":
        assert "onnxruntime-gpu" in dists and "onnxruntime" not in dists, dists
    else:
        assert "onnxruntime" in dists and "onnxruntime-gpu" not in dists, dists
    # The project CLI works without the training side (it imports model_export lazily).
    help_text = podman("run", "--rm", "--entrypoint", "captioner", images[variant], "--help").stdout
    assert "Usage" in help_text


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_image_configuration(images, variant):
    image = inspect(images[variant])
    config = image["Config"]
    user = config["User"]
    assert user and user.split(":")[0] not in ("", "0", "root"), f"the image runs as {user!r}"
    assert config["Entrypoint"][-1].endswith("entrypoint.sh")
    assert config["Cmd"] == ["python", "-m", "app.cli", "serve"], "exec-form command"
    assert "8000/tcp" in config["ExposedPorts"]
    health = config.get("Healthcheck") or image.get("Healthcheck") or {}  # podman: top level; docker: Config
    assert health.get("Test", [None])[0] == "CMD" and "healthcheck.py" in " ".join(health["Test"]), \
        "HEALTHCHECK missing (build with --format docker)"
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["CAPTIONER_HOST"] == "0.0.0.0" and env["CAPTIONER_BUNDLE"] == "/models/default"
    labels = config["Labels"]
    for key in ("title", "description", "version", "licenses", "base.name"):
        assert labels.get(f"org.opencontainers.image.{key}"), f"OCI label {key} missing"
    assert labels["org.opencontainers.image.version"] == "0.1.0-test"


def _write_sizes_into_docs(rows: list[tuple[str, str, int, int]]) -> None:
    begin, end = "<!-- image-sizes:begin -->", "<!-- image-sizes:end -->"
    text = DOCS.read_text()
    table = ["| image | base used in the test | size | base | added by the Dockerfile |", "|---|---|---|---|---|"]
    for variant, base, size, base_size in rows:
        table.append(f"| {variant} | `{base}` | {human(size)} | {human(base_size)} | {human(size - base_size)} |")
    block = begin + "\n" + "\n".join(table) + "\n" + end
    assert begin in text and end in text, f"{DOCS} has no {begin} ... {end} block"
    DOCS.write_text(re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.DOTALL))


def test_report_image_sizes(images, bases):
    rows = []
    for variant in ("gpu", "cpu"):
        size = inspect(images[variant])["Size"]
        base_size = inspect(bases[variant])["Size"]
        rows.append((variant, bases[variant], size, base_size))
        print(f"\n[containers] {variant} image {images[variant]}: {human(size)} "
              f"(base {bases[variant]}: {human(base_size)}; added by the Dockerfile: {human(size - base_size)})")
        assert size - base_size < 1.5e9, "the serving layers should stay well under 1.5 GB"
    report = ROOT / "work" / "containers" / "image-sizes.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps([{"image": v, "base": b, "bytes": s, "base_bytes": bs} for v, b, s, bs in rows],
                                 indent=2) + "\n")
    if os.environ.get("UPDATE_CONTAINER_DOCS") == "1":
        _write_sizes_into_docs(rows)


# ---- the compose deployment -------------------------------------------------------------------


class Deployment:
    def __init__(self, project: str, env: dict[str, str], container: str, url: str):
        self.project, self.env, self.container, self.url = project, env, container, url


def _compose_env(images: dict[str, str], bundle_dir: Path | str, port: int, **settings: str) -> dict[str, str]:
    return {"CAPTIONER_IMAGE": images["gpu"], "CAPTIONER_CPU_IMAGE": images["cpu"],
            "CAPTIONER_BUNDLE_DIR": str(bundle_dir), "CAPTIONER_PUBLISH": f"127.0.0.1:{port}", **settings}


def _down(project: str, env: dict[str, str]) -> None:
    compose(project, "down", "-t", "5", env=env, check=False, timeout=120)
    podman("pod", "rm", "-f", f"pod_{project}", check=False)


@pytest.fixture(scope="module")
def deployment(images, bundle) -> Iterator[Deployment]:
    """docker-compose.yml's CPU service brought up with podman-compose; `down` afterwards."""
    project = f"captest{os.getpid()}"
    port = free_port()
    env = _compose_env(images, bundle, port, CAPTIONER_THREADS="1")
    try:
        started = time.monotonic()
        compose(project, "up", "-d", "--no-build", "captioner-cpu", env=env)
        container = compose_container(project, "captioner-cpu")
        waited = wait_healthy(container)
        print(f"\n[containers] compose up -> healthy in {time.monotonic() - started:.1f} s "
              f"(health polled for {waited:.1f} s)")
        yield Deployment(project, env, container, f"http://127.0.0.1:{port}")
    finally:
        _down(project, env)
        remaining = podman("ps", "-a", "--filter", f"label=com.docker.compose.project={project}",
                           "--format", "{{.Names}}", check=False).stdout.split()
        assert remaining == [], f"`down` left containers behind: {remaining}"


@pytest.fixture(scope="module")
def gpu_container(images) -> Iterator[Deployment]:
    """The GPU image on this machine (no GPU, no CUDA libraries) with CAPTIONER_DEVICE=auto and its
    baked-in bundle, hardened as in docker-compose.yml."""
    name = f"captest{os.getpid()}-gpu-auto"
    try:
        url = run_hardened(name, images["gpu"], {"CAPTIONER_DEVICE": "auto", "CAPTIONER_THREADS": "1"})
        yield Deployment("", {}, name, url)
    finally:
        podman("rm", "-f", "-t", "5", name, check=False)


def run_hardened(name: str, image: str, env: dict[str, str]) -> str:
    """Start `image` detached as container `name` with `env`, hardened as docker-compose.yml runs it (read-only
    root, /tmp a tmpfs, no capabilities, no new privileges), on a free local port; wait until it is healthy and
    return its URL. (A container of that name left by an earlier run is removed first.)"""
    port = free_port()
    podman("rm", "-f", name, check=False)
    podman("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000", "--read-only", "--tmpfs", "/tmp",
           "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
           *(arg for key, value in env.items() for arg in ("-e", f"{key}={value}")), image)
    wait_healthy(name)
    return f"http://127.0.0.1:{port}"


def _caption_one_and_a_batch(url: str) -> tuple[dict, dict]:
    pictures = real_images()
    with httpx.Client(base_url=url, timeout=60) as client:
        name, (data, mime) = next(iter(pictures.items()))
        one = client.post("/v1/captions", files={"image": (name, data, mime)})
        assert one.status_code == 200, one.text
        batch = client.post("/v1/captions/batch",
                            files=[("images", (n, d, m)) for n, (d, m) in pictures.items()])
        assert batch.status_code == 200, batch.text
    one_body, batch_body = one.json(), batch.json()
    assert one_body["captions"] and one_body["captions"][0]["text"].strip()
    results = batch_body["results"]
    assert [r["index"] for r in results] == [0, 1, 2]
    assert all(r["captions"] and r["captions"][0]["text"].strip() and not r.get("error") for r in results), results
    return one_body, batch_body


def test_compose_deployment_serves_on_the_published_port(deployment):
    with httpx.Client(base_url=deployment.url, timeout=30) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        model = client.get("/v1/model").json()
        assert (model["provider"], model["device"]) == ("CPUExecutionProvider", "cpu")
        assert model["name"] == "tiny-sat", "the mounted bundle is served"
        metrics = client.get("/metrics")
        assert metrics.status_code == 200 and "captioner_ready 1.0" in metrics.text
    one, batch = _caption_one_and_a_batch(deployment.url)
    print(f"\n[containers] compose (cpu) captioned chelsea.jpg: {one['captions'][0]['text']!r}; "
          f"batch of {len(batch['results'])} in {batch['timings_ms']['total']:.0f} ms")
    assert inspect(deployment.container)["State"]["Health"]["Status"] == "healthy"


def test_service_runs_as_non_root_pid_1_on_a_read_only_root(deployment):
    probe = podman("exec", deployment.container, "sh", "-c",
                   "grep -E '^(Uid|Gid):' /proc/1/status; tr '\\0' ' ' < /proc/1/cmdline; echo; "
                   "touch /opt/venv/probe 2>&1 || echo read-only; touch /tmp/probe && echo tmp-writable").stdout
    uids = re.search(r"^Uid:\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", probe, re.MULTILINE)
    assert uids and {int(u) for u in uids.groups()} == {SERVICE_UID}, probe
    assert "python -m app.cli serve" in probe, f"the service is not PID 1 (exec-form): {probe}"
    assert "read-only" in probe and "tmp-writable" in probe, probe
    config = inspect(deployment.container)["HostConfig"]
    assert config["ReadonlyRootfs"] is True
    assert config["RestartPolicy"]["Name"] == "on-failure" and config["RestartPolicy"]["MaximumRetryCount"] == 3


def test_compose_sets_and_passes_through_the_settings(deployment):
    env = dict(item.split("=", 1) for item in inspect(deployment.container)["Config"]["Env"])
    assert env["CAPTIONER_BUNDLE"] == "/models/default" and env["CAPTIONER_HOST"] == "0.0.0.0"
    assert env["CAPTIONER_DEVICE"] == "cpu", "the CPU service defaults to device=cpu"
    assert env["CAPTIONER_THREADS"] == "1", "a CAPTIONER_* setting set for compose reaches the service"
    assert "CAPTIONER_LOG_LEVEL" not in env, "an unset setting stays unset (the service's default)"
    mounts = {m["Destination"]: m for m in inspect(deployment.container)["Mounts"]}
    assert mounts["/models/default"]["Source"] == deployment.env["CAPTIONER_BUNDLE_DIR"]
    assert mounts["/models/default"]["RW"] is False


def test_gpu_image_with_device_auto_serves_on_cpu_with_a_warning(gpu_container):
    with httpx.Client(base_url=gpu_container.url, timeout=30) as client:
        model = client.get("/v1/model").json()
    assert (model["provider"], model["device"]) == ("CPUExecutionProvider", "cpu")
    one, _ = _caption_one_and_a_batch(gpu_container.url)
    print(f"\n[containers] GPU image, no GPU, device=auto: {one['captions'][0]['text']!r} on {model['provider']}")
    warnings_logged = [json.loads(line) for line in logs(gpu_container.container).splitlines()
                       if line.startswith("{") and '"warning"' in line]
    assert any("CUDAExecutionProvider" in w["msg"] and "CPU" in w["msg"] for w in warnings_logged), \
        logs(gpu_container.container)[-3000:]
    uid = podman("exec", gpu_container.container, "sh", "-c", "grep '^Uid:' /proc/1/status").stdout.split()[1]
    assert int(uid) == SERVICE_UID


def test_sigterm_stops_the_service_gracefully(deployment, gpu_container):
    # Last of the deployment tests: it stops the containers.
    for name in (deployment.container, gpu_container.container):
        started = time.monotonic()
        stopped = podman("stop", "-t", "20", name, timeout=60)
        seconds = time.monotonic() - started
        final = state(name)
        # Had SIGTERM not reached the service, podman would have waited out -t 20 and sent SIGKILL
        # (exit 137, and a warning that it did): exit 0 and the service's own shutdown lines say it did.
        assert final["ExitCode"] == 0, f"{name} exited {final['ExitCode']} on SIGTERM:\n{logs(name)[-2000:]}"
        assert "SIGKILL" not in stopped.stdout + stopped.stderr, stopped.stderr
        assert "Shutting down" in logs(name) or "Finished server process" in logs(name)
        print(f"\n[containers] {name} stopped on SIGTERM in {seconds:.1f} s (measured, not asserted)")


def test_the_cpu_image_runs_several_workers(images):
    """CAPTIONER_WORKERS=2 in the hardened container (docs/scale.md): the supervisor is PID 1 as the
    service's user, its control and metrics folder on the /tmp tmpfs of a read-only root; both workers
    answer, /metrics from either counts every request, and SIGTERM stops it all with status 0."""
    name = f"captest{os.getpid()}-workers"
    try:
        url = run_hardened(name, images["cpu"], {"CAPTIONER_WORKERS": "2", "CAPTIONER_THREADS": "1"})

        def records() -> list[dict]:
            return [json.loads(line) for line in logs(name).splitlines() if line.startswith("{")]

        deadline = time.monotonic() + UP_TIMEOUT
        while len({r["pid"] for r in records() if r["msg"] == "ready"}) < 2:
            assert time.monotonic() < deadline, logs(name)[-3000:]
            time.sleep(0.5)
        workers = {r["pid"] for r in records() if r["msg"] == "ready"}
        probe = podman("exec", name, "sh", "-c", "grep -E '^Uid:' /proc/1/status; tr '\\0' ' ' < /proc/1/cmdline").stdout
        assert "python -m app.cli serve" in probe and str(SERVICE_UID) in probe, probe
        sent = 0
        fresh = httpx.Limits(max_keepalive_connections=0)  # a connection per request: they spread over the workers
        with httpx.Client(base_url=url, timeout=30, limits=fresh) as client:
            while {r["pid"] for r in records() if r.get("route") == "/healthz"} != workers:
                assert sent < 400, "the requests did not reach both workers"
                for _ in range(10):
                    assert client.get("/healthz").status_code == 200
                sent += 10
            metrics = client.get("/metrics").text
        assert f'captioner_http_requests_total{{method="GET",route="/healthz",status="200"}} {sent:.1f}' in metrics
        assert "captioner_ready 1.0" in metrics
        stopped = podman("stop", "-t", "30", name, timeout=60)
        assert state(name)["ExitCode"] == 0, logs(name)[-3000:]
        assert "SIGKILL" not in stopped.stdout + stopped.stderr
        assert {r["pid"] for r in records() if r["msg"].startswith("Finished server process")} == workers
    finally:
        podman("rm", "-f", "-t", "5", name, check=False)


# ---- bad input --------------------------------------------------------------------------------


def _unreadable_bundle(bundle: Path, root: Path) -> Path:
    path = root / "unreadable"
    shutil.copytree(bundle, path)
    path.chmod(0o700)  # owned by root here, so the service's uid 10001 cannot list it
    return path


BAD_INPUTS = {
    # case: (bundle dir maker, extra settings, image variant, expected exit status, expected message)
    "empty-bundle-volume": (lambda bundle, root: root, {}, "cpu", 3, "is an empty folder"),
    "unreadable-bundle": (_unreadable_bundle, {}, "cpu", 3, "is not readable"),
    "wrong-device-value": (lambda bundle, root: bundle, {"CAPTIONER_DEVICE": "gpu0"}, "cpu", 2,
                           "CAPTIONER_DEVICE: Input should be 'auto', 'cuda' or 'cpu'"),
    "device-cuda-without-cuda": (lambda bundle, root: bundle, {"CAPTIONER_DEVICE": "cuda"}, "gpu", 3,
                                 "device=cuda but onnxruntime could not load CUDAExecutionProvider"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_stops_the_container_with_a_clear_message(case, images, bundle, tmp_path):
    make_dir, settings, variant, status, message = BAD_INPUTS[case]
    empty = tmp_path / "empty"
    empty.mkdir()
    empty.chmod(0o755)
    bundle_dir = make_dir(bundle, empty)
    project = f"captest{os.getpid()}{case.replace('-', '')}"
    # The variant's image runs in the compose file's no-GPU service.
    env = _compose_env({**images, "cpu": images[variant]}, bundle_dir, free_port(), **settings)
    try:
        compose(project, "up", "-d", "--no-build", "captioner-cpu", env=env)
        container = compose_container(project, "captioner-cpu")
        deadline = time.monotonic() + 90
        while True:
            current = state(container)
            if current["Status"] == "exited" and current["RestartCount"] >= 3:
                break
            assert time.monotonic() < deadline, f"{case}: still {current} after 90 s:\n{logs(container)[-3000:]}"
            time.sleep(0.5)
        time.sleep(2)
        final = state(container)
        assert final["Status"] == "exited" and final["RestartCount"] == 3, f"restart loop: {final}"
        assert final["ExitCode"] == status, f"{case}: exit {final['ExitCode']}\n{logs(container)[-3000:]}"
        shown = compose(project, "logs", "captioner-cpu", env=env, check=False)
        shown_text = shown.stdout + shown.stderr
        assert message in shown_text, f"{case}: `compose logs` lacks {message!r}:\n{shown_text[-3000:]}"
        listed = compose(project, "ps", env=env, check=False).stdout
        assert f"Exited ({status})" in listed, listed
        print(f"\n[containers] {case}: exit {status} after {final['RestartCount']} restarts: "
              f"{next(line for line in logs(container).splitlines() if message in line).strip()[:160]}")
    finally:
        _down(project, env)


def test_missing_bundle_volume_is_refused_by_compose(images, tmp_path):
    missing = tmp_path / "no-such-bundle"
    project = f"captest{os.getpid()}missing"
    env = _compose_env(images, missing, free_port())
    try:
        result = compose(project, "up", "-d", "--no-build", "captioner-cpu", env=env, check=False)
        output = result.stdout + result.stderr
        assert result.returncode != 0, output
        assert "bind source path does not exist" in output and str(missing) in output, output[-3000:]
        assert not missing.exists(), "compose must not create the missing bundle folder"
    finally:
        _down(project, env)
