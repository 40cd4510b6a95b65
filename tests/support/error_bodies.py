"""Error bodies must not show the server's absolute paths (issue 24): `{"error": {"code", "message",
"details"}}` may name a bundle's files relative to the model repository, never `/home/…/repo/…` or a
temporary folder of the machine.

* `server_paths(text)`: the absolute paths of this machine in `text`: the repository (`REPO`), the
  temporary folder, the home folder, and any `/`-rooted token whose first part is a top-level folder of
  this machine (`/tmp/…`, `/work/…`, `/usr/…`); a URL's path or a route (`/v1/models`) is none.
* `assert_no_server_paths(error)`: every string of an error object (message, details, …) has none.
* `check_error_response(response)`: an httpx response hook: a JSON error body (status >= 400) is read and
  checked. `LiveServer.client()` (tests/support/live_server.py) installs it, so every error body a test
  gets from a live server is scanned.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
# A `/`-rooted token that is not part of a URL, a relative path or a word ("http://h/x", "a/b", "and/or").
_ROOTED = re.compile(r"(?<![\w.:/~%-])/[^\s'\"`(),;<>\[\]{}]+")


def _top_level() -> set[str]:
    try:
        return {name for name in os.listdir("/") if name}
    except OSError:
        return set()


TOP_LEVEL = _top_level()
NEEDLES = sorted({str(REPO), os.path.realpath(REPO), tempfile.gettempdir(), os.path.realpath(tempfile.gettempdir()),
                  str(Path.home())} - {"/", ""}, key=len, reverse=True)


def server_paths(text: str) -> list[str]:
    """The absolute paths of this machine that `text` holds (empty: none)."""
    found = [needle for needle in NEEDLES if needle in text]
    for token in _ROOTED.findall(text):
        first = token.strip("/").split("/", 1)[0]
        if first in TOP_LEVEL:
            found.append(token)
    return found


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    return []


def assert_no_server_paths(error: Any, where: str = "") -> None:
    """No string of `error` (an error object, a whole body, or a text) shows a path of this machine."""
    for text in _strings(error):
        leaked = server_paths(text)
        assert not leaked, f"an error body shows the server's paths {leaked}{' (' + where + ')' if where else ''}: {text!r}"


def check_error_response(response: Any) -> None:
    """httpx response hook: a JSON error body (status >= 400) must show no path of this machine."""
    if response.status_code < 400 or "json" not in response.headers.get("content-type", ""):
        return
    response.read()
    try:
        body = response.json()
    except ValueError:
        return
    if isinstance(body, dict):
        assert_no_server_paths(body.get("error", body), f"{response.request.method} {response.request.url.path}")
