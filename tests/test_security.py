"""Security of the service, against real uvicorn processes serving a tiny bundle:

* optional API keys (app/api/auth.py): public probes and docs, 401 + `WWW-Authenticate: Bearer` for
  everything else without a valid key (the same answer whatever was wrong), answered before the body
  is read, every configured key accepted (env list and keys file), keys never logged, the bearer
  scheme in the OpenAPI only when keys are configured;
* no stack traces or source paths in error bodies or in the log for client errors;
* CORS off unless configured;
* uploads never written to disk (a 3 MB upload stays in memory: an audit hook in the server process
  records every file opened for writing, and TMPDIR stays empty);
* no outbound connections: nothing in app/ imports an HTTP client, and requests full of URLs make the
  server connect nowhere (the audit hook records `socket.connect`).
"""

from __future__ import annotations

import ast
import base64
import io
import json
import os
import socket
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from tests.support.live_server import REPO, LiveServer, image_bytes, partial_upload

KEYS = ["env-key-0123456789abcdef", "env-key-2-FEDCBA9876543210"]
FILE_KEY = "file-key-Zm9vYmFyYmF6cXV4cXV1eA"
WRONG_KEY = "env-key-0123456789abcdeX"  # one character off the first key
ALL_KEYS = [*KEYS, FILE_KEY]
PUBLIC = ["/healthz", "/readyz", "/openapi.json", "/docs", "/redoc", "/v2/health/live", "/v2/health/ready"]
LEAKS = ("Traceback", 'File "', '.py"', "site-packages", str(REPO))

# Runs inside the server process (PYTHONPATH): record files opened for writing, outbound
# connections, URL opens and subprocesses, one JSON line each, into $SERVICE_AUDIT_LOG.
AUDIT_HOOK = r'''
import json, os, sys
_path = os.environ.get("SERVICE_AUDIT_LOG")
if _path:
    _fd = os.open(_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_TMPFILE", 0)

    def _record(kind, detail):
        os.write(_fd, (json.dumps({"event": kind, "detail": repr(detail)}) + "\n").encode())

    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE)
            if writing and path is not None and path != _path and not str(path).endswith(".pyc"):
                _record("write", path)
        elif event in ("socket.connect", "urllib.Request", "subprocess.Popen", "os.system", "os.exec"):
            _record(event, args[1] if event == "socket.connect" else args[0])

    sys.addaudithook(_hook)
'''


# ---- servers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tiny_bundles) -> Path:
    return tiny_bundles(max_length=8)


@pytest.fixture(scope="module")
def keyed(bundle, start_server, tmp_path_factory):
    """API keys on: two from CAPTIONER_API_KEYS, one from CAPTIONER_API_KEYS_FILE."""
    keys_file = tmp_path_factory.mktemp("keyed") / "api-keys"
    keys_file.write_text(f"# the service's API keys, one per line\n\n{FILE_KEY}\n", encoding="utf-8")
    return start_server(bundle, log_name="keyed", api_keys=",".join(KEYS), api_keys_file=keys_file)


class Sandbox:
    def __init__(self, server: LiveServer, tmpdir: Path, audit_log: Path):
        self.server = server
        self.tmpdir = tmpdir
        self.audit_log = audit_log
        self.mark = 0

    def start_watching(self) -> None:
        self.mark = len(self.audit_log.read_bytes()) if self.audit_log.exists() else 0

    def tmp_snapshot(self) -> dict[str, tuple[int, int]]:
        return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in self.tmpdir.rglob("*")}

    def events(self) -> list[dict]:
        data = self.audit_log.read_bytes()[self.mark:] if self.audit_log.exists() else b""
        return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def sandbox(bundle, start_server, tmp_path_factory):
    """Default settings (no keys, no CORS), TMPDIR an empty folder, the audit hook loaded."""
    root = tmp_path_factory.mktemp("sandbox")
    hook_dir = root / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(AUDIT_HOOK, encoding="utf-8")
    tmpdir = root / "tmp"
    tmpdir.mkdir()
    audit_log = root / "audit.jsonl"
    with pytest.MonkeyPatch.context() as mp:  # the server inherits these (live_server copies os.environ)
        mp.setenv("PYTHONPATH", str(hook_dir) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        mp.setenv("SERVICE_AUDIT_LOG", str(audit_log))
        mp.setenv("TMPDIR", str(tmpdir))
        mp.setenv("PYTHONDONTWRITEBYTECODE", "1")
        srv = start_server(bundle, log_name="sandbox")
    assert audit_log.exists(), "the audit hook did not load in the server process"
    return Sandbox(srv, tmpdir, audit_log)


def small_png() -> bytes:
    return image_bytes(np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8), "PNG")


def caption(client: httpx.Client, data: bytes, headers: dict | None = None, **params) -> httpx.Response:
    return client.post("/v1/captions", files={"image": ("a.png", data, "image/png")},
                       params={"strategy": "greedy", **params}, headers=headers or {})


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_unauthorized(r: httpx.Response) -> dict:
    assert r.status_code == 401, (r.status_code, r.text)
    assert r.headers["www-authenticate"] == "Bearer"
    body = r.json()
    assert set(body) == {"error"}
    if r.url.path == "/v2" or r.url.path.startswith("/v2/"):  # the v2 protocol: {"error": "<code>: <message>"}
        code, _, message = body["error"].partition(": ")
        assert code == "unauthorized", body
        return {"code": code, "message": message}
    assert body["error"]["code"] == "unauthorized"
    assert body["error"]["request_id"] == r.headers["x-request-id"]
    return body["error"]


# ---- API keys -----------------------------------------------------------------------------------


def test_public_routes_need_no_key(keyed):
    with keyed.client() as c:
        for path in PUBLIC:
            r = c.get(path)
            assert r.status_code == 200, (path, r.status_code, r.text[:200])
        assert c.get("/").status_code != 401  # the demo page


def _protected_operations(spec: dict) -> list[tuple[str, str]]:
    return [(method.upper(), path) for path, item in spec["paths"].items() for method in item
            if path not in PUBLIC]


def test_every_protected_operation_needs_a_key(keyed):
    with keyed.client() as c:
        spec = c.get("/openapi.json").json()
        operations = _protected_operations(spec)
        assert {("GET", "/v1/model"), ("POST", "/v1/captions"), ("POST", "/v1/captions/batch"),
                ("GET", "/metrics")} <= set(operations)
        messages = set()
        for method, path in [*operations, ("GET", "/no/such/route"), ("DELETE", "/v1/captions")]:
            files = {"image": ("a.png", small_png(), "image/png")} if method == "POST" else None
            messages.add(assert_unauthorized(c.request(method, path, files=files))["message"])
        assert len(messages) == 1


@pytest.mark.parametrize("headers, params", [
    ({}, {}),
    (bearer(WRONG_KEY), {}),
    (bearer(KEYS[0][:-1]), {}),
    (bearer(KEYS[0] + "x"), {}),
    (bearer(KEYS[0].upper()), {}),
    ({"Authorization": KEYS[0]}, {}),
    ({"Authorization": f"Basic {base64.b64encode(f'user:{KEYS[0]}'.encode()).decode()}"}, {}),
    ({"Authorization": f"Token {KEYS[0]}"}, {}),
    ({"Authorization": "Bearer"}, {}),
    ({"Authorization": f"Bearer {KEYS[0]} {KEYS[1]}"}, {}),
    ({"X-API-Key": KEYS[0]}, {}),
    ({}, {"api_key": KEYS[0]}),
    ({}, {"access_token": KEYS[0]}),
], ids=["missing", "wrong", "truncated", "extended", "case-changed", "no-scheme", "basic", "token-scheme",
        "empty-bearer", "two-keys", "x-api-key-header", "query-api-key", "query-access-token"])
def test_wrong_or_missing_key_is_401_with_the_same_answer(keyed, headers, params):
    with keyed.client() as c:
        error = assert_unauthorized(c.get("/v1/model", headers=headers, params=params))
        assert error["message"] == assert_unauthorized(c.get("/v1/model"))["message"]
        for key in ALL_KEYS:
            assert key not in json.dumps(error)


def test_two_authorization_headers_are_refused(keyed):
    with keyed.client() as c:
        r = c.get("/v1/model", headers=[("Authorization", f"Bearer {KEYS[0]}"),
                                        ("Authorization", f"Bearer {WRONG_KEY}")])
        assert_unauthorized(r)


@pytest.mark.parametrize("key", ALL_KEYS, ids=["env-1", "env-2", "file"])
def test_every_configured_key_works(keyed, key):
    with keyed.client() as c:
        assert c.get("/v1/model", headers=bearer(key)).status_code == 200
        r = caption(c, small_png(), headers=bearer(key))
        assert r.status_code == 200, r.text
        assert r.json()["captions"][0]["text"]
        assert c.get("/metrics", headers={"Authorization": f"bearer  {key}"}).status_code == 200
        # a bad request with a good key gets its own error, not 401
        assert caption(c, b"not an image", headers=bearer(key)).status_code == 415


def test_unauthenticated_upload_is_refused_before_the_body_is_read(keyed):
    """Declare a 10 MB upload and send the headers and 64 KB only: the 401 comes without the rest of the
    body (had the server waited for it, the socket's 10 s timeout would end the read with no answer)."""
    head_text, body = partial_upload(keyed.host, keyed.port, "/v1/captions", "X-Request-ID: no-key-upload\r\n",
                                     filename="a.jpg")
    assert head_text.startswith(b"HTTP/1.1 401"), head_text[:300]
    lower = head_text.lower()
    assert b"www-authenticate: bearer" in lower and b"connection: close" in lower
    assert json.loads(body)["error"]["code"] == "unauthorized"

    # and a client that sends the whole 10 MB gets the 401 too
    with keyed.client() as c:
        r = c.post("/v1/captions", files={"image": ("big.jpg", b"\xff\xd8" + b"\x00" * (10 * 1000 * 1000))})
        assert_unauthorized(r)


def test_cors_preflight_and_401_with_keys(bundle):
    """With CORS on, a browser's preflight needs no key and a 401 carries the CORS headers."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    origin = "https://app.example.org"
    app = create_app(Settings(bundle=bundle, device="cpu", cors_origins=[origin], api_keys=KEYS))
    c = TestClient(app)  # the lifespan is not entered: nothing is loaded, auth runs first anyway
    r = c.options("/v1/captions", headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                            "Access-Control-Request-Headers": "authorization"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
    r = c.get("/v1/model", headers={"Origin": origin})
    assert_unauthorized(r)
    assert r.headers["access-control-allow-origin"] == origin


def test_metrics_public_setting(bundle):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    closed = TestClient(create_app(Settings(bundle=bundle, device="cpu", api_keys=KEYS)))
    assert_unauthorized(closed.get("/metrics"))
    opened = TestClient(create_app(Settings(bundle=bundle, device="cpu", api_keys=KEYS, metrics_public=True)))
    assert opened.get("/metrics").status_code == 200
    assert_unauthorized(opened.get("/v1/model"))
    spec = opened.get("/openapi.json").json()
    metrics_op = spec["paths"]["/metrics"]["get"]
    assert "security" not in metrics_op and "401" not in metrics_op["responses"]


def test_keys_are_compared_against_every_key(monkeypatch):
    """Constant time: every configured key is compared, whichever matches (no early exit)."""
    from app.api import auth

    calls = []
    real = auth.hmac.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    keys = auth.APIKeys(ALL_KEYS)
    for presented, expected in [(KEYS[0], True), (FILE_KEY, True), (WRONG_KEY, False), ("x", False),
                                ("y" * 1000, False)]:
        calls.clear()
        assert keys.matches(presented.encode()) is expected
        assert len(calls) == len(ALL_KEYS)
        assert set(calls) == {(32, 32)}  # digests: the key's length never reaches the comparison


def test_openapi_documents_the_bearer_scheme_only_with_keys(keyed, sandbox):
    with keyed.client() as c:
        spec = c.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["bearer"]["type"] == "http"
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for method, path in _protected_operations(spec):
        op = spec["paths"][path][method.lower()]
        assert op["security"] == [{"bearer": []}], path
        shape = "/V2Error" if path.startswith("/v2") else "/ErrorResponse"  # the v2 routes: the protocol's errors
        assert op["responses"]["401"]["content"]["application/json"]["schema"]["$ref"].endswith(shape), path
        assert "X-Request-ID" in op["responses"]["401"]["headers"]
        # a key may have a rate limit (tests/test_key_rotation.py): 429 with Retry-After and X-RateLimit-*
        assert op["responses"]["429"]["content"]["application/json"]["schema"]["$ref"].endswith(shape), path
        assert {"Retry-After", "X-RateLimit-Limit", "X-Request-ID"} <= set(op["responses"]["429"]["headers"])
    for path in ("/healthz", "/readyz"):
        assert "security" not in spec["paths"][path]["get"]
    with sandbox.server.client() as c:
        plain = c.get("/openapi.json").json()
    assert "securitySchemes" not in plain.get("components", {})
    assert not any("security" in op for item in plain["paths"].values() for op in item.values())
    assert not any("429" in op["responses"] for item in plain["paths"].values() for op in item.values())


def test_keys_never_reach_the_log(keyed):
    """Run after the requests above (file order): no key, right or wrong, in any log line."""
    with keyed.client() as c:
        c.get("/v1/model", headers=bearer(WRONG_KEY) | {"X-Request-ID": "wrong-key-log"})
        c.get("/v1/model", headers=bearer(KEYS[1]) | {"X-Request-ID": "good-key-log"})
    time.sleep(0.2)
    log = keyed.log()
    for secret in [*ALL_KEYS, WRONG_KEY, KEYS[0][:12], FILE_KEY[-12:]]:
        assert secret not in log
    assert "authorization" not in log.lower() and "bearer" not in log.lower()
    access = {e["request_id"]: e for e in map(json.loads, filter(lambda x: x.startswith("{"), log.splitlines()))
              if e.get("logger") == "captioner.access"}
    assert access["wrong-key-log"]["status"] == 401 and access["good-key-log"]["status"] == 200


# ---- no internals in errors, CORS off, no disk, no network -----------------------------------------


def _error_requests(c: httpx.Client) -> list[httpx.Response]:
    png = small_png()
    return [
        c.get("/no/such/route"),
        c.delete("/v1/captions"),
        caption(c, b"plain text, not an image"),
        caption(c, png[: len(png) // 2]),
        caption(c, png, beam_size=99),
        caption(c, png, beam_size=2, num_captions=3),
        c.post("/v1/captions", content=b"--a\r\n\r\n", headers={"Content-Type": "multipart/form-data"}),
        c.post("/v1/captions", json={"image": "x"}),
        c.post("/v1/captions", files={"image": ("big.jpg", b"\x00" * (10 * 1024 * 1024 + 70 * 1024))}),
        c.post("/v1/captions/batch", files=[("images", ("a.png", png, "image/png"))] * 17),
    ]


def test_errors_carry_no_stack_traces_or_paths(sandbox):
    with sandbox.server.client() as c:
        responses = _error_requests(c)
    statuses = [r.status_code for r in responses]
    assert statuses == [404, 405, 415, 422, 422, 422, 400, 422, 413, 422], statuses
    for r in responses:
        assert r.json()["error"]["code"]
        for leak in LEAKS:
            assert leak not in r.text, (leak, r.text)
    time.sleep(0.2)
    log = sandbox.server.log()
    for leak in LEAKS:
        assert leak not in log, (leak, log[-2000:])


def test_cors_is_off_unless_configured(sandbox):
    with sandbox.server.client() as c:
        for r in (c.get("/healthz", headers={"Origin": "https://evil.example"}),
                  c.options("/v1/captions", headers={"Origin": "https://evil.example",
                                                     "Access-Control-Request-Method": "POST"}),
                  caption(c, small_png(), headers={"Origin": "https://evil.example"})):
            assert not any(h.startswith("access-control-") for h in r.headers), dict(r.headers)


def _marked_png(marker: bytes, side: int) -> bytes:
    """A random-noise PNG (hardly compressible: about 3 * side**2 bytes) carrying `marker` in a text
    chunk and in its pixels' first row."""
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
    flat = pixels.reshape(-1)
    flat[: len(marker)] = np.frombuffer(marker, np.uint8)
    info = PngImagePlugin.PngInfo()
    info.add_text("marker", marker.decode())
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def test_uploads_are_never_written_to_disk(sandbox):
    """A 3 MB upload (past Starlette's 1 MB spooling threshold) and a 2 x 3 MB batch: the server
    process opens no file for writing, TMPDIR is unchanged, the marker is nowhere on disk or in the log.
    (Before the fix in app/api/routes/captions.py, the audit hook recorded a temporary file per upload.)"""
    marker = f"UPLOAD-MARKER-{uuid.uuid4().hex}".encode()
    data = _marked_png(marker, 1000)
    assert len(data) > 2_900_000 and marker in data
    with sandbox.server.client() as c:
        assert caption(c, small_png()).status_code == 200  # warm: lazy imports happen before watching
        sandbox.start_watching()
        before = sandbox.tmp_snapshot()
        r = caption(c, data)
        assert r.status_code == 200, r.text
        r = c.post("/v1/captions/batch", files=[("images", (f"{i}.png", data, "image/png")) for i in range(2)],
                   params={"strategy": "greedy"})
        assert r.status_code == 200 and all("captions" in x for x in r.json()["results"]), r.text
        time.sleep(0.2)
    events = sandbox.events()
    assert not [e for e in events if e["event"] == "write"], events
    # TMPDIR is as it was before the uploads. (onnxruntime's telemetry SDK writes a session-id file,
    # `.ses`, there when it is imported; nothing else is.)
    assert sandbox.tmp_snapshot() == before
    assert {p.name for p in sandbox.tmpdir.iterdir()} <= {".ses"}
    for path in sandbox.tmpdir.rglob("*"):
        assert marker not in path.read_bytes()
    assert marker.decode() not in sandbox.server.log()


_SERVICE_MODULES = """
import json, sys
from app.main import create_app
from app.settings import Settings
create_app(Settings(device="cpu"))
import app.inference.engine, app.inference.bundle
print(json.dumps(sorted(m for m in sys.modules if m == "app" or m.startswith("app."))))
"""


@pytest.mark.service  # starts a subprocess
def test_service_code_imports_no_http_client():
    """No module the HTTP service loads (app.main, the routes, the engine and what they import) can
    fetch a URL: none imports an HTTP or socket client. (CLI helpers such as the bulk client, which
    talks to a running service, are not part of the service.)"""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _SERVICE_MODULES], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert result.returncode == 0, result.stderr
    modules = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"app.main", "app.api.routes.captions", "app.inference.preprocess", "app.inference.engine",
            "app.api.auth"} <= set(modules)
    forbidden = {"urllib.request", "urllib3", "http.client", "requests", "httpx", "aiohttp", "socket",
                 "ftplib", "smtplib", "telnetlib", "xmlrpc.client", "websockets", "pycurl", "subprocess"}
    found = []
    for module in modules:
        base = REPO / Path(*module.split("."))
        path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                if any(name == f or name.startswith(f + ".") for f in forbidden):
                    found.append(f"{module}: {name}")
            if isinstance(node, ast.Attribute) and node.attr in ("urlopen", "urlretrieve"):
                found.append(f"{module}: {node.attr}")
    assert not found, found


def test_urls_in_requests_are_never_fetched(sandbox):
    """URLs in every place a client could put one: the server connects nowhere (a canary listener
    gets no connection, the audit hook records no socket.connect, urlopen or subprocess)."""
    with socket.socket() as canary:
        canary.bind(("127.0.0.1", 0))
        canary.listen(8)
        canary.settimeout(0.5)
        url = f"http://127.0.0.1:{canary.getsockname()[1]}/cat.jpg"
        svg = (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink">'
               f'<image xlink:href="{url}" width="10" height="10"/></svg>').encode()
        with sandbox.server.client() as c:
            sandbox.start_watching()
            statuses = [
                c.post("/v1/captions", data={"image": url}).status_code,
                c.post("/v1/captions", params={"url": url, "image_url": url}).status_code,
                c.post("/v1/captions", json={"image_url": url, "url": url}).status_code,
                c.post("/v1/captions", files={"image": (url, url.encode(), "text/uri-list")}).status_code,
                c.post("/v1/captions", files={"image": ("a.svg", svg, "image/svg+xml")}).status_code,
                caption(c, small_png(), headers={"Referer": url, "X-Forwarded-Host": url}).status_code,
            ]
        assert statuses == [422, 422, 422, 415, 415, 200], statuses
        with pytest.raises(TimeoutError):
            canary.accept()
    time.sleep(0.2)
    assert [e for e in sandbox.events() if e["event"] != "write"] == []
