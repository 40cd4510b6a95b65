"""Serving from a model repository (app/serving/registry.py): `?model=`, `GET /v1/models`, and swapping versions
with no downtime (`POST /v1/models/{name}/load`, `.../rollback`), against a real uvicorn on 127.0.0.1.

The repository holds tiny bundles (model_export/tiny_bundle.py) of one name in two good versions
with different weights (so their captions differ), one with a flipped byte (sha256 mismatch) and one
whose recorded reference captions are wrong (parity mismatch), plus a second name.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.api.pipeline import prepare
from app.inference.bundle import load_bundle
from app.inference.decoding import DecodingConfig
from app.inference.engine import Engine
from model_export.tiny_bundle import make_tiny_bundle
from tests.support.error_bodies import assert_no_server_paths
from tests.support.live_server import REPO, LiveServer, free_port, image_bytes, service_env

ADMIN = "admin-key-0123456789abcdef"
API = "api-key-0123456789abcdef"
NAME = "tiny"
V1, V2 = "1.0.0", "2.0.0"
CORRUPT, WRONG_PARITY, NO_REFERENCE = "9.0.0", "8.0.0", "7.0.0"
GREEDY = {"strategy": "greedy"}
STATS: dict[str, float] = {}


def _images() -> list[bytes]:
    rng = np.random.default_rng(42)
    return [image_bytes(rng.integers(0, 256, (64 + 8 * i, 80, 3), dtype=np.uint8), "PNG") for i in range(4)]


IMAGES = _images()


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def build_repository(root: Path) -> Path:
    """The test repository (the module docstring) at `root`; tests/test_workers.py serves it too."""
    make_tiny_bundle(root / NAME / V1, seed=0, name=NAME, version=V1, reference=True)
    make_tiny_bundle(root / NAME / V2, seed=1, name=NAME, version=V2, reference=True)
    make_tiny_bundle(root / NAME / NO_REFERENCE, seed=4, name=NAME, version=NO_REFERENCE)
    corrupt = make_tiny_bundle(root / NAME / CORRUPT, seed=2, name=NAME, version=CORRUPT, reference=True)
    _flip_byte(corrupt / "encoder.onnx")
    wrong = make_tiny_bundle(root / NAME / WRONG_PARITY, seed=3, name=NAME, version=WRONG_PARITY, reference=True)
    manifest = json.loads((wrong / "manifest.json").read_text())
    manifest["parity"]["reference"][0]["tokens"] = ["a", "purple", "elephant"]
    (wrong / "manifest.json").write_text(json.dumps(manifest, indent=2))
    make_tiny_bundle(root / "other" / "0.1.0", attention=False, seed=5, name="other", version="0.1.0")
    return root


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    return build_repository(tmp_path_factory.mktemp("repository"))


@pytest.fixture(scope="module")
def expected(repository) -> dict[str, list[str]]:
    """Per version, the greedy caption of each test image, computed in-process on that bundle."""
    out = {}
    for version in (V1, V2):
        bundle = load_bundle(repository / NAME / version)
        engine = Engine(bundle, "cpu", threads=1)
        arrays = [prepare(data, 40_000_000, bundle.preprocessing).array for data in IMAGES]
        results = engine.run(arrays, DecodingConfig(strategy="greedy", beam_size=1))
        out[version] = [r.captions[0].text for r in results]
    assert out[V1] != out[V2], "the two versions must caption the test images differently"
    return out


@pytest.fixture(scope="module")
def server(start_server, repository) -> LiveServer:
    return start_server(repository, log_name="repository", model_repository=repository,
                        default_model=f"{NAME}:{V1}", admin_api_keys=ADMIN, api_keys=API)


def _auth(key: str = API) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _caption(client: httpx.Client, index: int, **params) -> httpx.Response:
    return client.post("/v1/captions", params={**GREEDY, **params}, headers=_auth(),
                       files={"image": (f"{index}.png", IMAGES[index], "image/png")})


def test_default_model_answers_and_names_itself(server, expected):
    with server.client() as c:
        r = _caption(c, 0)
        assert r.status_code == 200, r.text
        assert r.headers["X-Model-Version"] == f"{NAME}:{V1}"
        assert r.json()["model"] == {"name": NAME, "version": V1}
        assert r.json()["captions"][0]["text"] == expected[V1][0]
        other = _caption(c, 0, model="other")
        assert other.status_code == 200, other.text
        assert other.headers["X-Model-Version"] == "other:0.1.0"
        pinned = _caption(c, 1, model=f"{NAME}:{V1}")
        assert pinned.status_code == 200 and pinned.json()["captions"][0]["text"] == expected[V1][1]
        info = c.get("/v1/model", params={"model": "other"}, headers=_auth())
        assert info.status_code == 200 and info.json()["name"] == "other"


def test_unknown_model_is_404_listing_the_loaded_ones(server):
    with server.client() as c:
        for spec in ("nope", f"{NAME}:5.0.0", f"{NAME}:{V2}"):  # V2 is in the repository but not loaded
            r = _caption(c, 0, model=spec)
            assert r.status_code == 404, r.text
            error = r.json()["error"]
            assert error["code"] == "model_not_found"
            assert f"{NAME}:{V1}" in error["message"] and "other:0.1.0" in error["message"]
            assert {d["msg"] for d in error["details"]} == {f"{NAME}:{V1}", "other:0.1.0"}
        bad = _caption(c, 0, model="../etc")
        assert bad.status_code == 422


def test_models_lists_what_is_loaded(server):
    with server.client() as c:
        r = c.get("/v1/models", headers=_auth())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["default"] == NAME
    loaded = {m["name"]: m for m in body["loaded"]}
    assert loaded[NAME]["version"] == V1 and loaded[NAME]["default"] is True
    assert loaded[NAME]["provider"] == "CPUExecutionProvider" and loaded[NAME]["memory_bytes"] > 0
    assert {ch["name"]: ch["passed"] for ch in loaded[NAME]["checks"]} == {
        "sha256": True, "warmup": True, "smoke": True, "parity": True}
    assert {ch["name"]: ch["passed"] for ch in loaded["other"]["checks"]}["parity"] is None  # no reference: skipped
    repo = {m["name"]: m for m in body["repository"]}
    assert repo[NAME]["versions"] == [V1, V2, NO_REFERENCE, WRONG_PARITY, CORRUPT]
    assert repo[NAME]["active"] == V1


def test_admin_routes_need_an_admin_key(server):
    with server.client() as c:
        for headers in ({}, _auth(), _auth("wrong-key-0123456789abcdef")):
            r = c.post(f"/v1/models/{NAME}/load", json={"version": V2}, headers=headers)
            assert r.status_code == 401, r.text
            assert r.json()["error"]["code"] == "unauthorized"
        assert c.post(f"/v1/models/{NAME}/rollback", headers=_auth()).status_code == 401
        missing = c.post(f"/v1/models/{NAME}/load", json={"version": "5.0.0"}, headers=_auth(ADMIN))
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
        nobody = c.post(f"/v1/models/{NAME}/load", json={}, headers=_auth(ADMIN))
        assert nobody.status_code == 422
        nothing = c.post(f"/v1/models/{NAME}/rollback", headers=_auth(ADMIN))
        assert nothing.status_code == 409 and nothing.json()["error"]["code"] == "no_previous_version"


class Load:
    """Client threads posting captions continuously; every answer recorded."""

    def __init__(self, url: str, threads: int = 6):
        self.url = url
        self.stop = threading.Event()
        self.records: list[dict] = []
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, worker: int) -> None:
        n = 0
        with httpx.Client(base_url=self.url, timeout=30.0) as c:
            while not self.stop.is_set():
                n += 1
                index = (worker + n) % len(IMAGES)
                try:
                    if n % 5 == 0:  # a batch of two: both answers must come from one version
                        other = (index + 1) % len(IMAGES)
                        r = c.post("/v1/captions/batch", params=GREEDY, headers=_auth(), files=[
                            ("images", ("a.png", IMAGES[index], "image/png")),
                            ("images", ("b.png", IMAGES[other], "image/png"))])
                        indices = [index, other]
                    else:
                        r = _caption(c, index)
                        indices = [index]
                except httpx.HTTPError as exc:
                    with self.lock:
                        self.failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                with self.lock:
                    if r.status_code != 200:
                        self.failures.append(f"{r.status_code}: {r.text[:300]}")
                        continue
                    body = r.json()
                    if "results" in body:
                        texts = [item["captions"][0]["text"] for item in body["results"]]
                    else:
                        texts = [body["captions"][0]["text"]]
                    self.records.append({"t": time.perf_counter(), "header": r.headers.get("X-Model-Version"),
                                         "model": body["model"], "indices": indices, "texts": texts})

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def test_swap_under_load_and_back(server, expected):
    """Load v2 then roll back while six clients post continuously: no request fails, every answer
    names the version that wrote it (header and body agree), and its captions are that version's."""
    events: dict[str, float] = {}
    with server.client(timeout=60.0) as admin, Load(server.url) as load:
        time.sleep(1.0)
        t0 = time.perf_counter()
        r = admin.post(f"/v1/models/{NAME}/load", json={"version": V2}, headers=_auth(ADMIN))
        events["load"] = time.perf_counter()
        STATS["load_s"] = events["load"] - t0
        assert r.status_code == 200, r.text
        assert r.json() | {"checks": None, "load_seconds": None} == {
            "name": NAME, "version": V2, "previous": V1, "changed": True, "checks": None, "load_seconds": None}
        assert [c["passed"] for c in r.json()["checks"]] == [True, True, True, True]
        time.sleep(1.0)
        # refused bundles, while the load continues
        for version, check in ((CORRUPT, "sha256"), (WRONG_PARITY, "parity")):
            bad = admin.post(f"/v1/models/{NAME}/load", json={"version": version}, headers=_auth(ADMIN))
            assert bad.status_code == 422, bad.text
            error = bad.json()["error"]
            assert error["code"] == "bundle_refused" and error["details"][0]["type"] == check
            assert f"{NAME}:{V2} keeps serving" in error["message"]
            assert_no_server_paths(error)  # paths relative to the repository (issue 24)
            if check == "sha256":
                assert f"{NAME}/{CORRUPT}/encoder.onnx: sha256 mismatch" in error["message"], error
        time.sleep(0.5)
        t1 = events["rollback_sent"] = time.perf_counter()
        back = admin.post(f"/v1/models/{NAME}/rollback", headers=_auth(ADMIN))
        events["rollback"] = time.perf_counter()
        STATS["rollback_s"] = events["rollback"] - t1
        assert back.status_code == 200, back.text
        assert back.json()["version"] == V1 and back.json()["previous"] == V2
        time.sleep(1.0)

    assert not load.failures, load.failures[:5]
    records = load.records
    versions = {rec["model"]["version"] for rec in records}
    assert versions == {V1, V2}, versions
    for rec in records:
        version = rec["model"]["version"]
        assert rec["header"] == f"{NAME}:{version}"
        assert rec["texts"] == [expected[version][i] for i in rec["indices"]], rec  # no mixing
    # after each switch has answered, no new request gets the old version
    after_load = [r for r in records if events["load"] + 0.2 < r["t"] < events["rollback_sent"]]
    assert after_load and all(r["model"]["version"] == V2 for r in after_load)
    after_back = [r for r in records if r["t"] > events["rollback"] + 0.2]
    assert after_back and all(r["model"]["version"] == V1 for r in after_back)
    STATS["requests"] = len(records)
    STATS["v2_answers"] = sum(r["model"]["version"] == V2 for r in records)
    print(f"\nswap under load: {len(records)} requests ({STATS['v2_answers']:.0f} by {V2}), "
          f"{len(load.failures)} failures; load {STATS['load_s']:.2f} s, rollback {STATS['rollback_s']:.2f} s")


def test_unloaded_version_is_a_clear_404(server):
    with server.client() as c:
        r = _caption(c, 0, model=f"{NAME}:{V2}")
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "model_not_found"
        assert f"'{NAME}:{V2}' is not loaded" in r.json()["error"]["message"]
        listed = c.get("/v1/models", headers=_auth()).json()
        assert [m["version"] for m in listed["loaded"] if m["name"] == NAME] == [V1]  # V2 drained and unloaded
        assert {m["name"]: m for m in listed["repository"]}[NAME]["previous"] == []


def test_bundle_without_reference_loads_with_parity_skipped(server):
    with server.client(timeout=60.0) as c:
        r = c.post(f"/v1/models/{NAME}/load", json={"version": NO_REFERENCE}, headers=_auth(ADMIN))
        assert r.status_code == 200, r.text
        assert {ch["name"]: ch["passed"] for ch in r.json()["checks"]}["parity"] is None
        same = c.post(f"/v1/models/{NAME}/load", json={"version": NO_REFERENCE}, headers=_auth(ADMIN))
        assert same.status_code == 200 and same.json()["changed"] is False
        back = c.post(f"/v1/models/{NAME}/rollback", headers=_auth(ADMIN))
        assert back.status_code == 200 and back.json()["version"] == V1


def test_metrics_by_model_and_version(server):
    with server.client() as c:
        text = c.get("/metrics", headers=_auth()).text
    for version in (V1, V2):
        assert (f'captioner_model_requests_total{{model="{NAME}",route="/v1/captions",status="200",'
                f'version="{version}"}}') in text
        assert f'captioner_model_request_duration_seconds_count{{model="{NAME}",route="/v1/captions",' \
               f'version="{version}"}}' in text
    assert f'captioner_model_loads_total{{model="{NAME}",result="refused"}} 2.0' in text
    assert f'captioner_model_loaded{{model="{NAME}",version="{V2}"}} 0.0' in text
    assert "captioner_queue_images " in text


def test_a_single_bundle_is_a_repository_of_one(start_server, tiny_bundle):
    single = start_server(tiny_bundle, log_name="single")
    with single.client() as c:
        listed = c.get("/v1/models").json()
        assert listed["default"] == "tiny-sat"
        assert [(m["name"], m["version"]) for m in listed["loaded"]] == [("tiny-sat", "0.0.1")]
        r = c.post("/v1/captions", params={"model": "tiny-sat:0.0.1"},
                   files={"image": ("a.png", IMAGES[0], "image/png")})
        assert r.status_code == 200 and r.headers["X-Model-Version"] == "tiny-sat:0.0.1"
        off = c.post("/v1/models/tiny-sat/load", json={"version": "0.0.1"})
        assert off.status_code == 403 and off.json()["error"]["code"] == "admin_disabled"
        assert "CAPTIONER_ADMIN_API_KEYS" in off.json()["error"]["message"]


def _start(settings: dict, bundle: Path) -> subprocess.CompletedProcess:
    env = service_env(bundle, port=free_port(), **settings)
    return subprocess.run([sys.executable, "-m", "app.cli", "serve"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.mark.service  # starts a subprocess
def test_repository_settings_errors_stop_start_up(tmp_path, repository, tiny_bundle):
    (tmp_path / "empty").mkdir()
    cases = [
        ({"model_repository": tmp_path / "absent"}, 2, ("CAPTIONER_MODEL_REPOSITORY", "is not a folder")),
        ({"model_repository": tmp_path / "empty"}, 2, ("CAPTIONER_MODEL_REPOSITORY", "holds no bundle")),
        ({"model_repository": repository, "default_model": "nope"}, 2, ("CAPTIONER_DEFAULT_MODEL", "'nope'")),
        ({"default_model": NAME}, 2, ("CAPTIONER_DEFAULT_MODEL", "needs CAPTIONER_MODEL_REPOSITORY")),
        # the newest version of `tiny` has a flipped byte: start-up refuses it
        ({"model_repository": repository}, 3, ("cannot start", "encoder.onnx", "sha256 mismatch")),
    ]
    for settings, status, expect in cases:
        result = _start(settings, tiny_bundle)
        output = result.stdout + result.stderr
        assert result.returncode == status, (settings, output)
        assert "Traceback" not in output, output
        assert any(all(e in line for e in expect) for line in output.splitlines()), (expect, output)
    both = service_env(tiny_bundle, port=free_port(), model_repository=repository)
    both["CAPTIONER_BUNDLE"] = str(tiny_bundle)
    result = subprocess.run([sys.executable, "-m", "app.cli", "serve"], cwd=REPO, env=both, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 2 and "not both" in result.stdout + result.stderr
