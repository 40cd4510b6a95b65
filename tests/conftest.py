"""Fixtures shared by the test modules: tiny bundles built once per session, and live servers.

* ``tiny_bundle`` / ``tiny_bundle_no_attention``: the tiny Show-Attend-Tell / Show-and-Tell bundle with
  make_tiny_bundle's defaults (model_export/tiny_bundle.py).
* ``tiny_bundles(attention=True, **options)``: any other tiny bundle (``max_length=8``, ``row_layout=True``,
  ``decoding={...}``), each set of arguments built once per session.
* ``copy_bundle(bundle, name)``: a copy in the test's tmp_path, for the tests that damage a bundle.
* ``start_server(bundle, log_name="service", **settings)``: a live server (tests/support/live_server.py)
  with these CAPTIONER_* settings, stopped after the module's last test.
* ``spec``: the OpenAPI document of the module's own ``server`` fixture.

The shared bundles are read-only by contract: a test that changes one must damage a ``copy_bundle`` copy.
Every time a shared bundle is handed out it is checked to be as it was built, so a test that broke the
contract fails the next fixture that asks for that bundle, naming it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from model_export.tiny_bundle import make_tiny_bundle
from tests.support.live_server import LiveServer, live_server


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
    """``start_server(bundle, log_name="service", **settings)``: start ``python -m app.cli serve`` over
    `bundle` with these CAPTIONER_* settings (live_server), its log at <a fresh folder>/<log_name>.log,
    and return the ready LiveServer. Every server started this way stops after the module's last test."""
    with ExitStack() as stack:

        def start(bundle: Path, log_name: str = "service", **settings: object) -> LiveServer:
            log_path = tmp_path_factory.mktemp("logs") / f"{log_name}.log"
            return stack.enter_context(live_server(bundle, log_path, **settings))

        yield start
